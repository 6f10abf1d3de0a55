"""mesh-export: a training checkpoint -> a Hugging Face model directory.

    mesh-export --checkpoint runs/x/checkpoints --out hf/x [--tokenizer FILE] [--dtype bfloat16] [--verify]

1. The checkpoint (any ZeRO stage, any TP size) is gathered into one full fp32 state dict by
   `pretrain.checkpoint.load_full_model_state`, with the resolved run config (model section, tokens seen).
2. Vanilla models become a native `GPTNeoXForCausalLM`; recursive and MeSH models a `MeshGPTForCausalLM` whose
   configuration and modeling files (mesh_megatron/standalone/, the training model's own MeSH and connection code
   included) are copied into the export as they are (`auto_map`, `trust_remote_code=True`).
3. The tokenizer (from --tokenizer, else the dataset's PREFIX.meta.json sidecar) becomes tokenizer.json +
   tokenizer_config.json for `AutoTokenizer`.
4. A model card (README.md) records architecture, loops, parameters, tokens seen and the training config.

Everything is written into a temporary sibling directory which is renamed onto --out only when complete (and, with
--verify, only after the export reproduced the training-side logits), so a failed or killed export never leaves a
half-written model behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mesh_megatron import standalone
from mesh_megatron.config import ConfigError, ModelConfig
from mesh_tools.hf.card import model_card
from mesh_tools.hf.convert import ConversionError, check_state_dict, hf_config_dict, to_hf_state_dict
from mesh_tools.hf.tokenizer import TokenizerExportError, TokenizerSource, detect_kind, export_tokenizer

# The model code every recursive / MeSH export ships: the training model's own pure-torch files, copied as they are.
STANDALONE_DIR = Path(standalone.__file__).parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARITY_TOL = 1e-4  # fp32 CPU logits, export vs training-side model
# Context length advertised to tools (config max_position_embeddings, tokenizer model_max_length). Rotary positions
# have no table, so nothing clamps the model to its training length; advertising only that length made lm-eval assert
# on any continuation longer than it. 2048 is lm-eval's default and Pythia's context; positions past the training
# length are extrapolation (docs/export.md, Context length).
EVAL_CONTEXT = 2048


class ExportError(RuntimeError):
    """A user-facing export failure; the message says what is wrong and how to fix it."""


# --- checkpoint input ------------------------------------------------------------------------------------------------


def load_checkpoint(ckpt_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(model config, full fp32 state dict, run config) from a training checkpoint directory."""
    path = Path(ckpt_dir)
    if not path.exists():
        raise ExportError(f"--checkpoint {path}: no such directory")
    if not path.is_dir():
        raise ExportError(f"--checkpoint {path}: not a directory (pass the checkpoint directory or the run's checkpoint root)")
    from pretrain.checkpoint import load_full_model_state

    try:
        run_cfg, sd = load_full_model_state(path)
    except ExportError:
        raise
    except (ValueError, KeyError, OSError, RuntimeError, EOFError, AssertionError) as e:
        # ConfigError is a ValueError; torch.load / safetensors raise RuntimeError / OSError on truncated files.
        raise ExportError(f"--checkpoint {path}: cannot read it as a complete training checkpoint: {e}") from None
    except Exception as e:  # noqa: BLE001 -- e.g. pickle.UnpicklingError of a corrupt shard; never a bare traceback
        raise ExportError(f"--checkpoint {path}: corrupt or unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(run_cfg, dict) or "model" not in run_cfg:
        raise ExportError(f"--checkpoint {path}: its run config has no 'model' section")
    try:
        cfg = ModelConfig.from_dict(dict(run_cfg["model"]), source=f"{path} (run config)")
    except ConfigError as e:
        raise ExportError(str(e)) from None
    return cfg, sd, run_cfg


def imported_tokenizer(run_cfg: dict | None) -> TokenizerSource | None:
    """The tokenizer mesh-import copied into the run directory (<logging.dir>/tokenizer/tokenizer.json), if any."""
    log_dir = ((run_cfg or {}).get("logging") or {}).get("dir")
    path = Path(log_dir) / "tokenizer" / "tokenizer.json" if log_dir else None
    return TokenizerSource(kind="hf", path=path) if path is not None and path.is_file() else None


def tokenizer_from_run_config(run_cfg: dict | None) -> TokenizerSource | None:
    """The tokenizer named by the first dataset's PREFIX.meta.json sidecar (written by data_tools), if any."""
    data = (run_cfg or {}).get("data") or {}
    for prefix in list(data.get("paths") or []) + list(data.get("valid_paths") or []):
        meta_path = Path(str(prefix) + ".meta.json")
        if not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{meta_path}: not valid JSON ({e}); pass --tokenizer explicitly") from None
        tok = meta.get("tokenizer", meta)
        candidates = [c for c in (tok.get("path"), tok.get("relpath") and str(meta_path.parent / tok["relpath"])) if c]
        if not candidates:
            continue  # a sidecar without a tokenizer file (e.g. synthetic test data)
        for c in candidates:
            if Path(c).is_file():
                return TokenizerSource(kind=_kind(tok.get("kind")), path=Path(c), eod_token=tok.get("eod_token"))
        raise ExportError(f"{meta_path}: names tokenizer {candidates} but the file is gone; pass --tokenizer FILE")
    return None


def _kind(kind: str | None) -> str | None:
    if kind is None:
        return None
    k = kind.lower()
    return {"hf": "hf", "huggingface": "hf", "tokenizers": "hf", "sentencepiece": "sentencepiece", "sp": "sentencepiece", "spm": "sentencepiece"}.get(k, k)


# --- writing -----------------------------------------------------------------------------------------------------------


def advertised_context(cfg: ModelConfig) -> int:
    """max_position_embeddings / model_max_length written into an export: never below EVAL_CONTEXT."""
    return max(cfg.seq_length, EVAL_CONTEXT)


def _file_mode() -> int:
    """0666 minus the umask: the mode open() gives new files (safetensors writes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_weights(sd: dict[str, torch.Tensor], out: Path, max_shard_size: str) -> int:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size)
    for filename, names in tqdm(split.filename_to_tensors.items(), desc="writing weights", unit="shard", disable=len(split.filename_to_tensors) < 2):
        save_file({n: sd[n] for n in names}, str(out / filename), metadata={"format": "pt"})
        os.chmod(out / filename, _file_mode())  # readable by others like every other file of the export
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sum(t.numel() * t.element_size() for t in sd.values())


def hf_config(cfg: ModelConfig, ids: dict | None = None, dtype: str = "float32"):
    """(transformers config object, legacy keys for config.json) of the export of `cfg`."""
    d = hf_config_dict(cfg, ids or {})
    d["max_position_embeddings"] = advertised_context(cfg)
    if cfg.arch == "vanilla":
        from transformers import GPTNeoXConfig

        legacy = {"rotary_pct": d.pop("rotary_pct"), "rotary_emb_base": d.pop("rotary_emb_base")}
        arch_list = d.pop("architectures")
        d.pop("model_type")
        hf_cfg = GPTNeoXConfig(**d)
    else:
        from mesh_megatron.standalone.configuration_mesh_gpt import MeshGPTConfig

        legacy = {}
        arch_list = d.pop("architectures")
        d.pop("model_type")
        auto_map = d.pop("auto_map")
        hf_cfg = MeshGPTConfig(**d)
        hf_cfg.auto_map = auto_map
    hf_cfg.architectures = arch_list
    hf_cfg.dtype = DTYPES[dtype]
    return hf_cfg, legacy


def build_hf_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: str = "float32", ids: dict | None = None,
                   source: str = "(in memory)"):
    """The Hugging Face model an export of (cfg, full state dict) loads as, built in memory (no files), in eval mode.

    Same config and weight conversion as `export_model`; recursive / MeSH models use the standalone classes the
    export ships (mesh_megatron.standalone), vanilla ones transformers' GPTNeoXForCausalLM.
    """
    try:
        check_state_dict(cfg, state_dict, source)
        hf_sd = to_hf_state_dict(cfg, state_dict, DTYPES[dtype])
    except ConversionError as e:
        raise ExportError(str(e)) from None
    hf_cfg, _ = hf_config(cfg, ids, dtype)
    if cfg.arch == "vanilla":
        from transformers import GPTNeoXForCausalLM as model_cls
    else:
        from mesh_megatron.standalone.modeling_mesh_gpt import MeshGPTForCausalLM as model_cls
    # from_pretrained with a state dict: the same key renames (e.g. GPTNeoX's embed_out -> lm_head) a load from files gets.
    model, info = model_cls.from_pretrained(None, config=hf_cfg, state_dict=hf_sd, dtype=DTYPES[dtype], output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ExportError(f"{source}: converted weights do not load into {model_cls.__name__}: {bad}")
    return model.eval()


def _write_config(cfg: ModelConfig, out: Path, ids: dict, dtype: str) -> None:
    from transformers import GenerationConfig

    hf_cfg, legacy = hf_config(cfg, ids, dtype)
    if cfg.arch != "vanilla":
        for name in standalone.SHIPPED_FILES:
            shutil.copyfile(STANDALONE_DIR / name, out / name)
    hf_cfg.save_pretrained(str(out))
    if legacy:  # also under the pre-v5 GPTNeoX names, so older transformers read rotary settings too
        p = out / "config.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), **legacy}, indent=2, sort_keys=True) + "\n")
    gen = GenerationConfig(bos_token_id=ids.get("bos_token_id"), eos_token_id=ids.get("eos_token_id"),
                           pad_token_id=ids.get("pad_token_id", ids.get("eos_token_id")))
    gen.save_pretrained(str(out))


def reference_logits(cfg: ModelConfig, sd: dict[str, torch.Tensor], input_ids: torch.Tensor, num_loops: int | None = None) -> torch.Tensor:
    """Full logits of the training-side MeshGPTModel (TP=1, fp32) holding `sd`."""
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import initialize_parallel

    initialize_parallel(1)
    # the eager model (model.compile off): the reference is the plain computation, and costs no compile time
    model = MeshGPTModel(cfg.replace(params_dtype="float32", sequence_parallel=False, recompute="none", hidden_dropout=0.0,
                                     attention_dropout=0.0, compile=False))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise ExportError(f"state dict does not load into MeshGPTModel: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.eval()
    with torch.no_grad():
        return model.gather_logits(model(input_ids, num_loops=num_loops)).float()


def load_export(out: Path, dtype: torch.dtype = torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=dtype, **kwargs).eval()


def verify(cfg: ModelConfig, sd: dict[str, torch.Tensor], out: Path, seq_len: int = 16, seed: int = 0) -> dict:
    """Max |logits(export) - logits(training model)| on random tokens, fp32 on CPU; raises past PARITY_TOL."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, min(seq_len, cfg.seq_length)), generator=g)
    ref = reference_logits(cfg, sd, ids)
    hf = load_export(out)
    with torch.no_grad():
        got = hf(input_ids=ids, use_cache=False).logits.float()
    diff = (got - ref).abs().max().item()
    result = {"max_abs_diff": diff, "tokens": int(ids.numel()), "tolerance": PARITY_TOL}
    if not diff <= PARITY_TOL:
        raise ExportError(f"verification failed: exported logits differ from the training-side model by {diff:.3e} (> {PARITY_TOL})")
    return result


def check_output(out: Path, force: bool, dtype: str = "float32", check: bool = False) -> None:
    """Refuse bad output settings before any (possibly long) checkpoint loading."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {list(DTYPES)}")
    if check and dtype != "float32":
        raise ExportError("--verify compares fp32 logits; use it with --dtype float32")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out}: exists and is not empty; pass --force to replace it")
    check_writable(out.parent, "--out", out)


def check_writable(parent: Path, flag: str, out: Path) -> None:
    """Refuse an output whose directory cannot be created or written, before any checkpoint is read.

    Probes by creating (and removing) a directory in the nearest existing ancestor: that also catches read-only
    file systems and root-squashed mounts, where permission bits alone say nothing.
    """
    import tempfile

    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"{flag} {out}: {ancestor} is a file, not a directory; choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe", dir=ancestor))
    except OSError as e:
        raise ExportError(f"{flag} {out}: cannot write in {ancestor} ({e.strerror or e}); choose a writable {flag}") from None


def export_model(
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    *,
    tokenizer: TokenizerSource | None,
    run_config: dict | None = None,
    dtype: str = "float32",
    force: bool = False,
    check: bool = False,
    max_shard_size: str = "5GB",
    source: str = "(in memory)",
) -> dict:
    """Write the Hugging Face export of (cfg, full TP=1 state dict) to out_dir atomically; returns a summary."""
    out = Path(out_dir)
    check_output(out, force, dtype, check)
    try:
        check_state_dict(cfg, state_dict, source)
        hf_sd = to_hf_state_dict(cfg, state_dict, DTYPES[dtype])
    except ConversionError as e:
        raise ExportError(str(e)) from None

    tmp = out.parent / f"{out.name}.partial{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:  # e.g. the disk filled or permissions changed since check_output
        raise ExportError(f"--out {out}: cannot create {tmp} ({e.strerror or e}); choose a writable --out") from None
    try:
        ids = {}
        tok_note = "none exported"
        if tokenizer is not None:
            kind = tokenizer.kind or detect_kind(tokenizer.path)
            tokenizer = TokenizerSource(kind, tokenizer.path, tokenizer.eod_token)
            ids = export_tokenizer(tokenizer, tmp, model_max_length=advertised_context(cfg))
            tok_note = f"{'SentencePiece' if kind == 'sentencepiece' else 'HF tokenizers'} `{tokenizer.path.name}` -> `tokenizer.json`"
        _write_config(cfg, tmp, ids, dtype)
        nbytes = _write_weights(hf_sd, tmp, max_shard_size)
        parity = verify(cfg, state_dict, tmp) if check else None
        state = (run_config or {}).get("trainer_state") or {}
        card = model_card(cfg, run_config={k: v for k, v in (run_config or {}).items() if k not in ("trainer_state", "checkpoint_path")} or None,
                          tokens_seen=state.get("tokens_seen"), step=state.get("step"), tokenizer_note=tok_note,
                          dtype=dtype, parity=parity, source=source)
        (tmp / "README.md").write_text(card)
        # Publish: the old export (with --force) is moved aside first and removed only after the rename succeeded.
        old = None
        if out.exists():
            old = out.parent / f"{out.name}.old{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "arch": cfg.arch, "layout": cfg.layout, "bytes": nbytes, "parity": parity, "tokenizer": tok_note}


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, *, tokenizer: TokenizerSource | None = None,
                      no_tokenizer: bool = False, **kwargs) -> dict:
    check_output(Path(out_dir), kwargs.get("force", False), kwargs.get("dtype", "float32"), kwargs.get("check", False))
    if tokenizer is not None and not tokenizer.path.is_file():
        raise ExportError(f"--tokenizer {tokenizer.path}: no such file")
    cfg, sd, run_cfg = load_checkpoint(ckpt_dir)
    if tokenizer is None and not no_tokenizer:
        tokenizer = tokenizer_from_run_config(run_cfg) or imported_tokenizer(run_cfg)
        if tokenizer is None:
            raise ExportError(
                f"--checkpoint {ckpt_dir}: no tokenizer found (its datasets have no PREFIX.meta.json sidecar); "
                "pass --tokenizer FILE (tokenizer.json or SentencePiece .model), or --no-tokenizer for weights only"
            )
    return export_model(cfg, sd, out_dir, tokenizer=tokenizer, run_config=run_cfg, source=str(run_cfg.get("checkpoint_path", ckpt_dir)), **kwargs)


# --- CLI ------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-export",
        description="Export a mesh-megatron training checkpoint (any ZeRO stage, any TP size) as a Hugging Face model: "
        "vanilla -> native GPTNeoXForCausalLM; recursive / MeSH -> MeshGPTForCausalLM with its code shipped "
        "(load with trust_remote_code=True; num_loops overridable at load).",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (step_*) or a run's checkpoint root (its latest complete checkpoint is used)")
    p.add_argument("--out", required=True, help="output directory for the Hugging Face model (written atomically)")
    p.add_argument("--tokenizer", help="tokenizer file to export: a Hugging Face tokenizer.json or a SentencePiece .model "
                   "(default: the one named by the training datasets' PREFIX.meta.json)")
    p.add_argument("--tokenizer-kind", choices=("hf", "sentencepiece"), help="kind of --tokenizer (default: from its extension)")
    p.add_argument("--eod-token", help="end-of-text token of the tokenizer (default: <|endoftext|> / the SentencePiece eos)")
    p.add_argument("--no-tokenizer", action="store_true", help="export the weights and config only")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the saved weights (default float32, as trained master weights)")
    p.add_argument("--max-shard-size", default="5GB", help="split weights into safetensors shards of at most this size (default 5GB)")
    p.add_argument("--verify", action="store_true", help=f"before publishing, check the export's logits against the training-side model (fp32, CPU; fails above {PARITY_TOL})")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tok = None
    if args.tokenizer:
        tok = TokenizerSource(kind=args.tokenizer_kind, path=Path(args.tokenizer), eod_token=args.eod_token)
    try:
        summary = export_checkpoint(args.checkpoint, args.out, tokenizer=tok, no_tokenizer=args.no_tokenizer, dtype=args.dtype,
                                    force=args.force, check=args.verify, max_shard_size=args.max_shard_size)
    except (ExportError, TokenizerExportError) as e:
        print(f"mesh-export: error: {e}", file=sys.stderr)
        return 2
    print(f"mesh-export: wrote {summary['arch']} model (layout {summary['layout']}, {summary['bytes'] / 2**20:.1f} MiB of weights) to {summary['out']}")
    print(f"  tokenizer: {summary['tokenizer']}")
    if summary["parity"]:
        print(f"  verified: max |logits diff| = {summary['parity']['max_abs_diff']:.2e} (tolerance {PARITY_TOL})")
    how = "" if summary["arch"] == "vanilla" else ", trust_remote_code=True"
    print(f"  load: AutoModelForCausalLM.from_pretrained('{summary['out']}'{how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
