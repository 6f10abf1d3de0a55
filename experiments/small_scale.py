#!/usr/bin/env python
"""Small-scale reproduction of the MeSH paper's finding: vanilla, recursive base, anchor and MeSH (optionally the
residual heuristic) trained on the same real-text tokens with matched compute, then probed.

    python experiments/small_scale.py --scale tiny                      # CPU sanity run (~8 min on 2 cores)
    python experiments/small_scale.py --scale small --seeds 1234 5678   # one GPU (see docs/results.md)

Per run it writes a trainer run config, trains with the project's trainer (`python -m pretrain`, i.e. mesh-pretrain;
torchrun when launch.nproc_per_node > 1), resumes a half-finished run (--resume auto) and skips a finished one,
probes the final checkpoint with `mesh-probe run`, then writes OUT/results.{json,md}, OUT/loss_curves.png and
side-by-side probe figures in OUT/probe_compare/. Every output file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"scale", "data", "model", "archs", "default_archs", "seeds", "train", "parallel", "launch", "probe"}


class ExperimentError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------------------------
def load_scale(name_or_path: str) -> tuple[dict, Path]:
    p = Path(name_or_path)
    if not p.suffix:
        p = REPO / "experiments" / "configs" / f"{name_or_path}.yaml"
    if not p.is_file():
        known = sorted(q.stem for q in (REPO / "experiments" / "configs").glob("*.yaml"))
        raise ExperimentError(f"--scale {name_or_path}: no such config ({p}); known scales: {', '.join(known)}")
    cfg = yaml.safe_load(p.read_text()) or {}
    unknown = set(cfg) - SECTIONS
    if unknown:
        raise ExperimentError(f"{p}: unknown section(s) {sorted(unknown)}; valid: {sorted(SECTIONS)}")
    for key in ("data", "model", "archs", "train"):
        if key not in cfg:
            raise ExperimentError(f"{p}: missing section '{key}:'")
    return cfg, p


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _repo_path(p: str) -> str:
    return str(Path(p) if Path(p).is_absolute() else (REPO / p))


def ensure_data(cfg: dict, out: Path, override: str | None) -> str:
    """The dataset prefix: --data, or the scale's prefix under OUT, tokenized here on first use."""
    if override:
        return override
    d = cfg["data"]
    prefix = out / d["prefix"]
    if Path(str(prefix) + ".bin").is_file() and Path(str(prefix) + ".idx").is_file():
        return str(prefix)
    tok = d.get("tokenize")
    if not tok:
        raise ExperimentError(f"dataset {prefix}.bin/.idx missing and the scale config has no data.tokenize section")
    inputs = [_repo_path(i) for i in tok["inputs"]]
    missing = [i for i in inputs if not Path(i).exists()]
    if missing:
        raise ExperimentError(f"data.tokenize.inputs: {missing} not found (paths are relative to {REPO}); "
                              "or pass an already tokenized prefix with --data")
    from data_tools import tokenize_files

    print(f"[experiment] tokenizing {len(inputs)} file(s) -> {prefix}", flush=True)
    tokenize_files(inputs, str(prefix), tokenizer=tok.get("tokenizer", "hf"),
                   tokenizer_model=_repo_path(tok["tokenizer_model"]), workers=int(tok.get("workers", 1)))
    return str(prefix)


