"""mesh-import: a Hugging Face GPT-NeoX (Pythia) checkpoint -> a training checkpoint `mesh-pretrain --resume` continues.

    mesh-import --hf pythia-160m --config configs/pythia-160m-vanilla-pythia.yaml [--step 0] [--section.key value ...]
    mesh-import --hf pythia-160m --config configs/pythia-160m-mesh.yaml --init-recursive [--core-init average]

1. The HF directory (config.json with model_type gpt_neox; model.safetensors, sharded safetensors or
   pytorch_model.bin) is read and its weights renamed to MeshGPTModel's names: the inverse of the export's table
   (mesh_tools/hf/convert.py), so HF -> import -> export gives back the same tensors.
2. The run config (`--config`, with overrides) must describe the same function: its model section is checked
   against the HF config (width, heads, FFN, padded vocabulary, depth, rotary, LayerNorm eps, GELU, parallel
   residual); any difference is a one-line error naming the field.
3. `pretrain.initial_checkpoint` writes the checkpoint through the trainer's own save path: fp32 ZeRO-0, TP=1, a
   fresh optimizer, step 0 or `--step`. A resume in any other layout converts it automatically.
4. The HF tokenizer files are copied to `<run dir>/tokenizer/`, and `<run dir>/import.json` records the source,
   the step, the layer mapping and the tokenizer.

`--init-recursive` builds a recursive / MeSH model (the config's arch) from the vanilla source by the layer mapping
of `recursive_mapping` (docs/export.md, "Import from Hugging Face"); routers and learned connections start fresh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from mesh_megatron.config import ConfigError, ModelConfig
from mesh_tools.hf.convert import ConversionError, check_state_dict, expected_shapes, hf_name

# HF buffers that are not weights (older GPT-NeoX checkpoints save them): recomputed by both models.
_HF_BUFFERS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq", "rotary_emb.inv_freq")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")
CORE_INITS = ("block", "average")


class HFImportError(RuntimeError):
    """A user-facing import failure; the message names the file or field and the fix."""


# --- reading the HF checkpoint -----------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict:
    """config.json of a GPTNeoXForCausalLM directory (refuses anything else with one line)."""
    if not hf_dir.exists():
        raise HFImportError(f"--hf {hf_dir}: no such directory")
    if not hf_dir.is_dir():
        raise HFImportError(f"--hf {hf_dir}: not a directory (pass a Hugging Face model directory)")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFImportError(f"{path}: not found; --hf must be a Hugging Face model directory (config.json + weights)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFImportError(f"{path}: not valid JSON ({e})") from None
    kind = hf.get("model_type")
    if kind != "gpt_neox":
        arch = ", ".join(hf.get("architectures") or []) or "?"
        raise HFImportError(f"{path}: model_type {kind!r} ({arch}) is not GPT-NeoX; mesh-import reads "
                           "GPTNeoXForCausalLM (Pythia) checkpoints only")
    return hf


def _hf_rotary(hf: dict) -> tuple[float, float]:
    """(rotary pct, rotary base) under the transformers v5 name (rope_parameters) or the older ones."""
    rope = hf.get("rope_parameters") or {}
    pct = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
    base = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000)))
    return float(pct), float(base)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's weights (safetensors, sharded or not, else pytorch_model.bin), as stored."""
    from safetensors.torch import load_file

    def index_files(name: str) -> list[Path]:
        index = json.loads((hf_dir / name).read_text())
        return sorted({hf_dir / f for f in index["weight_map"].values()})

    try:
        if (hf_dir / "model.safetensors.index.json").is_file():
            files, loader = index_files("model.safetensors.index.json"), "safetensors"
        elif (hf_dir / "model.safetensors").is_file():
            files, loader = [hf_dir / "model.safetensors"], "safetensors"
        elif (hf_dir / "pytorch_model.bin.index.json").is_file():
            files, loader = index_files("pytorch_model.bin.index.json"), "torch"
        elif (hf_dir / "pytorch_model.bin").is_file():
            files, loader = [hf_dir / "pytorch_model.bin"], "torch"
        else:
            raise HFImportError(f"--hf {hf_dir}: no weights (model.safetensors, its index, or pytorch_model.bin)")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)) if loader == "safetensors" else torch.load(f, map_location="cpu", weights_only=True))
    except HFImportError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
        raise HFImportError(f"--hf {hf_dir}: cannot read its weights ({type(e).__name__}: {e})") from None
    return sd


# --- config: HF facts vs the run config ------------------------------------------------------------------------


