"""Asynchronous checkpoint writes (`checkpoint.async_save: true`; design in docs/checkpoints.md, "Asynchronous save").

DeepSpeed's `save_checkpoint` hands every file to `engine.checkpoint_engine.save(state_dict, path)`.
`SnapshotCheckpointEngine` is installed there for the duration of one save: its `save()` copies the state dict
(tensors detached and cloned to host memory, pinned when they live on a GPU) and queues the copy; one background
thread (`AsyncWriter`) writes the queued copies in order, each with torch.save into a temp file and os.replace.

The writer thread never makes a collective call (gloo collectives from two threads of a process are unsafe): it only
sets flags. The training thread asks every rank whether its writes are done at a step boundary, and then commits
with pretrain.checkpoint.commit, exactly as a synchronous save does.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


class WriteBatch:
    """The files of one checkpoint: written in order by the writer thread; `done` is set after the last one."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.done = threading.Event()
        self.error: BaseException | None = None  # the first write that failed; later writes of the batch are skipped
        self.files = 0
        self.bytes = 0
        self.snapshot_s = 0.0  # training-thread time spent copying state for this batch
        self.pinned: list[torch.Tensor] = []  # host buffers to hand back to the pool once written


class AsyncWriter:
    """One background thread that writes host copies of state dicts. At most one batch is in flight at a time (the
    trainer waits for and commits the previous save before it starts the next), so pinned host buffers are reused
    from one save to the next instead of being allocated (slowly) every time."""

    def __init__(self, zipfile_serialization: bool = True) -> None:
        self.zipfile_serialization = zipfile_serialization
        self._jobs: queue.Queue = queue.Queue()
        self._abandon = threading.Event()
        self._pool: dict[tuple, list[torch.Tensor]] = {}
        self._pool_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    # --- training thread ----------------------------------------------------------------------------------------

    def submit(self, batch: WriteBatch, obj: Any, path: str | Path) -> None:
        """Copy `obj` (the training thread's stall) and queue the copy to be written to `path`."""
        t0 = time.perf_counter()
        copied = self.snapshot(obj, batch)
        event = None
        if torch.cuda.is_available() and batch.pinned:
            # device->host copies were queued on the current stream: the writer waits for them, not this thread;
            # later kernels on that stream (the next step's updates) run after the copies.
            event = torch.cuda.Event()
            event.record()
        batch.snapshot_s += time.perf_counter() - t0
        self._jobs.put((batch, copied, Path(path), event))

    def seal(self, batch: WriteBatch) -> None:
        """No more files for `batch`: `batch.done` is set once every queued file is written (or failed)."""
        self._jobs.put((batch, None, None, None))

    def close(self, abandon: bool = False) -> None:
        """Stop the thread after the queued writes (or, with `abandon`, skipping those not yet started)."""
        if abandon:
            self._abandon.set()
        self._jobs.put(None)
        self._thread.join()

    def snapshot(self, obj: Any, batch: WriteBatch, memo: dict | None = None) -> Any:
        """A copy of `obj` that the training can no longer change: tensors detached and cloned to host memory (the
        same tensor object twice stays one copy), containers rebuilt, numpy arrays copied; other leaves (numbers,
        strings, config objects) are shared."""
        memo = {} if memo is None else memo
        if torch.is_tensor(obj):
            if id(obj) not in memo:
                memo[id(obj)] = self._host_copy(obj.detach(), batch)
            return memo[id(obj)]
        if isinstance(obj, dict):
            out = copy.copy(obj)  # keeps the mapping's type (OrderedDict, defaultdict)
            for k, v in obj.items():
                out[k] = self.snapshot(v, batch, memo)
            return out
        if isinstance(obj, list):
            return [self.snapshot(v, batch, memo) for v in obj]
        if isinstance(obj, tuple):
            items = [self.snapshot(v, batch, memo) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if isinstance(obj, np.ndarray):
            return obj.copy()
        return obj

    def _host_copy(self, t: torch.Tensor, batch: WriteBatch) -> torch.Tensor:
        if t.device.type == "cpu":
            return t.clone()
        key = (t.dtype, tuple(t.shape))
        with self._pool_lock:
            free = self._pool.get(key)
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        buf.copy_(t, non_blocking=True)
        batch.pinned.append(buf)
        return buf

    # --- writer thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch, obj, path, event = job
            if path is None:
                self._release(batch)
                batch.done.set()
                continue
            if batch.error is not None or self._abandon.is_set():
                continue
            try:
                if event is not None:
                    event.synchronize()
                tmp = path.with_name(f".{path.name}.partial")
                try:
                    torch.save(obj, tmp, _use_new_zipfile_serialization=self.zipfile_serialization)
                    os.replace(tmp, path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                batch.files += 1
                batch.bytes += path.stat().st_size
                if batch.files == 1:
                    _fault_injection_pause(batch.step)
            except BaseException as e:  # noqa: BLE001 - any failure is reported on every rank by the commit
                batch.error = e
            finally:
                del obj

    def _release(self, batch: WriteBatch) -> None:
        with self._pool_lock:
            for buf in batch.pinned:
                self._pool.setdefault((buf.dtype, tuple(buf.shape)), []).append(buf)
        batch.pinned = []


class SnapshotCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed checkpoint engine whose save() copies the state and queues it on an AsyncWriter instead of writing.
    Loading is TorchCheckpointEngine's. commit() does nothing: the trainer commits once every rank's writes are done."""

    def __init__(self, writer: AsyncWriter, config_params=None) -> None:
        super().__init__(config_params)
        self.name = "SnapshotCheckpointEngine"
        self.writer = writer
        self.batch: WriteBatch | None = None

    def save(self, state_dict, path: str) -> None:
        if self.batch is None:
            raise RuntimeError("SnapshotCheckpointEngine.save outside a checkpoint save (no WriteBatch set)")
        self.writer.submit(self.batch, state_dict, path)

    def commit(self, info) -> bool:  # noqa: ARG002
        return True

    def preserves_storage_sharing(self) -> bool:
        # DeepSpeed then skips its own device-side clone of views: the snapshot copies every tensor already.
        return False


def _fault_injection_pause(step: int) -> None:
    """Tests only: MESH_PRETRAIN_PAUSE_ASYNC_WRITE=STEP:SECONDS[,STEP:SECONDS...] makes the writer thread sleep after the first file of
    that step's save, so a test can kill -9 the process while the background write is half done, or check that the
    run waits for a slow write."""
    for item in filter(None, os.environ.get("MESH_PRETRAIN_PAUSE_ASYNC_WRITE", "").split(",")):
        at, secs = item.split(":")
        if int(at) == step:
            time.sleep(float(secs))


class AsyncSaver:
    """The trainer's side of asynchronous saves on one DeepSpeed engine: at most one save in flight."""

    def __init__(self, engine) -> None:
        self.engine = engine
        serialization = getattr(engine.checkpoint_engine, "zipfile_serialization", True)
        self.writer = AsyncWriter(zipfile_serialization=serialization)
        self.snapshot_engine = SnapshotCheckpointEngine(self.writer, getattr(engine, "_config", None))
        self.snapshot_engine.zipfile_serialization = serialization  # the same files as DeepSpeed's own engine
        self.pending = None  # pretrain.checkpoint.PendingSave

    def start(self, cfg, state, root: Path):
        """Collective: checks and copies as a synchronous save does, then returns while the writer thread writes.
        The caller commits the previous pending save first."""
        from pretrain import checkpoint as ckpt

        assert self.pending is None, "one asynchronous save at a time: commit the pending one first"
        batch = WriteBatch(state.step)
        original = self.engine.checkpoint_engine
        self.engine.checkpoint_engine, self.snapshot_engine.batch = self.snapshot_engine, batch
        try:
            self.pending = ckpt.start_save(self.engine, cfg, state, root, writer=self.writer, batch=batch)
        finally:
            self.engine.checkpoint_engine, self.snapshot_engine.batch = original, None
        return self.pending

    def commit(self) -> Path:
        """Collective: wait for this rank's writes of the pending save, then commit it (or raise CheckpointError on
        every rank). The pending save is cleared either way."""
        from pretrain import checkpoint as ckpt

        pending, self.pending = self.pending, None
        return ckpt.commit(pending)

    def close(self, abandon: bool = False) -> None:
        """Stop the writer thread (after the queued writes, or with `abandon` before its next file). A save still
        pending is not committed: it stays a .tmp-* directory, removed at the next start."""
        self.pending = None
        self.writer.close(abandon=abandon)
