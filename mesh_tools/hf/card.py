"""The model card (README.md) written into every export: architecture, loops, parameters, tokens seen, how to
load it, the logits-parity check if one ran, and the full training config."""

from __future__ import annotations

import json

import yaml

from mesh_megatron.config import ModelConfig
from mesh_megatron.params import count_parameters


def _fmt(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def model_card(cfg: ModelConfig, *, run_config: dict | None, tokens_seen: int | None, step: int | None,
               tokenizer_note: str, dtype: str, parity: dict | None, source: str) -> str:
    p = count_parameters(cfg)
    native = cfg.arch == "vanilla"
    arch = {"vanilla": "vanilla (Pythia / GPT-NeoX)", "recursive": f"recursive, connection `{cfg.connection}`", "mesh": "recursive + MeSH memory buffer"}[cfg.arch]
    rows = [
        ("Architecture", arch),
        ("Hugging Face class", "`GPTNeoXForCausalLM` (native)" if native else "`MeshGPTForCausalLM` (code shipped here, `trust_remote_code=True`)"),
        ("Layout", f"`{cfg.layout}`" + ("" if native else " (prelude + core x loops + coda)")),
        ("Loops (K)", "-" if native else f"{cfg.num_loops} trained; overridable at load (`num_loops=`)"),
        ("Compute depth", str(cfg.effective_depth())),
        ("MeSH buffer slots", str(cfg.num_slots) if cfg.arch == "mesh" else "-"),
        ("Hidden / heads / FFN", f"{cfg.hidden_size} / {cfg.num_attention_heads} / {cfg.ffn_size}"),
        ("Parameters (total)", _fmt(p["total"])),
        ("Parameters (non-embedding)", _fmt(p["non_embedding"])),
        ("Router / connection parameters", _fmt(p["router"])),
        ("Vocabulary", f"{cfg.vocab_size} (padded to {cfg.padded_vocab_size})"),
        ("Training sequence length", str(cfg.seq_length)),
        ("Tokens seen", _fmt(tokens_seen) if tokens_seen is not None else "unknown"),
        ("Training step", _fmt(step) if step is not None else "unknown"),
        ("Tokenizer", tokenizer_note),
        ("Weights dtype", dtype),
        ("Exported from", f"`{source}`"),
    ]
    name = cfg.name or f"{cfg.arch}-{cfg.layout}"
    load = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        # AutoTokenizer reads config.json, whose auto_map names the shipped config class: without trust_remote_code
        # it stops at "Do you wish to run the custom code? [y/N]" (the tokenizer itself is plain tokenizer.json).
        + ("tok = AutoTokenizer.from_pretrained(path)\n" if native else "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n")
        + ("model = AutoModelForCausalLM.from_pretrained(path)\n" if native else
           "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n"
           f"# more or fewer core iterations than trained (K={cfg.num_loops}):\n"
           f"deeper = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, num_loops={cfg.num_loops + 1})\n")
        + "out = model.generate(**tok(\"The\", return_tensors=\"pt\"), max_new_tokens=20)\n"
        "print(tok.decode(out[0]))"
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mesh-megatron, " + ("gpt_neox" if native else "recursive-transformer, mesh") + "]",
        "---",
        f"# {name}",
        "",
        "Exported by `mesh-export` (mesh-megatron) from a training checkpoint.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Load",
        "",
        "```python",
        load,
        "```",
    ]
    if not native and cfg.num_loops:
        lines += ["", "Loops beyond the trained K reuse the last trained iteration's "
                  + ("routers." if cfg.arch == "mesh" else "gates." if cfg.connection == "dynamic_comb" else "connection.")]
    if parity:
        lines += ["", "## Parity check", "",
                  f"Logits of this export vs the training-side model on {parity['tokens']} tokens (fp32, CPU): "
                  f"max abs diff {parity['max_abs_diff']:.2e}."]
    plain = json.loads(json.dumps(run_config if run_config else {"model": cfg.to_dict()}, default=str))  # YAML-safe types
    cfg_text = yaml.safe_dump(plain, sort_keys=False)
    lines += ["", "## Training config", "", "```yaml", cfg_text.rstrip(), "```", ""]
    return "\n".join(lines)
