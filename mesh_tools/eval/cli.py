"""mesh-eval: lm-evaluation-harness and perplexity over training checkpoints, at several loop counts.

    mesh-eval --checkpoint runs/x/checkpoints --out evals/x --tasks lambada_openai piqa --num-loops 1 2 4
    mesh-eval --checkpoint runs/x/checkpoints/step_00001000 --out evals/x --include-path my_tasks --tasks my_task \
              --ppl data/valid_text_document

Writes OUT/results/step_*_K*.json (one per checkpoint and K), OUT/summary.{md,csv}, OUT/plots/<metric>.png and logs
to wandb (offline by default). A re-run evaluates only the (checkpoint, K) pairs whose result is missing or was made
with other settings. docs/eval.md has the details.

    mesh-eval --watch --checkpoint runs/x/checkpoints --out runs/x/eval --tasks piqa   # follow a running job
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mesh_megatron.config import ConfigError
from mesh_tools.eval.cache import EvalSettings
from mesh_tools.eval.runner import evaluate
from mesh_tools.hf.export import DTYPES, ExportError
from mesh_tools.hf.tokenizer import TokenizerExportError, TokenizerSource


def _limit(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0 (a count of documents, or a fraction below 1)")
    return int(v) if v >= 1 else v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mesh-eval", description="Evaluate training checkpoints (any TP / ZeRO layout) with "
                                "lm-evaluation-harness and held-out perplexity, at one or several loop counts K.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint (step_*) or a run's checkpoint root (all its complete checkpoints)")
    p.add_argument("--out", required=True, help="output directory: results/, summary.md, summary.csv, plots/ (re-runs reuse it)")
    p.add_argument("--tasks", nargs="*", default=[], help="lm-eval task or group names (e.g. lambada_openai piqa)")
    p.add_argument("--include-path", help="a directory of extra lm-eval task YAMLs (local tasks)")
    p.add_argument("--num-loops", nargs="+", type=int, help="loop counts K to evaluate recursive / MeSH models at (default: as trained)")
    p.add_argument("--exit-threshold", type=float, metavar="T", help="recursive / MeSH: per-token early exit: a token "
                   "stops looping once its state changes by less than T (relative) between loops; the results record "
                   "the average loops per token (default: off)")
    p.add_argument("--ppl", nargs="*", default=[], metavar="PREFIX", help=".bin/.idx dataset prefixes to measure perplexity on")
    p.add_argument("--ppl-tokens", type=int, default=65536, help="predicted tokens per perplexity dataset (default 65536)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=_limit, help="documents per task (a count, or a fraction below 1); for quick looks")
    p.add_argument("--max-length", type=int, help="lm-eval context length (default: the training sequence length; longer "
                   "contexts are truncated from the left)")
    p.add_argument("--tokenizer", help="tokenizer.json or SentencePiece .model (default: the training datasets' PREFIX.meta.json)")
    p.add_argument("--tokenizer-kind", choices=("hf", "sentencepiece"), help="kind of --tokenizer (default: from its extension)")
    p.add_argument("--eod-token", help="end-of-text token of --tokenizer")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype for evaluation (default float32)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--wandb", choices=("offline", "online", "disabled"), default="offline", help="wandb mode (default offline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--watch", action="store_true", help="--checkpoint is a running job's checkpoint root: evaluate each "
                   "new checkpoint as it appears, until the run's final checkpoint (step = train_iters) or --idle-timeout")
    p.add_argument("--idle-timeout", type=float, default=120.0, metavar="MIN",
                   help="--watch: stop after this many minutes without a new checkpoint (default 120)")
    p.add_argument("--poll", type=float, default=60.0, metavar="SEC", help="--watch: seconds between looks (default 60)")
    p.add_argument("--records-json", metavar="PATH", help="also write this call's result records (evaluated and "
                   "cached) to PATH as one JSON list (the trainer reads it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    # lm-eval warns at every model hand-over (an in-memory model is what mesh-eval means to pass); errors still show.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tok = TokenizerSource(kind=args.tokenizer_kind, path=Path(args.tokenizer), eod_token=args.eod_token) if args.tokenizer else None
    settings = EvalSettings(tasks=list(args.tasks), include_path=args.include_path, num_fewshot=args.num_fewshot, limit=args.limit,
                            max_length=args.max_length, ppl_prefixes=[str(p) for p in args.ppl], ppl_tokens=args.ppl_tokens,
                            dtype=args.dtype, exit_threshold=args.exit_threshold)
    try:
        if args.ppl_tokens < 1 or args.batch_size < 1 or (args.max_length is not None and args.max_length < 1):
            raise ConfigError("--ppl-tokens, --batch-size and --max-length must be >= 1")
        if args.exit_threshold is not None and not args.exit_threshold >= 0:
            raise ConfigError(f"--exit-threshold {args.exit_threshold}: must be >= 0 (0 = off)")
        if args.idle_timeout < 0 or args.poll <= 0:
            raise ConfigError("--idle-timeout must be >= 0 and --poll > 0")
        if args.watch:
            from mesh_tools.eval.watch import watch

            res = watch(args.checkpoint, args.out, settings, idle_timeout_min=args.idle_timeout, poll_s=args.poll,
                        log=lambda m: print(m, flush=True), num_loops=args.num_loops, tokenizer=tok,
                        batch_size=args.batch_size, device=args.device, wandb_mode=args.wandb,
                        progress=not args.no_progress)
            print(f"mesh-eval: --watch {res['reason']}: {len(res['evaluated'])} checkpoint(s) evaluated -> {args.out}")
            return 0
        summary = evaluate(args.checkpoint, args.out, settings, num_loops=args.num_loops, tokenizer=tok,
                           batch_size=args.batch_size, device=args.device, wandb_mode=args.wandb, progress=not args.no_progress)
    except (ConfigError, ExportError, TokenizerExportError) as e:
        print(f"mesh-eval: error: {e}", file=sys.stderr)
        return 2
    if args.records_json:
        import json

        from pretrain.checkpoint import write_atomic

        Path(args.records_json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.records_json), json.dumps(summary["records"], default=str) + "\n")
    print(f"mesh-eval: {len(summary['evaluated'])} evaluated, {len(summary['cached'])} cached -> {args.out}")
    for path in summary["tables"]:
        print(f"  table: {path}")
    print(f"  plots: {len(summary['plots'])} in {Path(args.out) / 'plots'}")
    md = summary["tables"][1].read_text() if summary["records"] else ""
    if md:
        print(md.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
