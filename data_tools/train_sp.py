"""train-tokenizer: a SentencePiece (BPE or unigram) model trained on a sample of the corpus.

The sample is the first `max_chars` characters of documents in input order (the Pile's shards are
already shuffled, so a prefix is a fair sample), read with the same streaming readers and
validation as `tokenize` (bad lines are skipped and counted). Defaults make the model lossless:
identity normalization, whitespace kept as is, no dummy prefix, byte fallback on, so
decode(encode(text)) == text for any text. The EOD token is the model's eos piece (id 2).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from .errors import DataToolsError
from .readers import FileBatches, expand_inputs
from .worker import ParseOptions, iter_parsed

# SentencePiece's trainer reads lines; longer lines are dropped by it, so documents are cut to this.
_MAX_LINE_CHARS = 4096


def _cut(line: str):
    while len(line) > _MAX_LINE_CHARS:
        cut = line.rfind(" ", 0, _MAX_LINE_CHARS)
        cut = cut if cut > 0 else _MAX_LINE_CHARS
        yield line[:cut]
        line = line[cut:]
    if line:
        yield line


def train_tokenizer(
    inputs: list[str],
    model_prefix: str,
    *,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    user_defined_symbols: list[str] | None = None,
    add_dummy_prefix: bool = False,
    split_digits: bool = True,
    text_key: str = "text",
    subset_key: str = "meta.pile_set_name",
    subsets: list[str] | None = None,
    exclude_subsets: list[str] | None = None,
    txt_unit: str = "line",
    max_chars: int = 200_000_000,
    num_threads: int | None = None,
    quiet: bool = False,
) -> dict:
    """Train MODEL_PREFIX.model / MODEL_PREFIX.vocab; returns a small report dict."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataToolsError(f"--model-type must be 'bpe' or 'unigram', not {model_type!r}")
    if vocab_size < 300 and byte_fallback:
        raise DataToolsError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 256 + 3 special pieces")
    t0 = time.time()
    files = expand_inputs(list(inputs))
    base = dict(
        text_key=text_key,
        subset_key=subset_key,
        include_subsets=frozenset(subsets) if subsets else None,
        exclude_subsets=frozenset(exclude_subsets or ()),
    )
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".train-tokenizer-", dir=out_dir)
    try:
        sample = os.path.join(tmp, "sample.txt")
        docs = chars = skipped = 0
        with open(sample, "w", encoding="utf-8") as out:
            opts_by_kind = {k: ParseOptions(kind=k, **base) for k in ("jsonl", "txt", "columnar")}

            def documents():  # the same readers and checks as tokenize, over all inputs in order
                for path in files:
                    for kind, units, _ in FileBatches(path, 1 << 20, txt_unit, text_key, subset_key):
                        yield from iter_parsed(units, opts_by_kind[kind])

            for _, text, subset, skip in documents():
                if skip is not None:
                    skipped += 1
                    continue
                if subset in base["exclude_subsets"] or (base["include_subsets"] is not None and subset not in base["include_subsets"]):
                    continue
                for line in text.split("\n"):
                    for piece in _cut(line):
                        if piece.strip():
                            out.write(piece + "\n")
                docs += 1
                chars += len(text)
                if chars >= max_chars:
                    break
        if docs == 0:
            raise DataToolsError(f"train-tokenizer: no usable documents in {', '.join(files)}")
        tmp_prefix = os.path.join(tmp, "model")
        args = dict(
            input=sample,
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=add_dummy_prefix,
            split_digits=split_digits,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=_MAX_LINE_CHARS * 4 + 16,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2 if quiet else 1,
        )
        if user_defined_symbols:
            args["user_defined_symbols"] = list(user_defined_symbols)
        if not quiet:
            print(f"train-tokenizer: {docs} documents, {chars:,} characters -> SentencePiece {model_type}, vocab {vocab_size}", file=sys.stderr)
        try:
            spm.SentencePieceTrainer.train(**args)
        except RuntimeError as e:
            raise DataToolsError(f"SentencePiece training failed: {e}") from None
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, model_prefix + ext)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sp = spm.SentencePieceProcessor(model_file=model_prefix + ".model")
    return {
        "model": model_prefix + ".model",
        "vocab_size": sp.get_piece_size(),
        "eos_id": sp.eos_id(),
        "documents": docs,
        "characters": chars,
        "skipped_lines": skipped,
        "seconds": round(time.time() - t0, 2),
    }
