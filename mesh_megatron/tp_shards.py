"""Tensor-parallel sharding of state dicts: which dim each parameter is split on, merge and split.

Used to check / reshard checkpoints and to export one full model. The split dims are those megatron-core's
parallel layers use (ColumnParallelLinear: output dim 0; RowParallelLinear: input dim 1; VocabParallelEmbedding:
vocab dim 0); `tests/test_model.py` checks this table against the `partition_dim` attributes megatron-core sets.
"""

from __future__ import annotations

import torch

# parameter-name suffix -> split dim (None = replicated on every TP rank)
_SPLIT = {
    "embed.weight": 0,
    "attn.qkv.weight": 0,
    "attn.qkv.bias": 0,
    "attn.dense.weight": 1,
    "mlp.fc1.weight": 0,
    "mlp.fc1.bias": 0,
    "mlp.fc2.weight": 1,
    "lm_head.weight": 0,
}


def tp_partition_dim(name: str) -> int | None:
    for suffix, dim in _SPLIT.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def _tensors(sd: dict) -> dict[str, torch.Tensor]:
    # megatron-core linears add `_extra_state` entries (Transformer Engine compatibility); they hold no weights.
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


def merge_tp_state_dicts(shards: list[dict]) -> dict[str, torch.Tensor]:
    """[rank0_sd, rank1_sd, ...] -> full state dict; replicated tensors must agree across ranks."""
    shards = [_tensors(s) for s in shards]
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if list(s) != keys:
            missing = set(keys) ^ set(s)
            raise ValueError(f"TP shard {r} has different parameters from shard 0: {sorted(missing)[:5]}")
    full = {}
    for k in keys:
        dim = tp_partition_dim(k)
        if dim is None:
            ref = shards[0][k]
            for r, s in enumerate(shards[1:], 1):
                if not torch.equal(s[k], ref):
                    raise ValueError(f"replicated parameter '{k}' differs between TP rank 0 and rank {r}")
            full[k] = ref
        else:
            full[k] = torch.cat([s[k] for s in shards], dim=dim)
    return full


def split_state_dict(full: dict[str, torch.Tensor], tp_size: int, rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in _tensors(full).items():
        dim = tp_partition_dim(k)
        if dim is None:
            out[k] = v
        else:
            if v.shape[dim] % tp_size:
                raise ValueError(f"'{k}' dim {dim} of size {v.shape[dim]} does not split over {tp_size} TP ranks")
            out[k] = v.chunk(tp_size, dim=dim)[rank].clone()
    return out
