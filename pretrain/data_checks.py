"""Up-front dataset checks, run by `Trainer.setup` before process groups, DeepSpeed or the model exist, so a bad
dataset fails in seconds with one line (a `ConfigError`: the CLI prints it and exits 2) instead of a traceback at the
first batch.

Per prefix in data.paths / valid_paths / test_paths: PREFIX.bin and PREFIX.idx exist; the index reads with
megatron-core's own reader (`indexed_dataset._IndexReader`, the class GPTDataset uses; its counts, dtype and lengths
arrays are all we need, and it only memory-maps the index); the .idx size matches the counts in its header; the .bin
size is the sum of the sequence lengths x the dtype size; the dtype is an integer type; there is at least one document
and the document indices span every sequence; a PREFIX.meta.json sidecar agrees with the pair. The deeper per-sequence
checks (every pointer, every token) are `mesh-data verify PREFIX`.

Vocabulary: the largest token id must be below model.vocab_size. With a sidecar the tokenizer's vocabulary size
bounds it (data_tools records the vocabulary, not the largest id: every id is below it by construction). Without one,
the .bin is scanned once (a chunked numpy max over the memory-mapped file) and the result cached, keyed by the .bin's
size and mtime, in PREFIX.token_range.json when the data directory is writable and in <data.cache_dir>/token_ranges/.

Ranks: this runs before torch.distributed exists, so every rank runs the cheap checks itself (they read the same
files, so every rank fails the same way). Only rank 0 scans; the other ranks wait for its cache file (at most
parallel.timeout_s, like a collective) and then apply the same test, so they fail with the same line. Rank 0 writes
the result before judging it, so the waiters never wait on a rank that has already failed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mesh_megatron.config import ConfigError
from pretrain.checkpoint import write_atomic

CACHE_FORMAT = "mesh-pretrain-token-range/1"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_SCAN_CHUNK = 1 << 26  # tokens per numpy max: bounded temporaries, and still one vectorised call per 64M tokens


@dataclass
class PairInfo:
    """What the index says about one prefix (plain numbers: the index mmap is closed)."""

    prefix: str
    dtype: np.dtype
    sequences: int
    documents: int
    tokens: int
    meta: dict | None


def read_meta(prefix: str) -> dict | None:
    """PREFIX.meta.json written by data_tools (tokenizer kind/path/vocab/eod), if present."""
    p = Path(prefix + ".meta.json")
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e}); re-run the tokenizer for this prefix") from None
    tok = meta.get("tokenizer", meta)
    return {"vocab_size": tok.get("vocab_size"), "eod_id": tok.get("eod_id"), "raw": meta}


def _remake(prefix: str, meta: dict | None) -> str:
    """The `mesh-data tokenize` command that re-creates PREFIX (exact when the sidecar names inputs and tokenizer)."""
    raw = (meta or {}).get("raw") or {}
    tok, inputs = raw.get("tokenizer") or {}, raw.get("inputs") or []
    if inputs and tok.get("path") and tok.get("kind") in ("hf", "sentencepiece"):
        src = " ".join(inputs) if len(inputs) <= 3 else f"<the {len(inputs)} inputs listed in {prefix}.meta.json>"
        return f"`mesh-data tokenize {src} -o {prefix} --tokenizer {tok['kind']} --tokenizer-model {tok['path']} --force`"
    return f"`mesh-data tokenize CORPUS -o {prefix} --tokenizer-model TOKENIZER`"


def _fix(prefix: str, meta: dict | None) -> str:
    return f"re-create it with {_remake(prefix, meta)} (or copy it again), then check it with `mesh-data verify {prefix}`"


def check_prefixes(paths: list[str], field: str) -> None:
    """Each prefix has its .bin and .idx (no other file is opened: a missing path is reported at once)."""
    for prefix in paths:
        for ext in (".bin", ".idx"):
            if Path(prefix + ext).is_file():
                continue
            if prefix.endswith((".bin", ".idx")):
                hint = " (pass the prefix without .bin/.idx)"
            else:
                parent = Path(prefix).parent
                near = sorted(p.stem for p in parent.glob("*.idx")) if parent.is_dir() else []
                close = difflib.get_close_matches(Path(prefix).name, near, n=1)
                hint = f" (did you mean '{parent / close[0]}'?)" if close else ("" if parent.is_dir() else f" (no directory {parent})")
            raise ConfigError(
                f"{field}: dataset '{prefix}' has no {prefix + ext}{hint}; tokenize it with data_tools first: "
                f"`mesh-data tokenize CORPUS -o {prefix} --tokenizer-model TOKENIZER`"
            )


def inspect_pair(prefix: str, field: str) -> PairInfo:
    """Sizes, dtype and counts of one .bin/.idx pair, checked against each other and the sidecar."""
    import struct
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core's import-time notes about Transformer Engine / Apex
        from megatron.core.datasets.indexed_dataset import _IndexReader

    meta = read_meta(prefix)
    bp, ip = prefix + ".bin", prefix + ".idx"
    fix = _fix(prefix, meta)
    idx_bytes, bin_bytes = os.path.getsize(ip), os.path.getsize(bp)
    if idx_bytes < _HEADER_BYTES:
        raise ConfigError(f"{field}: {ip} is {idx_bytes} bytes, shorter than the {_HEADER_BYTES}-byte index header (truncated); {fix}")
    try:
        reader = _IndexReader(ip, multimodal=False)
    except (AssertionError, ValueError, KeyError, struct.error) as e:  # bad magic/version/dtype code, short arrays
        raise ConfigError(f"{field}: {ip} ({idx_bytes} bytes) is not a readable Megatron index ({e or type(e).__name__}): truncated or corrupt; {fix}") from None
    try:
        dtype = np.dtype(reader.dtype)
        n_seq, n_doc_idx = int(reader.sequence_count), int(reader.document_count)
        lengths, pointers, doc_idx = reader.sequence_lengths, reader.sequence_pointers, reader.document_indices
        first_doc = int(doc_idx[0]) if n_doc_idx else None
        last_doc = int(doc_idx[-1]) if n_doc_idx else None
        tokens = int(lengths.sum(dtype=np.int64))
        negative = bool(n_seq and lengths.min() < 0)
        # The first and last pointers bracket the data: cheap, and catches an index written for another .bin.
        ptr_ok = n_seq == 0 or (int(pointers[0]) == 0 and int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize == tokens * dtype.itemsize)
        del lengths, pointers, doc_idx  # views of the index mmap: drop them before the reader closes it
    finally:
        del reader
    expected = _HEADER_BYTES + n_seq * (4 + 8) + n_doc_idx * 8
    if idx_bytes not in (expected, expected + n_seq):  # + n_seq: multimodal indices carry a mode byte per sequence
        raise ConfigError(
            f"{field}: {ip} is {idx_bytes} bytes but its header announces {n_seq} sequences and {n_doc_idx} document "
            f"indices ({expected} bytes): truncated or corrupt; {fix}"
        )
    if dtype.kind not in "ui":
        raise ConfigError(f"{field}: {ip} stores tokens as {dtype.name}, not an integer type: not a tokenized dataset; {fix}")
    if n_doc_idx < 2:
        raise ConfigError(f"{field}: {ip} holds no documents; {fix}")
    if first_doc != 0 or last_doc != n_seq or negative or not ptr_ok:
        raise ConfigError(f"{field}: {ip} has inconsistent document indices / sequence lengths / pointers for its {n_seq} sequences: corrupt; {fix}")
    if tokens == 0:
        raise ConfigError(f"{field}: {ip} holds no tokens; {fix}")
    if bin_bytes != tokens * dtype.itemsize:
        how = "truncated (an interrupted copy or write?)" if bin_bytes < tokens * dtype.itemsize else "longer than its index"
        raise ConfigError(
            f"{field}: {bp} is {bin_bytes:,} bytes but {ip} describes {tokens:,} {dtype.name} tokens = "
            f"{tokens * dtype.itemsize:,} bytes: the .bin is {how}; {fix}"
        )
    raw = (meta or {}).get("raw") or {}
    have = {"dtype": dtype.name, "tokens": tokens, "documents": n_doc_idx - 1, "sequences": n_seq}
    for key, value in have.items():
        if key in raw and raw[key] != value:
            raise ConfigError(
                f"{field}: {prefix}.meta.json says {key} {raw[key]} but the .bin/.idx pair holds {value}: the sidecar "
                f"belongs to another version of the data; {fix}"
            )
    return PairInfo(prefix, dtype, n_seq, n_doc_idx - 1, tokens, meta)


# --- the largest token id, for data without a sidecar -----------------------------------------------------------


def launch_rank() -> tuple[int, int]:
    """(rank, world size) before torch.distributed exists, from the launcher's variables (as pretrain.launcher maps
    them: srun's SLURM_PROCID unless torchrun runs under srun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ
    if "SLURM_PROCID" in env and "TORCHELASTIC_RUN_ID" not in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", "1") or 1)
    return int(env.get("RANK", "0") or 0), int(env.get("WORLD_SIZE", "1") or 1)


