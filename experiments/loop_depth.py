#!/usr/bin/env python
"""Loop depth as a dial: recursive base and MeSH trained with fixed K vs randomised K, evaluated at every
K = 1..2*K_train and with per-token early exit, on the same validation tokens.

    python experiments/loop_depth.py --seeds 1 2 --train-iters 300 --jobs 2      # CPU, tiny scale
    python experiments/loop_depth.py --dry-run                                   # list the runs, train nothing

Per (arch, training, seed) it trains with the project's trainer (experiments/small_scale.py's run machinery: a
finished run is skipped, a half-finished one resumes), then evaluates the final checkpoint in-process with the
exported standalone model (the same one mesh-eval uses): mean next-token loss on the validation documents (split
949,50,1 -> documents 0.949..0.999) at K = 1..--max-k, and with early exit (max K = --max-k) at each --thresholds
value, recording the average loops per token. Evaluations are cached per checkpoint (eval_loop_depth.json in the run
dir), so a repeated command only computes what is missing.

Writes RESULTS_DIR/loop_depth.{json,md} and RESULTS_DIR/loop_depth.png (validation loss vs average loops per token,
one curve per model, mean over seeds with the seed spread). Randomised-vs-fixed differences are paired by seed
(same seed = same data order, init stream and validation tokens) with small_scale.paired_vs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling driver

from small_scale import (REPO, ExperimentError, _job_env, _mean_std, _paired_cell, _shown, ensure_data,  # noqa: E402
                         latest_checkpoint, load_scale, paired_vs, run_and_probe, run_config, set_dotted, write_atomic)

VALID_DOCS = (0.949, 0.999)  # the validation documents under the tiny scale's split 949,50,1
EVAL_VERSION = 1  # bump when the evaluation changes, so cached evaluations are recomputed


def training_specs(k_train: int, randomised: str) -> dict[str, str]:
    """{tag: train.num_loops_train}: the paper's fixed K and one randomised distribution ({2K} -> 2*K_train)."""
    spec = randomised.replace("{2K}", str(2 * k_train)).replace("{K}", str(k_train))
    return {"fixed": "fixed", spec.replace(":", "").replace(".", "p"): spec}


def variant_cfg(cfg: dict, spec: str) -> dict:
    c = copy.deepcopy(cfg)
    c["train"]["num_loops_train"] = spec
    return c


def _loss_at(model, windows, k: int, threshold: float | None, batch_size: int) -> dict:
    """Token-mean next-token loss over `windows` at loop count k (early exit at `threshold` if given) and the
    average loops per token the model actually ran."""
    import torch

    model.config.num_loops = k  # the standalone model reads both from its config at each call (as mesh-eval does)
    model.config.exit_threshold = threshold
    model.model.reset_exit_stats()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, windows.shape[0], batch_size):
            x = windows[b: b + batch_size]
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                       reduction="sum").item()
            count += x[:, 1:].numel()
    return {"loss": total / count, "loops_per_token": model.model.average_loops_per_token, "tokens": count}


