"""merge / inspect / train-tokenizer / CLI surface, the shipped tokenizers, and the shared corpus."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pytest

from data_tools import load_tokenizer, merge_datasets, tokenize_files, train_tokenizer, verify
from data_tools.cli import build_parser, main
from data_tools.errors import DataToolsError
from test_data_helpers import NEOX, SHARED, SP8K, read_docs, sample_records, write_jsonl

RECORDS = sample_records(12)


def test_merge_equals_tokenizing_all_files_together(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS[:5])
    b = write_jsonl(tmp_path / "b.jsonl.zst", RECORDS[5:])
    tokenize_files([str(a)], str(tmp_path / "A"), "hf", str(NEOX), quiet=True)
    tokenize_files([str(b)], str(tmp_path / "B"), "hf", str(NEOX), quiet=True)
    tokenize_files([str(a), str(b)], str(tmp_path / "AB"), "hf", str(NEOX), quiet=True)
    assert main(["merge", str(tmp_path / "A"), str(tmp_path / "B"), "-o", str(tmp_path / "M")]) == 0
    for e in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"M{e}", tmp_path / f"AB{e}", shallow=False)
    meta = json.loads((tmp_path / "M.meta.json").read_text())
    assert meta["documents"] == 12 and meta["tokenizer"]["eod_id"] == 0
    verify(str(tmp_path / "M"))
    tokenize_files([str(a)], str(tmp_path / "S"), "sentencepiece", str(SP8K), quiet=True)
    with pytest.raises(DataToolsError, match="different tokenizers"):
        merge_datasets([str(tmp_path / "A"), str(tmp_path / "S")], str(tmp_path / "X"))
    with pytest.raises(DataToolsError, match="also an input"):
        merge_datasets([str(tmp_path / "A"), str(tmp_path / "B")], str(tmp_path / "A"))


def test_cli_tokenize_prints_summary_and_inspect_detokenizes(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl.gz", RECORDS, raw_lines=[b"not json"])
    p = str(tmp_path / "o")
    rc = main(["tokenize", str(src), "-o", p, "--tokenizer", "sentencepiece", "--tokenizer-model", str(SP8K),
               "-j", "2", "--no-progress", "--summary-json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "documents  12" in out and "malformed_json" in out and f"{src}:13" in out
    assert json.loads((tmp_path / "s.json").read_text())["skipped"] == {"malformed_json": 1}
    assert main(["inspect", p, "-n", "2", "--max-chars", "80"]) == 0
    out = capsys.readouterr().out
    assert "12 documents" in out and RECORDS[0]["text"][:80] in out and RECORDS[1]["text"][:80] in out
    assert main(["inspect", p, "--json", "--start", "11", "-n", "5"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [s_["document"] for s_ in r["samples"]] == [11] and r["samples"][0]["text"] == RECORDS[11]["text"][:400]
    rc = main(["tokenize", str(tmp_path / "missing.jsonl"), "-o", p, "--tokenizer-model", str(NEOX)])
    assert rc == 1 and "does not exist" in capsys.readouterr().err


def test_every_subcommand_has_help():
    parser = build_parser()
    for cmd in ("tokenize", "train-tokenizer", "inspect", "verify", "merge"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0


def test_train_tokenizer_options(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl.zst", sample_records(40))
    r = train_tokenizer([str(src)], str(tmp_path / "sp"), vocab_size=600, model_type="unigram",
                        user_defined_symbols=["<|sep|>"], quiet=True)
    assert r["vocab_size"] == 600 and r["eos_id"] == 2 and os.path.exists(tmp_path / "sp.vocab")
    tok = load_tokenizer("sentencepiece", str(tmp_path / "sp.model"))
    text = "  Två <|sep|> språk\n\tcafé ☃ 日本語 — 3.14159"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # lossless (byte fallback, identity normalization)
    sep = tok._sp.piece_to_id("<|sep|>")
    assert sep in ids and tok.eod_id == 2 and tok.vocab_size == 600
    with pytest.raises(DataToolsError, match="too small"):
        train_tokenizer([str(src)], str(tmp_path / "t"), vocab_size=100, quiet=True)


def test_shipped_tokenizers():
    sp = load_tokenizer("sentencepiece", str(SP8K))
    assert sp.vocab_size == 8192 and sp.eod_id == 2 and sp.eod_token == "</s>"
    hf = load_tokenizer("hf", str(NEOX))
    assert hf.vocab_size == 50277 and hf.eod_id == 0
    assert hf.encode("Hello, I am a language model.") == [12092, 13, 309, 717, 247, 3448, 1566, 15]
    for r in sample_records(40, max_chars=100_000):
        assert sp.decode(sp.encode(r["text"])) == r["text"]


def test_import_is_light():
    code = "import sys, data_tools; data_tools.load_tokenizer; print('torch' in sys.modules, 'megatron' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.skipif(not (SHARED / "corpus" / "val.jsonl.zst").exists(), reason="../shared/corpus not present (only on the dev box)")
def test_shared_val_corpus_with_the_pythia_tokenizer(tmp_path):
    src = SHARED / "corpus" / "val.jsonl.zst"
    s = tokenize_files([str(src)], str(tmp_path / "val"), "hf", str(SHARED / "tokenizers" / "gpt-neox-20b.json"), workers=2, quiet=True)
    assert s["documents"] == 520 and s["skipped_total"] == 0 and len(s["subsets"]) > 5
    docs, _ = read_docs(str(tmp_path / "val"))
    assert len(docs) == 520 and all(int(d[-1]) == 0 for d in docs)
