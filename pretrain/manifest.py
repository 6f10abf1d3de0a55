"""What a checkpoint holds and whether it is still intact: the manifest in its COMPLETE marker.

COMPLETE (written last, just before the directory is renamed into place) is a JSON object

    {"tag": "step_00000100", "format": 1, "hash": "xxh3_128",
     "files": {"mp_rank_00_model_states.pt": {"size": 1234, "hash": "<32 hex digits>"}, "rng/rank_0.pt": {...}, ...}}

listing every other file of the checkpoint directory (relative path, size in bytes, xxh3-128 of the content).
Checkpoints written before manifests existed hold the plain text `step_N\\n`: `read_manifest` returns None for them.

Hashing and verifying are shared out over the ranks: the files, largest first, go round-robin (file i to rank
i % world), so each rank reads about 1/world of the bytes; the results are gathered with one all_gather_object.
Without an initialised process group (or with collective=False) one process does every file.

Why xxh3-128 (python-xxhash, pinned): on the development box (AMD EPYC, one core) reading a file from the page cache
and hashing it ran at 11.0 GiB/s with xxh3-128, 3.3 GiB/s with zlib.crc32, 1.6 with sha1, 1.5 with sha256 and
0.7 with blake2b; 128 bits leave accidental corruption (flipped bytes, a truncated or torn write) undetected with
probability 2^-128 per file. Corruption by an adversary is not the threat model (xxh3 is not cryptographic).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

FORMAT = 1
ALGO = "xxh3_128"
MARKER = "COMPLETE"
_CHUNK = 8 << 20
_OLD_MARKER = re.compile(r"step_\d+")  # what COMPLETE held before manifests


def hash_file(path: Path) -> tuple[int, str]:
    """(size in bytes, xxh3-128 hex digest) of one file, read in 8 MiB chunks."""
    h, size = xxhash.xxh3_128(), 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def list_files(ckpt: Path) -> dict[str, int]:
    """{relative path: size} of every regular file in a checkpoint directory, the marker excluded."""
    return {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.relative_to(ckpt).as_posix() != MARKER}


def _share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's files: largest first, round-robin, so the big model / optimizer files spread over the ranks."""
    order = sorted(sizes, key=lambda rel: (-sizes[rel], rel))
    return order[rank::world]


def _group(collective: bool) -> tuple[int, int]:
    import torch.distributed as dist

    if collective and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(mine, collective: bool) -> list:
    """Every rank's `mine`, in rank order (one all_gather_object; just [mine] in a single process)."""
    import torch.distributed as dist

    if not collective or not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def hash_checkpoint(ckpt: Path, collective: bool = True) -> tuple[dict[str, dict], OSError | None]:
    """Collective (every rank calls it, after every rank's writes into `ckpt` are done): ({relpath: {"size",
    "hash"}} of every file, on every rank; None, or this rank's OSError reading its share, which the caller must
    agree on collectively). Rank 0 lists the directory; the list is broadcast."""
    import torch.distributed as dist

    rank, world = _group(collective)
    listing = [None]
    if rank == 0:
        try:
            listing[0] = list_files(ckpt)
        except OSError as e:
            listing[0] = e
    if world > 1:
        dist.broadcast_object_list(listing, src=0)
    if isinstance(listing[0], OSError):
        return {}, listing[0] if rank == 0 else None
    mine, error = {}, None
    for rel in _share(listing[0], rank, world):
        try:
            size, digest = hash_file(ckpt / rel)
        except OSError as e:
            error = e
            break
        mine[rel] = {"size": size, "hash": digest}
    hashes = {}
    for part in _gather(mine, collective):
        hashes.update(part)
    return dict(sorted(hashes.items())), error


def write_complete(ckpt: Path, tag: str, hashes: dict[str, dict]) -> None:
    """Rank 0: write the COMPLETE marker holding the manifest (atomically). Files written after the collective
    hashing (rank 0's run_config.yaml, trainer_state.json) are hashed here."""
    from pretrain.checkpoint import write_atomic

    files = dict(hashes)
    for rel in list_files(ckpt):
        if rel not in files:
            size, digest = hash_file(ckpt / rel)
            files[rel] = {"size": size, "hash": digest}
    doc = {"tag": tag, "format": FORMAT, "hash": ALGO, "files": dict(sorted(files.items()))}
    write_atomic(ckpt / MARKER, json.dumps(doc, indent=1) + "\n")


class ManifestError(ValueError):
    """A COMPLETE marker that is neither a manifest nor the old plain-text marker."""


def read_manifest(ckpt: Path) -> dict | None:
    """The manifest of a checkpoint, or None for one written before manifests (COMPLETE = 'step_N\\n').
    Raises ManifestError when COMPLETE is damaged, OSError when it cannot be read."""
    text = (ckpt / MARKER).read_bytes().decode("utf-8", errors="replace")
    if _OLD_MARKER.fullmatch(text.strip()):
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"the manifest is not valid JSON ({e.msg} at line {e.lineno}): damaged") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        raise ManifestError(f"manifest format {doc.get('format') if isinstance(doc, dict) else None!r} is not "
                            f"{FORMAT} (damaged, or written by a newer version of this trainer)")
    if not all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("hash"), str)
               for v in doc["files"].values()):
        raise ManifestError("a manifest entry lacks its size or hash: damaged")
    if doc.get("hash") != ALGO:
        raise ManifestError(f"manifest hash {doc.get('hash')!r} is not {ALGO} (written by a newer version of this "
                            "trainer?)")
    return doc


@dataclass
class Verdict:
    """Outcome of `verify`: `manifest` False for an old checkpoint (nothing checked); `problems` are
    (relative path, reason) pairs, sorted; `files` / `bytes` what was checked, `seconds` how long it took."""

    manifest: bool = True
    problems: list[tuple[str, str]] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check(ckpt: Path, rel: str, want: dict) -> str | None:
    path = ckpt / rel
    try:
        size = path.stat().st_size
        if size != want["size"]:
            cut = " (truncated)" if size < want["size"] else ""
            return f"{size:,} bytes, the manifest says {want['size']:,}{cut}"
        _, digest = hash_file(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if digest != want["hash"]:
        return "content differs from the manifest (hash mismatch: corrupted)"
    return None


def verify(ckpt: Path, collective: bool = True) -> Verdict:
    """Collective unless collective=False: check every file the manifest lists (existence, size, hash), each rank
    a share; every rank gets the same Verdict. Rank 0 reads COMPLETE and broadcasts it, so the ranks cannot
    disagree on what to check; a damaged COMPLETE is a problem of its own ('COMPLETE', reason)."""
    import time

    import torch.distributed as dist

    t0 = time.time()
    rank, world = _group(collective)
    head = [None]
    if rank == 0:
        try:
            head[0] = read_manifest(ckpt) or "old"
        except ManifestError as e:
            head[0] = ("bad", str(e))
        except OSError as e:
            head[0] = ("bad", f"unreadable ({e.strerror or e})")
    if world > 1:
        dist.broadcast_object_list(head, src=0)
    if head[0] == "old":
        return Verdict(manifest=False)
    if isinstance(head[0], tuple):
        return Verdict(problems=[(MARKER, head[0][1])])
    files = head[0]["files"]
    mine = []
    for rel in _share({rel: int(v.get("size", 0)) for rel, v in files.items()}, rank, world):
        if (why := _check(ckpt, rel, files[rel])) is not None:
            mine.append((rel, why))
    problems = sorted(p for part in _gather(mine, collective) for p in part)
    return Verdict(problems=problems, files=len(files), bytes=sum(int(v["size"]) for v in files.values()),
                   seconds=time.time() - t0)
