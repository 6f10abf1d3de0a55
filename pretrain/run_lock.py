"""One run per directory: rank 0 holds an exclusive OS lock (flock) on `<dir>/.run.lock` in the run directory and in
the checkpoint directory (when that is elsewhere) for the whole run.

The kernel releases the lock when the last descriptor of it closes, including when the process is killed (kill -9,
OOM killer): a dead run never leaves a stale lock. The file itself stays (deleting a lock file races with a process
that just opened it); its content, written by the holder, only names the holder (host, pid, start time) for the
message a second run prints. So a second run on the same directory stops at once, before anything is built or
written, instead of interleaving its checkpoints and metrics with the first's.

Limits: the lock is as good as the filesystem's flock. Local filesystems: exact. NFS (Linux clients emulate flock with
POSIX locks via the NFS lock protocol): works across nodes unless the filesystem is mounted `nolock` or `local_lock=`
(then each node sees only its own locks); a lock held by a node that crashed is released when the server's lease
expires (NFSv4: ~90 s). Lustre: across nodes only when mounted `-o flock`; with `localflock` per node; where flock is
refused (`noflock`) the run warns and continues unlocked. A child process forked (not exec'd) by the trainer shares
the lock and keeps it while it lives.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path

from mesh_megatron.config import ConfigError

LOCK_NAME = ".run.lock"

# Locks this process holds, by lock-file path. flock treats two opens of one file in one process as two holders, so a
# second train() in the same process (tests, notebooks) would refuse itself while the first Trainer is still alive
# (e.g. referenced by a traceback); the earlier run in this process is over by then, so its lock is handed over.
_held: dict[str, weakref.ref] = {}


class RunDirLocked(ConfigError):
    """Another live process holds the lock on this run's directory."""


class RunLock:
    """Open, flock'ed lock files; released by release(), by garbage collection, or by the process's death."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def release(self) -> None:
        for path, fd in self.fds.items():
            if _held.get(path) is not None and _held[path]() is self:
                del _held[path]
            os.close(fd)  # closing the only descriptor releases the flock
        self.fds = {}

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: the process exit closes the descriptors anyway
            pass

    @property
    def paths(self) -> list[str]:
        return list(self.fds)


def lock_dirs(dirs: list[Path]) -> RunLock:
    """Take the lock in each of `dirs` (created if missing). Raises RunDirLocked naming the holder if another process
    has one; a directory whose filesystem refuses flock is skipped with a warning."""
    lock = RunLock()
    seen = []
    for d in dirs:
        d = Path(d)
        try:
            d.mkdir(parents=True, exist_ok=True)
            real = os.path.realpath(d / LOCK_NAME)
        except OSError as e:
            lock.release()
            raise ConfigError(f"{d}: cannot create the run directory ({e.strerror}); choose a writable "
                              "logging.dir / checkpoint.dir") from None
        if real in seen:
            continue
        seen.append(real)
        try:
            _take(real, lock)
        except BaseException:
            lock.release()
            raise
    return lock


def _take(path: str, lock: RunLock) -> None:
    previous = _held.get(path)
    if previous is not None and previous() is not None:
        previous().release()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ConfigError(f"{path}: cannot open the run lock file ({e.strerror}); choose a writable logging.dir / "
                          "checkpoint.dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
        os.close(fd)
        if holder is not None:
            raise RunDirLocked(
                f"{Path(path).parent}: another run is using this directory ({holder}; lock file {path}); wait for it "
                "to finish or stop it, or give this run its own logging.dir / checkpoint.dir"
            ) from None
        print(f"[pretrain] warning: cannot lock {path} ({e.strerror}; the filesystem does not support flock): a "
              "second run on this directory would not be detected", file=sys.stderr, flush=True)
        return
    # Ours now: say who holds it (read by the run that is refused).
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "argv": " ".join(sys.argv)}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as e:  # e.g. a full disk: say so in one line rather than start a run that cannot save
        os.close(fd)
        raise ConfigError(f"{path}: cannot write the run lock file ({e.strerror}); free space or choose another "
                          "logging.dir / checkpoint.dir") from None
    lock.fds[path] = fd
    _held[path] = weakref.ref(lock)


def _holder(fd: int) -> str:
    """'pid P on host H since T' from the holder's lock file (it may be writing it right now: retry briefly)."""
    for _ in range(20):
        raw = os.pread(fd, 4096, 0)
        try:
            info = json.loads(raw)
            return f"held by pid {info['pid']} on host {info['host']} since {info['started']}"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "held by another process that has not written its name into the lock file"
