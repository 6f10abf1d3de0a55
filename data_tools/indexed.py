"""Megatron indexed datasets (.bin/.idx) in megatron-core's format, plus the PREFIX.meta.json sidecar.

Writing is plain numpy in exactly the bytes megatron-core's IndexedDatasetBuilder writes (version-1
index, not multimodal; tests/test_data_hardening.py compares them byte for byte), because importing
megatron-core pulls in torch and costs seconds of CPU per process before the first document, paid
by every tokenize run and every task of a Slurm array. Reading and checking go through
`megatron.core.datasets.indexed_dataset` (imported lazily), so what is written is checked by the
reader GPTDataset uses. This module adds what megatron-core lacks: atomic publication of a .bin/.idx
pair, a consistency checker with readable errors (megatron-core only asserts), one-line errors naming
the path when the disk is full or read-only, and the sidecar that records the tokenizer.

The sidecar is the completeness marker: it is written last and removed first when an output is
replaced, so a pair without a matching PREFIX.meta.json is never the product of a finished run.
"""

from __future__ import annotations

import array
import errno
import json
import os
import shutil
import socket
import struct
import time
from typing import Iterable

import numpy as np

from .errors import DataToolsError

META_FORMAT = "mesh-data-meta/1"
_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count


def _idx():
    """megatron-core's indexed_dataset module (imported lazily: it pulls in torch)."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    logging.getLogger("megatron.core.datasets.indexed_dataset").setLevel(logging.WARNING)
    return indexed_dataset


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def meta_path(prefix: str) -> str:
    return prefix + ".meta.json"


# megatron-core's indexed_dataset.DType codes, written into the .idx header
DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}
_COPY_BYTES = 1 << 24


def optimal_dtype(vocab_size: int):
    """uint16 when every token id fits, else int32 (megatron-core's DType.optimal_dtype rule)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class OutputError(DataToolsError):
    """The output cannot be written (read-only filesystem, disk full, no permission). Exit status 2."""

    exit_code = 2


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def output_error(e: OSError, path: str, need_bytes: int | None = None) -> OutputError:
    """One line naming the path that could not be written, why, and what to do."""
    where = os.path.dirname(os.path.abspath(path))
    if e.errno == errno.EROFS:
        why, fix = "read-only file system", "write the output (-o) to a writable filesystem"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(where)
        why = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        facts = ([f"{free:,} bytes free in {where}"] if free is not None else []) + (
            [f"this step writes {need_bytes:,} bytes"] if need_bytes else [])
        why += f" ({', '.join(facts)})" if facts else ""
        fix = "free space there or write the output (-o) elsewhere"
    elif e.errno in (errno.EACCES, errno.EPERM):
        why, fix = "permission denied", "write the output (-o) to a directory you can write"
    else:
        why, fix = e.strerror or str(e), "check the output location (-o)"
    return OutputError(f"cannot write {path}: {why}; {fix}")


def ensure_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise output_error(e, path) from None


def _remove_quietly(*paths: str) -> None:
    for p in paths:
        try:
            os.remove(p)
        except OSError:
            pass


def atomic_write_json(path: str, obj) -> None:
    # host + pid: array tasks on different nodes may write the same file on a shared filesystem
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise output_error(e, path) from None


def read_meta(prefix: str) -> dict | None:
    p = meta_path(prefix)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataToolsError(f"{p}: unreadable sidecar ({e}); re-create the dataset or delete the file") from None
    if meta.get("format") != META_FORMAT:
        raise DataToolsError(f"{p}: unknown sidecar format {meta.get('format')!r} (expected {META_FORMAT})")
    return meta


def resolve_tokenizer_path(meta: dict, prefix: str) -> str:
    """The tokenizer file recorded in the sidecar: absolute path, else relative to the sidecar."""
    t = meta["tokenizer"]
    cands = [t.get("path"), os.path.join(os.path.dirname(os.path.abspath(prefix)), t.get("relpath") or "")]
    for c in cands:
        if c and os.path.isfile(c):
            return c
    raise DataToolsError(
        f"{meta_path(prefix)}: tokenizer file {t.get('path')} not found (nor {t.get('relpath')} next to the dataset); "
        "pass --tokenizer/--tokenizer-model"
    )


def _index_header(dtype, n_seq: int, n_doc: int) -> bytes:
    """megatron-core _IndexWriter: magic, version 1, dtype code, sequence count, document-index count."""
    return _HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[np.dtype(dtype).name]) + struct.pack("<QQ", n_seq, n_doc)


def _pointers(lengths: np.ndarray, itemsize: int, base: int = 0) -> np.ndarray:
    """Byte offset of each sequence in the .bin (megatron-core _IndexWriter._sequence_pointers), from base."""
    ptr = np.empty(len(lengths), dtype=np.int64)
    if len(lengths):
        ptr[0] = 0
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=ptr[1:])
        ptr += base
    return ptr


