"""Training-side (MeshGPTModel) state dict + ModelConfig -> Hugging Face config dict + state dict.

Vanilla -> native `GPTNeoXForCausalLM` (Pythia layout: gpt_neox.*, embed_out.weight). Recursive / MeSH ->
`MeshGPTForCausalLM` (mesh_megatron/standalone/modeling_mesh_gpt.py, shipped in the export).

Layouts need no reshuffling: our fused QKV already is GPT-NeoX's [heads, (q, k, v), head_dim] on the output dim,
LayerNorms / linears keep their shapes, and the padded vocabulary rows stay (vocab_size = padded size, as Pythia).
`scale_embeddings` (x sqrt(d) after the lookup) has no GPTNeoX switch, so for vanilla it is folded into the input
embedding matrix: scaling each row before the gather computes the same fp32 products as scaling after it, so this
is exact (bit-identical) in fp32; in bf16/fp16 exports it rounds once more. The MeSH model keeps it as a flag,
because its buffer slot 0 must hold the scaled embedding anyway.
"""

from __future__ import annotations

import math
import re

import torch

from mesh_megatron.config import ModelConfig

# our layer sub-module names -> GPT-NeoX names
_LAYER_MAP = {
    "ln1": "input_layernorm",
    "ln2": "post_attention_layernorm",
    "attn.qkv": "attention.query_key_value",
    "attn.dense": "attention.dense",
    "mlp.fc1": "mlp.dense_h_to_4h",
    "mlp.fc2": "mlp.dense_4h_to_h",
}
_LAYER_RE = re.compile(r"^(layers|prelude|core|coda)\.(\d+)\.(ln1|ln2|attn\.qkv|attn\.dense|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")


class ConversionError(ValueError):
    """The state dict does not fit the config (missing / unexpected / mis-shaped tensors)."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a full (TP=1) MeshGPTModel of `cfg` holds, with its shape; built from the config alone."""
    d, f, v = cfg.hidden_size, cfg.ffn_size, cfg.padded_vocab_size
    layer = {
        "ln1.weight": (d,), "ln1.bias": (d,), "ln2.weight": (d,), "ln2.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,), "attn.dense.weight": (d, d), "attn.dense.bias": (d,),
        "mlp.fc1.weight": (f, d), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (d, f), "mlp.fc2.bias": (d,),
    }
    out = {"embed.weight": (v, d), "final_ln.weight": (d,), "final_ln.bias": (d,), "lm_head.weight": (v, d)}
    stacks = {"layers": cfg.num_layers} if cfg.arch == "vanilla" else {"prelude": cfg.prelude_layers, "core": cfg.core_layers, "coda": cfg.coda_layers}
    for stack, n in stacks.items():
        for i in range(n):
            out.update({f"{stack}.{i}.{k}": s for k, s in layer.items()})
    if cfg.arch == "mesh":
        for kind in ("write_routers", "read_routers"):
            for i in range(cfg.num_loops + 1):
                out[f"connection.{kind}.{i}.weight"] = (cfg.num_slots, d)
                out[f"connection.{kind}.{i}.bias"] = (cfg.num_slots,)
    elif cfg.arch == "recursive" and cfg.connection == "static_comb":
        out["connection.alpha"] = (3,)
    elif cfg.arch == "recursive" and cfg.connection == "dynamic_comb":
        for i in range(cfg.num_loops):
            out[f"connection.gates.{i}.weight"] = (3, d)
            out[f"connection.gates.{i}.bias"] = (3,)
    return out


def check_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise ConversionError naming what is missing / unexpected / mis-shaped (an incomplete or foreign checkpoint)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad = [f"{k}: {tuple(sd[k].shape)} != expected {want[k]}" for k in sorted(set(want) & set(sd)) if tuple(sd[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:4]}")
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es), e.g. {bad[:3]}")
    if problems:
        raise ConversionError(
            f"{source}: the model weights do not match its model config ({cfg.arch}, layout {cfg.layout}, hidden "
            f"{cfg.hidden_size}, padded vocab {cfg.padded_vocab_size}): " + "; ".join(problems)
            + ". The checkpoint is incomplete or was saved with a different model config."
        )
    nonfinite = [k for k in want if not torch.isfinite(sd[k]).all()]
    if nonfinite:
        raise ConversionError(f"{source}: non-finite values (NaN/inf) in {nonfinite[:4]}; the checkpoint is corrupt or the run diverged")


