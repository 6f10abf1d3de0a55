"""Parameter counts and training FLOPs, from the config alone (no model is built, so 6.9B costs nothing).

Counts follow Pythia's convention (they reproduce the official totals, e.g. 162,322,944 for 160M): untied input and
output embeddings of the padded vocabulary; "non-embedding" = every transformer layer + the final LayerNorm
(+ MeSH routers), excluding both embedding matrices, as in the MeSH paper's Table 5.

FLOPs per token (training = forward + backward = 3 x forward):
    6 x (parameters applied per token, counting the core once per loop, plus the LM head)
  + 12 x L_eff x d x seq           (attention scores and weighted sum, forward + backward)
The input-embedding lookup costs no matmul FLOPs. MeSH's routers (matmuls) are counted in the applied parameters;
its buffer reads/writes (B x d elementwise ops per step) are added as 6 x 2 x B x d x (K + 1) per token.
"""

from __future__ import annotations

from mesh_megatron.config import ModelConfig


def layer_params(cfg: ModelConfig) -> int:
    d, f = cfg.hidden_size, cfg.ffn_size
    qkv = 3 * d * d + 3 * d
    dense = d * d + d
    mlp = d * f + f + f * d + d
    norms = 4 * d
    return qkv + dense + mlp + norms


def connection_params(cfg: ModelConfig, num_loops: int | None = None) -> int:
    d = cfg.hidden_size
    if cfg.arch == "mesh":
        return (cfg.num_loops + 1) * 2 * (d * cfg.num_slots + cfg.num_slots)
    if cfg.arch == "recursive" and cfg.connection == "static_comb":
        return 3
    if cfg.arch == "recursive" and cfg.connection == "dynamic_comb":
        return cfg.num_loops * (3 * d + 3)
    return 0


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    d = cfg.hidden_size
    embedding = 2 * cfg.padded_vocab_size * d  # untied input + output
    layers = cfg.unique_layers * layer_params(cfg)
    router = connection_params(cfg)
    non_embedding = layers + 2 * d + router  # + final LayerNorm
    return {
        "total": non_embedding + embedding,
        "non_embedding": non_embedding,
        "embedding": embedding,
        "layers": layers,
        "router": router,
        "per_layer": layer_params(cfg),
    }


def flops_per_token(cfg: ModelConfig, seq_length: int | None = None, num_loops: int | None = None) -> float:
    """Training (fwd + bwd) FLOPs per token at the model's compute depth."""
    d = cfg.hidden_size
    s = cfg.seq_length if seq_length is None else seq_length
    l_eff = cfg.effective_depth(num_loops)
    applied = l_eff * layer_params(cfg) + 2 * d + cfg.padded_vocab_size * d + connection_params(cfg)
    flops = 6.0 * applied + 12.0 * l_eff * d * s
    if cfg.arch == "mesh":
        k = cfg.num_loops if num_loops is None else num_loops
        flops += 6.0 * 2 * cfg.num_slots * d * (k + 1)
    return flops


def summary(cfg: ModelConfig) -> dict[str, object]:
    c = count_parameters(cfg)
    return {
        "name": cfg.name,
        "arch": cfg.arch + (f"/{cfg.connection}" if cfg.arch == "recursive" else ""),
        "layout": cfg.layout,
        **c,
        "unique_layers": cfg.unique_layers,
        "effective_depth": cfg.effective_depth(),
        "slots": cfg.num_slots if cfg.arch == "mesh" else None,
        "padded_vocab": cfg.padded_vocab_size,
        "seq_length": cfg.seq_length,
        "train_flops_per_token": flops_per_token(cfg),
    }