def _lengths_int32(lengths: np.ndarray) -> np.ndarray:
    if len(lengths) and int(lengths.max()) >= 2**31:  # the index stores int32 lengths
        raise DataToolsError(f"a sequence of {int(lengths.max()):,} tokens does not fit the index's int32 lengths; use --split-sentences")
    return lengths.astype(np.int32)


class ShardWriter:
    """Writes PREFIX.bin/.idx under temporary names (PREFIX.partial.*); commit() renames them into place.

    The bytes are those of megatron-core's IndexedDatasetBuilder (add_document + finalize). Lengths and
    document indices are kept as int64 arrays (8 bytes each, where the builder keeps Python lists).
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self._tmp = f"{prefix}.partial"
        self.dtype = np.dtype(dtype)
        self._lengths = array.array("q")
        self._doc_idx = array.array("q", [0])
        self._bin = bin_path(self._tmp)
        try:
            self._f = open(self._bin, "wb")
        except OSError as e:
            raise output_error(e, self._bin) from None

    def add_document(self, tokens: np.ndarray, seq_lengths: list[int]) -> None:
        arr = np.ascontiguousarray(tokens, dtype=self.dtype)
        try:
            self._f.write(memoryview(arr).cast("B"))
        except OSError as e:
            raise output_error(e, self._bin) from None
        self._lengths.extend(seq_lengths)
        self._doc_idx.append(len(self._lengths))

    def commit(self) -> None:
        ip = idx_path(self._tmp)
        try:
            self._f.close()
        except OSError as e:
            raise output_error(e, self._bin) from None
        lengths = np.frombuffer(self._lengths, dtype=np.int64)
        try:
            with open(ip, "wb") as f:
                f.write(_index_header(self.dtype, len(lengths), len(self._doc_idx)))
                f.write(_lengths_int32(lengths).tobytes())
                f.write(_pointers(lengths, self.dtype.itemsize).tobytes())
                f.write(np.frombuffer(self._doc_idx, dtype=np.int64).tobytes())
        except OSError as e:
            raise output_error(e, ip) from None
        publish_pair(self._tmp, self.prefix)

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass  # e.g. the disk is full: the file goes anyway
        _remove_quietly(bin_path(self._tmp), idx_path(self._tmp))


def _read_index(prefix: str):
    """(dtype, lengths int32, document indices int64) of a version-1, non-multimodal .idx."""
    ip = idx_path(prefix)
    with open(ip, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _HEADER:
        raise DataToolsError(f"{ip}: not a Megatron index (bad header); run `mesh-data verify {prefix}`")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    names = {v: k for k, v in DTYPE_CODES.items()}
    if version != 1 or code not in names:
        raise DataToolsError(f"{ip}: index version {version} / dtype code {code} not supported; run `mesh-data verify {prefix}`")
    lengths = np.fromfile(ip, dtype=np.int32, count=n_seq, offset=_HEADER_BYTES)
    doc_idx = np.fromfile(ip, dtype=np.int64, count=n_doc, offset=_HEADER_BYTES + 12 * n_seq)
    if len(lengths) != n_seq or len(doc_idx) != n_doc:
        raise DataToolsError(f"{ip}: truncated index; run `mesh-data verify {prefix}`")
    return np.dtype(names[code]), lengths, doc_idx


def concatenate(prefixes: list[str], output_prefix: str, dtype) -> None:
    """Append whole .bin/.idx pairs in order into output_prefix: the bytes of megatron-core's builder
    add_index + finalize, streamed one input at a time (memory: one input's index, not the sum).
    Temporary names until complete; a failure removes them."""
    dtype = np.dtype(dtype)
    heads = []
    for p in prefixes:
        dt, lengths, doc_idx = _read_index(p)
        if dt != dtype:  # megatron-core asserts the same
            raise DataToolsError(f"{idx_path(p)} holds {dt.name} tokens, the output is {dtype.name}")
        heads.append((len(lengths), len(doc_idx)))
        del lengths, doc_idx
    n_seq = sum(h[0] for h in heads)
    n_doc = 1 + sum(max(h[1] - 1, 0) for h in heads)
    tmp = f"{output_prefix}.partial"
    need = sum(os.path.getsize(bin_path(p)) for p in prefixes)
    target = idx_path(tmp)
    try:
        with open(target, "wb") as f:
            f.write(_index_header(dtype, n_seq, n_doc))
            for p in prefixes:  # the three arrays are stored one after the other: three passes
                f.write(_read_index(p)[1].tobytes())
            base = 0
            for p in prefixes:
                lengths = _read_index(p)[1]
                f.write(_pointers(lengths, dtype.itemsize, base).tobytes())
                base += int(lengths.astype(np.int64).sum()) * dtype.itemsize
            f.write(np.zeros(1, dtype=np.int64).tobytes())
            offset = 0
            for p, (n, _) in zip(prefixes, heads):
                f.write((_read_index(p)[2][1:] + offset).tobytes())
                offset += n
        target = bin_path(tmp)
        with open(target, "wb") as out:
            for p in prefixes:
                with open(bin_path(p), "rb") as src:
                    shutil.copyfileobj(src, out, _COPY_BYTES)
    except OSError as e:
        _remove_quietly(bin_path(tmp), idx_path(tmp))
        raise output_error(e, target, need if target == bin_path(tmp) else None) from None
    except BaseException:
        _remove_quietly(bin_path(tmp), idx_path(tmp))
        raise
    publish_pair(tmp, output_prefix)


def read_json_or_none(path: str):
    """A JSON record of a previous run, or None if it is missing or unreadable (it is then simply redone)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def publish_pair(src_prefix: str, dst_prefix: str) -> None:
    """Move a finished src pair onto dst. The dst sidecar is dropped first (see module doc)."""
    target = meta_path(dst_prefix)
    try:
        if os.path.exists(target):
            os.remove(target)
        for f in (bin_path, idx_path):
            target = f(src_prefix)
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
            target = f(dst_prefix)
            os.replace(f(src_prefix), target)
    except OSError as e:
        raise output_error(e, target) from None


def read_dataset(prefix: str):
    """megatron-core's IndexedDataset over PREFIX (mmap). Errors become DataToolsError."""
    mod = _idx()
    for p in (bin_path(prefix), idx_path(prefix)):
        if not os.path.isfile(p):
            raise DataToolsError(f"{p} does not exist (expected a .bin/.idx pair at prefix {prefix})")
    try:
        return mod.IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, struct.error) as e:
        raise DataToolsError(f"{prefix}: megatron-core cannot read this dataset ({e}); run `mesh-data verify {prefix}`") from None


