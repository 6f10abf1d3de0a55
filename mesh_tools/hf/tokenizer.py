"""Tokenizer export: a Hugging Face `tokenizer.json` or a SentencePiece `.model` -> files `AutoTokenizer` loads.

Both become a `tokenizers`-backed fast tokenizer (tokenizer.json + tokenizer_config.json), so the export needs no
sentencepiece at load time. A SentencePiece model is rebuilt from its own proto (unigram or BPE pieces and scores,
its NFKC charsmap, whitespace and dummy-prefix settings, byte fallback), then checked against sentencepiece itself
on probe texts: any difference in the ids is an error, never a silently different tokenizer.

No special tokens are added to encodings (`add_special_tokens` is a no-op), as in training, where documents are
tokenized plainly and separated by the end-of-document token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Probe texts for the SentencePiece round trip: spaces, punctuation, digits, unicode, NFKC-folded forms, newlines.
PROBES = [
    "Hello world",
    "  The quick brown fox  jumps over the lazy dog.  ",
    "Numbers: 3.14159, 2,718 and 1e-5; ratios 50% / 33.3%.",
    "naïve café — “quotes” ‘single’ … ﬁnal ＦＵＬＬＷＩＤＴＨ ①",
    "line one\nline two\ttabbed",
    "日本語のテキスト and emoji 🙂 mixed",
    "def f(x):\n    return x ** 2  # code",
    "",
]


class TokenizerExportError(ValueError):
    pass


@dataclass
class TokenizerSource:
    kind: str  # "hf" | "sentencepiece"
    path: Path
    eod_token: str | None = None


def detect_kind(path: Path) -> str:
    if path.suffix == ".json":
        return "hf"
    if path.suffix == ".model":
        return "sentencepiece"
    head = path.read_bytes()[:1]
    return "hf" if head == b"{" else "sentencepiece"


def _hf_tokenizer(src: TokenizerSource):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(src.path))
    except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exception subclasses
        raise TokenizerExportError(f"{src.path}: not a Hugging Face tokenizer.json ({e})") from None
    names = [src.eod_token] if src.eod_token else ["<|endoftext|>", "</s>", "<eos>", "<|eot_id|>"]
    eos = next((n for n in names if n and tok.token_to_id(n) is not None), None)
    if eos is None:
        raise TokenizerExportError(f"{src.path}: no end-of-text token among {names}; pass --eod-token")
    unk = "<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else None
    # Pythia's tokenizer: <|endoftext|> is bos, eos and unk.
    return tok, {"eos_token": eos, "bos_token": eos, "unk_token": unk or eos}


def _sentencepiece_tokenizer(src: TokenizerSource):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    try:
        sp = spm.SentencePieceProcessor(model_file=str(src.path))
        proto = pb.ModelProto()
        proto.ParseFromString(src.path.read_bytes())
    except Exception as e:  # noqa: BLE001
        raise TokenizerExportError(f"{src.path}: not a SentencePiece model ({e})") from None
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ns.name not in ("nmt_nfkc", "nfkc", "identity", "") or ns.name.endswith("_cf"):
        raise TokenizerExportError(f"{src.path}: normalization rule '{ns.name}' is not supported (use nmt_nfkc, nfkc or identity)")
    if not ns.escape_whitespaces:
        raise TokenizerExportError(f"{src.path}: escape_whitespaces=false is not supported")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    unk_id = ts.unk_id
    if ts.model_type == pb.TrainerSpec.UNIGRAM:
        model = Unigram(pieces, unk_id=unk_id, byte_fallback=ts.byte_fallback)
    elif ts.model_type == pb.TrainerSpec.BPE:
        from transformers.convert_slow_tokenizer import generate_merges

        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        # BPE merge order = piece score order (sentencepiece scores BPE pieces by merge rank).
        specials = [p.piece for p in proto.pieces if p.type != pb.ModelProto.SentencePiece.NORMAL]
        merges = generate_merges(vocab, pieces, skip_tokens=specials)
        model = BPE(vocab, merges, unk_token=proto.pieces[unk_id].piece, fuse_unk=True, byte_fallback=ts.byte_fallback)
    else:
        raise TokenizerExportError(f"{src.path}: SentencePiece model type {ts.model_type} is not supported (unigram or bpe)")
    tok = Tokenizer(model)

    norms = []
    if ns.precompiled_charsmap:
        norms.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norms += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norms:
        tok.normalizer = normalizers.Sequence(norms)
    # "always", not "first": "first" keys on the original offset, which a stripped leading space moves off 0.
    prepend = "always" if ns.add_dummy_prefix else "never"
    # No word pre-split: sentencepiece encodes the whole normalized string (its pieces already respect word
    # boundaries, and whitespace-only pieces like "▁▁" must stay whole).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    dec = [decoders.Replace("▁", " ")]
    if ts.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())  # one string, so the Strip below removes only the text's dummy prefix
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # Control pieces (<s>, </s>, ...) are special tokens; user-defined pieces are matched verbatim, as sentencepiece does.
    added = [AddedToken(p.piece, normalized=False, special=p.type == pb.ModelProto.SentencePiece.CONTROL)
             for p in proto.pieces if p.type in (pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.USER_DEFINED)]
    tok.add_tokens(added)

    for text in PROBES:
        want = sp.encode(text)
        got = tok.encode(text, add_special_tokens=False).ids
        if want == got and unk_id not in got and tok.decode(got) != sp.decode(want):  # (sp renders unk as ' ⁇ ')
            raise TokenizerExportError(f"{src.path}: the converted tokenizer decodes {text!r} as {tok.decode(got)!r}, sentencepiece as {sp.decode(want)!r}")
        if want != got:
            raise TokenizerExportError(
                f"{src.path}: the converted tokenizer disagrees with sentencepiece on {text!r}: {got} vs {want}; "
                "this SentencePiece model uses a setting the converter does not reproduce"
            )
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    eos = src.eod_token or piece(sp.eos_id())
    if eos is None:
        raise TokenizerExportError(f"{src.path}: the SentencePiece model has no eos piece; pass --eod-token")
    special = {"eos_token": eos, "unk_token": piece(sp.unk_id()), "bos_token": piece(sp.bos_id()) or eos}
    if sp.pad_id() >= 0:
        special["pad_token"] = piece(sp.pad_id())
    return tok, special, sp


def export_tokenizer(src: TokenizerSource, out_dir: Path, model_max_length: int) -> dict:
    """Write tokenizer files into out_dir; return {bos,eos,pad}_token_id for config.json."""
    from transformers import PreTrainedTokenizerFast

    if not src.path.is_file():
        raise TokenizerExportError(f"{src.path}: tokenizer file not found")
    kind = src.kind or detect_kind(src.path)
    sp = None
    if kind == "hf":
        tok, special = _hf_tokenizer(src)
    elif kind == "sentencepiece":
        tok, special, sp = _sentencepiece_tokenizer(src)
    else:
        raise TokenizerExportError(f"unknown tokenizer kind '{kind}' (hf or sentencepiece)")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, clean_up_tokenization_spaces=False,
                                   **{k: v for k, v in special.items() if v is not None})
    fast.save_pretrained(str(out_dir))
    ids = {f"{k[:-6]}_token_id": fast.convert_tokens_to_ids(v) for k, v in special.items() if v is not None and k != "unk_token"}
    if sp is not None:
        # Round trip through the files just written: what a user's AutoTokenizer will produce.
        from transformers import AutoTokenizer

        back = AutoTokenizer.from_pretrained(str(out_dir))
        for text in PROBES:
            if back(text, add_special_tokens=True)["input_ids"] != sp.encode(text):
                raise TokenizerExportError(f"{src.path}: the saved tokenizer does not reproduce sentencepiece on {text!r}")
    (out_dir / "tokenizer_source.json").write_text(json.dumps({"kind": kind, "file": src.path.name}, indent=2) + "\n")
    return ids
