"""Streaming readers for corpus files: .jsonl / .jsonl.zst / .jsonl.gz, plain .txt (also .txt.zst/.gz),
Parquet files, Arrow IPC files (.arrow) and Hugging Face datasets saved with `save_to_disk`.

Everything here streams: a text file is read in fixed-size chunks and yielded as units (one JSON
line, or one line / paragraph of text) with their 1-based line number, so memory stays bounded by the
largest single line, whatever the file size. A truncated .zst/.gz raises DataToolsError naming the
file instead of silently yielding a prefix of it.

Columnar inputs (Parquet, Arrow) are read one record batch at a time: Parquet without pre-buffering
whole row groups and with a row count per read sized from the file's metadata to ~batch_bytes of
text; Arrow IPC memory-mapped, so a batch costs address space, not memory. Only the text and subset
columns are extracted (dotted keys reach nested struct fields), as plain Python lists: see `Rows`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, NamedTuple

from .errors import DataToolsError

_CHUNK = 1 << 20  # compressed bytes read per step

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")
TXT_SUFFIXES = (".txt", ".txt.zst", ".txt.gz")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
# "hf_dataset": a directory written by datasets' Dataset.save_to_disk (state.json + data-*.arrow)
COLUMNAR_KINDS = ("parquet", "arrow", "hf_dataset")
_DIR_HELP = "(a Hugging Face save_to_disk directory, with state.json and dataset_info.json, is read as one input)"


def hf_dataset_files(path: str) -> list[str]:
    """The Arrow files of a save_to_disk directory, in the dataset's row order (state.json's list)."""
    state_file = os.path.join(path, "state.json")
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        names = [d["filename"] for d in state["_data_files"]]
    except OSError as e:
        raise DataToolsError(f"{state_file}: cannot read: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataToolsError(f"{state_file}: not a Hugging Face save_to_disk state file ({type(e).__name__}: {e}); re-save the dataset") from None
    if state.get("_indices_data_files"):  # written by datasets < 2.0 for select()/shuffle() results
        raise DataToolsError(f"{path}: saved with an indices mapping; re-save it with ds.flatten_indices().save_to_disk(...)")
    out = []
    for n in names:
        f = os.path.join(path, n)
        if not os.path.isfile(f):
            raise DataToolsError(f"{path}: state.json lists {n}, which is missing; re-save the dataset")
        out.append(f)
    return out


def input_kind(path: str) -> str:
    """'jsonl', 'txt', 'parquet', 'arrow' or 'hf_dataset'; DataToolsError for anything else."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")):
            return "hf_dataset"
        dd = os.path.join(path, "dataset_dict.json")
        if os.path.isfile(dd):
            try:
                with open(dd, encoding="utf-8") as f:
                    splits = ", ".join(json.load(f)["splits"])
            except (OSError, ValueError, KeyError, TypeError):
                splits = "?"
            raise DataToolsError(
                f"input {path} is a Hugging Face DatasetDict (splits: {splits}); pass one split's directory, "
                f"e.g. {os.path.join(path, 'train')}"
            )
        raise DataToolsError(
            f"input {path} is a directory; pass files or a glob such as '{path}/*.jsonl.zst' or '{path}/*.parquet' {_DIR_HELP}"
        )
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TXT_SUFFIXES):
        return "txt"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(ARROW_SUFFIXES):
        return "arrow"
    raise DataToolsError(
        f"{path}: unsupported input type; expected one of "
        f"{', '.join(JSONL_SUFFIXES + TXT_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES)} or a save_to_disk "
        "directory (rename the file if its content is one of these)"
    )


def _data_files(path: str) -> list[str]:
    return hf_dataset_files(path) if os.path.isdir(path) else [path]


def input_size(path: str) -> int:
    """Bytes on disk (a save_to_disk directory: its Arrow files), the unit of the progress bar."""
    return sum(os.path.getsize(f) for f in _data_files(path))


