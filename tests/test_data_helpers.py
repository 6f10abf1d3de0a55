"""Helpers shared by the data_tools tests (real documents from the shipped sample), and their own check."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "sample.jsonl.zst"
NEOX = REPO / "data" / "tokenizers" / "gpt-neox-20b.json"
SP8K = REPO / "data" / "tokenizers" / "sample_sp8k.model"
SHARED = REPO.parent / "shared"

TOKENIZERS = {"hf": str(NEOX), "sentencepiece": str(SP8K)}


def sample_records(n: int, start: int = 0, max_chars: int = 3000) -> list[dict]:
    """n real Pile-format records from the shipped sample (texts cut to max_chars to keep tests fast),
    alternating between its two subsets so subset filters have something to do."""
    data = zstandard.ZstdDecompressor().decompress(SAMPLE.read_bytes(), max_output_size=1 << 26)
    by_subset: dict[str, list] = {}
    for line in data.split(b"\n"):
        if line:
            r = json.loads(line)
            by_subset.setdefault(r["meta"]["pile_set_name"], []).append(r)
    names = sorted(by_subset)
    out = []
    for i in range(start, start + n):
        r = by_subset[names[i % len(names)]][i // len(names)]
        out.append({"text": r["text"][:max_chars], "meta": r["meta"]})
    return out


def write_jsonl(path: Path, records: list, raw_lines: list[bytes] | None = None) -> Path:
    """Write records (dicts) as JSON lines, compressed by the suffix; raw_lines are appended verbatim."""
    body = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    if raw_lines:
        body += b"".join(l + b"\n" for l in raw_lines)
    return write_bytes(path, body)


def write_bytes(path: Path, body: bytes) -> Path:
    if path.name.endswith(".zst"):
        body = zstandard.ZstdCompressor(level=3).compress(body)
    elif path.name.endswith(".gz"):
        body = gzip.compress(body)
    path.write_bytes(body)
    return path


def read_docs(prefix: str):
    """Documents of a dataset through megatron-core's own reader, as numpy arrays (sequences joined)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    di = ds.document_indices
    return [np.concatenate([ds[i] for i in range(di[d], di[d + 1])]) for d in range(len(di) - 1)], ds


def test_sample_records_alternate_subsets_and_are_real():
    recs = sample_records(4)
    assert [r["meta"]["pile_set_name"] for r in recs] == ["shakespeare_milton", "wikipedia_leads"] * 2
    assert all(len(r["text"]) > 100 for r in recs)
