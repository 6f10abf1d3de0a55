"""Training-step throughput per architecture: tokens/s, step time, MFU, peak memory.

    python bench/train_throughput.py --configs configs/pythia-160m-{vanilla,recursive,anchor,mesh}.yaml \
        --micro-batch 4 --seq 2048            # on a GPU: bf16 autocast, SDPA flash attention
    python bench/train_throughput.py --preset cpu-small   # CPU: a small shape, fp32, relative costs only

One step = forward + backward + AdamW (fused on CUDA) on the project's model at TP=1. Timing: warm-up steps, then
the median of `--steps` timed steps (CUDA-synchronised), the models taking turns step by step. MFU = achieved model FLOP/s / peak FLOP/s, with model
FLOPs per token from `mesh_megatron.params.flops_per_token`: 6 x parameters applied per token (the core counted once
per loop, LM head included) + 12 x L_eff x d x seq for attention. Peak: 989 TFLOP/s dense bf16 on H100 SXM
(`--peak-tflops` to change); no MFU is printed on CPU.

Prints a table and writes JSON (with the device name) to bench/results/. The MeSH overhead column is the step
time relative to the recursive base config with the same shape, when both are in the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh_megatron.config import ModelConfig  # noqa: E402
from mesh_megatron.params import count_parameters, flops_per_token  # noqa: E402

PRESETS = {
    # d=256, 8 effective layers, seq 256: big enough that matmuls dominate on a CPU, small enough to run in a minute.
    "cpu-small": dict(
        shape=dict(hidden_size=256, num_attention_heads=4, seq_length=256, vocab_size=8192, make_vocab_size_divisible_by=64),
        variants={
            "vanilla": dict(arch="vanilla", num_layers=8),
            "recursive": dict(arch="recursive", prelude_layers=2, core_layers=2, num_loops=2, coda_layers=2, scale_embeddings=True),
            "anchor": dict(arch="recursive", connection="anchor", prelude_layers=2, core_layers=2, num_loops=2, coda_layers=2, scale_embeddings=True),
            "mesh": dict(arch="mesh", prelude_layers=2, core_layers=2, num_loops=2, coda_layers=2, scale_embeddings=True),
            "mesh+recompute": dict(arch="mesh", prelude_layers=2, core_layers=2, num_loops=2, coda_layers=2, scale_embeddings=True, recompute="loop"),
        },
        micro_batch=4,
    ),
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


class Runner:
    """One model + optimiser + fixed batch; `step()` runs and times one training step."""

    def __init__(self, cfg: ModelConfig, micro_batch: int):
        from mesh_megatron.model import MeshGPTModel
        from pretrain.distributed import set_seed

        self.cfg, self.micro_batch = cfg, micro_batch
        self.cuda = torch.cuda.is_available()
        dev = torch.device("cuda" if self.cuda else "cpu")
        set_seed(0)
        self.model = MeshGPTModel(cfg).to(dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.cuda)
        ids = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_length + 1), device=dev)
        self.x, self.y = ids[:, :-1], ids[:, 1:]
        self.times: list[float] = []
        self.peak = 0.0
        self.loss = float("nan")

    def step(self, timed: bool) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            loss = self.model(self.x, self.y).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() / 2**30)
        if timed:
            self.times.append(time.perf_counter() - t0)
        self.loss = loss.item()

    def result(self, peak_tflops: float) -> dict:
        cfg = self.cfg
        step = statistics.median(self.times)
        tokens = self.micro_batch * cfg.seq_length
        achieved = flops_per_token(cfg) * tokens / step / 1e12
        return {
            "config": cfg.name,
            "arch": cfg.arch + (f"/{cfg.connection}" if cfg.arch == "recursive" else ""),
            "layout": cfg.layout,
            "recompute": cfg.recompute,
            "params": count_parameters(cfg)["total"],
            "micro_batch": self.micro_batch,
            "seq_length": cfg.seq_length,
            "step_time_s": step,
            "step_time_min_max_s": (min(self.times), max(self.times)),
            "tokens_per_s": tokens / step,
            "model_tflops_per_s": achieved,
            "mfu": achieved / peak_tflops if self.cuda else None,
            "peak_memory_gib": self.peak if self.cuda else None,
            "final_loss": self.loss,
        }


def measure_all(cfgs: list[ModelConfig], micro_batch: int, steps: int, warmup: int, peak_tflops: float) -> list[dict]:
    """Round-robin over the models (one step each per round), so drift in machine load hits all of them alike."""
    runners = [Runner(c, micro_batch) for c in cfgs]
    for i in range(warmup + steps):
        for r in runners:
            r.step(timed=i >= warmup)
        print(f"  round {i + 1}/{warmup + steps}", file=sys.stderr)
    return [r.result(peak_tflops) for r in runners]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=[], help="model / run YAML files to measure")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a built-in set of shapes (e.g. cpu-small)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: preset's, else 4)")
    ap.add_argument("--seq", type=int, default=None, help="override the configs' sequence length")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 SXM dense bf16: 989)")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/train_throughput_<device>.json)")
    args = ap.parse_args(argv)

    from pretrain.cpu_malloc import keep_heap_on_cpu
    from pretrain.distributed import initialize_parallel

    if not torch.cuda.is_available():
        keep_heap_on_cpu()  # else glibc page-faults activations in every step and dominates the timings
    initialize_parallel(1)
    cfgs: list[ModelConfig] = []
    micro = args.micro_batch or 4
    if args.preset:
        p = PRESETS[args.preset]
        micro = args.micro_batch or p["micro_batch"]
        cfgs += [ModelConfig.from_dict({**p["shape"], **v, "name": f"{args.preset}-{n}"}) for n, v in p["variants"].items()]
    for path in args.configs:
        cfgs.append(ModelConfig.from_yaml(path))
    if args.seq:
        cfgs = [c.replace(seq_length=args.seq) for c in cfgs]
    if not cfgs:
        ap.error("give --configs and/or --preset")

    rows = measure_all(cfgs, micro, args.steps, args.warmup, args.peak_tflops)
    base = {(r["layout"], r["seq_length"]): r for r in rows if r["arch"] == "recursive/base" and r["recompute"] == "none"}
    for r in rows:
        b = base.get((r["layout"], r["seq_length"]))
        r["vs_recursive_base"] = r["step_time_s"] / b["step_time_s"] - 1 if b else None

    dev = device_name()
    print(f"\ndevice: {dev}")
    head = f"{'config':<26} {'layout':<9} {'recomp':<6} {'tok/s':>10} {'ms/step':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'vs base':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mfu = f"{r['mfu'] * 100:5.1f}%" if r["mfu"] is not None else "   n/a"
        mem = f"{r['peak_memory_gib']:8.2f}" if r["peak_memory_gib"] is not None else "     n/a"
        vs = f"{r['vs_recursive_base'] * 100:+7.1f}%" if r["vs_recursive_base"] is not None else "       -"
        print(
            f"{r['config']:<26} {r['layout']:<9} {r['recompute']:<6} {r['tokens_per_s']:>10.0f} {r['step_time_s'] * 1e3:>9.1f} "
            f"{r['model_tflops_per_s']:>8.3f} {mfu:>6} {mem} {vs}"
        )
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "train_throughput_" + ("cuda" if torch.cuda.is_available() else "cpu") + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"device": dev, "torch": torch.__version__, "steps": args.steps, "rows": rows}, indent=2))
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
