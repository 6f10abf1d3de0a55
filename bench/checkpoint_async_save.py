"""How long a checkpoint save stalls training: synchronous save vs `checkpoint.async_save`.

    python bench/checkpoint_async_save.py                 # ~100M-parameter model, CPU, fp32, ZeRO-1, one process
    python bench/checkpoint_async_save.py --layers 2      # a quick smoke run

One DeepSpeed engine (ZeRO-1, torch AdamW) on the project's model at TP=1, one process. Measured, after warm-up:
- a normal training step (median of `--steps`);
- sync: the wall time of `pretrain.checkpoint.save` at a step boundary, plus the extra time of the step after it;
- async: the training thread's part: `AsyncSaver.start` (checks + copying the state to host memory) plus the commit
  at the step boundary where every file is written, and the extra time of the steps that ran while the background
  thread was writing (they share the CPU and memory bandwidth with it), each step minus a normal step.
Prints a table and writes bench/results/checkpoint_async_save.json. Checkpoints go to --dir (default: a temp dir on
the filesystem of /tmp), which is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

from pretrain import checkpoint as ckpt  # noqa: E402
from pretrain import distributed as pd  # noqa: E402
from pretrain.config import build_run_config  # noqa: E402


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def build(args, root: Path):
    import deepspeed
    from mesh_megatron.model import MeshGPTModel
    from pretrain.train import deepspeed_config, param_groups

    cfg = build_run_config({
        "model": {"name": "bench-async-save", "arch": "vanilla", "num_layers": args.layers, "hidden_size": args.hidden,
                  "num_attention_heads": args.hidden // 64, "seq_length": args.seq, "vocab_size": args.vocab},
        "data": {"paths": ["unused"]},
        "train": {"train_iters": 10**6, "micro_batch_size": 1, "global_batch_size": 1, "lr": 1e-4},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"dir": str(root), "keep_last": 1},
        "logging": {"dir": str(root / "run")},
    }, source="bench")
    pd.setup_groups(1, "auto", 600)
    pd.setup_deepspeed()
    pd.set_seed(1)
    model = MeshGPTModel(cfg.model)
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0),
                                      config=deepspeed_config(cfg, 1, precision), mpu=pd.MegatronMPU())
    state = ckpt.TrainerState(zero_stage=1, global_batch_size=1, train_iters=10**6, precision=precision)
    return cfg, engine, state


def make_step(engine, args):
    tokens = torch.randint(0, args.vocab, (1, args.seq), device=engine.device)

    def step() -> float:
        t0 = time.perf_counter()
        loss = engine(input_ids=tokens, labels=tokens).float().mean()
        engine.backward(loss)
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed normal steps")
    ap.add_argument("--repeats", type=int, default=2, help="saves of each kind")
    ap.add_argument("--dir", default=None, help="checkpoint root (default: a temp dir under /tmp)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint_async_save.json"))
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-async-bench-"))
    try:
        run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path) -> None:
    from mesh_megatron.params import count_parameters
    from pretrain.async_save import AsyncSaver

    cfg, engine, state = build(args, root)
    step = make_step(engine, args)
    params = count_parameters(cfg.model)["total"]
    for _ in range(3):
        step()
    normal = statistics.median(step() for _ in range(args.steps))
    state.step = 1

    sync, asyn = [], []
    saver = AsyncSaver(engine)
    try:
        for _ in range(args.repeats):
            step()
            state.step += 1
            t0 = time.perf_counter()
            path = ckpt.save(engine, cfg, state, root)
            save_s = time.perf_counter() - t0
            after = max(step() - normal, 0.0)  # the next step, for a like-for-like comparison with async
            sync.append({"save_s": save_s, "next_step_extra_s": after, "stall_s": save_s + after,
                         "bytes": ckpt.dir_bytes(path)})

            step()
            state.step += 1
            t0 = time.perf_counter()
            pending = saver.start(cfg, state, root)
            start_s = time.perf_counter() - t0
            during = []
            while not pending.written_here():
                during.append(step())
            t0 = time.perf_counter()
            path = saver.commit()
            commit_s = time.perf_counter() - t0
            extra = sum(max(d - normal, 0.0) for d in during)
            asyn.append({"start_s": start_s, "snapshot_s": pending.batch.snapshot_s, "commit_s": commit_s,
                         "steps_during_write": len(during), "extra_step_time_s": extra,
                         "stall_s": start_s + commit_s + extra, "bytes": ckpt.dir_bytes(path)})
    finally:
        saver.close()

    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    result = {
        "device": device_name(), "torch": torch.__version__, "params": params, "precision": state.precision,
        "zero_stage": 1, "checkpoint_bytes": sync[-1]["bytes"], "normal_step_s": normal,
        "sync": {k: med(sync, k) for k in ("save_s", "next_step_extra_s", "stall_s")} | {"runs": sync},
        "async": {k: med(asyn, k) for k in ("start_s", "snapshot_s", "commit_s", "steps_during_write",
                                             "extra_step_time_s", "stall_s")} | {"runs": asyn},
        "filesystem": str(root),
    }
    gb = result["checkpoint_bytes"] / 1e9
    rows = [
        ("model", f"{params / 1e6:.0f}M params, {state.precision}, ZeRO-1, 1 process"),
        ("checkpoint size", f"{gb:.2f} GB"),
        ("normal step", f"{normal:.2f} s"),
        ("sync: save call", f"{result['sync']['save_s']:.2f} s ({gb / result['sync']['save_s']:.2f} GB/s)"),
        ("sync: next step", f"+{result['sync']['next_step_extra_s']:.2f} s over a normal step"),
        ("sync save: stall (total)", f"{result['sync']['stall_s']:.2f} s"),
        ("async: start (checks + host copy)", f"{result['async']['start_s']:.2f} s "
                                               f"(copy {result['async']['snapshot_s']:.2f} s)"),
        ("async: steps while writing", f"{result['async']['steps_during_write']:.0f} steps, "
                                       f"+{result['async']['extra_step_time_s']:.2f} s over normal steps"),
        ("async: commit at step boundary", f"{result['async']['commit_s']:.3f} s"),
        ("async save: stall (total)", f"{result['async']['stall_s']:.2f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"checkpoint save stall on {result['device']}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
