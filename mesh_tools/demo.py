"""`make demo` (= `python -m mesh_tools.demo`): the whole pipeline on one CPU in a few minutes.

1. tokenize the shipped sample corpus (data/sample) with the shipped SentencePiece model into runs/demo/data,
2. train the tiny MeSH model (configs/demo.yaml) with the real trainer (DeepSpeed + megatron-core, gloo, fp32),
3. validate / test, checkpoint,
4. export to Hugging Face format (when `mesh_tools.hf.export` is installed),
and print where everything was written. Re-running resumes nothing: it starts a fresh run unless --resume auto.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "sample.jsonl.zst"
SP_MODEL = ROOT / "data" / "tokenizers" / "sample_sp8k.model"
CONFIG = ROOT / "configs" / "demo.yaml"


def tokenize(out_prefix: Path, workers: int) -> dict:
    for p in (SAMPLE, SP_MODEL):
        if not p.exists():
            sys.exit(f"demo: {p.relative_to(ROOT)} is missing; it ships with the repository (data/), check your checkout")
    from data_tools import tokenize_files

    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    return tokenize_files([str(SAMPLE)], str(out_prefix), tokenizer="sentencepiece", tokenizer_model=str(SP_MODEL), workers=workers)


def export(checkpoint: str, out_dir: Path) -> str:
    """The Hugging Face export: runs `mesh-export --checkpoint CKPT --out DIR --verify`."""
    from mesh_tools.hf.export import main as export_main

    # --force: a re-run replaces the last export; --verify: logits parity with the training-side model before publishing
    rc = export_main(["--checkpoint", checkpoint, "--out", str(out_dir), "--force", "--verify"])
    if rc not in (0, None):
        raise SystemExit(f"demo: HF export failed (exit {rc})")
    return str(out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mesh_tools.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="run directory (default runs/demo)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: train.train_iters of configs/demo.yaml, 600)")
    ap.add_argument("--workers", type=int, default=2, help="tokenizer worker processes (default 2)")
    ap.add_argument("--resume", default="none", help="'auto' continues a previous demo run from its last checkpoint")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine and Apex are not installed|full scope is deprecated).*")
    from mesh_megatron.config import ConfigError
    from pretrain.config import load_run_config

    out = Path(args.out).resolve()
    prefix = out / "data" / "sample_text_document"
    t0 = time.time()
    print(f"[demo] 1/4 tokenizing {SAMPLE.relative_to(ROOT)} with {SP_MODEL.relative_to(ROOT)} -> {prefix}", flush=True)
    summary = tokenize(prefix, args.workers)
    n_tok = summary.get("tokens", summary.get("num_tokens", "?")) if isinstance(summary, dict) else "?"
    print(f"[demo]     {n_tok} tokens in {time.time() - t0:.1f}s", flush=True)

    overrides = {"data.paths": f"[{prefix}]", "logging.dir": str(out), "checkpoint.resume": args.resume}
    if args.steps:
        overrides["train.train_iters"] = str(args.steps)
    try:
        cfg = load_run_config(CONFIG, overrides)
    except ConfigError as e:
        sys.exit(f"demo: {e}")
    if args.resume == "none":  # a fresh demo run replaces the previous one's outputs; --resume auto keeps them
        for old in (cfg.checkpoint_dir, out / "wandb"):
            shutil.rmtree(old, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)

    print(f"[demo] 2/4 training {cfg.model.name} ({cfg.model.arch}, {cfg.model.layout}) for {cfg.train.train_iters} steps on CPU",
          flush=True)
    from pretrain.distributed import destroy_parallel
    from pretrain.train import train

    try:
        result = train(cfg)
    except ConfigError as e:
        sys.exit(f"demo: {e}")
    finally:
        destroy_parallel()
    losses = result["losses"]
    first = sum(losses[:10]) / max(len(losses[:10]), 1)
    last = sum(losses[-10:]) / max(len(losses[-10:]), 1)
    valid = [e for e in result["evals"] if e["split"] == "valid"]

    print("[demo] 3/4 evaluation", flush=True)
    print(f"[demo]     train loss {first:.3f} (first 10 steps) -> {last:.3f} (last 10 steps)", flush=True)
    if valid:
        print(f"[demo]     validation loss {valid[-1]['loss']:.3f}, perplexity {valid[-1]['ppl']:.1f}", flush=True)

    hf_dir = out / "hf"
    print("[demo] 4/4 Hugging Face export", flush=True)
    exported = export(result["checkpoint"], hf_dir) if result["checkpoint"] else None
    if exported is None:
        print("[demo]     skipped: the run saved no checkpoint", flush=True)

    print(f"\n[demo] done in {time.time() - t0:.0f}s. Written:", flush=True)
    rows = [
        ("tokenized data", f"{prefix}.bin/.idx (+ .meta.json)"),
        ("resolved config", out / "run_config.yaml"),
        ("metrics (JSONL)", out / "metrics.jsonl"),
        ("wandb (offline)", out / "wandb"),
        ("checkpoint", result["checkpoint"]),
        ("HF export", exported or "-"),
    ]
    for k, v in rows:
        print(f"  {k:<16} {v}")
    if last >= first:
        print("[demo] warning: the loss did not fall; something is wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
