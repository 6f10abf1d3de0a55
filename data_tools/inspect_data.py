"""inspect: counts, length statistics and a detokenized sample of documents of a .bin/.idx pair."""

from __future__ import annotations

import numpy as np

from . import indexed
from .errors import DataToolsError
from .tokenizer import load_tokenizer


def inspect_dataset(prefix: str, num_docs: int = 3, max_chars: int = 400, tokenizer: str | None = None,
                    tokenizer_model: str | None = None, start: int = 0) -> dict:
    """Return counts/statistics and the first `num_docs` documents from `start`, detokenized.

    The tokenizer comes from PREFIX.meta.json unless given; without either, token ids are shown.
    """
    ds = indexed.read_dataset(prefix)
    meta = indexed.read_meta(prefix)
    doc_idx = ds.document_indices
    lengths = ds.sequence_lengths.astype(np.int64)
    n_docs = len(doc_idx) - 1
    csum = np.concatenate([[0], np.cumsum(lengths)])
    doc_tokens = csum[doc_idx[1:]] - csum[doc_idx[:-1]]
    tok = None
    if tokenizer_model:
        tok = load_tokenizer(tokenizer or (meta or {}).get("tokenizer", {}).get("kind", "hf"), tokenizer_model)
    elif meta is not None:
        tok = load_tokenizer(meta["tokenizer"]["kind"], indexed.resolve_tokenizer_path(meta, prefix))
    if start < 0 or (n_docs and start >= n_docs):
        raise DataToolsError(f"--start {start} is out of range: the dataset has {n_docs} documents")
    samples = []
    for d in range(start, min(start + num_docs, n_docs)):
        ids = np.concatenate([ds[i] for i in range(int(doc_idx[d]), int(doc_idx[d + 1]))] or [np.zeros(0, np.int64)])
        text = tok.decode(ids.tolist()) if tok is not None else " ".join(map(str, ids[:200].tolist()))
        samples.append({"document": d, "tokens": int(ids.size), "text": text[:max_chars], "truncated": len(text) > max_chars})
    return {
        "prefix": prefix,
        "dtype": np.dtype(ds.index.dtype).name,
        "documents": int(n_docs),
        "sequences": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "doc_tokens_min": int(doc_tokens.min()) if n_docs else 0,
        "doc_tokens_mean": float(doc_tokens.mean()) if n_docs else 0.0,
        "doc_tokens_max": int(doc_tokens.max()) if n_docs else 0,
        "tokenizer": (meta or {}).get("tokenizer"),
        "subsets": (meta or {}).get("summary", {}).get("subsets"),
        "samples": samples,
    }
