"""Metrics sinks (rank 0 only): a console line, a plain JSONL file, and Weights & Biases (offline by default).

MFU = achieved model FLOP/s / (devices x dense peak), with model FLOPs per token from
`mesh_megatron.params.flops_per_token` (effective depth: the core counted once per loop; never from parameter count).
Peaks are dense bf16 numbers (never "with sparsity"); on CPU there is no meaningful peak, so MFU is shown as n/a unless
`logging.peak_tflops` is set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak TFLOP/s by device-name substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "A6000": 155.0, "V100": 125.0}


def device_peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def memory_gib() -> float:
    """Peak accelerator memory (GPU) or resident set size (CPU) of this process, GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:
        return float("nan")


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _WandbSocketNoise(logging.Filter):
    """asyncio logs "socket.send() raised exception." for each write wandb makes after its service process is gone;
    Metrics reports that once, in its own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "socket.send() raised exception."


def _quiet_wandb_socket_noise() -> None:
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _WandbSocketNoise) for f in log.filters):
        log.addFilter(_WandbSocketNoise())


class Metrics:
    """Collects per-step numbers and writes them to console / JSONL / wandb on rank 0.

    wandb is best effort: its service (`wandb-core`) is a separate process, and a job's SIGTERM (Slurm's scancel or
    preemption signals every process of the step) stops it at once; a Go program cannot be told to ignore SIGTERM.
    The first wandb call that fails is reported in one line, wandb is off for the rest of the run, and training, the
    checkpoint and the exit code go on as if it had been disabled (metrics.jsonl keeps every record).
    """

    def __init__(self, cfg, rank: int, run_dir: Path, resume_wandb_id: str | None = None):
        self.cfg = cfg
        self.enabled = rank == 0
        self.jsonl = None
        self.wandb = None
        self.wandb_id = resume_wandb_id
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.logging.jsonl:
            self.jsonl_path = run_dir / "metrics.jsonl"
            self.jsonl = open(self.jsonl_path, "a", buffering=1)  # line-buffered: a crash loses at most one line
        wb = cfg.logging.wandb
        if wb.mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wandb.init(
                    project=wb.project, entity=wb.entity, name=wb.name or cfg.model.name, tags=wb.tags,
                    mode=wb.mode, dir=str(run_dir), config=cfg.to_dict(), id=resume_wandb_id, resume="allow",
                )
                self.wandb_id = self.wandb.id
                _quiet_wandb_socket_noise()
            except Exception as e:  # logging must never kill a training run
                print(f"[metrics] wandb disabled: {type(e).__name__}: {e}", file=sys.stderr)
                self.wandb = None

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                               step=record.get("step"))
            except Exception as e:  # e.g. ConnectionResetError: the service got the job's SIGTERM
                self._drop_wandb("log", e, finish=True)
        if console:
            print(console, flush=True)

    def _drop_wandb(self, what: str, err: BaseException, finish: bool) -> None:
        """One warning line; then release wandb's broken connection quietly, so that neither a later call nor wandb's
        own exit hook (a traceback at interpreter exit) reports it again."""
        run, self.wandb = self.wandb, None
        kept = "metrics.jsonl has every record" if self.cfg.logging.jsonl else "the console has the step lines"
        print(f"[metrics] warning: wandb {what} failed ({type(err).__name__}: {err}); wandb is off for the rest of "
              f"this run, {kept} (a job's SIGTERM also stops wandb's service process)", file=sys.stderr, flush=True)
        import wandb

        for release in ([run.finish] if finish else []) + [wandb.teardown]:
            try:
                release()
            except (Exception, SystemExit):  # teardown sys.exit()s with the service's code (-15 after a SIGTERM)
                pass

    def close(self) -> None:
        """Never raises: it runs after the last checkpoint, and closing a logger must not turn a saved, clean stop
        into a failure."""
        if not self.enabled:
            return
        if self.jsonl:
            try:
                self.jsonl.close()
            except OSError as e:
                print(f"[metrics] warning: closing {self.jsonl_path} failed ({e}); it holds every record up to the "
                      "last complete line", file=sys.stderr, flush=True)
            self.jsonl = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
                self.wandb = None
            except Exception as e:
                self._drop_wandb("finish", e, finish=False)
