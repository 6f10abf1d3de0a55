"""Parquet, Arrow IPC and Hugging Face save_to_disk inputs: the same documents give the same bytes as
jsonl, bad rows are counted with file:row, broken files are one error naming them, resume works."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools import load_tokenizer, tokenize_files, train_tokenizer
from data_tools.cli import main
from data_tools.errors import DataToolsError
from test_data_helpers import NEOX, REPO, read_docs, sample_records, write_jsonl

RECORDS = sample_records(30, max_chars=1500)


def _same_bytes(a: str, b: str) -> None:
    for e in (".bin", ".idx"):
        assert filecmp.cmp(a + e, b + e, shallow=False), f"{a}{e} != {b}{e}"


def _save_to_disk(path, records, num_shards=1):
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(records).save_to_disk(str(path), num_shards=num_shards)
    return path


def _parquet(path, records, row_group_size=7, **kw):
    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=row_group_size, **kw)
    return path


def _tok(inputs, prefix, **kw):
    kw.setdefault("quiet", True)
    return tokenize_files([str(p) for p in inputs], str(prefix), "hf", str(NEOX), **kw)


def test_jsonl_parquet_arrow_and_save_to_disk_give_identical_bytes(tmp_path):
    import datasets

    jsonl = write_jsonl(tmp_path / "c.jsonl.zst", RECORDS)
    par = _parquet(tmp_path / "c.parquet", RECORDS)
    assert pq.ParquetFile(par).metadata.num_row_groups == 5
    hf_dir = _save_to_disk(tmp_path / "hf", RECORDS, num_shards=3)
    hf_export = tmp_path / "export.parquet"  # datasets' own Parquet export (row groups of batch_size rows)
    datasets.load_from_disk(str(hf_dir)).to_parquet(str(hf_export), batch_size=8)
    ipc_file = tmp_path / "c.arrow"  # Arrow IPC *file* format (Feather v2), not the stream save_to_disk writes
    with pa.ipc.new_file(str(ipc_file), pa.Table.from_pylist(RECORDS).schema) as w:
        w.write_table(pa.Table.from_pylist(RECORDS), max_chunksize=11)

    ref = _tok([jsonl], tmp_path / "ref", batch_bytes=4000)
    assert ref["documents"] == 30
    for name, src, workers in [("par", par, 2), ("hf", hf_dir, 2), ("hfexp", hf_export, 1), ("ipc", ipc_file, 1),
                               ("arrow1", hf_dir / "data-00001-of-00003.arrow", 1)]:
        if name == "hf":  # through the CLI, as a user would
            assert main(["tokenize", str(src), "-o", str(tmp_path / name), "--tokenizer-model", str(NEOX), "-j", "2",
                         "--batch-bytes", "4000", "-q", "--summary-json", str(tmp_path / "hf.json")]) == 0
            s = json.loads((tmp_path / "hf.json").read_text())
        else:
            s = _tok([src], tmp_path / name, workers=workers, batch_bytes=4000)
        if name == "arrow1":  # one shard of the dataset = its rows 11..20
            part = _tok([write_jsonl(tmp_path / "part.jsonl", RECORDS[10:20])], tmp_path / "part")
            _same_bytes(str(tmp_path / "part"), str(tmp_path / name))
            continue
        _same_bytes(str(tmp_path / "ref"), str(tmp_path / name))
        assert s["subsets"] == ref["subsets"] and s["skipped_total"] == 0, name

    # subset filters read the same column
    a = _tok([jsonl], tmp_path / "ja", exclude_subsets=["wikipedia_leads"])
    b = _tok([hf_dir], tmp_path / "ha", exclude_subsets=["wikipedia_leads"], workers=2)
    _same_bytes(str(tmp_path / "ja"), str(tmp_path / "ha"))
    assert a["filtered_by_subset"] == b["filtered_by_subset"] == {"wikipedia_leads": 15}


def test_nested_keys_null_subsets_and_flattened_columns(tmp_path):
    recs = [{"body": {"content": r["text"], "lang": "en"}, "info": {"src": {"name": r["meta"]["pile_set_name"]}}} for r in RECORDS[:12]]
    recs[3]["info"]["src"]["name"] = None  # null subset = no subset, in JSON as in Arrow
    recs[5]["info"] = None  # a null struct on the way: no subset either
    kw = dict(text_key="body.content", subset_key="info.src.name")
    a = _tok([write_jsonl(tmp_path / "n.jsonl", recs)], tmp_path / "a", **kw)
    b = _tok([_parquet(tmp_path / "n.parquet", recs, row_group_size=5)], tmp_path / "b", workers=2, **kw)
    c = _tok([_save_to_disk(tmp_path / "n_hf", recs)], tmp_path / "c", **kw)
    _same_bytes(str(tmp_path / "a"), str(tmp_path / "b"))
    _same_bytes(str(tmp_path / "a"), str(tmp_path / "c"))
    assert a["subsets"] == b["subsets"] == c["subsets"]
    assert a["subsets"]["<no subset>"]["documents"] == 2
    kept = _tok([tmp_path / "n.parquet"], tmp_path / "k", subsets=["shakespeare_milton"], **kw)
    assert kept["documents"] == 6 and kept["filtered_by_subset"] == {"wikipedia_leads": 4, "<no subset>": 2}

    # a flattened export (pandas style) with a column literally named "body.content": the exact name wins
    flat = [{"body.content": r["text"]} for r in RECORDS[:4]]
    d = _tok([_parquet(tmp_path / "flat.parquet", flat)], tmp_path / "d", text_key="body.content")
    e = _tok([write_jsonl(tmp_path / "flat.jsonl", flat)], tmp_path / "e", text_key="body.content")
    assert d["documents"] == 4
    _same_bytes(str(tmp_path / "d"), str(tmp_path / "e"))


def test_bad_rows_are_counted_with_file_and_row(tmp_path):
    good = [r["text"] for r in RECORDS[:6]]
    f1 = _parquet(tmp_path / "f1.parquet", [{"text": t} for t in [good[0], None, "", good[1], " \n\t"]], row_group_size=2)
    f2 = _parquet(tmp_path / "f2.parquet", [{"text": 7}, {"text": 8}])  # a column of int64
    f3 = _parquet(tmp_path / "f3.parquet", [{"content": good[2]}, {"content": good[3]}, {"content": good[4]}])  # no text column
    f4 = tmp_path / "f4.parquet"  # a binary text column with a byte that is not UTF-8
    pq.write_table(pa.table({"text": pa.array([good[5].encode(), b"caf\xe9"], pa.binary())}), str(f4))
    hf = _save_to_disk(tmp_path / "hf", [{"text": good[0]}, {"text": None}])
    s = _tok([f1, f2, f3, f4, hf], tmp_path / "o", workers=2, batch_bytes=100)
    assert s["documents"] == 4 and s["skipped_total"] == 10
    assert s["skipped"] == {"missing_text_key": 3, "text_not_a_string": 4, "invalid_utf8": 1, "empty_document": 2}
    ex = s["skip_examples"]
    assert ex["text_not_a_string"] == [f"{f1}:2: text_not_a_string: 'text' is null",
                                       f"{f2}:1: text_not_a_string: 'text' is a column of int64, not text",
                                       f"{f2}:2: text_not_a_string: 'text' is a column of int64, not text",
                                       f"{hf}:2: text_not_a_string: 'text' is null"]
    assert [e.split(": ")[0] for e in ex["empty_document"]] == [f"{f1}:3", f"{f1}:5"]
    assert ex["missing_text_key"][0] == f"{f3}:1: missing_text_key: no column 'text' in this file (columns: content); set --text-key"
    assert [e.split(": ")[0] for e in ex["missing_text_key"]] == [f"{f3}:1", f"{f3}:2", f"{f3}:3"]
    assert ex["invalid_utf8"][0].startswith(f"{f4}:2: invalid_utf8: ")
    docs, _ = read_docs(str(tmp_path / "o"))
    tok = load_tokenizer("hf", str(NEOX))
    assert [tok.decode(d[:-1].tolist()) for d in docs] == [good[0], good[1], good[5], good[0]]

    with pytest.raises(DataToolsError, match=rf"(?s)^{f1}:2: text_not_a_string: 'text' is null\n\(--strict"):
        _tok([f1], tmp_path / "s", strict=True, workers=2)
    assert not (tmp_path / "s.bin").exists()


def _cli_error(args, capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_truncated_or_corrupt_columnar_files_are_one_line_naming_the_file(tmp_path, capsys):
    recs = sample_records(40, max_chars=3000)
    full = _parquet(tmp_path / "full.parquet", recs, row_group_size=10)
    data = full.read_bytes()
    common = ["-o", str(tmp_path / "o"), "--tokenizer-model", str(NEOX), "-q"]

    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    err = _cli_error(["tokenize", str(cut), *common], capsys)
    assert err.startswith(f"mesh-data tokenize: error: {cut}: corrupt or truncated Parquet file (")

    bad = tmp_path / "bad.parquet"  # the footer is intact, a data page is not
    mid = len(data) // 3
    bad.write_bytes(data[:mid] + bytes(b ^ 0x5A for b in data[mid:mid + 64]) + data[mid + 64:])
    err = _cli_error(["tokenize", str(bad), *common], capsys)
    assert f"{bad}: corrupt or truncated Parquet file (" in err

    hf = _save_to_disk(tmp_path / "hf", recs, num_shards=2)
    arrow = hf / "data-00001-of-00002.arrow"
    good = arrow.read_bytes()
    arrow.write_bytes(good[:-8])  # cut exactly at a message boundary: only the missing end marker tells
    err = _cli_error(["tokenize", str(hf), *common], capsys)
    assert f"{arrow}: truncated Arrow stream (no end-of-stream marker" in err
    arrow.write_bytes(good[: len(good) // 2])  # cut inside a record batch
    err = _cli_error(["tokenize", str(hf), *common], capsys)
    assert f"{arrow}: corrupt or truncated Arrow file (" in err
    assert not list(tmp_path.glob("o.bin*")) and not list(tmp_path.glob("o.idx*")) and not (tmp_path / "o.meta.json").exists()
    arrow.write_bytes(good)
    assert main(["tokenize", str(hf), *common]) == 0


def test_directories_and_globs(tmp_path, capsys):
    import datasets

    datasets.disable_progress_bars()
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:6]), "validation": datasets.Dataset.from_list(RECORDS[6:8])})
    dd.save_to_disk(str(tmp_path / "dd"))
    err = _cli_error(["tokenize", str(tmp_path / "dd"), "-o", str(tmp_path / "o"), "--tokenizer-model", str(NEOX)], capsys)
    assert "DatasetDict (splits: train, validation); pass one split's directory, e.g. " + str(tmp_path / "dd" / "train") in err
    s = _tok([tmp_path / "dd" / "train"], tmp_path / "train")
    assert s["documents"] == 6

    pdir = tmp_path / "pq"
    pdir.mkdir()
    for i in (2, 0, 1):  # written out of order: the glob's sorted order decides
        _parquet(pdir / f"part-{i:05d}.parquet", RECORDS[10 * i: 10 * i + 10], row_group_size=4)
    with pytest.raises(DataToolsError, match=rf"input {pdir} is a directory; pass files or a glob such as '{pdir}/\*.jsonl.zst' or '{pdir}/\*.parquet'"):
        _tok([pdir], tmp_path / "x")
    s = _tok([f"{pdir}/*.parquet"], tmp_path / "g", workers=2)
    assert s["files"] == 3
    _tok([write_jsonl(tmp_path / "all.jsonl", RECORDS)], tmp_path / "all")
    _same_bytes(str(tmp_path / "all"), str(tmp_path / "g"))

    (tmp_path / "hf_broken").mkdir()
    (tmp_path / "hf_broken" / "dataset_info.json").write_text("{}")
    (tmp_path / "hf_broken" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    with pytest.raises(DataToolsError, match="state.json lists data-00000-of-00001.arrow, which is missing"):
        _tok([tmp_path / "hf_broken"], tmp_path / "x")


def test_up_to_date_and_resume_use_each_arrow_file_of_a_dataset(tmp_path):
    hf = _save_to_disk(tmp_path / "hf", RECORDS[:12], num_shards=2)
    prefix = tmp_path / "o"
    assert _tok([hf], prefix)["up_to_date"] is False
    assert _tok([hf], prefix)["up_to_date"] is True
    arrow = hf / "data-00001-of-00002.arrow"
    st = arrow.stat()
    os.utime(arrow, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, newer: not up to date
    assert _tok([hf], prefix)["up_to_date"] is False

    # a failed run keeps the finished dataset's shard; a changed dataset is redone
    par = _parquet(tmp_path / "p.parquet", RECORDS[12:24], row_group_size=3)
    data = par.read_bytes()
    par.write_bytes(data[:100])
    with pytest.raises(DataToolsError, match="corrupt or truncated Parquet"):
        _tok([hf, par], prefix)
    assert os.path.exists(f"{prefix}.work/shard-00000.done.json")
    par.write_bytes(data)
    s = _tok([hf, par], prefix, workers=2)
    assert s["files_resumed"] == 1 and s["documents"] == 24
    _tok([write_jsonl(tmp_path / "j.jsonl", RECORDS[:24])], tmp_path / "fresh")
    _same_bytes(str(tmp_path / "fresh"), str(prefix))

    par.write_bytes(data[:100])
    with pytest.raises(DataToolsError):
        _tok([hf, par], prefix, keep_work=True)
    import shutil

    shutil.rmtree(hf)
    _save_to_disk(hf, RECORDS[24:30], num_shards=2)  # another dataset at the same path
    par.write_bytes(data)
    s = _tok([hf, par], prefix)
    assert s["files_resumed"] == 0 and s["documents"] == 18


def test_parquet_memory_stays_near_one_batch(tmp_path):
    """A 96 MB single-row-group Parquet file is read with a small, fixed amount of memory. pyarrow's
    defaults (pre-buffering the row group's column chunks) take ~66 MB more here; this reader ~12 MB."""
    import numpy as np

    size, doc = 96 << 20, 48_000
    letters = np.random.default_rng(0).integers(97, 123, size=size, dtype=np.uint8)
    letters[::7] = 32  # words
    n = size // doc
    offsets = np.arange(0, (n + 1) * doc, doc, dtype=np.int32)
    text = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(letters))
    path = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({"text": text}), str(path), row_group_size=n, compression="zstd", write_batch_size=16)
    pq.write_table(pa.table({"text": ["warm up"] * 4}), str(tmp_path / "tiny.parquet"))
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    code = (
        "import sys\n"
        "from data_tools.readers import FileBatches\n"
        "def read(p): return sum(u[0].count for _, u, _ in FileBatches(p, 1 << 20))\n"
        "def kb(key): return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])\n"
        "read(sys.argv[2])  # one-time costs (pyarrow kernels, thread pools) before the baseline\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # peak RSS := current RSS\n"
        "base = kb('VmHWM:')\n"
        "n = read(sys.argv[1])\n"
        "print(n, (kb('VmHWM:') - base) // 1024)\n"
    )
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (this test process).
    # The system allocator returns freed memory at once (mimalloc, pyarrow's default, caches it:
    # RSS then levels off near 100 MB however large the file, which would blur this check)
    env = dict(os.environ, ARROW_DEFAULT_MEMORY_POOL="system")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "tiny.parquet")],
                         capture_output=True, text=True, check=True, cwd=REPO, env=env).stdout.split()
    rows, peak_mb = int(out[0]), int(out[1])
    assert rows == n
    assert peak_mb < 40, f"reading a 96 MB row group took {peak_mb} MB more memory"