def _rename_layer(name: str, prefix: str) -> str | None:
    m = _LAYER_RE.match(name)
    if not m:
        return None
    stack, i, sub, kind = m.groups()
    stack = "layers" if stack == "layers" else stack
    return f"{prefix}{stack}.{i}.{_LAYER_MAP[sub]}.{kind}"


def hf_name(cfg: ModelConfig, name: str) -> str:
    """The Hugging Face name of our parameter `name` (GPTNeoX names for vanilla, MeshGPT's for looped models); the
    one table, used by the export and, inverted, by mesh-import."""
    vanilla = cfg.arch == "vanilla"
    base = "gpt_neox." if vanilla else "model."
    if name == "embed.weight":
        return base + "embed_in.weight"
    if name.startswith("final_ln."):
        return base + "final_layer_norm." + name.split(".", 1)[1]
    if name == "lm_head.weight":
        return "embed_out.weight" if vanilla else "lm_head.weight"
    if name.startswith("connection."):
        return base + name
    new = _rename_layer(name, base)
    if new is None:
        raise ConversionError(f"no Hugging Face name for parameter '{name}'")
    return new


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Rename (and for vanilla, fold sqrt(d) into the embeddings); contiguous tensors of `dtype`."""
    check_state_dict(cfg, sd)
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith("_extra_state"):
            continue
        t = t.detach().to(torch.float32)
        if name == "embed.weight" and cfg.arch == "vanilla" and cfg.scale_embeddings:
            t = t * math.sqrt(cfg.hidden_size)
        out[hf_name(cfg, name)] = t.to(dtype).contiguous()
    return out


def hf_config_dict(cfg: ModelConfig, tokenizer_ids: dict | None = None) -> dict:
    """config.json content (before transformers adds its bookkeeping)."""
    ids = tokenizer_ids or {}
    common = dict(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act="gelu",
        layer_norm_eps=cfg.layernorm_epsilon,
        max_position_embeddings=cfg.seq_length,
        initializer_range=cfg.init_std,
        use_cache=True,
        tie_word_embeddings=False,
        bos_token_id=ids.get("bos_token_id"),
        eos_token_id=ids.get("eos_token_id"),
        pad_token_id=ids.get("pad_token_id"),
    )
    if cfg.arch == "vanilla":
        return dict(
            common,
            architectures=["GPTNeoXForCausalLM"],
            model_type="gpt_neox",
            num_hidden_layers=cfg.num_layers,
            use_parallel_residual=True,
            attention_bias=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base), "partial_rotary_factor": cfg.rotary_pct},
            # the same two facts under their pre-v5 names, so older transformers read them too
            rotary_pct=cfg.rotary_pct,
            rotary_emb_base=cfg.rotary_base,
        )
    return dict(
        common,
        architectures=["MeshGPTForCausalLM"],
        model_type="mesh_gpt",
        auto_map={
            "AutoConfig": "configuration_mesh_gpt.MeshGPTConfig",
            "AutoModelForCausalLM": "modeling_mesh_gpt.MeshGPTForCausalLM",
        },
        arch=cfg.arch,
        prelude_layers=cfg.prelude_layers,
        core_layers=cfg.core_layers,
        num_loops=cfg.num_loops,
        trained_num_loops=cfg.num_loops,
        coda_layers=cfg.coda_layers,
        connection=cfg.connection,
        mesh_slots=cfg.num_slots if cfg.arch == "mesh" else None,
        rotary_pct=cfg.rotary_pct,
        rotary_emb_base=float(cfg.rotary_base),
        scale_embeddings=cfg.scale_embeddings,
    )