def evaluate_run(run_dir: Path, prefix: str, max_k: int, thresholds: list[float], n_windows: int,
                 batch_size: int) -> dict:
    """Loss and loops per token of a run's final checkpoint at K = 1..max_k and with early exit; cached."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ExperimentError(f"{run_dir}: no complete checkpoint to evaluate; repeat the command to resume it")
    key = {"version": EVAL_VERSION, "checkpoint": str(ckpt), "max_k": max_k, "thresholds": thresholds,
           "windows": n_windows, "doc_range": list(VALID_DOCS), "data": prefix}
    cached = run_dir / "eval_loop_depth.json"
    if cached.is_file():
        prev = json.loads(cached.read_text())
        if prev.get("key") == key:
            return prev
    from mesh_tools.hf.export import ExportError, build_hf_model, load_checkpoint
    from mesh_tools.probe.data import ProbeDataError, load_windows

    t0 = time.time()
    try:
        cfg, sd, _ = load_checkpoint(ckpt)
        model = build_hf_model(cfg, sd, "float32", source=str(ckpt))
        windows = load_windows(prefix, n_windows, cfg.seq_length, VALID_DOCS, vocab_size=cfg.padded_vocab_size)
    except (ExportError, ProbeDataError) as e:
        raise ExperimentError(str(e)) from None
    points = [{"mode": "K", "k": k, "threshold": None, **_loss_at(model, windows, k, None, batch_size)}
              for k in range(1, max_k + 1)]
    points += [{"mode": "exit", "k": max_k, "threshold": th, **_loss_at(model, windows, max_k, th, batch_size)}
               for th in thresholds]
    rec = {"key": key, "trained_num_loops": cfg.num_loops, "points": points, "seconds": round(time.time() - t0, 1)}
    write_atomic(cached, json.dumps(rec, indent=1))
    print(f"[loop_depth] evaluated {run_dir.name} in {rec['seconds']} s", flush=True)
    return rec


# --------------------------------------------------------------------------------------------------------------------
def point_label(p: dict) -> str:
    return f"K={p['k']}" if p["mode"] == "K" else f"exit {p['threshold']:g} (K≤{p['k']})"


def summarize(evals: dict, models: list[tuple[str, str]], seeds: list[int]) -> dict:
    """evals[(arch, tag, seed)] -> per model and evaluation point: mean/std over seeds of loss and loops per token,
    and per arch the paired difference (randomised - fixed) at every point."""
    labels = [point_label(p) for p in next(iter(evals.values()))["points"]]
    table = {}
    for arch, tag in models:
        rows = {}
        for i, lab in enumerate(labels):
            by_seed = {s: evals[(arch, tag, s)]["points"][i] for s in seeds if (arch, tag, s) in evals}
            losses = [p["loss"] for p in by_seed.values()]
            loops = [p["loops_per_token"] for p in by_seed.values()]
            lm, ls = _mean_std(losses)
            rows[lab] = {"loss": lm, "loss_std": ls, "loops_per_token": _mean_std(loops)[0],
                         "loops_std": _mean_std(loops)[1], "per_seed": {s: p["loss"] for s, p in by_seed.items()},
                         "loops_per_seed": {s: p["loops_per_token"] for s, p in by_seed.items()}}
        table[f"{arch}/{tag}"] = rows
    paired = {}
    archs = list(dict.fromkeys(a for a, _ in models))
    for arch in archs:
        tags = [t for a, t in models if a == arch]
        for tag in tags[1:]:
            paired[f"{arch}: {tag} - {tags[0]}"] = {
                lab: paired_vs(table[f"{arch}/{tag}"][lab]["per_seed"], table[f"{arch}/{tags[0]}"][lab]["per_seed"])
                for lab in labels}
    if len(archs) == 2:  # MeSH vs base at each training
        a, b = archs[1], archs[0]
        for tag in dict.fromkeys(t for _, t in models):
            if f"{a}/{tag}" in table and f"{b}/{tag}" in table:
                paired[f"{tag}: {a} - {b}"] = {
                    lab: paired_vs(table[f"{a}/{tag}"][lab]["per_seed"], table[f"{b}/{tag}"][lab]["per_seed"])
                    for lab in labels}
    return {"labels": labels, "models": table, "paired": paired, "seeds": seeds}


def results_markdown(summary: dict, cmdline: str, setup: str) -> str:
    labels = summary["labels"]
    out = [f"# Loop depth experiment\n\n{setup}\n\n```bash\n{cmdline}\n```\n",
           "Validation loss (mean ± std over seeds) and, in brackets, average loops per token:\n",
           "| model | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name, rows in summary["models"].items():
        out.append(f"| {name} | " + " | ".join(f"{rows[l]['loss']:.4f} ± {rows[l]['loss_std']:.4f} "
                                              f"[{rows[l]['loops_per_token']:.2f}]" for l in labels) + " |")
    out.append("\nPaired differences by seed (negative: the first model has lower loss):\n")
    out += ["| comparison | point | Δ loss |", "|---|---|---|"]
    for name, per in summary["paired"].items():
        out += [f"| {name} | {l} | {_paired_cell(per[l])} |" for l in labels]
    return "\n".join(out) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (name, rows) in enumerate(summary["models"].items()):
        color = f"C{i}"
        for mode, style, suffix in (("K=", "-o", "K=1..max"), ("exit", "--^", "early exit")):
            pts = [r for l, r in rows.items() if l.startswith(mode)]
            pts.sort(key=lambda r: r["loops_per_token"])
            ax.errorbar([r["loops_per_token"] for r in pts], [r["loss"] for r in pts],
                        xerr=[r["loops_std"] for r in pts], yerr=[r["loss_std"] for r in pts], fmt=style,
                        color=color, capsize=2, ms=4, label=f"{name}, {suffix}")
    ax.set_xlabel("average loops per token")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Loss vs loop depth ({len(summary['seeds'])} seeds, mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="tiny", help="scale config (experiments/configs/<name>.yaml or a path); "
                    "default tiny")
    ap.add_argument("--archs", nargs="+", default=["base", "mesh"], help="looped architectures from the scale's "
                    "archs: section (default: base mesh)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="training seeds (default 1 2)")
    ap.add_argument("--train-iters", type=int, default=300, help="optimizer steps per run (default 300)")
    ap.add_argument("--randomised", default="uniform:1-{2K}", help="train.num_loops_train of the randomised runs; "
                    "{2K} / {K} are replaced by 2*K_train / K_train (default uniform:1-{2K})")
    ap.add_argument("--max-k", type=int, default=None, help="evaluate K = 1..MAX_K; early exit runs up to MAX_K "
                    "(default 2*K_train)")
    ap.add_argument("--thresholds", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5],
                    help="early-exit thresholds (default 0.1 0.2 0.3 0.5)")
    ap.add_argument("--eval-windows", type=int, default=512, help="validation windows of seq_length+1 tokens "
                    "(default 512 = 65k tokens at seq 128)")
    ap.add_argument("--eval-batch-size", type=int, default=32, help="windows per forward in the evaluation")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change one scale-config entry (repeatable; VALUE is YAML), e.g. train.lr=6e-3")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (CPU: cores split between them)")
    ap.add_argument("--out", default=None, help="run directory (default runs/loop_depth/<scale>)")
    ap.add_argument("--results-dir", default=str(REPO / "docs" / "results" / "loop_depth"),
                    help="where loop_depth.{json,md,png} go (default docs/results/loop_depth)")
    ap.add_argument("--data", default=None, metavar="PREFIX", help="an existing tokenized dataset instead of the "
                    "scale's own (tiny tokenizes the shipped sample into OUT)")
    ap.add_argument("--wandb", default="disabled", choices=["disabled", "offline", "online"], help="wandb mode")
    ap.add_argument("--force", action="store_true", help="retrain runs that already finished")
    ap.add_argument("--dry-run", action="store_true", help="check configs and data, list the runs, write nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, cfg_path = load_scale(args.scale)
        cfg["train"]["train_iters"] = args.train_iters
        cfg["train"]["eval_interval"] = args.train_iters  # the trainer's own validation only at the end
        for a in args.set:
            set_dotted(cfg, a, "--set")
        bad = [a for a in args.archs if a not in cfg["archs"] or cfg["archs"][a].get("arch") == "vanilla"]
        if bad:
            raise ExperimentError(f"--archs {bad}: need looped (recursive / mesh) models from {cfg_path}'s archs")
        if args.jobs < 1 or args.eval_windows < 1:
            raise ExperimentError("--jobs and --eval-windows must be >= 1")
        k_train = {int(cfg["archs"][a]["num_loops"]) for a in args.archs}
        if len(k_train) != 1:
            raise ExperimentError(f"--archs {args.archs}: trained with different num_loops {sorted(k_train)}")
        k_train = k_train.pop()
        max_k = args.max_k or 2 * k_train
        specs = training_specs(k_train, args.randomised)
        from mesh_megatron.config import ConfigError
        from pretrain.config import build_run_config

        for tag, spec in specs.items():
            for arch in args.archs:
                try:
                    build_run_config(run_config(variant_cfg(cfg, spec), arch, 0, Path("/nonexistent"), "data/x",
                                                "disabled"), source=f"--randomised {spec}, arch {arch}")
                except ConfigError as e:
                    raise ExperimentError(str(e)) from None
        out = Path(args.out or REPO / "runs" / "loop_depth" / str(cfg.get("scale", cfg_path.stem)))
        prefix = ensure_data(cfg, out, args.data, dry_run=args.dry_run)
        models = [(arch, tag) for arch in args.archs for tag in specs]
        tasks = [(arch, tag, seed) for seed in args.seeds for arch, tag in models]
        name = {t: f"{t[0]}-{t[1]}-s{t[2]}" for t in tasks}
        if args.dry_run:
            print(f"[loop_depth] dataset: {prefix}; K_train {k_train}; trainings: {specs}", flush=True)
            print(f"[loop_depth] would train and evaluate {len(tasks)} run(s) in {out / 'runs'}: "
                  f"{', '.join(name[t] for t in tasks)}; eval at K=1..{max_k}, early exit at {args.thresholds}",
                  flush=True)
            return 0
        out.mkdir(parents=True, exist_ok=True)
        import queue
        from concurrent.futures import ThreadPoolExecutor

        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
        evals, errors, slots = {}, [], queue.Queue()
        for i in range(args.jobs):
            slots.put(i)

        def work(task):
            slot = slots.get()
            try:
                arch, tag, seed = task
                run_dir = out / "runs" / name[task]
                run_and_probe(variant_cfg(cfg, specs[tag]), arch, seed, run_dir, None, prefix, args, 1,
                              _job_env(slot, args.jobs))
                evals[task] = evaluate_run(run_dir, prefix, max_k, args.thresholds, args.eval_windows,
                                           args.eval_batch_size)
            except ExperimentError as e:
                errors.append(str(e))
            finally:
                slots.put(slot)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(work, tasks))
        if errors:
            raise ExperimentError(f"{len(errors)} of {len(tasks)} runs failed:\n" + "\n".join(errors))

        summary = summarize(evals, models, args.seeds)
        t = cfg["train"]
        setup = (f"Scale `{cfg.get('scale')}` ({_shown(cfg_path)}), {t['train_iters']} steps × {t['global_batch_size']}"
                 f" × {cfg['model']['seq_length']} tokens, seeds {args.seeds}, K_train = {k_train}; trainings: "
                 + ", ".join(f"`{tag}` = `{s}`" for tag, s in specs.items())
                 + f". Evaluated on {args.eval_windows} validation windows (documents {VALID_DOCS[0]}..{VALID_DOCS[1]}),"
                 f" early exit with K ≤ {max_k}.")
        cmdline = "python experiments/loop_depth.py " + " ".join(argv if argv is not None else sys.argv[1:])
        res_dir = Path(args.results_dir)
        result = {"setup": setup, "command": cmdline, "k_train": k_train, "max_k": max_k, "trainings": specs,
                  "thresholds": args.thresholds, **summary,
                  "runs": {name[t]: evals[t]["points"] for t in tasks}}
        write_atomic(res_dir / "loop_depth.json", json.dumps(result, indent=1, default=str))
        md = results_markdown(summary, cmdline, setup)
        write_atomic(res_dir / "loop_depth.md", md)
        plot(summary, res_dir / "loop_depth.png")
        print(md)
        print(f"[loop_depth] wrote {res_dir}/loop_depth.{{json,md,png}}", flush=True)
    except ExperimentError as e:
        print(f"loop_depth: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