def test_batches_cover_every_row_once_and_progress_reaches_the_size(tmp_path):
    from data_tools.readers import FileBatches

    par = _parquet(tmp_path / "p.parquet", RECORDS, row_group_size=4)
    fb = FileBatches(str(par), batch_bytes=3000)
    seen, last = [], 0
    for kind, units, pos in fb:
        (rows,) = units
        assert kind == "columnar" and pos >= last
        last = pos
        assert sum(len(t) for t in rows.texts[:-1]) < 3000  # cut as soon as a batch reaches batch_bytes
        seen.extend(range(rows.first_row, rows.first_row + rows.count))
    assert seen == list(range(1, 31)) and fb.disk_bytes_read == par.stat().st_size


def test_train_tokenizer_reads_parquet_like_jsonl(tmp_path):
    recs = sample_records(60, max_chars=2000)
    kw = dict(vocab_size=400, num_threads=1, quiet=True, exclude_subsets=["wikipedia_leads"])
    a = train_tokenizer([str(write_jsonl(tmp_path / "t.jsonl", recs))], str(tmp_path / "a"), **kw)
    b = train_tokenizer([str(_save_to_disk(tmp_path / "t_hf", recs, num_shards=2))], str(tmp_path / "b"), **kw)
    assert (a["documents"], a["characters"]) == (b["documents"], b["characters"]) == (30, sum(len(r["text"]) for r in recs[::2]))
    assert (tmp_path / "a.vocab").read_bytes() == (tmp_path / "b.vocab").read_bytes()  # .model also holds the temp paths
