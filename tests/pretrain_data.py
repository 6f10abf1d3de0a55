"""Small `.bin/.idx` datasets for the pretrain tests, written with megatron-core's IndexedDatasetBuilder.

`make_dataset` writes documents from a fixed random bigram "language" (each token has a few likely successors), so a
tiny model's loss falls quickly and deterministically, plus a PREFIX.meta.json sidecar like data_tools writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 256
EOD = 0


def make_dataset(prefix: str | Path, n_docs: int = 200, seed: int = 0, vocab: int = VOCAB) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    succ = np.random.default_rng(1234).integers(1, vocab, size=(vocab, 4))  # same language for every seed
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        n = int(rng.integers(40, 400))
        toks = [int(rng.integers(1, vocab))]
        for _ in range(n - 1):
            toks.append(int(succ[toks[-1], rng.integers(0, 4)]))
        toks.append(EOD)
        builder.add_document(torch.tensor(toks, dtype=torch.int64), [len(toks)])
    builder.finalize(prefix + ".idx")
    meta = {"tokenizer": {"kind": "synthetic", "vocab_size": vocab, "eod_id": EOD}}
    Path(prefix + ".meta.json").write_text(json.dumps(meta))
    return prefix
