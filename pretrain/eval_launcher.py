"""Evaluation during training (the run config's `eval:` section): rank 0 runs `mesh-eval` on each new checkpoint in a
background process and logs its results into metrics.jsonl and wandb at a later step boundary.

Why no rank waits: the evaluation reads the committed checkpoint from disk, not the live model, so training never
pauses for it. Rank 0 only starts the process (a fork + exec, milliseconds) and, at each step boundary, asks whether
it has exited (a non-blocking poll); the other ranks do nothing at all, and no collective is involved. The process
runs at a lower CPU priority (`nice`) with `eval.threads` threads and, on `eval.device: cpu`, sees no GPU, so it
cannot take device memory from training. At most one evaluation runs at a time: a checkpoint saved meanwhile waits
for it; if another arrives before that one started, the older waiting one is skipped (a note; `mesh-eval` on the
run's checkpoint root fills such gaps later from its cache).

At the end of training the run waits up to `eval.final_wait_minutes` for the evaluations still due (a message says
so), then leaves any still running to finish on its own (its result lands in <run>/eval/results, not in
metrics.jsonl). A stop (signal, time limit) or a failed run does not wait: the evaluation process is terminated.

The trainer must not import mesh_tools (layering), so the evaluation is a separate `python -m mesh_tools.eval.cli`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mesh_megatron.config import ConfigError
from pretrain.launcher import LAUNCHER_ENV


@dataclass
class _Job:
    step: int
    path: Path
    proc: subprocess.Popen
    started: float
    log_path: Path
    records_path: Path


def check_paths(cfg) -> None:
    """The eval section's files exist (checked on every rank at start, like the data, before anything is built)."""
    e = cfg.eval
    if not e.tasks:
        return
    if e.include_path and not Path(e.include_path).exists():
        raise ConfigError(f"eval.include_path: {e.include_path} not found; give the directory of your lm-eval task YAMLs")
    if e.tokenizer and not Path(e.tokenizer).is_file():
        raise ConfigError(f"eval.tokenizer: {e.tokenizer} not found; give a tokenizer.json or SentencePiece .model")


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def metric_key(metric: str, num_loops: int | None) -> str:
    """`tasks/<task>/<metric>` with `@K<k>` for a loop count, as the trainer's `valid/loss@K2`."""
    return f"tasks/{metric}" + (f"@K{num_loops}" if num_loops is not None else "")


