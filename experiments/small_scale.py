#!/usr/bin/env python
"""Small-scale reproduction of the MeSH paper's finding: vanilla, recursive base, anchor and MeSH (optionally the
residual heuristic) trained on the same real-text tokens with matched compute, then probed.

    python experiments/small_scale.py --scale tiny                      # CPU sanity run (~8 min on 2 cores)
    python experiments/small_scale.py --scale small --seeds 1234 5678   # one GPU (see docs/results.md); needs the
        # corpus data/corpus/corpus.bin/.idx (small.yaml's data.corpus; made with `mesh-data tokenize`) or --data PREFIX
    python experiments/small_scale.py --archs base mesh --sweep train.lr=1.5e-3,3e-3,6e-3 --jobs 2   # a sweep

Per run it writes a trainer run config, trains with the project's trainer (`python -m pretrain`, i.e. mesh-pretrain;
torchrun when launch.nproc_per_node > 1), resumes a half-finished run (--resume auto) and skips a finished one,
probes the final checkpoint with `mesh-probe run`, then writes OUT/results.{json,md}, OUT/loss_curves.png and
side-by-side probe figures in OUT/probe_compare/. Every output file is written atomically.

Loss differences are reported per seed against the recursive base (same seed = same data order, same init stream,
same validation tokens), i.e. as a paired comparison: mean +- std of the per-seed deltas, how many seeds the model
won, and the paired t statistic. `--set KEY=VALUE` changes one entry of the scale config (`train.lr=6e-3`,
`archs.mesh.router_init_std=0.002`); `--sweep KEY=V1,V2,..` trains the grid, one table per value. `--jobs N` runs N
trainings at once (CPU: cores split between them; GPU: one device each).
"""

from __future__ import annotations

import argparse
import functools
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


def _shown(p: str | Path) -> str:
    """A path as a command run from the current directory spells it: relative below it, absolute elsewhere."""
    p = os.path.abspath(p)
    rel = os.path.relpath(p)
    return p if rel == ".." or rel.startswith(".." + os.sep) else rel


def _dataset_exists(prefix: str | Path) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def tokenize_command(prefix: str | Path, tok: dict) -> str:
    """The mesh-data command that writes PREFIX.bin/.idx with a scale's tokenizer (its own inputs, or SHARDS...)."""
    inputs = [_shown(_repo_path(i)) for i in tok.get("inputs") or []] or ["SHARDS..."]
    model = _shown(_repo_path(str(tok["tokenizer_model"]))) if tok.get("tokenizer_model") else "TOKENIZER_MODEL"
    cmd = ["mesh-data", "tokenize", *inputs, "-o", _shown(prefix), "--tokenizer", str(tok.get("tokenizer", "hf")),
           "--tokenizer-model", model]
    if int(tok.get("workers", 1)) > 1:
        cmd += ["-j", str(int(tok["workers"]))]
    return " ".join(cmd)


