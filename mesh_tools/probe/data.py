"""Fixed-length token windows from a megatron-core `.bin/.idx` dataset, for probing.

The documents in a fraction range of the dataset are concatenated in order (their EOD tokens, written by data_tools,
stay in place, as in GPTDataset) and cut into non-overlapping windows of seq_length + 1 tokens (inputs + next-token
labels). The first N windows are used, so the probe set is a deterministic function of (prefix, range, N, length).
With the trainer's default split "949,50,1", `doc_range=(0.949, 0.999)` is the validation documents.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch


class ProbeDataError(ValueError):
    pass


def check_prefix(prefix: str) -> None:
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise ProbeDataError(
            f"dataset prefix '{prefix}': missing {', '.join(missing)}; pass the path without the .bin/.idx suffix "
            "(e.g. runs/demo/data/sample_text_document), as written by `mesh-data tokenize`"
        )


def load_windows(prefix: str, num_sequences: int, seq_length: int, doc_range: tuple[float, float] = (0.0, 1.0),
                 vocab_size: int | None = None) -> torch.Tensor:
    """-> Long[n, seq_length + 1], n <= num_sequences (a warning on stderr when the range holds fewer tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_prefix(prefix)
    lo, hi = doc_range
    if not (0.0 <= lo < hi <= 1.0):
        raise ProbeDataError(f"document range {lo}:{hi}: need 0 <= start < end <= 1 (fractions of the documents)")
    if num_sequences < 1 or seq_length < 2:
        raise ProbeDataError(f"need num_sequences >= 1 and seq_length >= 2, got {num_sequences} and {seq_length}")
    ds = IndexedDataset(prefix)
    doc_idx = ds.document_indices  # sequence boundaries of each document: doc d = sequences [doc_idx[d], doc_idx[d+1])
    n_docs = len(doc_idx) - 1
    first, last = int(lo * n_docs), max(int(hi * n_docs), int(lo * n_docs) + 1)
    window = seq_length + 1
    need = num_sequences * window
    chunks, have = [], 0
    for seq in range(int(doc_idx[first]), int(doc_idx[min(last, n_docs)])):
        arr = np.asarray(ds[seq], dtype=np.int64)
        chunks.append(arr)
        have += arr.size
        if have >= need:
            break
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    n = min(num_sequences, tokens.size // window)
    if n == 0:
        raise ProbeDataError(
            f"dataset '{prefix}' documents {first}..{last} (of {n_docs}) hold {tokens.size} tokens, fewer than one "
            f"window of {window}; widen --doc-range or lower --seq-length"
        )
    if n < num_sequences:
        print(f"[mesh-probe] warning: '{prefix}' range {lo}:{hi} holds only {n} windows of {window} tokens "
              f"(asked for {num_sequences}); using {n}", file=sys.stderr)
    out = torch.from_numpy(tokens[: n * window].reshape(n, window).copy())
    if vocab_size is not None and int(out.max()) >= vocab_size:
        raise ProbeDataError(
            f"dataset '{prefix}' has token id {int(out.max())} >= the model's vocab size {vocab_size}: the data was "
            "tokenized with a different tokenizer than the model was trained with"
        )
    return out
