"""Time and host memory to build a model (MeshGPTModel at TP=1 on CPU): this tree's init against another tree's.

    python bench/model_build.py --before /tmp/wt-head            # Pythia-1.4B vanilla shape, fp32
    python bench/model_build.py --config configs/pythia-160m-vanilla.yaml --before /tmp/wt-head

Each build runs in a fresh process (one at a time: a 1.4B fp32 model is 5.6 GB) that imports the trainer's stack,
seeds as the trainer does (pretrain.distributed.set_seed) and times `MeshGPTModel(cfg)`; its host memory is the peak
RSS of that process minus its RSS just before the build. `--rounds` builds per tree, in alternating order (the
machine may be shared), the fastest reported. `--before DIR` builds the same config with the code of
another checkout (e.g. `git worktree add /tmp/wt-head <commit>` of the commit before the sharded init: megatron-core's
CPU master-weight init), so "before" and "after" are measured on the same machine in the same run.

Prints a table and writes bench/results/model_build_cpu.json (machine, config, the trees' commits, rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, resource, sys, time
import torch
from mesh_megatron.config import ModelConfig
from mesh_megatron.model import MeshGPTModel
from pretrain.distributed import initialize_parallel, set_seed
import mesh_megatron

cfg = ModelConfig.from_yaml(sys.argv[1]).replace(params_dtype=sys.argv[2])
initialize_parallel(1)
set_seed(1234)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
t0 = time.perf_counter()
model = MeshGPTModel(cfg)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = sum(p.numel() for p in model.parameters())
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_growth": peak - before, "params": params,
                              "param_bytes": param_bytes, "code": os.path.dirname(os.path.dirname(mesh_megatron.__file__)),
                              "threads": torch.get_num_threads()}))
"""


def commit_of(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" + uncommitted changes" if dirty else "")


def build_in_child(tree: Path, config: str, dtype: str) -> dict:
    """One build in a fresh process importing the code of `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(Path(config).resolve()), dtype], env=env, cwd=tree,
                          capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"model_build: the build with {tree} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    if Path(result["code"]).resolve() != tree.resolve():
        sys.exit(f"model_build: the child imported mesh_megatron from {result['code']}, not {tree} "
                 "(an editable install shadows PYTHONPATH?)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pythia-1.4b-vanilla.yaml")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model.params_dtype")
    ap.add_argument("--before", help="a checkout with the code to compare against (e.g. a git worktree of HEAD)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="builds per tree, alternating trees (the machine may be shared): the fastest is reported")
    ap.add_argument("--note", default="", help="free text stored in the JSON (what the trees are)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "model_build_cpu.json"))
    args = ap.parse_args()

    trees = ([("before", Path(args.before))] if args.before else []) + [("after", REPO)]
    samples: dict[str, list[dict]] = {label: [] for label, _ in trees}
    for rnd in range(args.rounds):
        for label, tree in trees if rnd % 2 == 0 else trees[::-1]:  # alternate the order: load drifts over time
            t0 = time.time()
            r = build_in_child(tree, args.config, args.dtype)
            samples[label].append(r)
            print(f"[model_build] {label}: {r['seconds']:.1f} s ({time.time() - t0:.0f} s with imports), "
                  f"peak host growth {r['peak_rss_growth'] / 2**30:.2f} GiB", flush=True)
    rows = []
    for label, tree in trees:
        best = min(samples[label], key=lambda r: r["seconds"])
        rows.append({"build": label, "tree": str(tree), "commit": commit_of(tree), **best,
                     "all_seconds": [r["seconds"] for r in samples[label]],
                     "all_peak_rss_growth": [r["peak_rss_growth"] for r in samples[label]]})

    print(f"\n{args.config} ({rows[0]['params'] / 1e9:.2f}B parameters, {args.dtype}), TP=1, CPU")
    print(f"{'build':8s} {'seconds':>9s} {'host GiB (peak growth)':>24s} {'x param bytes':>14s}  commit")
    for r in rows:
        print(f"{r['build']:8s} {r['seconds']:9.1f} {r['peak_rss_growth'] / 2**30:24.2f} "
              f"{r['peak_rss_growth'] / r['param_bytes']:14.2f}  {r['commit'][:12]}")
    if len(rows) == 2:
        print(f"speed-up: {rows[0]['seconds'] / rows[1]['seconds']:.2f}x")

    from pretrain.checkpoint import write_atomic

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps({
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "config": args.config, "params_dtype": args.dtype, "tensor_parallel_size": 1,
        "method": "each build in a fresh process: time of MeshGPTModel(cfg) after set_seed; host memory = peak RSS "
                  "minus the RSS before the build; 'before' = the code of the given checkout, same machine, same run; "
                  f"{args.rounds} builds per tree in alternating order, the fastest reported (all in all_seconds)",
        "note": args.note, "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