def ensure_data(cfg: dict, out: Path, override: str | None, dry_run: bool = False) -> str:
    """The dataset prefix to train on: --data PREFIX; else the scale's data.corpus.prefix, an existing data_tools
    dataset (relative to the repository root; the small scale); else data.prefix under OUT, tokenized here from
    data.tokenize on first use (the tiny scale; not with dry_run). A dataset that has to exist and does not is an
    ExperimentError naming the mesh-data command that creates it, raised before anything is trained or written."""
    d = cfg["data"]
    corpus = d.get("corpus")
    if corpus is not None and not (isinstance(corpus, dict) and corpus.get("prefix")):
        raise ExperimentError(f"data.corpus: expected a mapping with prefix:, tokenizer:, tokenizer_model:; got {corpus!r}")
    if override or corpus:
        # --data is relative to the current directory; absolute, so the trainer and the prober (run in REPO) agree
        prefix = os.path.abspath(override) if override else _repo_path(corpus["prefix"])
        if not _dataset_exists(prefix):
            what = "--data" if override else "data.corpus.prefix"
            hint = tokenize_command(prefix, corpus or d.get("tokenize") or {})
            note = " (SHARDS: your Pile-format .jsonl/.jsonl.zst files)" if "SHARDS..." in hint else ""
            raise ExperimentError(f"{what} {_shown(prefix)}: no such dataset ({_shown(prefix)}.bin/.idx missing); "
                                  f"create it with: {hint}{note}" + ("" if override else "; or pass --data PREFIX"))
        return prefix
    if "prefix" not in d:
        raise ExperimentError("the scale config's data: section needs corpus.prefix (an existing dataset) or prefix: "
                              "(tokenized under --out from data.tokenize)")
    prefix = out / d["prefix"]
    if _dataset_exists(prefix):
        return str(prefix)
    tok = d.get("tokenize")
    if not tok:
        raise ExperimentError(f"dataset {prefix}.bin/.idx missing and the scale config has no data.tokenize section")
    inputs = [_repo_path(i) for i in tok["inputs"]]
    missing = [i for i in inputs if not Path(i).exists()]
    if missing:
        raise ExperimentError(f"data.tokenize.inputs: {missing} not found (paths are relative to {REPO}); "
                              "or pass an already tokenized prefix with --data")
    if dry_run:
        print(f"[experiment] would tokenize {len(inputs)} file(s) -> {prefix}", flush=True)
        return str(prefix)
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


def train_one(run_cfg: dict, run_dir: Path, nproc: int, env: dict | None = None) -> None:
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
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_child_env(env))
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise ExperimentError(f"training {run_dir.name} failed (exit {rc}); last lines of {log}:\n{tail}")
    print(f"[experiment] {run_dir.name} trained in {time.time() - t0:.0f} s", flush=True)


def probe_one(ckpt: Path, prefix: str, out_dir: Path, pcfg: dict, name: str, env: dict | None = None) -> dict:
    done = out_dir / "probe.json"
    if done.is_file():  # already probed this very checkpoint: reuse (re-running the command is cheap)
        prev = json.loads(done.read_text())
        if prev.get("source", {}).get("checkpoint") == str(ckpt) and prev["data"]["num_sequences"] == pcfg.get("num_sequences", 64):
            return prev
    cmd = [sys.executable, "-m", "mesh_tools.probe.cli", "run", "--checkpoint", str(ckpt), "--data", prefix,
           "--doc-range", str(pcfg.get("doc_range", "0:1")), "--num-sequences", str(pcfg.get("num_sequences", 64)),
           "--batch-size", str(pcfg.get("batch_size", 8)), "--name", name, "--out", str(out_dir)]
    log = out_dir.parent / f"{out_dir.name}.log"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_child_env(env))
    if rc != 0:
        raise ExperimentError(f"probing {ckpt} failed (exit {rc}); see {log}")
    return json.loads((out_dir / "probe.json").read_text())


def _child_env(env: dict | None) -> dict:
    """os.environ with the run's additions; a None value removes the variable."""
    full = {**os.environ, **(env or _cpu_env())}
    return {k: v for k, v in full.items() if v is not None}


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


def paired_vs(finals: dict[int, float], ref: dict[int, float]) -> dict | None:
    """Per-seed loss differences against a reference model trained with the same seeds (same data order, same
    validation tokens): the seed-to-seed spread that both models share cancels, which unpaired means cannot do."""
    seeds = [s for s in finals if s in ref]
    if not seeds:
        return None
    d = [finals[s] - ref[s] for s in seeds]
    mean, std = _mean_std(d)
    t = mean / (std / math.sqrt(len(d))) if len(d) > 1 and std > 0 else None
    return {"seeds": seeds, "deltas": d, "mean": mean, "std": std, "wins": sum(x < 0 for x in d), "n": len(d), "t": t}