def hf_facts(hf: dict) -> dict:
    """What the HF config fixes about the function the weights compute, in ModelConfig's terms."""
    d = hf["hidden_size"]
    pct, base = _hf_rotary(hf)
    return {
        "hidden_size": d,
        "num_attention_heads": hf["num_attention_heads"],
        "ffn size (intermediate_size)": hf.get("intermediate_size") or 4 * d,
        "padded vocab (vocab_size)": hf["vocab_size"],
        "rotary_pct": pct,
        "rotary_base": base,
        "layernorm_epsilon": float(hf.get("layer_norm_eps", 1e-5)),
    }


def _cfg_facts(cfg: ModelConfig) -> dict:
    return {
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "ffn size (intermediate_size)": cfg.ffn_size,
        "padded vocab (vocab_size)": cfg.padded_vocab_size,
        "rotary_pct": float(cfg.rotary_pct),
        "rotary_base": float(cfg.rotary_base),
        "layernorm_epsilon": float(cfg.layernorm_epsilon),
    }


def check_matches(cfg: ModelConfig, hf: dict, config_path: str, hf_path: Path, recursive: bool) -> None:
    """One-line HFImportError when the run config's model cannot hold the HF model's function."""
    where = f"{config_path}: model does not match {hf_path / 'config.json'}"
    if hf.get("hidden_act", "gelu") != "gelu":
        raise HFImportError(f"{hf_path / 'config.json'}: hidden_act {hf['hidden_act']!r}; the model uses exact (erf) "
                           "GELU, HF 'gelu', so this checkpoint cannot be imported")
    if not hf.get("use_parallel_residual", True):
        raise HFImportError(f"{hf_path / 'config.json'}: use_parallel_residual false; the model has GPT-NeoX's "
                           "parallel residual only")
    if not hf.get("attention_bias", True):
        raise HFImportError(f"{hf_path / 'config.json'}: attention_bias false; the model's attention has biases")
    want, have = hf_facts(hf), _cfg_facts(cfg)
    diff = [f"{k}: HF {want[k]!r} vs config {have[k]!r}" for k in want
            if (not math.isclose(want[k], have[k], rel_tol=1e-9) if isinstance(want[k], float) else want[k] != have[k])]
    if diff:
        raise HFImportError(f"{where} ({'; '.join(diff[:4])}); use the run config of this model size (e.g. "
                           "configs/pythia-<size>-vanilla-pythia.yaml) or fix those fields")
    n = hf["num_hidden_layers"]
    if recursive:
        if cfg.arch == "vanilla":
            raise HFImportError(f"{config_path}: --init-recursive needs a recursive or mesh model (model.arch), got "
                               "vanilla; drop --init-recursive to import as vanilla")
    elif cfg.arch != "vanilla":
        raise HFImportError(f"{config_path}: model.arch is {cfg.arch}; this checkpoint is vanilla GPT-NeoX: pass "
                           "--init-recursive to build a recursive / MeSH model from it, or use a vanilla config")
    elif cfg.num_layers != n:
        raise HFImportError(f"{where} (num_layers: HF num_hidden_layers {n} vs config {cfg.num_layers}); set "
                           f"model.num_layers {n}")


def source_config(cfg: ModelConfig, num_layers: int) -> ModelConfig:
    """The vanilla model of the HF checkpoint, in the run config's terms (its width, vocab, rotary, ...)."""
    if cfg.arch == "vanilla":
        return cfg
    return cfg.replace(arch="vanilla", num_layers=num_layers, prelude_layers=0, core_layers=0, num_loops=0,
                       coda_layers=0, connection="base", mesh_slots=None,
                       recompute="none" if cfg.recompute == "loop" else cfg.recompute)


# --- names: the inverse of the export's table ------------------------------------------------------------------