def iter_documents(ds) -> Iterable[np.ndarray]:
    """Each document's tokens (its sequences concatenated), in order."""
    doc_idx = ds.document_indices
    for d in range(len(doc_idx) - 1):
        parts = [ds[i] for i in range(int(doc_idx[d]), int(doc_idx[d + 1]))]
        yield np.concatenate(parts) if parts else np.zeros(0, dtype=ds.index.dtype)


def verify(prefix: str, check_tokens: bool = True, chunk_tokens: int = 1 << 24) -> dict:
    """Check a .bin/.idx pair for consistency; DataToolsError listing every problem found.

    Checks: header/version/dtype code; .idx size against its counts; lengths non-negative;
    pointers = byte offsets of consecutive sequences; document indices start at 0, never decrease
    and end at the sequence count; .bin size = total tokens x itemsize; megatron-core opens it.
    With a sidecar: dtype and counts match it, every token id < vocab_size, every document ends
    with the EOD id (when EOD was appended).
    """
    mod = _idx()
    problems: list[str] = []
    bp, ip = bin_path(prefix), idx_path(prefix)
    for p in (bp, ip):
        if not os.path.isfile(p):
            raise DataToolsError(f"verify: {p} does not exist")
    idx_size = os.path.getsize(ip)
    with open(ip, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES:
        raise DataToolsError(f"verify: {ip} is {idx_size} bytes, shorter than the {_HEADER_BYTES}-byte header: truncated")
    if head[:9] != _HEADER:
        raise DataToolsError(f"verify: {ip} does not start with the Megatron index magic {_HEADER!r}: not an index file or corrupt")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise DataToolsError(f"verify: {ip}: index version {version}, expected 1")
    try:
        dtype = np.dtype(mod.DType.dtype_from_code(code))
    except Exception:
        raise DataToolsError(f"verify: {ip}: unknown dtype code {code}") from None
    expected = _HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if idx_size not in (expected, expected + n_seq):  # + n_seq: multimodal (per-sequence mode byte)
        raise DataToolsError(
            f"verify: {ip} is {idx_size} bytes but its header announces {n_seq} sequences and {n_doc} document "
            f"indices, which need {expected} bytes: truncated or corrupt index"
        )
    index = mod._IndexReader(ip, multimodal=idx_size != expected)
    # copies: the reader's arrays are views of an mmap that closes when the reader is freed
    lengths = np.array(index.sequence_lengths, dtype=np.int64)
    pointers = np.array(index.sequence_pointers, dtype=np.int64)
    doc_idx = np.array(index.document_indices, dtype=np.int64)
    itemsize = dtype.itemsize
    if n_seq and lengths.min() < 0:
        problems.append(f"negative sequence length at sequence {int(np.argmin(lengths))}")
    if n_seq:
        want = np.zeros(n_seq, dtype=np.int64)
        np.cumsum(lengths[:-1] * itemsize, out=want[1:])
        bad = np.nonzero(pointers != want)[0]
        if bad.size:
            i = int(bad[0])
            problems.append(f"sequence pointer {i} is {int(pointers[i])}, expected {int(want[i])} ({bad.size} pointers wrong)")
    if n_doc == 0 or doc_idx[0] != 0:
        problems.append("document indices must start with 0")
    elif np.any(np.diff(doc_idx) < 0):
        problems.append(f"document indices decrease at document {int(np.argmax(np.diff(doc_idx) < 0))}")
    elif int(doc_idx[-1]) != n_seq:
        problems.append(f"last document index is {int(doc_idx[-1])}, expected the sequence count {n_seq}")
    n_tokens = int(lengths.sum())
    bin_size = os.path.getsize(bp)
    if bin_size != n_tokens * itemsize:
        problems.append(
            f"{bp} is {bin_size} bytes but the index describes {n_tokens} tokens x {itemsize} bytes = {n_tokens * itemsize} bytes"
        )
    if n_tokens == 0:
        problems.append("the dataset holds no tokens (megatron-core cannot open an empty .bin)")
    del index
    report = {
        "prefix": prefix,
        "dtype": dtype.name,
        "sequences": int(n_seq),
        "documents": int(max(n_doc - 1, 0)),
        "tokens": n_tokens,
        "bin_bytes": bin_size,
        "idx_bytes": idx_size,
    }
    if problems:
        raise DataToolsError(f"verify: {prefix} is corrupt:\n  - " + "\n  - ".join(problems))

    read_dataset(prefix)  # megatron-core's own checks must pass as well

    meta = read_meta(prefix)
    report["sidecar"] = meta is not None
    if meta is not None:
        mp = meta_path(prefix)
        if meta.get("dtype") != dtype.name:
            problems.append(f"{mp} says dtype {meta.get('dtype')}, the index says {dtype.name}")
        for key, have in (("documents", report["documents"]), ("tokens", n_tokens), ("sequences", int(n_seq))):
            if meta.get(key) != have:
                problems.append(f"{mp} says {meta.get(key)} {key}, the pair holds {have}")
        if check_tokens and not problems and n_tokens:
            vocab = int(meta["tokenizer"]["vocab_size"])
            data = np.memmap(bp, dtype=dtype, mode="r")
            for start in range(0, n_tokens, chunk_tokens):
                chunk = data[start:start + chunk_tokens]
                mx = int(chunk.max())
                if mx >= vocab or (dtype.kind == "i" and int(chunk.min()) < 0):
                    pos = start + int(np.argmax((chunk >= vocab) | (chunk < 0)))
                    problems.append(f"token id {int(data[pos])} at token {pos} is outside the vocabulary [0, {vocab})")
                    break
            if meta.get("append_eod", True) and n_doc > 1:
                ends = doc_idx[1:] - 1  # last sequence of each document
                nonempty = doc_idx[1:] > doc_idx[:-1]
                last_tok = (pointers[ends[nonempty]] // itemsize) + lengths[ends[nonempty]] - 1
                eod = int(meta["tokenizer"]["eod_id"])
                wrong = np.nonzero(np.asarray(data[last_tok]) != eod)[0]
                if wrong.size:
                    problems.append(f"{wrong.size} documents do not end with the EOD id {eod} (first: document {int(np.nonzero(nonempty)[0][wrong[0]])})")
            del data
        if problems:
            raise DataToolsError(f"verify: {prefix} disagrees with its sidecar:\n  - " + "\n  - ".join(problems))
    return report


def merge(prefixes: list[str], output_prefix: str, dtype=None) -> dict:
    """Concatenate pairs (in the given order) into output_prefix with megatron-core's add_index.

    Returns counts. Sidecars, when present, must agree on tokenizer and dtype; the caller writes
    the merged sidecar.
    """
    if not prefixes:
        raise DataToolsError("merge: no input datasets given")
    dtypes = {}
    for p in prefixes:
        r = verify(p, check_tokens=False)
        dtypes[p] = r["dtype"]
    if len(set(dtypes.values())) > 1:
        raise DataToolsError("merge: inputs have different token dtypes: " + ", ".join(f"{p}: {d}" for p, d in dtypes.items()))
    dt = dtype or np.dtype(next(iter(dtypes.values()))).type
    t0 = time.time()
    ensure_dir(os.path.dirname(os.path.abspath(output_prefix)))
    concatenate(prefixes, output_prefix, dt)
    return {"inputs": prefixes, "seconds": time.time() - t0}