def cache_files(prefix: str, cache_dir: str | Path) -> list[Path]:
    """Where a token-range cache may be: next to the data, then in the run's data cache (one name per prefix)."""
    absolute = os.path.abspath(prefix)
    key = hashlib.sha1(absolute.encode()).hexdigest()[:16]
    return [Path(prefix + ".token_range.json"), Path(cache_dir) / "token_ranges" / f"{Path(prefix).name}-{key}.json"]


def _bin_key(prefix: str, dtype: np.dtype) -> dict:
    st = os.stat(prefix + ".bin")
    return {"bin_bytes": st.st_size, "bin_mtime_ns": st.st_mtime_ns, "dtype": dtype.name}


def read_cached_range(files: list[Path], key: dict) -> tuple[int, int] | None:
    for f in files:
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("format") == CACHE_FORMAT and all(rec.get(k) == v for k, v in key.items()):
            return int(rec["min_id"]), int(rec["max_id"])
    return None


def scan_token_range(bin_path: str, dtype: np.dtype) -> tuple[int, int]:
    """(smallest, largest) token id in a .bin: chunked numpy min/max over the memory-mapped file (the min only for
    signed dtypes; unsigned ids cannot be negative)."""
    data = np.memmap(bin_path, dtype=dtype, mode="r")
    lo, hi = 0, 0
    try:
        for start in range(0, len(data), _SCAN_CHUNK):
            chunk = data[start:start + _SCAN_CHUNK]
            hi = max(hi, int(chunk.max()))
            if dtype.kind == "i":
                lo = min(lo, int(chunk.min()))
            del chunk
    finally:
        del data
    return lo, hi