class EvalLauncher:
    """Rank 0's side of evaluation during training. `log` is Metrics.log (record, console=...)."""

    def __init__(self, cfg, run_dir: Path, log: Callable[..., None], python: str = sys.executable):
        self.cfg, self.e = cfg, cfg.eval
        self.out = Path(run_dir) / "eval"
        self.log = log
        self.python = python
        self.running: _Job | None = None
        self.waiting: tuple[int, Path] | None = None  # the next checkpoint to evaluate
        self.disabled: str | None = None  # why no more evaluations are started (a settings error)
        self.step = 0  # the trainer's step, for the records' `step` (wandb needs it increasing)
        self.stopping = False  # the run is stopping early: its last checkpoint is not evaluated now

    def resumed(self, step: int, path: Path) -> None:
        """A resumed run: the checkpoint it resumed from is evaluated first if no evaluation of it finished (a stop
        terminates the running one)."""
        self.step = max(self.step, step)
        if self.due(step) and not (self.out / "records" / f"{_tag(step)}.json").is_file():
            self.waiting = (step, Path(path))

    # --- what the trainer calls --------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the checkpoint of `step` is evaluated (eval.interval; the final checkpoint always is)."""
        return not self.e.interval or step % self.e.interval == 0 or step >= self.cfg.train.train_iters

    def checkpoint_saved(self, step: int, path: Path) -> None:
        """A checkpoint was committed: evaluate it now if nothing runs, else after the one running."""
        self.step = max(self.step, step)
        if self.disabled or self.stopping or not self.due(step):
            return
        if self.waiting is not None:
            self.log({"event": "eval_tasks_skipped", "step": self.step, "checkpoint_step": self.waiting[0]},
                     console=f"[eval] skipping {_tag(self.waiting[0])}: the evaluation of {_tag(self.running.step)} "
                     f"is still running and {_tag(step)} is newer (mesh-eval on the checkpoint root fills gaps later)")
        self.waiting = (step, Path(path))
        self.poll(step)

    def poll(self, step: int) -> None:
        """Non-blocking: log the results of a finished evaluation and start the waiting one."""
        self.step = max(self.step, step)
        job = self.running
        if job is not None and job.proc.poll() is not None:
            self.running = None
            self._collect(job)
        if self.running is None and self.waiting is not None and not self.disabled:
            step_w, path = self.waiting
            self.waiting = None
            self._start(step_w, path)

    def close(self, wait: bool) -> None:
        """End of the run. `wait`: up to eval.final_wait_minutes for what is due, then leave the rest running;
        otherwise (a stop or a failure) terminate the running evaluation."""
        if not wait:
            if self.running is not None:
                self.running.proc.terminate()
                try:
                    self.running.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.running.proc.kill()
                self.log({"event": "eval_tasks_stopped", "step": self.step, "checkpoint_step": self.running.step},
                         console=f"[eval] stopped the evaluation of {_tag(self.running.step)} (the run stops); "
                         f"mesh-eval --checkpoint {self.cfg.checkpoint_dir} --out {self.out} completes it later")
                self.running = None
            return
        if self.running is None and self.waiting is None:
            return
        t0 = time.time()
        deadline = t0 + 60 * self.e.final_wait_minutes
        todo = [j for j in (self.running and self.running.step, self.waiting and self.waiting[0]) if j]
        print(f"[eval] training done; waiting up to {self.e.final_wait_minutes:g} min for the evaluation of "
              f"{', '.join(_tag(j) for j in todo)} (log: {self.out / 'logs'})", flush=True)
        while (self.running is not None or self.waiting is not None) and time.time() < deadline:
            self.poll(self.step)
            if self.running is not None:
                try:
                    self.running.proc.wait(timeout=max(0.0, min(1.0, deadline - time.time())))
                except subprocess.TimeoutExpired:
                    pass
        if self.running is not None and self.running.proc.poll() is not None:
            job, self.running = self.running, None
            self._collect(job)
        if self.waiting is not None:
            print(f"[eval] eval.final_wait_minutes passed: {_tag(self.waiting[0])} not evaluated", flush=True)
        if self.running is not None:
            print(f"[eval] eval.final_wait_minutes passed: the evaluation of {_tag(self.running.step)} goes on in the "
                  f"background (pid {self.running.proc.pid}); its results land in {self.out / 'results'}, not in "
                  "metrics.jsonl", flush=True)
        self.log({"event": "eval_tasks_wait", "step": self.step, "wait_s": time.time() - t0,
                  "left_running": self.running is not None})

    # --- the process -------------------------------------------------------------------------------------------

    def command(self, path: Path, records_path: Path) -> list[str]:
        """The mesh-eval command line for one checkpoint."""
        e = self.e
        cmd = [self.python, "-m", "mesh_tools.eval.cli", "--checkpoint", str(path), "--out", str(self.out),
               "--tasks", *e.tasks, "--device", e.device, "--batch-size", str(e.batch_size), "--wandb", "disabled",
               "--no-progress", "--records-json", str(records_path)]
        if e.include_path:
            cmd += ["--include-path", str(e.include_path)]
        if e.num_loops:
            cmd += ["--num-loops", *map(str, e.num_loops)]
        if e.limit is not None:
            cmd += ["--limit", f"{e.limit:g}" if e.limit >= 1 else repr(e.limit)]
        if e.num_fewshot is not None:
            cmd += ["--num-fewshot", str(e.num_fewshot)]
        if e.tokenizer:
            cmd += ["--tokenizer", str(e.tokenizer)]
        nice = shutil.which("nice")
        return ([nice, "-n", "10"] if nice else []) + cmd  # below training's CPU priority

    def _start(self, step: int, path: Path) -> None:
        if not path.is_dir():
            self.log({"event": "eval_tasks_skipped", "step": self.step, "checkpoint_step": step},
                     console=f"[eval] skipping {_tag(step)}: {path} was removed (checkpoint.keep_last) before its turn")
            return
        t0 = time.time()
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path, records_path = logs / f"{_tag(step)}.log", self.out / "records" / f"{_tag(step)}.json"
        records_path.unlink(missing_ok=True)
        # A job of its own: not this process's launcher rank variables, and not its wandb service (the evaluation
        # outlives or is killed apart from the trainer; a shared service would take the other's run down with it).
        drop = {*LAUNCHER_ENV, "WANDB_SERVICE"}
        env = {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": str(self.e.threads),
               "MKL_NUM_THREADS": str(self.e.threads), "TOKENIZERS_PARALLELISM": "false"}
        if self.e.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA context on the training GPUs
        with open(log_path, "w") as f:
            proc = subprocess.Popen(self.command(path, records_path), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        self.running = _Job(step, path, proc, time.time(), log_path, records_path)
        self.log({"event": "eval_tasks_started", "step": self.step, "checkpoint_step": step, "pid": proc.pid,
                  "launch_s": time.time() - t0},
                 console=f"[eval] evaluating {_tag(step)} in the background (pid {proc.pid}, log {log_path})")

    def _collect(self, job: _Job) -> None:
        t0 = time.time()
        rc = job.proc.returncode
        eval_s = t0 - job.started
        try:
            records = json.loads(job.records_path.read_text()) if rc == 0 else None
        except (OSError, json.JSONDecodeError):
            records = None
        if records is None:
            lines = [ln for ln in _tail(job.log_path).splitlines() if ln.strip()]
            last = lines[-1] if lines else "no output"
            self.log({"event": "eval_tasks_failed", "step": self.step, "checkpoint_step": job.step, "rc": rc,
                      "log": str(job.log_path)},
                     console=f"[eval] evaluation of {_tag(job.step)} failed (rc {rc}): {last} (log: {job.log_path})")
            if rc == 2:  # mesh-eval's one-line settings errors: every later checkpoint would fail the same way
                self.disabled = last
                self.waiting = None
                print("[eval] no further evaluations in this run; fix the eval: section and resume", flush=True)
            return
        for rec in records:
            k = rec.get("num_loops")
            row = {"event": "eval_tasks", "step": self.step, "checkpoint_step": rec["step"],
                   "tokens_seen": rec.get("tokens_seen"), "num_loops": k, "eval_s": eval_s,
                   **{metric_key(m, k): v for m, v in rec["metrics"].items()}}
            shown = ", ".join(f"{m} {v:.4f}" for m, v in rec["metrics"].items())
            row["collect_s"] = time.time() - t0
            self.log(row, console=f"[eval] {_tag(rec['step'])}" + (f" K={k}" if k is not None else "") + f": {shown}")


def _tail(path: Path, n: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


__all__ = ["EvalLauncher", "check_paths", "metric_key"]
