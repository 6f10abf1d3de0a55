"""Tokenizers behind one small interface: encode / encode_batch / decode / vocab_size / eod_id.

Two kinds:
- "hf": any Hugging Face `tokenizer.json` through the `tokenizers` library (e.g. GPT-NeoX-20B's,
  which Pythia uses; its EOD is `<|endoftext|>` = 0).
- "sentencepiece": a SentencePiece `.model`; EOD is the model's eos id (must exist).

Imports of the tokenizer libraries happen inside the loaders, so `import data_tools` stays cheap.

Long documents: a tokenizer's working memory grows with the text it encodes at once (GPT-NeoX's
peaked at 7.5 GB for one 50 MB document), so a text longer than PIECE_CHARS characters is encoded
in pieces cut where the tokenizer provably never joins the two sides into one token, and the ids
are the same as encoding the whole text (tests/test_data_hardening.py compares them). The cut is
right before a whitespace character that follows a non-whitespace one:
- hf: when the tokenizer is byte-level BPE with the GPT-2 pre-tokenizer regex (GPT-NeoX, GPT-2,
  Pythia): no pre-token of that regex holds a non-whitespace character followed by whitespace, and
  BPE never merges across pre-tokens; the normalizer (none or NFC) cannot compose across a space
  or newline; and no added token may contain non-whitespace followed by whitespace (GPT-NeoX's
  whitespace-run tokens do not). Cut before " " or "\n".
- sentencepiece: BPE or unigram with identity normalization, whitespace as a prefix ("▁") and no
  piece holding "▁" after another character (split_by_whitespace; whitespace-only pieces are
  fine): no piece spans the cut. Cut before a " " between two non-whitespace characters; with a
  dummy prefix the space is dropped from the piece, as the prefix re-creates it.
Any other tokenizer, and a text with no such cut point (e.g. 50 MB without a space or newline),
is encoded whole, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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


# Texts longer than this (characters) are encoded in pieces of about this size (see module doc). A
# piece ends at the first cut point at or after PIECE_CHARS characters, so it is longer only by the
# distance to that point. GPT-NeoX needs about 150 bytes per character of a piece while encoding.
PIECE_CHARS = 1 << 16
_HF_CUT = re.compile(r"(?<=\S)[ \n]")
# "\u2581" is whitespace to SentencePiece (its escaped space), not to Python's \S
_SP_CUT = re.compile(r"(?<=[^\s\u2581]) (?=[^\s\u2581])")
_GPT2_REGEX_PRETOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def _pieces(text: str, cut: re.Pattern, skip: int = 0) -> list[str]:
    """text in pieces of about PIECE_CHARS characters, each ending right before a match of `cut`;
    `skip` characters at each cut are left out (1: the space a SentencePiece dummy prefix re-creates)."""
    out, start = [], 0
    while len(text) - start > PIECE_CHARS:
        m = cut.search(text, start + PIECE_CHARS)
        if m is None:
            break
        out.append(text[start:m.start()])
        start = m.start() + skip
    out.append(text[start:])
    return out


def _join_ids(parts, vocab_size: int) -> list[int]:
    """The ids of a long text's pieces as one list of shared int objects: 8 bytes per token
    instead of ~36 for a list of fresh ints (a 50 MB document has ~13M tokens)."""
    ints = list(range(vocab_size))
    ids: list[int] = []
    for p in parts:
        n = len(ids)
        try:
            ids.extend(map(ints.__getitem__, p))
        except IndexError:  # an id beyond the reported vocabulary size (holes in added tokens)
            del ids[n:]
            ints = list(range(max(max(p) + 1, len(ints))))
            ids.extend(map(ints.__getitem__, p))
    return ids


def _ws_after_non_ws(s: str, ws: str) -> bool:
    """Whether s holds a character of ws right after a character that is neither in ws nor whitespace."""
    return any(b in ws and not (a in ws or a.isspace()) for a, b in zip(s, s[1:]))


def limit_threads() -> None:
    """One thread per process: data_tools parallelizes with worker processes, and a tokenizer
    library spawning its own thread pool in each of them would oversubscribe the cores."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")


class HFTokenizer:
    kind = "hf"
    _cut = _HF_CUT  # where long texts are cut, and characters left out there (see module doc)
    _skip = 0

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
        self._cuttable: bool | None = None

    def can_cut(self) -> bool:
        """Whether long texts may be encoded in pieces (see module doc); decided once per tokenizer."""
        if self._cuttable is None:
            cfg = json.loads(self._tok.to_str())
            pre = cfg.get("pre_tokenizer") or {}
            if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
                pre = pre["pretokenizers"][0]
            norm = cfg.get("normalizer")
            model = cfg.get("model") or {}
            self._cuttable = (
                all(pre.get(k) == v for k, v in _GPT2_REGEX_PRETOKENIZER.items())
                and (norm is None or norm.get("type") == "NFC")
                and model.get("type") == "BPE" and not model.get("dropout")
                and not any(_ws_after_non_ws(t["content"], " \n") for t in cfg.get("added_tokens", []))
                # an added token that swallows the spaces around it (rstrip / lstrip / single_word) could reach across
                and not any(t.get(k) for t in cfg.get("added_tokens", []) for k in ("rstrip", "lstrip", "single_word"))
            )
        return self._cuttable

    def _encode_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return _encode_long_apart(self, list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _encode_long_apart(tok, texts: list[str]) -> list[list[int]]:
    """tok._encode_ids(texts), with texts longer than PIECE_CHARS encoded piece by piece (at tok._cut,
    leaving out tok._skip characters there) when tok.can_cut()."""
    long = [i for i, t in enumerate(texts) if len(t) > PIECE_CHARS]
    if not long or not tok.can_cut():
        return tok._encode_ids(texts) if texts else []
    out: list = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= PIECE_CHARS]
    for i, ids in zip(short, tok._encode_ids([texts[i] for i in short]) if short else []):
        out[i] = ids
    for i in long:
        # one piece at a time: only one piece's encoding is alive at once
        pieces = _pieces(texts[i], tok._cut, tok._skip)
        out[i] = _join_ids((tok._encode_ids([p])[0] for p in pieces), tok.vocab_size)
    return out


class SentencePieceTokenizer:
    kind = "sentencepiece"
    _cut = _SP_CUT
    _skip = 0  # 1 with a dummy prefix (set by can_cut)

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
        self._cuttable: bool | None = None

    def can_cut(self) -> bool:
        """Whether long texts may be encoded in pieces (see module doc); decided once per model."""
        if self._cuttable is None:
            self._cuttable = False
            try:
                from sentencepiece import sentencepiece_model_pb2 as pb

                m = pb.ModelProto()
                m.ParseFromString(self._sp.serialized_model_proto())
            except Exception:  # no protobuf, or an unexpected proto: encode whole
                return False
            t, n = m.trainer_spec, m.normalizer_spec
            self._skip = 1 if n.add_dummy_prefix else 0
            self._cuttable = (
                t.model_type in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM)
                and n.name == "identity" and not n.precompiled_charsmap and not n.normalization_rule_tsv
                and n.escape_whitespaces and not t.treat_whitespace_as_suffix
                and (n.add_dummy_prefix or not n.remove_extra_whitespaces)
                and not any(_ws_after_non_ws(p.piece, "\u2581") for p in m.pieces)
            )
        return self._cuttable

    def _encode_ids(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int, num_threads=1)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return _encode_long_apart(self, list(texts))

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
