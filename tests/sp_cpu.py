"""Sequence parallelism on CPU, for the TP=2 gloo tests (tests/tp_worker.py).

megatron-core's sequence-parallel collectives (all-gather of the sequence before a column-parallel linear,
reduce-scatter after a row-parallel one, in forward and backward) run on gloo as they are: torch 2.13's gloo has
`all_gather_into_tensor` and `reduce_scatter_tensor`. What it cannot do without a GPU is allocate their outputs: it
asks `torch.cuda.current_device()` for the device. `megatron_sequence_parallel_on_cpu` answers "cpu" there, and
nothing else changes: the model, megatron-core's layers and the collectives are the ones a GPU run uses.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


@contextlib.contextmanager
def megatron_sequence_parallel_on_cpu():
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.current_device = saved


def sequence_parallel_dropout_masks(seed: int = 99) -> dict[str, torch.Tensor]:
    """The hidden-dropout masks one NeoX layer applies on this rank, with and without sequence parallelism, for the same
    local input: the attention and MLP weights are zeroed and their output biases set to 1, so the layer's output is
    x + drop(1) + drop(1) and shows the masks. Returned gathered over the TP ranks ([ranks, ...])."""
    from megatron.core import parallel_state as ps

    from mesh_megatron.config import ModelConfig
    from mesh_megatron.layers import NeoXLayer, megatron_config
    from pretrain.distributed import set_seed
    from tp_cases import TINY

    out = {}
    for sp in (False, True):
        cfg = ModelConfig.from_dict({**TINY, "arch": "vanilla", "num_layers": 1, "hidden_dropout": 0.5,
                                     "sequence_parallel": sp})
        set_seed(seed)
        layer = NeoXLayer(cfg, megatron_config(cfg, ps.get_tensor_model_parallel_world_size()),
                          ps.get_tensor_model_parallel_world_size()).train()
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.fill_(1.0 if name in ("attn.dense.bias", "mlp.fc2.bias") else 0.0)
        seq = TINY["seq_length"] // (ps.get_tensor_model_parallel_world_size() if sp else 1)
        with torch.no_grad():
            y = layer(torch.zeros(seq, 2, TINY["hidden_size"]), None)
        parts = [torch.empty_like(y) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, y.contiguous(), group=ps.get_tensor_model_parallel_group())
        out["sequence_parallel" if sp else "replicated"] = torch.stack(parts)
    return out


def all_reduces_in_one_backward(cfg_dict: dict) -> int:
    """How many all-reduce calls one backward pass of the sequence-parallel model makes (megatron-core's SP backward
    uses all-gathers and reduce-scatters; the replicated parameters' gradient sum should be the only all-reduce)."""
    from mesh_megatron.config import ModelConfig
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import set_seed
    from tp_cases import batch

    set_seed(1234)
    model = MeshGPTModel(ModelConfig.from_dict({**cfg_dict, "sequence_parallel": True}))
    x, y = batch()
    loss = model(x, y).mean()
    calls = 0
    real = dist.all_reduce

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        loss.backward()
    finally:
        dist.all_reduce = real
    return calls

