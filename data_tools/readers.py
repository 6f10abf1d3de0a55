"""Streaming readers for corpus files: .jsonl / .jsonl.zst / .jsonl.gz and plain .txt (also .txt.zst/.gz).

Everything here streams: a file is read in fixed-size chunks and yielded as units (one JSON line, or
one line / paragraph of text) with their 1-based line number, so memory stays bounded by the
largest single line, whatever the file size. A truncated .zst/.gz raises DataToolsError naming the
file instead of silently yielding a prefix of it.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .errors import DataToolsError

_CHUNK = 1 << 20  # compressed bytes read per step

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")
TXT_SUFFIXES = (".txt", ".txt.zst", ".txt.gz")


def input_kind(path: str) -> str:
    """'jsonl' or 'txt', from the file name; DataToolsError for anything else."""
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TXT_SUFFIXES):
        return "txt"
    raise DataToolsError(
        f"{path}: unsupported input type; expected one of "
        f"{', '.join(JSONL_SUFFIXES + TXT_SUFFIXES)} (rename the file if its content is one of these)"
    )


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs in order (each glob's matches sorted), keep explicit paths, drop duplicates.

    Order matters: documents are written in input order, so the same command line always gives the
    same output bytes.
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
            if os.path.isdir(m):
                raise DataToolsError(f"input {m} is a directory; pass files or a glob such as '{m}/*.jsonl.zst'")
            input_kind(m)  # fail early on unsupported types
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