def summarize(cfg: dict, archs: list[str], seeds: list[int], runs: dict, probes: dict) -> dict:
    rows = []
    t = cfg["train"]
    tokens = t["train_iters"] * t["global_batch_size"] * cfg["model"]["seq_length"]
    final = {a: {s: runs[(a, s)]["valid"][-1][1] for s in seeds if runs[(a, s)]["valid"]} for a in archs}
    for arch in archs:
        costs = model_costs({"name": arch, **cfg["model"], **cfg["archs"][arch]})
        finals = [final[arch][s] for s in seeds if s in final[arch]]
        mean, std = _mean_std(finals) if finals else (float("nan"), float("nan"))
        row = {"arch": arch, **costs, "train_tokens": tokens, "train_flops": costs["flops_per_token"] * tokens,
               "seeds": seeds, "valid_loss_per_seed": finals, "valid_loss": mean, "valid_loss_std": std,
               "valid_ppl": math.exp(mean) if finals else float("nan"),
               "paired_vs_base": paired_vs(final[arch], final["base"]) if "base" in final and arch != "base" else None}
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


def _paired_cell(p: dict | None) -> str:
    if not p:
        return "—"
    if p["n"] == 1:
        return f"{p['mean']:+.4f} (1 seed)"
    t = f", t = {p['t']:+.1f}" if p["t"] is not None else ""
    return f"{p['mean']:+.4f} ± {p['std']:.4f} ({p['wins']}/{p['n']} seeds lower{t})"