def run_config(cfg: dict, arch: str, seed: int, run_dir: Path, prefix: str, wandb: str) -> dict:
    model = {"name": f"{cfg.get('scale', 'exp')}-{arch}", **cfg["model"], **cfg["archs"][arch]}
    return {
        "model": model,
        "data": {"paths": [prefix], "split": cfg["data"].get("split", "949,50,1")},
        "train": {**cfg["train"], "seed": seed},
        "parallel": cfg.get("parallel", {}),
        # Only the final checkpoint matters here (it is probed); resume auto makes a re-run continue.
        "checkpoint": {"save_interval": 0, "keep_last": 1, "save_at_end": True, "resume": "auto"},
        "logging": {"dir": str(run_dir), "wandb": {"mode": wandb, "name": run_dir.name}},
    }


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = [p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").exists()]
    return max(ckpts, key=lambda p: int(p.name.split("_")[1])) if ckpts else None


def read_metrics(run_dir: Path) -> dict:
    """metrics.jsonl -> train curve, validation points (last record per step wins: resumed runs repeat steps)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ExperimentError(f"{path}: missing; did the training run start?")
    train, valid, test = {}, {}, {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            print(f"[experiment] warning: {path}:{i}: not JSON (a killed run's last line?); skipped", file=sys.stderr)
            continue
        if r.get("event") == "eval":
            if "valid/loss" in r:
                valid[r["step"]] = r["valid/loss"]
            if "test/loss" in r:
                test[r["step"]] = r["test/loss"]
        elif "loss" in r and "step" in r and "event" not in r:
            train[r["step"]] = (r["loss"], r.get("tokens_seen"))
    return {"train": sorted((s, l, t) for s, (l, t) in train.items()), "valid": sorted(valid.items()),
            "test": sorted(test.items())}


def train_one(run_cfg: dict, run_dir: Path, nproc: int) -> None:
    cfg_path = run_dir / "experiment_run.yaml"
    write_atomic(cfg_path, yaml.safe_dump(run_cfg, sort_keys=False))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pretrain"]
    else:
        cmd = [sys.executable, "-m", "pretrain"]
    cmd += ["--config", str(cfg_path)]
    log = run_dir / "train.log"
    print(f"[experiment] training {run_dir.name}: {' '.join(cmd)}  (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **_cpu_env()})
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise ExperimentError(f"training {run_dir.name} failed (exit {rc}); last lines of {log}:\n{tail}")
    print(f"[experiment] {run_dir.name} trained in {time.time() - t0:.0f} s", flush=True)


def probe_one(ckpt: Path, prefix: str, out_dir: Path, pcfg: dict, name: str) -> dict:
    done = out_dir / "probe.json"
    if done.is_file():  # already probed this very checkpoint: reuse (re-running the command is cheap)
        prev = json.loads(done.read_text())
        if prev.get("source", {}).get("checkpoint") == str(ckpt) and prev["data"]["num_sequences"] == pcfg.get("num_sequences", 64):
            return prev
    cmd = [sys.executable, "-m", "mesh_megatron.probe.cli", "run", "--checkpoint", str(ckpt), "--data", prefix,
           "--doc-range", str(pcfg.get("doc_range", "0:1")), "--num-sequences", str(pcfg.get("num_sequences", 64)),
           "--batch-size", str(pcfg.get("batch_size", 8)), "--name", name, "--out", str(out_dir)]
    log = out_dir.parent / f"{out_dir.name}.log"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **_cpu_env()})
    if rc != 0:
        raise ExperimentError(f"probing {ckpt} failed (exit {rc}); see {log}")
    return json.loads((out_dir / "probe.json").read_text())


def _cpu_env() -> dict:
    try:
        import torch

        return {} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}
    except ImportError:
        return {"DS_ACCELERATOR": "cpu"}


# --------------------------------------------------------------------------------------------------------------------
def model_costs(model_dict: dict) -> dict:
    from mesh_megatron.config import ModelConfig
    from mesh_megatron.params import count_parameters, flops_per_token

    mc = ModelConfig.from_dict(model_dict, "experiment model")
    n = count_parameters(mc)
    return {"layout": mc.layout, "params": n["total"], "non_embedding": n["non_embedding"],
            "flops_per_token": flops_per_token(mc), "effective_depth": mc.effective_depth()}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def summarize(cfg: dict, archs: list[str], seeds: list[int], runs: dict, probes: dict) -> dict:
    rows = []
    t = cfg["train"]
    tokens = t["train_iters"] * t["global_batch_size"] * cfg["model"]["seq_length"]
    for arch in archs:
        costs = model_costs({"name": arch, **cfg["model"], **cfg["archs"][arch]})
        finals = [runs[(arch, s)]["valid"][-1][1] for s in seeds if runs[(arch, s)]["valid"]]
        mean, std = _mean_std(finals) if finals else (float("nan"), float("nan"))
        row = {"arch": arch, **costs, "train_tokens": tokens, "train_flops": costs["flops_per_token"] * tokens,
               "seeds": seeds, "valid_loss_per_seed": finals, "valid_loss": mean, "valid_loss_std": std,
               "valid_ppl": math.exp(mean) if finals else float("nan")}
        pr = [probes[(arch, s)] for s in seeds if (arch, s) in probes]
        if pr:
            # consecutive states inside the network (not touching emb/out): h0->h1->..->hK, or L1->..->L(n-1)
            inner = [i for i, c in enumerate(pr[0]["cka_consecutive"]["rbf"]) if "emb" not in c["pair"] and "out" not in c["pair"]]
            row["probe"] = {
                "cka_rbf_between_loop_states": _mean_std([sum(p["cka_consecutive"]["rbf"][i]["mean"] for i in inner) / len(inner)
                                                          for p in pr])[0] if inner else None,
                "skew": {s["block"]: _mean_std([q["mean"] for p in pr for q in p["skew"] if q["block"] == s["block"]])[0] for s in pr[0]["skew"]},
                "effective_rank": {lab: _mean_std([p["effective_rank"][st]["mean"] for p in pr])[0]
                                   for st, lab in zip(pr[0]["states"], pr[0]["state_labels"])},
            }
        rows.append(row)
    return {"scale": cfg.get("scale"), "rows": rows}


def results_markdown(summary: dict, cfg: dict, cmdline: str) -> str:
    rows = summary["rows"]
    base = next((r["valid_loss"] for r in rows if r["arch"] == "base"), None)
    lines = [f"# Small-scale experiment: scale `{summary['scale']}`", "", f"Command: `{cmdline}`", "",
             "| model | layout | params | non-emb params | train FLOPs/token | train tokens | train FLOPs | valid loss | valid ppl | Δ loss vs base |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vl = f"{r['valid_loss']:.4f}" + (f" ± {r['valid_loss_std']:.4f}" if len(r["valid_loss_per_seed"]) > 1 else "")
        d = f"{r['valid_loss'] - base:+.4f}" if base is not None and r["arch"] != "base" else "—"
        lines.append(f"| {r['arch']} | {r['layout']} | {r['params']:,} | {r['non_embedding']:,} | {r['flops_per_token']:.3e} | "
                     f"{r['train_tokens']:,} | {r['train_flops']:.3e} | {vl} | {r['valid_ppl']:.2f} | {d} |")
    lines += ["", f"Valid loss: the trainer's final validation (mean over seeds {rows[0]['seeds']}, ± sample std when > 1 seed).", "",
              "Probe (final checkpoints; mean over seeds):", "",
              "| model | RBF CKA, consecutive inner states (h0→h1→h2; vanilla: layers) | skew per block | effective rank per state |", "|---|---:|---|---|"]
    for r in rows:
        p = r.get("probe")
        if not p:
            continue
        cka = f"{p['cka_rbf_between_loop_states']:.3f}" if p["cka_rbf_between_loop_states"] is not None else "—"
        sk = ", ".join(f"{k} {v:.3f}" for k, v in p["skew"].items())
        er = ", ".join(f"{k} {v:.1f}" for k, v in p["effective_rank"].items())
        lines.append(f"| {r['arch']} | {cka} | {sk} | {er} |")
    return "\n".join(lines) + "\n"


def plot_curves(archs, seeds, runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    tail: list[float] = []  # plotted values after the first third: sets the y range, so the early drop does not hide the gaps
    for i, arch in enumerate(archs):
        c = f"C{i}"
        for j, s in enumerate(seeds):
            m = runs[(arch, s)]
            if m["train"]:
                steps = [x[0] for x in m["train"]]
                ema, out = None, []
                for _, l, _ in m["train"]:  # EMA smoothing (0.9): single steps are noisy at tiny batch sizes
                    ema = l if ema is None else 0.9 * ema + 0.1 * l
                    out.append(ema)
                tail += out[len(out) // 3:]
                a1.plot(steps, out, color=c, lw=1.2, ls="-" if j == 0 else "--", label=arch if j == 0 else None)
            if m["valid"]:
                a2.plot([x[0] for x in m["valid"]], [x[1] for x in m["valid"]], color=c, marker="o", ms=3,
                        ls="-" if j == 0 else "--", label=arch if j == 0 else None)
    a1.set(xlabel="step", ylabel="train loss (EMA 0.9)", title="training loss")
    a2.set(xlabel="step", ylabel="validation loss", title="validation loss")
    if tail:
        a1.set_ylim(min(tail) - 0.05, max(tail) + 0.05)
    for ax in (a1, a2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if len(seeds) > 1:
        fig.suptitle(f"solid: seed {seeds[0]}; dashed: other seeds", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="tiny", help="tiny (CPU), small (one GPU), or a path to a scale YAML "
                    "(experiments/configs/*.yaml)")
    ap.add_argument("--archs", nargs="+", default=None, help="architectures from the scale's archs: section "
                    "(default: its default_archs, i.e. vanilla base anchor mesh)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds (default: the scale's seeds)")
    ap.add_argument("--out", default=None, help="output directory (default runs/small_scale/<scale>)")
    ap.add_argument("--data", default=None, help="an existing .bin/.idx prefix to train on instead of tokenizing")
    ap.add_argument("--train-iters", type=int, default=None, help="override train.train_iters (e.g. a quicker check)")
    ap.add_argument("--nproc", type=int, default=None, help="processes per run (torchrun when > 1; default launch.nproc_per_node)")
    ap.add_argument("--wandb", default="disabled", choices=["disabled", "offline", "online"], help="wandb mode for the runs")
    ap.add_argument("--force", action="store_true", help="retrain runs that already finished (deletes their run dirs)")
    ap.add_argument("--no-probe", action="store_true", help="skip the probing step")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, cfg_path = load_scale(args.scale)
        archs = args.archs or cfg.get("default_archs") or list(cfg["archs"])
        bad = [a for a in archs if a not in cfg["archs"]]
        if bad:
            raise ExperimentError(f"--archs {bad}: not in {cfg_path}'s archs: {sorted(cfg['archs'])}")
        seeds = args.seeds or cfg.get("seeds") or [1234]
        if args.train_iters:
            cfg["train"]["train_iters"] = args.train_iters
        out = Path(args.out or REPO / "runs" / "small_scale" / str(cfg.get("scale", cfg_path.stem)))
        out.mkdir(parents=True, exist_ok=True)
        nproc = args.nproc or int(cfg.get("launch", {}).get("nproc_per_node", 1))
        prefix = ensure_data(cfg, out, args.data)
        runs, probes = {}, {}
        for seed in seeds:
            for arch in archs:
                run_dir = out / "runs" / f"{arch}-s{seed}"
                done = run_dir / "experiment_done.json"
                rc = run_config(cfg, arch, seed, run_dir, prefix, args.wandb)
                if args.force and run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                if done.is_file() and json.loads(done.read_text()).get("run_config") == rc:
                    print(f"[experiment] {run_dir.name}: already trained, skipping", flush=True)
                else:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    train_one(rc, run_dir, nproc)
                    last = latest_checkpoint(run_dir)
                    if last is None or int(last.name.split("_")[1]) != rc["train"]["train_iters"]:
                        # the trainer exits 0 after a SIGTERM/SIGUSR1 stop too: that run is not finished
                        raise ExperimentError(f"{run_dir.name} stopped before step {rc['train']['train_iters']} "
                                              f"(latest checkpoint {last}); repeat the command to resume it")
                    write_atomic(done, json.dumps({"run_config": rc}, indent=1))
                runs[(arch, seed)] = read_metrics(run_dir)
                if not args.no_probe:
                    ckpt = latest_checkpoint(run_dir)
                    if ckpt is None:
                        raise ExperimentError(f"{run_dir}: no complete checkpoint to probe")
                    probes[(arch, seed)] = probe_one(ckpt, prefix, out / "probe" / f"{arch}-s{seed}", cfg.get("probe", {}), arch)
        summary = summarize(cfg, archs, seeds, runs, probes)
        summary["curves"] = {f"{a}-s{s}": runs[(a, s)] for a in archs for s in seeds}
        cmdline = "python experiments/small_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_atomic(out / "results.json", json.dumps(summary, indent=1))
        write_atomic(out / "results.md", results_markdown(summary, cfg, cmdline))
        plot_curves(archs, seeds, runs, out / "loss_curves.png")
        if probes:
            from mesh_megatron.probe.plots import plot_all

            plot_all([probes[(a, seeds[0])] for a in archs], archs, out / "probe_compare")
        print((out / "results.md").read_text())
        print(f"[experiment] wrote {out / 'results.md'}, results.json, loss_curves.png, probe_compare/*.png", flush=True)
    except ExperimentError as e:
        print(f"small_scale: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
