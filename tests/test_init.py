"""Model initialisation (mesh_megatron/weight_init.py): the same seed gives the bit-identical full model at TP=1 and
TP=2 (two gloo processes), without megatron-core building full master weights on the host; each weight family has
the std layers.py intends; biases are zero, LayerNorms identity; the seed (set_seed) decides the model."""

from __future__ import annotations

import pytest
import torch

from conftest import run_torchrun
from init_cases import CASES, SEED, initial_state
from mesh_megatron.config import ModelConfig
from mesh_megatron.layers import base_std, output_std
from mesh_megatron.tp_shards import merge_tp_state_dicts


@pytest.fixture(scope="module")
def tp2_states(tmp_path_factory):
    out = tmp_path_factory.mktemp("init_tp2")
    run_torchrun("init_worker.py", out, nproc=2)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_full_model_at_tp1_and_tp2(single_process, tp2_states, case):
    ref = initial_state(CASES[case])
    full = merge_tp_state_dicts([tp2_states[0][case], tp2_states[1][case]])  # also: replicated ones agree
    assert set(full) == set(ref)
    for name, value in ref.items():
        assert full[name].dtype == value.dtype, name
        assert torch.equal(full[name], value), name
    # the shards really are halves: rank 1's embedding rows are the second half of the TP=1 embedding
    half = ref["embed.weight"].shape[0] // 2
    assert torch.equal(tp2_states[1][case]["embed.weight"], ref["embed.weight"][half:])


def test_no_full_master_weight_on_the_host_at_tp2(tp2_states):
    # megatron-core's CPU init builds every parallel weight in full on every rank before slicing it
    assert tp2_states[0]["master_weights"] == [] and tp2_states[1]["master_weights"] == []


def test_seed_decides_the_model(single_process):
    a, b, c = initial_state(CASES["vanilla"]), initial_state(CASES["vanilla"]), initial_state(CASES["vanilla"], SEED + 1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["layers.0.attn.qkv.weight"], c["layers.0.attn.qkv.weight"])
    # each weight has its own stream: same-shaped weights differ
    assert not torch.equal(a["layers.0.mlp.fc1.weight"], a["layers.1.mlp.fc1.weight"])
    assert not torch.equal(a["embed.weight"], a["lm_head.weight"])


@pytest.mark.parametrize("output_init", ["scaled", "wang"])
def test_init_statistics(single_process, output_init):
    cfg = ModelConfig.from_dict(dict(
        arch="recursive", connection="anchor", hidden_size=256, num_attention_heads=4, seq_length=16, vocab_size=4096,
        make_vocab_size_divisible_by=64, prelude_layers=1, core_layers=1, num_loops=2, coda_layers=1,
        output_layer_init=output_init,
    ))
    state = initial_state(cfg.to_dict())
    intended = {"embed.weight": base_std(cfg), "lm_head.weight": base_std(cfg), "attn.qkv.weight": base_std(cfg),
                "mlp.fc1.weight": base_std(cfg), "attn.dense.weight": output_std(cfg), "mlp.fc2.weight": output_std(cfg)}
    seen = set()
    for name, p in state.items():
        family = next((f for f in intended if name == f or name.endswith("." + f)), None)
        if family is not None:
            seen.add(family)
            # >= 65k samples: the sample std is within ~0.3% of the true one; 3% leaves room for no flakes
            assert p.float().std().item() == pytest.approx(intended[family], rel=0.03), name
            assert abs(p.float().mean().item()) < 0.05 * intended[family], name
        elif name.endswith(("ln1.weight", "ln2.weight", "final_ln.weight")):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias") and not name.startswith("connection."):
            assert torch.equal(p, torch.zeros_like(p)), name  # megatron-core leaves them uninitialised now
    assert seen == set(intended)
    assert output_std(cfg) != base_std(cfg)  # the two families are told apart


def test_parallel_weights_carry_megatron_tp_attributes(single_process):
    from mesh_megatron.model import MeshGPTModel

    model = MeshGPTModel(ModelConfig.from_dict(dict(CASES["vanilla"])))
    split = {n: (p.partition_dim, p.partition_stride) for n, p in model.named_parameters()
             if getattr(p, "tensor_model_parallel", False)}
    assert split["layers.0.attn.dense.weight"] == (1, 1) and split["embed.weight"] == (0, 1)
    assert split["lm_head.weight"] == (0, 1) and "layers.0.attn.dense.bias" not in split


@pytest.mark.parametrize("split_dim", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_concatenate_to_the_tp1_weight(split_dim, dtype):
    from mesh_megatron.weight_init import fill_shard

    full = torch.empty(64, 32, dtype=dtype)
    fill_shard(full, 0.02, seed=99, split_dim=split_dim, tp_rank=0, tp_size=1)
    shape = [64, 32]
    shape[split_dim] //= 4
    shards = [torch.empty(shape, dtype=dtype) for _ in range(4)]
    for rank, shard in enumerate(shards):
        fill_shard(shard, 0.02, seed=99, split_dim=split_dim, tp_rank=rank, tp_size=4)
    assert torch.equal(torch.cat(shards, dim=split_dim), full)
