"""Tokenizers behind one small interface: encode / encode_batch / decode / vocab_size / eod_id.

Two kinds:
- "hf": any Hugging Face `tokenizer.json` through the `tokenizers` library (e.g. GPT-NeoX-20B's,
  which Pythia uses; its EOD is `<|endoftext|>` = 0).
- "sentencepiece": a SentencePiece `.model`; EOD is the model's eos id (must exist).

Imports of the tokenizer libraries happen inside the loaders, so `import data_tools` stays cheap.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

from .errors import DataToolsError

KINDS = ("hf", "sentencepiece")
_KIND_ALIASES = {"hf": "hf", "huggingface": "hf", "tokenizers": "hf", "sentencepiece": "sentencepiece", "sp": "sentencepiece", "spm": "sentencepiece"}
# Tried in order when an HF tokenizer does not name its end-of-document token explicitly.
_HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


def normalize_kind(kind: str) -> str:
    k = _KIND_ALIASES.get(str(kind).lower())
    if k is None:
        raise DataToolsError(f"unknown tokenizer kind {kind!r}; use one of: {', '.join(KINDS)}")
    return k


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def limit_threads() -> None:
    """One thread per process: data_tools parallelizes with worker processes, and a tokenizer
    library spawning its own thread pool in each of them would oversubscribe the cores."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")


class HFTokenizer:
    kind = "hf"

    def __init__(self, path: str, eod_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - dependency is pinned
            raise DataToolsError(f"the 'tokenizers' package is required for --tokenizer hf: {e}") from None
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:
            raise DataToolsError(f"{path}: not a Hugging Face tokenizer.json ({e}); for a SentencePiece .model use --tokenizer sentencepiece") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = (eod_token,) if eod_token else _HF_EOD_CANDIDATES
        for name in names:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                self.eod_id, self.eod_token = int(tid), name
                break
        else:
            raise DataToolsError(
                f"{path}: no end-of-document token found (tried {', '.join(names)}); pass --eod-token with a token of this vocabulary"
            )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: str, eod_token: str | None = None):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise DataToolsError(f"{path}: not a SentencePiece model ({e}); for a tokenizer.json use --tokenizer hf") from None
        self.path = path
        self.vocab_size = int(self._sp.get_piece_size())
        if eod_token:
            tid = self._sp.piece_to_id(eod_token)
            if tid == self._sp.unk_id() and eod_token != self._sp.id_to_piece(self._sp.unk_id()):
                raise DataToolsError(f"{path}: --eod-token {eod_token!r} is not a piece of this SentencePiece model")
            self.eod_id = int(tid)
        else:
            self.eod_id = int(self._sp.eos_id())
            if self.eod_id < 0:
                raise DataToolsError(
                    f"{path}: this SentencePiece model has no eos piece (trained with eos_id=-1); "
                    "retrain with an eos id (mesh-data train-tokenizer does) or pass --eod-token"
                )
        self.eod_token = self._sp.id_to_piece(self.eod_id)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(kind: str, path: str, eod_token: str | None = None):
    """Load a tokenizer of `kind` ("hf" or "sentencepiece") from `path`.

    The result has .encode(text)->list[int], .encode_batch(texts), .decode(ids)->str,
    .vocab_size, .eod_id, .kind, .path.
    """
    kind = normalize_kind(kind)
    if not path:
        raise DataToolsError("a tokenizer model path is required (--tokenizer-model)")
    if not os.path.isfile(path):
        raise DataToolsError(f"tokenizer model {path} does not exist")
    if kind == "hf":
        return HFTokenizer(path, eod_token)
    return SentencePieceTokenizer(path, eod_token)
