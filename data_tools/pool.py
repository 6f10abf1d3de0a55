"""Worker processes for batch work (tokenize, dedup signatures), one implementation for both.

A worker that dies (e.g. killed for memory) fails the run with one line instead of a hang, which
multiprocessing.Pool would do. fork on Linux: no re-import of __main__ (works from notebooks / stdin),
and workers inherit what the parent loaded."""

from __future__ import annotations

import os
import sys

from .errors import DataToolsError

THREAD_ENV = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")


class WorkerPool:
    def __init__(self, workers: int, initializer, initargs: tuple, what: str):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.what = what
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs)

    def submit(self, fn, *args):
        """A handle whose get() is fn(*args) as computed by a worker."""
        fut, what = self.pool.submit(fn, *args), self.what

        class _Result:
            def get(self_inner):
                from concurrent.futures.process import BrokenProcessPool

                try:
                    return fut.result()
                except BrokenProcessPool as e:
                    raise DataToolsError(f"a {what} worker process died ({e}); if it ran out of memory, use fewer "
                                         "--workers or a smaller --batch-bytes") from None

        return _Result()

    def close(self, abort: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=abort)


class Inline:
    """--workers 1: the same calls, computed in this process when the result is needed. `setup()` runs here as a
    worker's initializer would (single-threaded tokenizer); close() restores the caller's thread settings."""

    def __init__(self, setup, *args):
        self._saved_env = {k: os.environ.get(k) for k in THREAD_ENV}
        setup(*args)

    def submit(self, fn, *args):
        class _Deferred:
            def get(self_inner):
                return fn(*args)

        return _Deferred()

    def close(self, abort: bool = False) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
