"""Keep glibc from handing activation memory back to the OS after every training step on CPU.

By default glibc serves allocations above a (dynamic) threshold with fresh mmap()s and unmaps them on free, so every
step page-faults its activations in again. On the 2-core CPU box this alone made MeSH look 84% and the anchor
heuristic 46% slower than the base recursion (their activations are a little larger); with the heap kept, the same
benchmark gives about +2.5% and +1.5% (bench/results/train_throughput_cpu.json). On CUDA the caching allocator already
does this, so the call is a no-op there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters from <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_heap_on_cpu() -> bool:
    """Raise glibc's mmap / trim thresholds (mmap threshold max is 32 MiB on 64-bit). Returns True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1  # int parameter
        ok &= libc.mallopt(_M_TOP_PAD, 256 * 2**20) == 1
        return bool(ok)
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
