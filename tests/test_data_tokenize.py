"""tokenize: round trips through megatron-core's reader, determinism across workers, subsets, dtype."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest

from data_tools import load_tokenizer, tokenize_files, verify
from data_tools.errors import DataToolsError
from test_data_helpers import NEOX, SP8K, TOKENIZERS, read_docs, sample_records, write_bytes, write_jsonl

RECORDS = sample_records(24)
TEXTS = [r["text"] for r in RECORDS]


def _check_roundtrip(prefix, kind, expected_texts):
    tok = load_tokenizer(kind, TOKENIZERS[kind])
    docs, ds = read_docs(prefix)
    assert len(docs) == len(expected_texts)
    for doc, text in zip(docs, expected_texts):
        assert int(doc[-1]) == tok.eod_id  # EOD appended
        assert tok.decode(doc[:-1].tolist()) == text
    return docs, ds


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".jsonl.gz"])
def test_roundtrip_jsonl_formats(tmp_path, kind, suffix):
    src = write_jsonl(tmp_path / f"in{suffix}", RECORDS)
    s = tokenize_files([str(src)], str(tmp_path / "out"), kind, TOKENIZERS[kind], quiet=True)
    assert s["documents"] == len(RECORDS) and s["skipped_total"] == 0
    docs, ds = _check_roundtrip(str(tmp_path / "out"), kind, TEXTS)
    assert s["tokens"] == sum(len(d) for d in docs)
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    tok = load_tokenizer(kind, TOKENIZERS[kind])
    assert meta["tokenizer"]["kind"] == kind and meta["tokenizer"]["eod_id"] == tok.eod_id
    assert meta["tokenizer"]["vocab_size"] == tok.vocab_size and meta["dtype"] == "uint16"
    assert ds.index.dtype == np.uint16
    verify(str(tmp_path / "out"))


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
@pytest.mark.parametrize("suffix", [".txt", ".txt.zst"])
def test_roundtrip_txt_lines_and_paragraphs(tmp_path, kind, suffix):
    paragraphs = [t.strip("\n").replace("\n\n", "\n") for t in TEXTS[:6]]
    body = ("\n\n".join(paragraphs) + "\n").encode()
    src = write_bytes(tmp_path / f"in{suffix}", body)
    tokenize_files([str(src)], str(tmp_path / "para"), kind, TOKENIZERS[kind], txt_unit="paragraph", quiet=True)
    _check_roundtrip(str(tmp_path / "para"), kind, paragraphs)
    lines = [l for p in paragraphs for l in p.split("\n") if l.strip()]
    s = tokenize_files([str(src)], str(tmp_path / "line"), kind, TOKENIZERS[kind], txt_unit="line", quiet=True)
    _check_roundtrip(str(tmp_path / "line"), kind, lines)
    assert s["separator_lines"] == len(paragraphs) - 1 and s["skipped_total"] == 0


def test_output_bytes_do_not_depend_on_workers(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl.zst", RECORDS[:12], raw_lines=[b"{broken"])
    b = write_jsonl(tmp_path / "b.jsonl", RECORDS[12:])
    outs = []
    for w in (1, 2, 3):
        p = str(tmp_path / f"w{w}")
        s = tokenize_files([str(a), str(b)], p, "hf", str(NEOX), workers=w, batch_bytes=4096, quiet=True)
        assert s["documents"] == 24 and s["skipped"] == {"malformed_json": 1}
        outs.append(p)
    for p in outs[1:]:
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(outs[0] + ext, p + ext, shallow=False), f"{p}{ext} differs from workers=1"
    _check_roundtrip(outs[0], "hf", TEXTS)  # input order kept across files and batches


def test_subset_selection_and_exclusion(tmp_path):
    src = write_jsonl(tmp_path / "pile.jsonl.zst", RECORDS + [{"text": "no meta here"}])
    names = {r["meta"]["pile_set_name"] for r in RECORDS}
    assert names == {"shakespeare_milton", "wikipedia_leads"}
    s = tokenize_files([str(src)], str(tmp_path / "ex"), "hf", str(NEOX), exclude_subsets=["wikipedia_leads"], quiet=True)
    keep = [r["text"] for r in RECORDS if r["meta"]["pile_set_name"] != "wikipedia_leads"] + ["no meta here"]
    _check_roundtrip(str(tmp_path / "ex"), "hf", keep)
    assert s["filtered_by_subset"] == {"wikipedia_leads": 12}
    assert s["subsets"]["shakespeare_milton"]["documents"] == 12 and s["subsets"]["<no subset>"]["documents"] == 1
    s = tokenize_files([str(src)], str(tmp_path / "inc"), "hf", str(NEOX), subsets=["wikipedia_leads"], quiet=True)
    _check_roundtrip(str(tmp_path / "inc"), "hf", [r["text"] for r in RECORDS if r["meta"]["pile_set_name"] == "wikipedia_leads"])
    assert s["filtered_by_subset"] == {"shakespeare_milton": 12, "<no subset>": 1} and s["skipped_total"] == 0


def test_custom_text_key_and_sentence_splitting(tmp_path):
    recs = [{"body": {"content": t}} for t in TEXTS[:5]]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    s = tokenize_files([str(src)], str(tmp_path / "o"), "sentencepiece", str(SP8K), text_key="body.content", split_sentences=True, quiet=True)
    assert s["documents"] == 5 and s["sequences"] > 5 * 3
    _, ds = _check_roundtrip(str(tmp_path / "o"), "sentencepiece", TEXTS[:5])
    tok = load_tokenizer("sentencepiece", str(SP8K))
    di = ds.document_indices
    for d in range(5):  # EOD only at the end of the document's last sentence
        seqs = [ds[i] for i in range(di[d], di[d + 1])]
        assert all(tok.eod_id not in s_.tolist() for s_ in seqs[:-1]) and seqs[-1][-1] == tok.eod_id


def test_large_vocab_uses_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70000)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "big.json"))
    src = write_jsonl(tmp_path / "x.jsonl", [{"text": "w69999 w1 w65535"}])
    tokenize_files([str(src)], str(tmp_path / "o"), "hf", str(tmp_path / "big.json"), quiet=True)
    docs, ds = read_docs(str(tmp_path / "o"))
    assert ds.index.dtype == np.int32 and docs[0].tolist() == [70001, 3, 65537, 0]
    verify(str(tmp_path / "o"))


def test_up_to_date_rerun_and_settings_change(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", RECORDS[:4])
    p = str(tmp_path / "o")
    tokenize_files([str(src)], p, "hf", str(NEOX), quiet=True)
    assert tokenize_files([str(src)], p, "hf", str(NEOX), quiet=True)["up_to_date"] is True
    s = tokenize_files([str(src)], p, "sentencepiece", str(SP8K), quiet=True)  # other tokenizer: rebuilt
    assert s["up_to_date"] is False
    _check_roundtrip(p, "sentencepiece", TEXTS[:4])


def test_input_without_documents_is_an_error_not_an_empty_dataset(tmp_path):
    src = write_jsonl(tmp_path / "e.jsonl.zst", [{"text": ""}, {"text": "x", "meta": {"pile_set_name": "Books3"}}])
    with pytest.raises(DataToolsError, match=r"no documents kept .*empty_document.*Books3"):
        tokenize_files([str(src)], str(tmp_path / "o"), "hf", str(NEOX), exclude_subsets=["Books3"], quiet=True)
    assert not list(tmp_path.glob("o.*"))


def test_input_errors_are_clear(tmp_path):
    with pytest.raises(DataToolsError, match="matched no files"):
        tokenize_files([str(tmp_path / "*.jsonl")], str(tmp_path / "o"), "hf", str(NEOX))
    (tmp_path / "x.csv").write_bytes(b"")  # (.parquet is an input type since mesh-data reads Parquet)
    with pytest.raises(DataToolsError, match="unsupported input type"):
        tokenize_files([str(tmp_path / "x.csv")], str(tmp_path / "o"), "hf", str(NEOX))
    src = write_jsonl(tmp_path / "a.jsonl", RECORDS[:1])
    with pytest.raises(DataToolsError, match="not a Hugging Face tokenizer.json"):
        tokenize_files([str(src)], str(tmp_path / "o"), "hf", str(SP8K))
    with pytest.raises(DataToolsError, match="does not exist"):
        tokenize_files([str(src)], str(tmp_path / "o"), "sentencepiece", str(tmp_path / "nope.model"))