def input_identity(path: str) -> dict:
    """What the up-to-date check and shard resume compare: size and mtime (of each Arrow file, for a
    save_to_disk directory)."""
    if os.path.isdir(path):
        files = []
        for f in hf_dataset_files(path):
            st = os.stat(f)
            files.append({"name": os.path.basename(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return {"path": os.path.abspath(path), "files": files}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs in order (each glob's matches sorted), keep explicit paths, drop duplicates.

    Order matters: documents are written in input order, so the same command line always gives the
    same output bytes. A directory is accepted only if it is a save_to_disk dataset.
    """
    out: list[str] = []
    seen: set[str] = set()
    for pat in patterns:
        if any(c in pat for c in "*?["):
            matches = sorted(glob.glob(pat, recursive=True))
            if not matches:
                raise DataToolsError(f"input pattern {pat!r} matched no files")
        else:
            if not os.path.exists(pat):
                raise DataToolsError(f"input file {pat} does not exist")
            matches = [pat]
        for m in matches:
            if input_kind(m) == "hf_dataset":  # fail early on unsupported types and broken datasets
                hf_dataset_files(m)
            key = os.path.abspath(m)
            if key not in seen:
                seen.add(key)
                out.append(m)
    if not out:
        raise DataToolsError("no input files given")
    return out


class _CountingFile(io.RawIOBase):
    """Wraps a binary file and counts the bytes read from disk (for the progress bar)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        self.bytes_read += n or 0
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class _ZstdRaw(io.RawIOBase):
    """Decompresses a (possibly multi-frame) zstd file chunk by chunk.

    zstandard's own stream_reader returns a silent short read on a truncated file; here the end of
    input inside an unfinished frame is an error that names the file.
    """

    def __init__(self, src: _CountingFile, path: str):
        import zstandard

        self._zstd = zstandard
        self._src = src
        self._path = path
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj = None  # decompressor of the current frame; None between frames
        self._pending = b""  # decompressed bytes not yet handed out
        self._eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self._pending and not self._eof:
            data = self._src.read(_CHUNK)
            if not data:
                if self._dobj is not None:
                    raise DataToolsError(
                        f"{self._path}: truncated zstd stream (the file ends inside a compressed frame after "
                        f"{self._src.bytes_read} bytes); re-download or re-create it"
                    )
                self._eof = True
                return
            while data:
                if self._dobj is None:
                    self._dobj = self._dctx.decompressobj()
                try:
                    self._pending += self._dobj.decompress(data)
                except self._zstd.ZstdError as e:
                    raise DataToolsError(f"{self._path}: corrupt zstd data near byte {self._src.bytes_read}: {e}") from None
                if self._dobj.eof:
                    data = self._dobj.unused_data
                    self._dobj = None
                else:
                    data = b""

    def readinto(self, b) -> int:
        self._fill()
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._src.close()
        super().close()


class _GzipRaw(io.RawIOBase):
    """gzip with the truncation/corruption errors rewritten to name the file."""

    def __init__(self, src: _CountingFile, path: str):
        self._g = gzip.GzipFile(fileobj=src, mode="rb")
        self._src = src
        self._path = path

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            return self._g.readinto(b)
        except EOFError:
            raise DataToolsError(f"{self._path}: truncated gzip stream (ends before the end-of-stream marker); re-download or re-create it") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise DataToolsError(f"{self._path}: corrupt gzip data near byte {self._src.bytes_read}: {e}") from None

    def close(self) -> None:
        self._g.close()
        self._src.close()
        super().close()


class InputStream:
    """A decompressed binary line reader over one input file, with on-disk progress in bytes."""

    def __init__(self, path: str):
        self.path = path
        try:
            raw = open(path, "rb", buffering=0)
        except OSError as e:
            raise DataToolsError(f"{path}: cannot open: {e.strerror}") from None
        self._counter = _CountingFile(raw)
        name = path.lower()
        if name.endswith(".zst"):
            inner: io.RawIOBase = _ZstdRaw(self._counter, path)
        elif name.endswith(".gz"):
            inner = _GzipRaw(self._counter, path)
        else:
            inner = self._counter
        self._buf = io.BufferedReader(inner, buffer_size=_CHUNK)

    @property
    def disk_bytes_read(self) -> int:
        return self._counter.bytes_read

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._buf)

    def close(self) -> None:
        self._buf.close()

    def __enter__(self) -> "InputStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Unit:
    """One candidate document before parsing: raw bytes and the 1-based line where it starts."""

    lineno: int
    raw: bytes


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line


def iter_units(stream: InputStream, kind: str, txt_unit: str = "line") -> Iterator[tuple[Unit | None, int]]:
    """Yield (unit, separator_lines) pairs from an open stream.

    jsonl: every line is a unit (blank lines included: an empty line in a jsonl file is a defect
    that gets reported as a skipped record, not dropped silently).
    txt, txt_unit="line": every non-blank line is a document.
    txt, txt_unit="paragraph": blocks of non-blank lines separated by blank lines; the document is
    the block's lines joined by "\\n". Blank separator lines are not documents; they are counted
    (second tuple item, with unit None) so the summary accounts for every line.
    """
    if kind == "jsonl":
        for i, line in enumerate(stream, 1):
            yield Unit(i, _strip_eol(line)), 0
        return
    if txt_unit not in ("line", "paragraph"):
        raise DataToolsError(f"--txt-unit must be 'line' or 'paragraph', not {txt_unit!r}")
    block: list[bytes] = []
    start = 0
    for i, line in enumerate(stream, 1):
        body = _strip_eol(line)
        if body.strip() == b"":
            if block:
                yield Unit(start, b"\n".join(block)), 0
                block = []
            yield None, 1
            continue
        if txt_unit == "line":
            yield Unit(i, body), 0
        else:
            if not block:
                start = i
            block.append(body)
    if block:
        yield Unit(start, b"\n".join(block)), 0


# --- columnar inputs: Parquet, Arrow IPC, save_to_disk directories ----------------------------------
class Rows(NamedTuple):
    """Consecutive rows of a columnar input, the unit sent to a worker in place of raw JSON lines.

    Extracting the two columns here and shipping plain lists keeps the worker free of pyarrow and
    the pickle small: pickling a sliced Arrow array would copy its whole parent buffers. texts are
    the text column's values as UTF-8 bytes (None for null), decoded and validated by the worker
    like a JSON line's; subsets are the subset column's values (None: no such column). problem is a
    (reason, detail) skip for every row (the text column is missing in this file, or not text).
    """

    first_row: int  # 1-based, counted over the whole input (all Arrow files of a dataset directory)
    count: int
    texts: list | None
    subsets: list | None
    problem: tuple | None


_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _resolve(schema, dotted: str):
    """Field-index path of a dotted key in an Arrow schema, None if absent. As for JSON keys, an
    exact top-level name wins over the dotted path; the rest walk struct fields."""
    import pyarrow as pa

    i = schema.get_field_index(dotted)
    if i >= 0:
        return [i]
    path: list[int] = []
    typ = None
    for n, part in enumerate(dotted.split(".")):
        if n == 0:
            i = schema.get_field_index(part)
            if i < 0:
                return None
            typ = schema.field(i).type
        else:
            if not pa.types.is_struct(typ):
                return None
            i = typ.get_field_index(part)
            if i < 0:
                return None
            typ = typ.field(i).type
        path.append(i)
    return path


def _column(rb, path: list[int]):
    import pyarrow.compute as pc

    col = rb.column(path[0])
    # struct_field (not StructArray.field) so that a null parent struct makes the value null
    return pc.struct_field(col, path[1:]) if len(path) > 1 else col


def _as_binary(col):
    """The column as UTF-8 bytes (a zero-copy view for string types); None if it does not hold text."""
    import pyarrow as pa

    t = col.type
    if pa.types.is_dictionary(t):
        col = col.dictionary_decode()
        t = col.type
    if pa.types.is_string(t):
        return col.view(pa.binary())
    if pa.types.is_large_string(t):
        return col.view(pa.large_binary())
    if pa.types.is_string_view(t) or pa.types.is_binary_view(t):  # no length kernel for views
        return col.cast(pa.large_binary())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_null(t):
        return col
    return None


def _values(col) -> list:
    try:
        return col.to_pylist()
    except UnicodeDecodeError:  # a string column with bytes that are not UTF-8
        b = _as_binary(col)
        return [None if v is None else v.decode("utf-8", "replace") for v in b.to_pylist()]


def _cum_bytes(text):
    """Cumulative byte length of a binary array's values (for cutting batches), read off its offsets:
    pyarrow's length kernel + to_numpy/fill_null would import pandas (~0.2 s and 35 MB)."""
    import numpy as np
    import pyarrow as pa

    t = text.type
    if pa.types.is_fixed_size_binary(t):
        return np.arange(1, len(text) + 1, dtype=np.int64) * t.byte_width
    off = np.frombuffer(text.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(t) else np.int32)
    off = off[text.offset:text.offset + len(text) + 1].astype(np.int64)
    return off[1:] - off[0]


def _rows_of_batch(rb, first_row: int, all_names: list[str], text_key: str, subset_key: str, batch_bytes: int, max_rows: int):
    """Cut one record batch into Rows of ~batch_bytes of text (the same rule as for jsonl lines)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from .worker import MISSING_TEXT_KEY, TEXT_NOT_STRING

    n = rb.num_rows
    tpath, spath = _resolve(rb.schema, text_key), _resolve(rb.schema, subset_key)
    text = problem = None
    if tpath is None:
        problem = (MISSING_TEXT_KEY, f"no column {text_key!r} in this file (columns: {', '.join(all_names[:8])}); set --text-key")
    else:
        col = _column(rb, tpath)
        text = _as_binary(col)
        if text is None:
            problem = (TEXT_NOT_STRING, f"{text_key!r} is a column of {col.type}, not text")
    sub = _column(rb, spath) if spath is not None else None
    cum = None
    if n and text is not None and not pa.types.is_null(text.type):
        cum = _cum_bytes(text)
    start = 0
    while start < n:
        if cum is None:
            end = min(n, start + max_rows)
        else:
            base = int(cum[start - 1]) if start else 0
            end = min(int(np.searchsorted(cum, base + batch_bytes, side="left")) + 1, start + max_rows, n)
        k = end - start
        yield Rows(
            first_row + start, k,
            text.slice(start, k).to_pylist() if text is not None else None,
            _values(sub.slice(start, k)) if sub is not None else None,
            problem,
        )
        start = end


def _parquet_batches(path: str, text_key: str, subset_key: str, batch_bytes: int, max_rows: int):
    """(record batch, bytes-equivalent progress, column names) per read of one Parquet file.

    Reads only the needed top-level columns, streams pages instead of pre-buffering whole row
    groups, and reads as many rows at a time as ~batch_bytes of them take uncompressed (from the
    row groups' metadata, the densest row group counting), so memory stays near one batch.
    """
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=_CHUNK, page_checksum_verification=True)
    schema = pf.schema_arrow
    cols: list[str] = []
    for key in (text_key, subset_key):
        p = _resolve(schema, key)
        if p is not None and schema.field(p[0]).name not in cols:
            cols.append(schema.field(p[0]).name)
    md = pf.metadata
    per_row = 1
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if rg.num_rows:
            b = sum(
                rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
                if rg.column(j).path_in_schema.split(".")[0] in cols or rg.column(j).path_in_schema in cols
            )
            per_row = max(per_row, b // rg.num_rows)
    rows_per_read = max(1, min(max_rows, batch_bytes // per_row))
    size, total, done = os.path.getsize(path), max(md.num_rows, 1), 0
    # use_threads=False: decoding one or two columns gains little from threads, and the main process
    # should not hold a thread pool when it forks the tokenizer workers
    for rb in pf.iter_batches(batch_size=rows_per_read, columns=cols, use_threads=False):
        done += rb.num_rows
        yield rb, size * done // total, schema.names


def _ipc_batches(path: str):
    """(record batch, file position, column names) per batch of an Arrow IPC stream (what
    save_to_disk writes) or IPC file, memory-mapped: a batch is a view of the page cache."""
    import pyarrow as pa

    size = os.path.getsize(path)
    with pa.memory_map(path) as m:
        if m.read(6) == b"ARROW1":
            m.seek(0)
            r = pa.ipc.open_file(m)
            n = r.num_record_batches
            for i in range(n):
                yield r.get_batch(i), size * (i + 1) // n, r.schema.names
            return
        m.seek(0)
        r = pa.ipc.open_stream(m)
        pos = m.tell()  # end of the last message read
        while True:
            try:
                rb = r.read_next_batch()
            except StopIteration:
                break
            pos = m.tell()
            yield rb, pos, r.schema.names
        m.seek(pos)
        tail = m.read(16)
    # a stream cut at a message boundary reads as a clean, shorter stream: only the end-of-stream
    # marker that writers put last tells it from a complete one
    if tail != _ARROW_EOS:
        raise DataToolsError(f"{path}: truncated Arrow stream (no end-of-stream marker after {pos} bytes); re-download or re-create it")


def _guarded(gen, path: str, fmt: str):
    """Re-raise pyarrow's read errors as one line naming the file."""
    import pyarrow as pa

    while True:
        try:
            item = next(gen)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataToolsError(f"{path}: corrupt or truncated {fmt} file ({first}); re-download or re-create it") from None
        yield item


def _columnar_rows(path: str, kind: str, text_key: str, subset_key: str, batch_bytes: int, max_rows: int):
    """Yield (Rows, disk position) over one columnar input (all Arrow files of a dataset directory)."""
    sources = hf_dataset_files(path) if kind == "hf_dataset" else [path]
    fmt = "Parquet" if kind == "parquet" else "Arrow"
    row, base = 1, 0
    for src in sources:
        try:
            open(src, "rb").close()
        except OSError as e:
            raise DataToolsError(f"{src}: cannot open: {e.strerror}") from None

        def rows_of(src=src, first=row, base=base):
            batches = _parquet_batches(src, text_key, subset_key, batch_bytes, max_rows) if kind == "parquet" else _ipc_batches(src)
            for rb, pos, names in batches:
                for rows in _rows_of_batch(rb, first, names, text_key, subset_key, batch_bytes, max_rows):
                    yield rows, base + pos
                first += rb.num_rows

        for rows, pos in _guarded(rows_of(), src, fmt):
            row = rows.first_row + rows.count
            yield rows, pos
        base += os.path.getsize(src)


class FileBatches:
    """One input cut into batches of units for the parse/tokenize step, with progress in disk bytes.

    Iterating yields (parse_kind, units, disk_bytes_so_far): for jsonl/txt, units are
    (line number, raw bytes) pairs of ~batch_bytes in all; for columnar inputs, a one-item list
    holding a `Rows`. After the iteration, separator_lines (blank lines between txt paragraphs) and
    disk_bytes_read (the input's size on disk, once read to the end) are set.
    """

    def __init__(self, path: str, batch_bytes: int = 1 << 20, txt_unit: str = "line", text_key: str = "text",
                 subset_key: str = "meta.pile_set_name", max_units: int = 4096):
        self.path, self.kind = path, input_kind(path)
        self.batch_bytes, self.txt_unit, self.max_units = batch_bytes, txt_unit, max_units
        self.text_key, self.subset_key = text_key, subset_key
        self.separator_lines = 0
        self.disk_bytes_read = 0

    def __iter__(self) -> Iterator[tuple[str, list, int]]:
        if self.kind in COLUMNAR_KINDS:
            for rows, pos in _columnar_rows(self.path, self.kind, self.text_key, self.subset_key, self.batch_bytes, self.max_units):
                self.disk_bytes_read = pos
                yield "columnar", [rows], pos
            self.disk_bytes_read = input_size(self.path)
            return
        with InputStream(self.path) as stream:
            units: list[tuple[int, bytes]] = []
            size = 0
            for unit, sep in iter_units(stream, self.kind, self.txt_unit):
                if unit is None:
                    self.separator_lines += sep
                    continue
                units.append((unit.lineno, unit.raw))
                size += len(unit.raw)
                if size >= self.batch_bytes or len(units) >= self.max_units:
                    yield self.kind, units, stream.disk_bytes_read
                    units, size = [], 0
            if units:
                yield self.kind, units, stream.disk_bytes_read
            self.disk_bytes_read = stream.disk_bytes_read
