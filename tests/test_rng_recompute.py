"""Dropout RNG under tensor parallelism and activation recompute (mesh_megatron/rng.py), on the code path a GPU runs.

The model's TP-rank-specific dropout (attention heads; sequence-parallel slices) forks megatron-core's RNG tracker,
which here lives on the CPU generator as it lives on the CUDA one on a GPU. Recompute (model.recompute loop / layer)
must replay the forward's masks exactly, the tracker's streams included: losses and gradients are then *equal*
(bit for bit), not merely close, with recompute on and off.
"""

import pytest
import torch

from mesh_megatron import rng
from mesh_megatron.config import ModelConfig

TINY = dict(hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=250, make_vocab_size_divisible_by=64,
            hidden_dropout=0.1, attention_dropout=0.1)
LOOPED = dict(arch="mesh", prelude_layers=1, core_layers=2, num_loops=3, coda_layers=1, scale_embeddings=True, **TINY)


def _steps(cfg: dict, steps: int = 2) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of `steps` SGD steps (fixed batch) and the first step's gradients, dropout on."""
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import set_seed

    set_seed(5)
    model = MeshGPTModel(ModelConfig.from_dict(dict(cfg))).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 250, (2, 17), generator=torch.Generator().manual_seed(3))
    losses, grads = [], {}
    for step in range(steps):
        loss = model(ids[:, :-1], ids[:, 1:]).mean()
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.parametrize("arch, recompute", [("mesh", "loop"), ("mesh", "layer"), ("vanilla", "layer")])
def test_recompute_replays_dropout_exactly(single_process, arch, recompute):
    cfg = LOOPED if arch == "mesh" else dict(arch="vanilla", num_layers=3, **TINY)
    ref_losses, ref_grads = _steps(cfg)
    losses, grads = _steps({**cfg, "recompute": recompute})
    assert losses == ref_losses
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), n
    # and the dropout is really on: without it the losses differ
    assert _steps({**cfg, "hidden_dropout": 0.0, "attention_dropout": 0.0}, steps=1)[0][0] != ref_losses[0]


def test_attention_dropout_draws_from_the_tp_stream(single_process):
    """Attention heads are split over TP ranks: their dropout advances the TP stream, not the default generator."""
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import set_seed

    set_seed(5)
    model = MeshGPTModel(ModelConfig.from_dict({**LOOPED, "hidden_dropout": 0.0})).train()
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(3))
    default_before, tp_before = torch.get_rng_state(), rng.tracker().get_states()[rng.TP_STREAM]
    model(ids)
    assert torch.equal(torch.get_rng_state(), default_before)
    assert not torch.equal(rng.tracker().get_states()[rng.TP_STREAM], tp_before)


def test_tp_stream_differs_per_rank_default_stream_does_not(single_process):
    draws = {}
    for tp_rank in (0, 1):
        rng.seed_streams(11, tp_rank)
        with rng.fork_tp_stream():
            tp = torch.rand(8)
        draws[tp_rank] = (tp, torch.rand(8))
    assert not torch.equal(draws[0][0], draws[1][0])
    assert torch.equal(draws[0][1], draws[1][1])


def test_checkpointed_rng_state_restores_the_streams(single_process):
    from pretrain.checkpoint import rng_state, set_rng_state

    rng.seed_streams(11, 0)
    saved = rng_state()
    with rng.fork_tp_stream():
        first = torch.rand(8)
    set_rng_state(saved)
    with rng.fork_tp_stream():
        again = torch.rand(8)
    assert torch.equal(first, again)