def from_hf_state_dict(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF GPT-NeoX tensors -> our vanilla state dict (fp32) for `cfg` (vanilla). With `scale_embeddings`, the
    embedding is divided by sqrt(d) (the model multiplies it back), the export's folding undone."""
    names = {hf_name(cfg, ours): ours for ours in expected_shapes(cfg)}
    hf_sd = dict(hf_sd)
    if "embed_out.weight" not in hf_sd and "gpt_neox.embed_in.weight" in hf_sd:
        hf_sd["embed_out.weight"] = hf_sd["gpt_neox.embed_in.weight"]  # tied embeddings: the head starts equal
    unexpected = sorted(k for k in hf_sd if k not in names and not k.endswith(_HF_BUFFERS))
    if unexpected:
        raise HFImportError(f"{source}: {len(unexpected)} tensor(s) GPT-NeoX does not have, e.g. {unexpected[:4]}; "
                           "not a GPTNeoXForCausalLM checkpoint")
    out = {ours: hf_sd[theirs].detach().to(torch.float32).contiguous() for theirs, ours in names.items() if theirs in hf_sd}
    if cfg.scale_embeddings and "embed.weight" in out:
        out["embed.weight"] = out["embed.weight"] / math.sqrt(cfg.hidden_size)
    try:
        check_state_dict(cfg, out, source)
    except ConversionError as e:
        raise HFImportError(str(e)) from None
    return out


# --- vanilla -> recursive / MeSH --------------------------------------------------------------------------------


def recursive_mapping(cfg: ModelConfig, num_source_layers: int, core_init: str = "block",
                      core_from: int | None = None) -> dict[str, list[int]]:
    """Which source layers initialise each layer of the recursive / MeSH model `cfg`: {"prelude.i": [l],
    "core.j": [l, ...] (averaged if several), "coda.k": [l]}.

    prelude = the first Lpre source layers; coda = the last Lcoda; core (`core_init`):
      block   -- source layers core_from .. core_from + Lcore - 1 (default core_from = Lpre: the block right after
                 the prelude)
      average -- core layer j = mean over the K blocks of the source's middle, layers Lpre + t*Lcore + j
                 (t = 0..K-1; needs Lpre + K*Lcore + Lcoda = the source depth)
    """
    n, pre, core, k, coda = num_source_layers, cfg.prelude_layers, cfg.core_layers, cfg.num_loops, cfg.coda_layers
    if pre + coda > n:
        raise HFImportError(f"model: prelude_layers {pre} + coda_layers {coda} exceed the source's {n} layers")
    out = {f"prelude.{i}": [i] for i in range(pre)}
    if core_init == "average":
        if core_from is not None:
            raise HFImportError("--core-from: only with --core-init block (average uses every block of the middle)")
        if pre + k * core + coda != n:
            raise HFImportError(f"--core-init average: needs prelude + K x core + coda = the source's {n} layers, got "
                               f"{pre} + {k} x {core} + {coda} = {pre + k * core + coda}; change the layout or use "
                               "--core-init block")
        out.update({f"core.{j}": [pre + t * core + j for t in range(k)] for j in range(core)})
    elif core_init == "block":
        start = pre if core_from is None else core_from
        if start < 0 or start + core > n:
            raise HFImportError(f"--core-from {start}: the core's {core} layers would be source layers {start}.."
                               f"{start + core - 1}, outside 0..{n - 1}")
        out.update({f"core.{j}": [start + j] for j in range(core)})
    else:
        raise HFImportError(f"--core-init {core_init}: choose one of {CORE_INITS}")
    out.update({f"coda.{i}": [n - coda + i] for i in range(coda)})
    return out


def recursive_state_dict(vanilla: dict[str, torch.Tensor], mapping: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Our recursive / MeSH state dict (no connection parameters: they start fresh) from a vanilla one."""
    out = {k: v for k, v in vanilla.items() if not k.startswith("layers.")}
    subs = sorted({k.split(".", 2)[2] for k in vanilla if k.startswith("layers.")})
    for target, sources in mapping.items():
        for sub in subs:
            stacked = torch.stack([vanilla[f"layers.{s}.{sub}"] for s in sources])
            out[f"{target}.{sub}"] = stacked.mean(dim=0) if len(sources) > 1 else stacked[0].clone()
    return out


# --- tokenizer --------------------------------------------------------------------------------------------------


def copy_tokenizer(hf_dir: Path, run_dir: Path) -> Path | None:
    """The HF tokenizer files into `<run dir>/tokenizer/` (atomically: temp dir + rename); None if there are none."""
    found = [hf_dir / f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    if not found:
        return None
    out = run_dir / "tokenizer"
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".tokenizer.partial{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in found:
            shutil.copyfile(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- the whole import --------------------------------------------------------------------------------------------


def import_hf(hf_dir: str | Path, run_cfg, *, config_path: str = "--config", step: int = 0, init_recursive: bool = False,
              core_init: str = "block", core_from: int | None = None, seed: int | None = None) -> dict:
    """Write the HF GPT-NeoX model at `hf_dir` as the first checkpoint of the run `run_cfg` (a RunConfig); returns
    a summary (checkpoint path, mapping, tokenizer, fresh parameters). Raises HFImportError / ConfigError (one line)."""
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    cfg = run_cfg.model
    check_matches(cfg, hf, config_path, hf_dir, init_recursive)
    if step < 0:
        raise HFImportError(f"--step {step}: must be >= 0")
    if (core_from is not None or core_init != "block") and not init_recursive:
        raise HFImportError("--core-from / --core-init: only with --init-recursive")
    n = hf["num_hidden_layers"]
    src_cfg = source_config(cfg, n)
    mapping = recursive_mapping(cfg, n, core_init, core_from) if init_recursive else None
    weights = from_hf_state_dict(src_cfg, read_hf_weights(hf_dir), str(hf_dir))
    if mapping is not None:
        weights = recursive_state_dict(weights, mapping)
    tok = copy_tokenizer(hf_dir, run_cfg.run_dir)

    from pretrain.initial_checkpoint import write_initial_checkpoint

    path, fresh = write_initial_checkpoint(run_cfg, weights, step=step, seed=seed, source=str(hf_dir))
    summary = {
        "checkpoint": str(path), "source": str(hf_dir.resolve()), "step": step, "arch": cfg.arch, "layout": cfg.layout,
        "layer_mapping": mapping, "core_init": core_init if init_recursive else None,
        "fresh_parameters": fresh, "seed": run_cfg.train.seed if seed is None else seed,
        "tokenizer": str(tok) if tok else None,
    }
    from pretrain.checkpoint import write_atomic

    write_atomic(run_cfg.run_dir / "import.json", json.dumps(summary, indent=2) + "\n")
    return summary


# --- CLI ------------------------------------------------------------------------------------------------------------

EPILOG = """\
overrides:
  Any run-config key can be set as --section.key value (as in mesh-pretrain), e.g. --logging.dir runs/pythia-160m-ft
  --train.train_iters 2000. The checkpoint goes to the run's checkpoint directory (checkpoint.dir, default
  <logging.dir>/checkpoints), which must not hold a checkpoint yet.

continue training (any TP size / ZeRO stage / node count; the layout is converted on resume):
  mesh-pretrain --config SAME_CONFIG [same overrides] --resume auto

layer mapping of --init-recursive (source layers 0..N-1; layout Lpre + Lcore x K + Lcoda):
  prelude i <- source layer i;  coda i <- source layer N - Lcoda + i
  core j    <- block:   source layer core_from + j (default core_from = Lpre)
               average: mean of source layers Lpre + t x Lcore + j, t = 0..K-1 (needs Lpre + K x Lcore + Lcoda = N)
  embeddings, final LayerNorm and LM head copied; MeSH routers / learned connections fresh (seeded).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-import",
        description="Import a Hugging Face GPT-NeoX (Pythia) checkpoint as the first checkpoint of a training run: "
        "fp32 weights, a fresh optimizer, step 0 (or --step), the tokenizer recorded. `mesh-pretrain --resume` "
        "continues from it in any layout.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hf", required=True, metavar="DIR",
                   help="Hugging Face model directory: config.json (model_type gpt_neox) and model.safetensors "
                   "(sharded or not) or pytorch_model.bin; its tokenizer files are copied to <run dir>/tokenizer/")
    p.add_argument("--config", required=True, metavar="RUN.yaml",
                   help="run config to continue with (data, train, parallel, checkpoint, logging); its model section "
                   "must match the HF config (e.g. configs/pythia-160m-vanilla-pythia.yaml)")
    p.add_argument("--step", type=int, default=0,
                   help="step the checkpoint is saved as (default 0): the LR schedule and the data position "
                   "(step x global batch) start there")
    p.add_argument("--init-recursive", action="store_true",
                   help="build the config's recursive / MeSH model from the vanilla source by the layer mapping "
                   "below (routers and learned connections fresh)")
    p.add_argument("--core-init", choices=CORE_INITS, default="block",
                   help="with --init-recursive: the core is one block of source layers (block, default) or the mean "
                   "of the K blocks between prelude and coda (average)")
    p.add_argument("--core-from", type=int, default=None, metavar="LAYER",
                   help="with --core-init block: first source layer of the core (default: prelude_layers)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the fresh parameters (routers, connections; default train.seed)")
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine and Apex are not installed|full scope is deprecated).*")
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    try:
        from pretrain.cli import split_overrides
        from pretrain.config import load_run_config

        if args.core_from is not None and args.core_init != "block":
            raise HFImportError("--core-from: only with --core-init block")
        run_cfg = load_run_config(args.config, split_overrides(rest))
        summary = import_hf(args.hf, run_cfg, config_path=args.config, step=args.step,
                            init_recursive=args.init_recursive, core_init=args.core_init, core_from=args.core_from,
                            seed=args.seed)
    except (HFImportError, ConfigError, ConversionError) as e:
        print(f"mesh-import: error: {e}", file=sys.stderr)
        return 2
    print(f"mesh-import: wrote {summary['arch']} model (layout {summary['layout']}) from {summary['source']} as "
          f"{summary['checkpoint']} (step {summary['step']})")
    if summary["layer_mapping"]:
        print("  layers: " + ", ".join(f"{k} <- {'+'.join(map(str, v))}" for k, v in summary["layer_mapping"].items()))
        print(f"  fresh (seed {summary['seed']}): {len(summary['fresh_parameters'])} connection parameter(s)")
    print(f"  tokenizer: {summary['tokenizer'] or 'none in --hf (pass --tokenizer to mesh-export later)'}")
    print("  continue: " + " ".join(["mesh-pretrain", "--config", args.config, *rest, "--resume", "auto"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
