"""Megatron indexed datasets (.bin/.idx) through megatron-core, plus the PREFIX.meta.json sidecar.

Writing and reading go through `megatron.core.datasets.indexed_dataset` (IndexedDatasetBuilder,
IndexedDataset), so the files are exactly what megatron-core's GPTDataset reads. This module adds
what megatron-core lacks: atomic publication of a .bin/.idx pair, a consistency checker with
readable errors (megatron-core only asserts), and the sidecar that records the tokenizer.

The sidecar is the completeness marker: it is written last and removed first when an output is
replaced, so a pair without a matching PREFIX.meta.json is never the product of a finished run.
"""

from __future__ import annotations

import json
import os
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


def optimal_dtype(vocab_size: int):
    """uint16 when every token id fits (megatron-core's own rule), else int32."""
    return _idx().DType.optimal_dtype(vocab_size)


def atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


class ShardWriter:
    """An IndexedDatasetBuilder writing to temporary names; commit() renames to PREFIX.bin/.idx."""

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self._tmp = f"{prefix}.partial"
        self.builder = _idx().IndexedDatasetBuilder(bin_path(self._tmp), dtype=dtype)

    def add_document(self, tokens: np.ndarray, seq_lengths: list[int]) -> None:
        self.builder.add_document(tokens, seq_lengths)

    def add_index(self, prefix: str) -> None:
        self.builder.add_index(prefix)

    def commit(self) -> None:
        self.builder.finalize(idx_path(self._tmp))
        publish_pair(self._tmp, self.prefix)

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
        except Exception:
            pass
        for p in (bin_path(self._tmp), idx_path(self._tmp)):
            if os.path.exists(p):
                os.remove(p)


def concatenate(prefixes: list[str], output_prefix: str, dtype) -> None:
    """Append whole .bin/.idx pairs (megatron-core add_index) into output_prefix; temp names until complete."""
    w = ShardWriter(output_prefix, dtype)
    try:
        for p in prefixes:
            w.add_index(p)
        w.commit()
    except BaseException:
        w.abort()
        raise


def read_json_or_none(path: str):
    """A JSON record of a previous run, or None if it is missing or unreadable (it is then simply redone)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def publish_pair(src_prefix: str, dst_prefix: str) -> None:
    """Move a finished src pair onto dst. The dst sidecar is dropped first (see module doc)."""
    if os.path.exists(meta_path(dst_prefix)):
        os.remove(meta_path(dst_prefix))
    for f in (bin_path, idx_path):
        with open(f(src_prefix), "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(f(src_prefix), f(dst_prefix))


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
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    concatenate(prefixes, output_prefix, dt)
    return {"inputs": prefixes, "seconds": time.time() - t0}
