"""Launch-machinery smoke test: a tiny gloo "trainer" with the real trainer's Slurm contract, no model.

    MESH_ENTRY=slurm/smoke_train.py sbatch --nodes=2 slurm/pretrain.sbatch --checkpoint.dir runs/smoke/ckpt \
        --train.train_iters 20

Rank / world / rendezvous come from SLURM_PROCID / SLURM_NTASKS / MASTER_ADDR:MASTER_PORT (as in
pretrain.launcher). Every step all-reduces each rank's contribution; rank 0 saves {step, total} atomically
every --checkpoint.save_interval steps. SIGUSR1 / SIGTERM: finish the step, save, exit 0. `--checkpoint.resume
auto` continues from the newest checkpoint and checks the all-reduced running total, so a wrong world size or a
lost step after a requeue fails loudly. Used by tests/test_slurm_cluster.py and for checking a new cluster in
seconds before spending GPU hours.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

stop_signal: list[int] = []


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="accepted and printed (the real trainer's flag); unused")
    p.add_argument("--checkpoint.dir", dest="ckpt_dir", default="runs/smoke/checkpoints", help="where checkpoints go")
    p.add_argument("--checkpoint.resume", dest="resume", default="none", help="'auto': continue from the newest checkpoint")
    p.add_argument("--checkpoint.save_interval", dest="save_interval", type=int, default=5, help="steps between saves")
    p.add_argument("--train.train_iters", dest="iters", type=int, default=20, help="total steps")
    p.add_argument("--smoke.step_seconds", dest="step_seconds", type=float, default=0.2, help="sleep per step (to leave time to signal)")
    return p.parse_args(argv)


def latest(ckpt_dir: Path) -> Path | None:
    done = sorted(ckpt_dir.glob("step_*.pt"))
    return done[-1] if done else None


def save(ckpt_dir: Path, step: int, total: float) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".step_{step:07d}.pt.tmp"
    torch.save({"step": step, "total": total}, tmp)
    os.replace(tmp, ckpt_dir / f"step_{step:07d}.pt")
    print(f"saved checkpoint step {step} -> {ckpt_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stop_signal.append(s))
    dist.init_process_group(
        "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120),
    )
    ckpt_dir = Path(args.ckpt_dir)
    step, total = 0, 0.0
    if args.resume == "auto" and (path := latest(ckpt_dir)) is not None:
        state = torch.load(path)
        step, total = state["step"], state["total"]
        if rank == 0:
            print(f"resumed from {path} at step {step}", flush=True)
    per_step = world * (world + 1) / 2  # sum over ranks of (rank + 1)
    print(f"rank {rank}/{world} on {socket.gethostname()} master={os.environ['MASTER_ADDR']} start_step={step}", flush=True)
    while step < args.iters:
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        step, total = step + 1, total + t.item()
        time.sleep(args.step_seconds)
        # Every rank must agree to stop at the same step: all-reduce the flag.
        flag = torch.tensor([1.0 if stop_signal else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"step {step}/{args.iters} all_reduce={t.item()} total={total}", flush=True)
        if rank == 0 and (step % args.save_interval == 0 or step == args.iters or flag.item()):
            save(ckpt_dir, step, total)
        if flag.item():
            dist.barrier()
            if rank == 0:
                print(f"stopping on signal at step {step} (checkpoint saved); exit 0", flush=True)
            dist.destroy_process_group()
            return 0
    ok = total == per_step * step
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(f"finished step {step}: total={total} expected={per_step * step} {'OK' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
