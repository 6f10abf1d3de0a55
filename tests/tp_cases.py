"""Shared by the TP=1 reference (in the pytest process) and the TP=2 workers (tests/tp_worker.py): build a model
from a config dict with a fixed seed, run a few AdamW steps on a fixed batch, and return what must agree."""

from __future__ import annotations

import torch

from mesh_megatron.config import ModelConfig

TINY = dict(hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=250, make_vocab_size_divisible_by=64)
REC = dict(prelude_layers=1, core_layers=2, num_loops=2, coda_layers=1, scale_embeddings=True, output_layer_init="scaled", **TINY)

# Every architecture the model implements.
CASES = {
    "vanilla": dict(arch="vanilla", num_layers=3, **TINY),
    **{c: dict(arch="recursive", connection=c, **REC) for c in (
        "base", "residual", "anchor", "anchor_star", "residual+anchor+anchor_star", "static_comb", "dynamic_comb")},
    "mesh": dict(arch="mesh", **REC),
}
# Sequence parallelism (tests/sp_cpu.py runs it on CPU): every connection family, the buffer, recompute of both kinds.
SP_CASES = {
    "vanilla": CASES["vanilla"], "anchor": CASES["anchor"], "dynamic_comb": CASES["dynamic_comb"], "mesh": CASES["mesh"],
    "mesh+recompute_loop": {**CASES["mesh"], "recompute": "loop"},
    "mesh+recompute_layer": {**CASES["mesh"], "recompute": "layer"},
}
STEPS = 3


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 250, (2, TINY["seq_length"] + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def run_case(cfg_dict: dict, seed: int = 1234) -> dict:
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import set_seed

    set_seed(seed)
    model = MeshGPTModel(ModelConfig.from_dict(dict(cfg_dict)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    x, y = batch()
    out = {"losses": []}
    for step in range(STEPS):
        if step == 0:
            with torch.no_grad():
                out["logits"] = model.gather_logits(model(x)).clone()
        loss = model(x, y)
        if step == 0:
            out["token_loss"] = loss.detach().clone()
        loss.mean().backward()
        if step == 0:
            out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        out["losses"].append(loss.mean().item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["replicated"] = {n: p.detach().clone() for n, p in model.replicated_parameters().items()}
    return out
