"""Shared by tests/test_init.py (TP=1, in the pytest process) and tests/init_worker.py (TP=2): build each config
with a fixed seed and return this rank's initial state dict."""

from __future__ import annotations

import torch

from mesh_megatron.config import ModelConfig

SHAPE = dict(hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=250, make_vocab_size_divisible_by=64)
REC = dict(prelude_layers=1, core_layers=2, num_loops=2, coda_layers=1, **SHAPE)

CASES = {
    "vanilla": dict(arch="vanilla", num_layers=2, **SHAPE),
    "mesh_bf16": dict(arch="mesh", params_dtype="bfloat16", **REC),
    "anchor_wang": dict(arch="recursive", connection="anchor", output_layer_init="wang", **REC),
}
SEED = 4321


def initial_state(cfg_dict: dict, seed: int = SEED) -> dict[str, torch.Tensor]:
    """This rank's parameters right after MeshGPTModel() under set_seed(seed)."""
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import set_seed

    set_seed(seed)
    model = MeshGPTModel(ModelConfig.from_dict(dict(cfg_dict)))
    return {n: p.detach().clone() for n, p in model.named_parameters()}
