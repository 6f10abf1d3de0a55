"""Shared by the export tests and tests/export_tp_worker.py: every architecture as a tiny config, and a full state dict
of a MeshGPTModel built from it at any TP size (seeded, so TP=1 and TP=2 hold the same full weights), with every
tensor perturbed so that trained-looking values reach all paths (static/dynamic gates start at (1, 0, 0), biases and
LayerNorms at 0 / 1)."""

from __future__ import annotations

import torch

from tp_cases import CASES as MODEL_CASES

CASES = {
    **MODEL_CASES,
    # scale_embeddings on vanilla: no GPTNeoX switch, folded into the embedding matrix by the export.
    "vanilla_scaled": {**MODEL_CASES["vanilla"], "scale_embeddings": True},
}
LOOPED = [c for c in CASES if CASES[c]["arch"] != "vanilla"]


def model_state(cfg_dict: dict, seed: int = 1234) -> dict[str, torch.Tensor]:
    """This rank's state dict (TP-local shards under TP>1) of a perturbed MeshGPTModel."""
    from mesh_megatron.config import ModelConfig
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import set_seed
    from mesh_megatron.tp_shards import tp_partition_dim

    set_seed(seed)
    model = MeshGPTModel(ModelConfig.from_dict(dict(cfg_dict)))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    # The perturbation is drawn for the FULL tensor and sliced, so it is the same at any TP size.
    from megatron.core import parallel_state

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for k in sorted(sd):
        v = sd[k]
        dim = tp_partition_dim(k)
        full_shape = list(v.shape)
        if dim is not None:
            full_shape[dim] *= tp
        noise = 0.05 * torch.randn(full_shape, generator=g)
        if dim is not None:
            noise = noise.chunk(tp, dim=dim)[rank]
        out[k] = v + noise.to(v.dtype)
    return out


def batch(vocab: int = 250, seq: int = 16, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, seq), generator=g)