def results_markdown(summary: dict, cfg: dict, cmdline: str, title: str | None = None) -> str:
    rows = summary["rows"]
    lines = [f"# Small-scale experiment: scale `{summary['scale']}`" if title is None else f"## {title}", "",
             f"Command: `{cmdline}`", "",
             "| model | layout | params | non-emb params | train FLOPs/token | train tokens | train FLOPs | valid loss | valid ppl | Δ loss vs base, paired by seed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        vl = f"{r['valid_loss']:.4f}" + (f" ± {r['valid_loss_std']:.4f}" if len(r["valid_loss_per_seed"]) > 1 else "")
        lines.append(f"| {r['arch']} | {r['layout']} | {r['params']:,} | {r['non_embedding']:,} | {r['flops_per_token']:.3e} | "
                     f"{r['train_tokens']:,} | {r['train_flops']:.3e} | {vl} | {r['valid_ppl']:.2f} | {_paired_cell(r.get('paired_vs_base'))} |")
    lines += ["", f"Valid loss: the trainer's final validation (mean over seeds {rows[0]['seeds']}, ± sample std when > 1 seed). "
              "Δ vs base: mean ± std of the per-seed differences, seeds where the model's loss is lower, paired t.", "",
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
def set_dotted(cfg: dict, assignment: str, source: str) -> tuple[str, object]:
    """KEY=VALUE into the scale config; VALUE parsed as YAML ('6e-3' -> 0.006, 'true', '[a, b]')."""
    key, sep, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or not all(parts):
        raise ExperimentError(f"{source} {assignment!r}: expected KEY=VALUE with a dotted KEY, e.g. train.lr=6e-3")
    if parts[0] not in SECTIONS:
        raise ExperimentError(f"{source} {key}: '{parts[0]}' is not a scale config section; valid: {sorted(SECTIONS)}")
    if parts[0] == "archs" and (len(parts) < 3 or parts[1] not in cfg["archs"]):
        raise ExperimentError(f"{source} {key}: expected archs.<arch>.<field> with <arch> one of {sorted(cfg['archs'])}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads '6e-3' (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return key, value


def validate_runs(cfg: dict, archs: list[str], where: str) -> None:
    """Build every run config the way the trainer will, so a typo fails now rather than after hours of training."""
    from mesh_megatron.config import ConfigError
    from pretrain.config import build_run_config

    for arch in archs:
        try:
            build_run_config(run_config(cfg, arch, 0, Path("/nonexistent"), "data/x", "disabled"), source=f"{where}, arch {arch}")
        except ConfigError as e:
            raise ExperimentError(str(e)) from None


def variants(cfg: dict, sweep: str | None) -> list[tuple[str, dict]]:
    """[(label, scale config)]: one per --sweep value (label 'key=value', run dirs suffixed), or the config itself."""
    import copy

    if not sweep:
        return [("", cfg)]
    key, sep, vals = sweep.partition("=")
    values = [v for v in vals.split(",") if v.strip()]
    if not sep or not values:
        raise ExperimentError(f"--sweep {sweep!r}: expected KEY=V1,V2,.. e.g. train.lr=1.5e-3,3e-3,6e-3")
    out = []
    for v in values:
        c = copy.deepcopy(cfg)
        set_dotted(c, f"{key}={v}", "--sweep")
        out.append((f"{key.split('.')[-1]}={v.strip()}", c))
    return out


def _dotted_diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _dotted_diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


@functools.lru_cache(maxsize=None)  # one hash per dataset per invocation, however many runs compare against it
def _data_fingerprint(prefix: str) -> tuple | None:
    """What identifies a tokenized dataset wherever it lies: the bytes of its .idx and .bin (the .meta.json sidecar
    records paths and timings, so it differs between identical tokenizations). None if the files are gone."""
    import hashlib

    digests = []
    for ext in (".idx", ".bin"):
        f = Path(prefix + ext)
        if not f.is_file():
            return None
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        digests.append(h.hexdigest())
    return tuple(digests)


def _same_tokens(a: list[str] | None, b: list[str] | None) -> bool:
    """data.paths that name the same tokens: equal, or moved/re-tokenized copies with identical files."""
    if a == b:
        return True
    if not a or not b or len(a) != len(b):
        return False

    def same(x: str, y: str) -> bool:
        fx = _data_fingerprint(x)
        return fx is not None and fx == _data_fingerprint(y)

    return all(x == y or same(x, y) for x, y in zip(a, b))


def run_name(cfg: dict, variant: dict, label: str, arch: str, seed: int) -> str:
    """`arch-sSEED`, with the sweep value inserted only when it changes this model's run: a sweep of
    archs.mesh.router_init_std leaves `base-s1` as it is, so the main comparison's run is reused, not retrained."""
    same = run_config(cfg, arch, seed, Path("."), "", "disabled") == run_config(variant, arch, seed, Path("."), "", "disabled")
    return f"{arch}-s{seed}" if not label or same else f"{arch}-{label.replace('=', '')}-s{seed}"


def _job_env(slot: int, jobs: int) -> dict:
    """Per concurrent run: its share of the CPU cores, or its own GPU."""
    from pretrain.launcher import LAUNCHER_ENV

    # every run is a job of its own: inherited launcher variables would make concurrent runs share one rendezvous
    # port (or a run join the caller's group), so drop them and let each form its own group on a free port
    env = {**_cpu_env(), **dict.fromkeys(LAUNCHER_ENV)}
    if jobs > 1:
        import torch

        if torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = str(slot % torch.cuda.device_count())
        else:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="tiny", help="tiny (CPU), small (one GPU), or a path to a scale YAML "
                    "(experiments/configs/*.yaml)")
    ap.add_argument("--archs", nargs="+", default=None, help="architectures from the scale's archs: section "
                    "(default: its default_archs, i.e. vanilla base anchor mesh)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds (default: the scale's seeds)")
    ap.add_argument("--out", default=None, help="output directory (default runs/small_scale/<scale>)")
    ap.add_argument("--data", default=None, metavar="PREFIX", help="an existing data_tools dataset (PREFIX.bin/.idx) to "
                    "train on instead of the scale's own: small reads data.corpus.prefix (data/corpus/corpus), tiny "
                    "tokenizes the shipped sample into OUT")
    ap.add_argument("--train-iters", type=int, default=None, help="override train.train_iters (e.g. a quicker check)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change one scale-config entry, e.g. train.lr=6e-3 or archs.mesh.router_init_std=0.002 "
                         "(repeatable; VALUE is YAML)")
    ap.add_argument("--sweep", default=None, metavar="KEY=V1,V2,..",
                    help="train every model at each value of one scale-config entry; run dirs and tables per value")
    ap.add_argument("--jobs", type=int, default=1, help="trainings run at once (default 1). CPU: the cores are split "
                    "between them (OMP_NUM_THREADS); GPU: one device each")
    ap.add_argument("--nproc", type=int, default=None, help="processes per run (torchrun when > 1; default launch.nproc_per_node)")
    ap.add_argument("--wandb", default="disabled", choices=["disabled", "offline", "online"], help="wandb mode for the runs")
    ap.add_argument("--force", action="store_true", help="retrain runs that already finished (deletes their run dirs). A finished run "
                    "is otherwise never replaced: other settings in the same --out are an error")
    ap.add_argument("--no-probe", action="store_true", help="skip the probing step")
    ap.add_argument("--dry-run", action="store_true", help="check the config and the dataset, print the runs it "
                    "would train, and stop (trains, tokenizes and writes nothing)")
    return ap


def run_and_probe(cfg: dict, arch: str, seed: int, run_dir: Path, probe_dir: Path | None, prefix: str, args,
                  nproc: int, env: dict) -> tuple[dict, dict | None]:
    """Train (or skip / resume) one model and probe its final checkpoint, holding the run's lock: two invocations
    sharing OUT (a sweep beside the main comparison) wait for each other's runs instead of training them twice."""
    import fcntl

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[experiment] {run_dir.name}: another invocation is running it; waiting", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _run_and_probe_locked(cfg, arch, seed, run_dir, probe_dir, prefix, args, nproc, env)


def _run_and_probe_locked(cfg: dict, arch: str, seed: int, run_dir: Path, probe_dir: Path | None, prefix: str, args,
                          nproc: int, env: dict) -> tuple[dict, dict | None]:
    done = run_dir / "experiment_done.json"
    rc = run_config(cfg, arch, seed, run_dir, prefix, args.wandb)
    if args.force and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    prev = json.loads(done.read_text()).get("run_config") if done.is_file() else None
    if prev is not None and prev != rc and _same_tokens(prev.get("data", {}).get("paths"), rc["data"]["paths"]):
        # the same tokens under another path (e.g. --data given once, tokenized into OUT another time): same run
        prev = {**prev, "data": {**prev["data"], "paths": rc["data"]["paths"]}}
    if prev == rc:
        print(f"[experiment] {run_dir.name}: already trained, skipping", flush=True)
    elif prev is not None:
        # never overwrite a finished run silently (e.g. a --set that changes a model in an OUT shared with others)
        diff = sorted(_dotted_diff(prev, rc))
        raise ExperimentError(f"{run_dir} was trained with different settings ({', '.join(diff)}); "
                              "use another --out, or --force to retrain it")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        train_one(rc, run_dir, nproc, env)
        last = latest_checkpoint(run_dir)
        if last is None or int(last.name.split("_")[1]) != rc["train"]["train_iters"]:
            # the trainer exits 0 after a SIGTERM/SIGUSR1 stop too: that run is not finished
            raise ExperimentError(f"{run_dir.name} stopped before step {rc['train']['train_iters']} "
                                  f"(latest checkpoint {last}); repeat the command to resume it")
        write_atomic(done, json.dumps({"run_config": rc}, indent=1))
    metrics = read_metrics(run_dir)
    if probe_dir is None:
        return metrics, None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ExperimentError(f"{run_dir}: no complete checkpoint to probe")
    return metrics, probe_one(ckpt, prefix, probe_dir, cfg.get("probe", {}), arch, env)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, cfg_path = load_scale(args.scale)
        archs = args.archs or cfg.get("default_archs") or list(cfg["archs"])
        bad = [a for a in archs if a not in cfg["archs"]]
        if bad:
            raise ExperimentError(f"--archs {bad}: not in {cfg_path}'s archs: {sorted(cfg['archs'])}")
        if args.jobs < 1:
            raise ExperimentError(f"--jobs {args.jobs}: must be >= 1")
        seeds = args.seeds or cfg.get("seeds") or [1234]
        if args.train_iters:
            cfg["train"]["train_iters"] = args.train_iters
        for a in args.set:
            set_dotted(cfg, a, "--set")
        grid = variants(cfg, args.sweep)
        for label, c in grid:
            validate_runs(c, archs, f"{cfg_path}" + (f" with {label}" if label else ""))
        out = Path(args.out or REPO / "runs" / "small_scale" / str(cfg.get("scale", cfg_path.stem)))
        nproc = args.nproc or int(cfg.get("launch", {}).get("nproc_per_node", 1))
        prefix = ensure_data(cfg, out, args.data, dry_run=args.dry_run)  # a missing corpus stops here: nothing written

        cfg_of = dict(grid)
        tasks = [(label, arch, seed) for label, _ in grid for seed in seeds for arch in archs]
        names = {t: run_name(cfg, cfg_of[t[0]], *t) for t in tasks}
        unique: dict[str, tuple] = {}  # a sweep that leaves some models unchanged trains each of those once
        for t in tasks:
            unique.setdefault(names[t], t)
        tasks = list(unique.values())
        if args.dry_run:
            print(f"[experiment] dataset: {prefix}", flush=True)
            print(f"[experiment] would train {len(tasks)} run(s) in {out / 'runs'}: "
                  f"{', '.join(names[t] for t in tasks)}" + ("" if args.no_probe else ", and probe each"), flush=True)
            return 0
        out.mkdir(parents=True, exist_ok=True)
        results, errors = {}, []

        def work(task, slot):
            label, arch, seed = task
            c = cfg_of[label]
            probe_dir = None if args.no_probe else out / "probe" / names[task]
            results[task] = run_and_probe(c, arch, seed, out / "runs" / names[task], probe_dir, prefix, args, nproc,
                                          _job_env(slot, args.jobs))

        # --jobs slots (a slot = a share of the cores, or a GPU); a failed run is reported after the others finish
        import queue
        from concurrent.futures import ThreadPoolExecutor

        slots: queue.Queue = queue.Queue()
        for i in range(args.jobs):
            slots.put(i)

        def in_slot(task):
            slot = slots.get()
            try:
                work(task, slot)
            except ExperimentError as e:
                errors.append(str(e))
            finally:
                slots.put(slot)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(in_slot, tasks))
        if errors:
            raise ExperimentError(f"{len(errors)} of {len(tasks)} runs failed:\n" + "\n".join(errors))

        cmdline = "python experiments/small_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
        summaries, md = [], []
        by_name = {names[t]: r for t, r in results.items()}
        for label, c in grid:
            res = {(a, s): by_name[run_name(cfg, c, label, a, s)] for a in archs for s in seeds}
            runs = {k: v[0] for k, v in res.items()}
            probes = {k: v[1] for k, v in res.items() if v[1]}
            summary = summarize(c, archs, seeds, runs, probes)
            summary["variant"] = label or None
            summary["curves"] = {f"{a}-s{s}": runs[(a, s)] for a in archs for s in seeds}
            summaries.append(summary)
            suffix = f"-{label.replace('=', '')}" if label else ""
            md.append(results_markdown(summary, c, cmdline, title=label or None))
            plot_curves(archs, seeds, runs, out / f"loss_curves{suffix}.png")
            if probes:
                from mesh_tools.probe.plots import plot_all

                plot_all([probes[(a, seeds[0])] for a in archs], archs, out / f"probe_compare{suffix}")
        if not args.sweep:
            result = summaries[0]
        else:
            result = {"scale": cfg.get("scale"), "sweep": args.sweep, "variants": summaries}
            md.insert(0, f"# Small-scale experiment: scale `{cfg.get('scale')}`, sweep `{args.sweep}`\n")
        # a sweep writes results-<key>.{json,md}, so it can share OUT (and the unchanged runs) with the main comparison
        stem = f"results-{args.sweep.partition('=')[0].split('.')[-1]}" if args.sweep else "results"
        write_atomic(out / f"{stem}.json", json.dumps(result, indent=1))
        write_atomic(out / f"{stem}.md", "\n".join(md))
        print((out / f"{stem}.md").read_text())
        print(f"[experiment] wrote {out / stem}.md, {stem}.json, loss_curves*.png, probe_compare*/*.png", flush=True)
    except ExperimentError as e:
        print(f"small_scale: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
