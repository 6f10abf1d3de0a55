"""On a GPU (`-m gpu`, run by bench/gpu_check.sh; skipped without CUDA): a model built under the CUDA device creates
every parameter on the GPU -- megatron-core allocates the shards there and mesh_megatron.weight_init draws them there
-- and the host memory of the process hardly grows (no full master weights on the host), with the intended stds."""

from __future__ import annotations

import os

import pytest
import torch

from mesh_megatron.config import ModelConfig
from mesh_megatron.layers import base_std, output_std

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Pythia-410M's shape: 405M parameters, 1.6 GB in fp32 -- a host-side build would show in the RSS.
SHAPE = dict(arch="vanilla", hidden_size=1024, num_attention_heads=16, num_layers=24, seq_length=2048,
             vocab_size=50277, make_vocab_size_divisible_by=128, params_dtype="float32")
HOST_GROWTH_LIMIT = 256 * 2**20  # far below the model's 1.6 GB; allows allocator / CUDA context noise


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_model_built_on_the_gpu_with_little_host_memory(single_process):
    from mesh_megatron.model import MeshGPTModel
    from mesh_megatron.weight_init import build_device
    from pretrain.distributed import set_seed

    device = build_device()
    assert device.type == "cuda"
    torch.zeros(1, device=device)  # the CUDA context's own host memory before the baseline
    cfg = ModelConfig.from_dict(dict(SHAPE))
    set_seed(1234)
    rss_before = _rss_bytes()
    with device:
        model = MeshGPTModel(cfg)
    torch.cuda.synchronize()
    growth = _rss_bytes() - rss_before

    params = dict(model.named_parameters())
    on_host = [n for n, p in params.items() if p.device.type != "cuda"]
    assert not on_host, on_host
    total = sum(p.numel() * p.element_size() for p in params.values())
    assert total > 1.5e9
    assert growth < HOST_GROWTH_LIMIT, f"host RSS grew by {growth / 2**20:.0f} MiB building a {total / 2**30:.1f} GiB model"

    assert params["layers.0.attn.qkv.weight"].std().item() == pytest.approx(base_std(cfg), rel=0.03)
    assert params["layers.0.mlp.fc2.weight"].std().item() == pytest.approx(output_std(cfg), rel=0.03)
    assert torch.equal(params["layers.0.mlp.fc2.bias"], torch.zeros_like(params["layers.0.mlp.fc2.bias"]))


def test_gpu_build_is_deterministic_for_a_seed(single_process):
    from mesh_megatron.model import MeshGPTModel
    from mesh_megatron.weight_init import build_device
    from pretrain.distributed import set_seed

    small = ModelConfig.from_dict(dict(SHAPE, num_layers=2, hidden_size=256, num_attention_heads=4, vocab_size=1000))
    states = []
    for _ in range(2):
        set_seed(7)
        with build_device():
            states.append({n: p.detach().clone() for n, p in MeshGPTModel(small).named_parameters()})
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])


@pytest.mark.parametrize("split_dim", [0, 1])
def test_gpu_shards_concatenate_to_the_tp1_weight(split_dim):
    """TP invariance of the draw on the CUDA generator: the shards fill_shard gives ranks 0..3 of TP=4 (drawn in
    full, sliced) concatenate to the TP=1 weight (drawn in place)."""
    from mesh_megatron.weight_init import fill_shard

    full = torch.empty(512, 256, device="cuda")
    fill_shard(full, 0.02, seed=99, split_dim=split_dim, tp_rank=0, tp_size=1)
    shape = [512, 256]
    shape[split_dim] //= 4
    shards = []
    for rank in range(4):
        shards.append(torch.empty(shape, device="cuda"))
        fill_shard(shards[-1], 0.02, seed=99, split_dim=split_dim, tp_rank=rank, tp_size=4)
    assert torch.equal(torch.cat(shards, dim=split_dim), full)