def token_range(info: PairInfo, cache_dir: str | Path, timeout_s: float) -> tuple[int, int]:
    """(smallest, largest) token id of a prefix: from a valid cache, else scanned by rank 0 and cached (other ranks
    wait for its cache file)."""
    prefix = info.prefix
    files, key = cache_files(prefix, cache_dir), _bin_key(prefix, info.dtype)
    hit = read_cached_range(files, key)
    if hit is not None:
        return hit
    rank, world = launch_rank()
    if rank != 0 and world > 1:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.2)
            hit = read_cached_range(files, key)
            if hit is not None:
                return hit
        raise ConfigError(
            f"data: rank {rank} waited parallel.timeout_s = {timeout_s:g}s for rank 0 to record the largest token id of "
            f"{prefix}.bin in {files[0]} or {files[1]}; if rank 0 failed, its error says why, else put data.cache_dir on "
            "a filesystem every rank sees or raise parallel.timeout_s"
        )
    print(f"[pretrain] data: {prefix}.bin has no {prefix}.meta.json; scanning its {info.tokens:,} tokens for the "
          "largest token id (once: the result is cached)", flush=True)
    t0 = time.time()
    lo, hi = scan_token_range(prefix + ".bin", info.dtype)
    rec = {"format": CACHE_FORMAT, **key, "min_id": lo, "max_id": hi, "tokens": info.tokens,
           "scan_s": round(time.time() - t0, 3)}
    written, errors = [], []
    for f in files:  # next to the data for later runs; the run's cache dir, which every rank sees, in any case
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(f, json.dumps(rec, indent=1) + "\n")
            written.append(f)
        except OSError as e:
            errors.append(f"{f}: {e.strerror or e}")
    if not written and world > 1:
        raise ConfigError(f"data: cannot record the largest token id of {prefix}.bin for the other ranks ({'; '.join(errors)}); "
                          "set data.cache_dir to a writable directory every rank sees")
    print(f"[pretrain] data: token ids of {prefix}.bin span [{lo}, {hi}] ({time.time() - t0:.1f}s"
          + (f"; cached in {written[0]})" if written else "; not cached: no writable location)"), flush=True)
    return lo, hi


def check_vocabulary(info: PairInfo, field: str, cfg, cache_dir: str | Path) -> None:
    """Every token id of the prefix is a valid row of the model's embedding, and below model.vocab_size."""
    vocab, prefix = cfg.model.vocab_size, info.prefix
    v = (info.meta or {}).get("vocab_size")
    if v is not None:
        if v > vocab:
            raise ConfigError(
                f"{field}: '{prefix}' was tokenized with a vocabulary of {v} tokens but model.vocab_size is {vocab}; "
                f"set model.vocab_size >= {v} or use a dataset made with the model's tokenizer"
            )
        return
    lo, hi = token_range(info, cache_dir, cfg.parallel.timeout_s)
    if hi >= vocab:
        raise ConfigError(
            f"{field}: {prefix}.bin holds token id {hi} but model.vocab_size is {vocab} (embedding rows: "
            f"{cfg.model.padded_vocab_size}) and there is no {prefix}.meta.json naming its tokenizer: set "
            f"model.vocab_size to that tokenizer's vocabulary size (> {hi}), or re-tokenize with the model's tokenizer: "
            f"{_remake(prefix, None)}"
        )
    if lo < 0:
        raise ConfigError(f"{field}: {prefix}.bin holds a negative token id ({lo}): corrupt data; {_fix(prefix, None)}")


def check_data(cfg) -> None:
    """All the checks above for every configured prefix; raises ConfigError (one line) on the first problem.
    Existence first (no file opened), then each pair's sizes, then the vocabulary (which may scan)."""
    d = cfg.data
    if not d.paths:
        raise ConfigError(f"{cfg.source}: data.paths is empty; give at least one tokenized dataset prefix (PREFIX.bin/.idx)")
    fields = [("data.paths", d.paths), ("data.valid_paths", d.valid_paths or []), ("data.test_paths", d.test_paths or [])]
    for field, paths in fields:
        check_prefixes(paths, field)
    infos = [(field, inspect_pair(p, field)) for field, paths in fields for p in dict.fromkeys(paths)]
    cache_dir = d.cache_dir or str(cfg.run_dir / "data_cache")
    for field, info in infos:
        check_vocabulary(info, field, cfg, cache_dir)
