"""`mesh-eval --watch`: evaluate each new complete checkpoint of a running job as it appears, until the run is finished
(its checkpoint at step == train_iters, which the trainer writes at the end) or no new checkpoint came for
--idle-timeout minutes. Restartable: the result cache skips what is done. One watcher per OUT at a time (a lock
file); a second one waits for it, so chained Slurm jobs can each start one."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable

from mesh_tools.eval.cache import EvalSettings
from mesh_tools.eval.runner import EvalError, evaluate
from pretrain.checkpoint import TAG_RE, complete_checkpoints, read_state


def finished_step(ckpts: list[Path]) -> int | None:
    """The step of the run's final checkpoint (step >= its train_iters), or None while training goes on."""
    if not ckpts:
        return None
    try:
        state, _ = read_state(ckpts[-1])
    except Exception:  # noqa: BLE001 -- pruned or unreadable meanwhile: look again at the next poll
        return None
    return state.step if state.train_iters and state.step >= state.train_iters else None


class _Lock:
    """An exclusive flock on OUT/.watch.lock (released by the OS if the watcher dies)."""

    def __init__(self, out: Path):
        self.fd = os.open(out / ".watch.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def try_take(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.fd)


def watch(root: str | Path, out: str | Path, settings: EvalSettings, *, idle_timeout_min: float, poll_s: float,
          log: Callable[[str], None] = print, **eval_kwargs) -> dict:
    """Evaluate new checkpoints under `root` into `out` until the run finishes or `idle_timeout_min` pass without a
    new one. Returns {"evaluated": [checkpoint names], "reason": "finished" | "idle"}."""
    root, out = Path(root), Path(out)
    if TAG_RE.match(root.name):
        raise EvalError(f"--watch: --checkpoint {root} is one checkpoint; pass the run's checkpoint root (its parent)")
    if root.exists() and not root.is_dir():
        raise EvalError(f"--watch: --checkpoint {root} is not a directory")
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = _Lock(out)
    done: list[str] = []
    seen: set[str] = set()
    last_new = time.time()
    waiting_note = False
    try:
        while True:
            if time.time() - last_new > idle_timeout_min * 60:
                log(f"mesh-eval --watch: no new checkpoint in {root} for {idle_timeout_min:g} min; stopping "
                    "(re-run to continue: finished evaluations are cached)")
                return {"evaluated": done, "reason": "idle"}
            if not lock.try_take():
                if not waiting_note:
                    log(f"mesh-eval --watch: another watcher holds {out / '.watch.lock'}; waiting for it")
                    waiting_note = True
                time.sleep(poll_s)
                continue
            ckpts = complete_checkpoints(root)
            for c in ckpts:
                if c.name in seen:
                    continue
                try:
                    summary = evaluate(c, out, settings, **eval_kwargs)
                except EvalError:
                    if c.exists():
                        raise
                    log(f"mesh-eval --watch: {c.name} was removed before it was read (checkpoint.keep_last); skipped")
                    seen.add(c.name)
                    continue
                seen.add(c.name)
                last_new = time.time()
                if summary["evaluated"]:
                    done.append(c.name)
                log(f"mesh-eval --watch: {c.name}: {len(summary['evaluated'])} evaluated, {len(summary['cached'])} cached")
            final = finished_step(ckpts)
            if final is not None and all(c.name in seen for c in complete_checkpoints(root)):
                log(f"mesh-eval --watch: the run is finished (checkpoint at step {final} = train_iters); done")
                return {"evaluated": done, "reason": "finished"}
            time.sleep(poll_s)
    finally:
        lock.close()
