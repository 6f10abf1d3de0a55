"""A small, lossless sentence splitter (used only with --split-sentences, off by default).

Splits after ., ! or ? (plus closing quotes/brackets) when whitespace follows. The whitespace goes
to the *next* sentence, so "".join(split(text)) == text exactly and a byte-level BPE sees the same
" word" pieces it would see unsplit. Deliberately simple (no abbreviation model): Megatron uses
sentences only as sequence boundaries inside a document for BERT-style objectives.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(r"""(?<=[.!?])["'”’)\]]*(?=\s+\S)""")


def split_sentences(text: str) -> list[str]:
    pieces: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        end = m.end()
        if end > start:
            pieces.append(text[start:end])
            start = end
    if start < len(text) or not pieces:
        pieces.append(text[start:])
    return pieces
