"""dedup (exact + MinHash LSH near duplicates), keep-lists honoured by tokenize, and deterministic splits.

The corpora are real documents from the shipped sample with planted duplicates: exact copies (changed
case and spacing), near copies (a few words replaced) and hard negatives (halves of two documents).
Recall and precision on the planted pairs are printed (pytest -s) and held to a floor.
"""

from __future__ import annotations

import collections
import filecmp
import json
import os
import random
import re

import numpy as np
import pytest

from data_tools import tokenize_files
from data_tools.cli import build_parser, main
from data_tools.dedup import (DEFAULT_THRESHOLD, EXACT, NEAR, Shingler, dedup_files, normalize_text, read_keep_list,
                              signature, signature_datasketch, _setup, SigConfig)
from data_tools.errors import DataToolsError
from data_tools.split import split_files
from test_data_helpers import NEOX, read_docs, sample_records, write_bytes, write_jsonl


def _grams(text: str, n: int = 5) -> set:
    """Reference word 5-gram set (independent of dedup.py's hashing): the ground truth Jaccard."""
    w = re.findall(r"[^\W_]+", text.lower())
    return {tuple(w[i:i + n]) for i in range(max(len(w) - n + 1, 1))}


def _jaccard(a: str, b: str) -> float:
    x, y = _grams(a), _grams(b)
    return len(x & y) / len(x | y)


def _planted_corpus(seed: int = 0):
    """(file a records, file b records, truth): truth maps (file, line) -> 'exact' | 'near' | 'negative' for planted
    documents, plus 'pairs' [(original text, copy text, kind)]. Copies come after their originals."""
    rng = random.Random(seed)
    base, sizes, index = [], [], {}
    for r in sample_records(420, max_chars=3000):
        g = _grams(r["text"])
        shared = collections.Counter(j for x in g for j in index.get(x, ()))
        if len(g) < 150 or any(c / (len(g) + sizes[j] - c) > 0.3 for j, c in shared.items()):
            continue  # the sample itself has a few overlapping passages: keep the base set duplicate-free
        for x in g:
            index.setdefault(x, []).append(len(base))
        base.append(r)
        sizes.append(len(g))
    assert len(base) >= 250
    long_docs = [r for r in base if len(r["text"].split()) >= 300]
    copies = []
    for r in rng.sample(long_docs, 40):
        w = r["text"].split(" ")
        for _ in range(rng.randint(1, 3)):
            w[rng.randrange(len(w))] = f"qz{rng.randrange(10**6)}"
        copies.append(({"text": " ".join(w), "meta": r["meta"]}, r["text"], "near"))
    for r in rng.sample(base, 20):
        t = r["text"]
        t = t.upper() if rng.random() < 0.5 else "  " + "\n ".join(t.split()) + "\t"
        copies.append(({"text": t, "meta": r["meta"]}, r["text"], "exact"))
    for _ in range(20):
        x, y = rng.sample(base, 2)
        t = x["text"][: len(x["text"]) // 2] + y["text"][len(y["text"]) // 2:]
        copies.append(({"text": t, "meta": x["meta"]}, x["text"], "negative"))
    rng.shuffle(copies)
    a = base[:150]
    b = base[150:] + [c[0] for c in copies]
    truth = {}
    for i, (_, _, kind) in enumerate(copies):
        truth[("b", len(base) - 150 + i + 1)] = kind
    return a, b, truth, [(orig, rec["text"], kind) for rec, orig, kind in copies]


A, B, TRUTH, PAIRS = _planted_corpus()


def _write(tmp_path, a=A, b=B):
    return [write_jsonl(tmp_path / "a.jsonl.zst", a), write_jsonl(tmp_path / "b.jsonl", b)]


def _dropped(keep_list: str, names=("a", "b")) -> dict:
    """{(file, line): reason code} from a keep-list."""
    header, z = read_keep_list(keep_list)
    out = {}
    for i, name in enumerate(names):
        why = z[f"why{i}"]  # reason code by line number, 0 = kept
        for loc in np.flatnonzero(why).tolist():
            out[(name, loc)] = int(why[loc])
    assert [f["dropped"] for f in header["files"]] == [sum(k[0] == n for k in out) for n in names]
    return out


def test_signatures_are_datasketchs_minhash_and_shingles_ignore_case_punctuation_and_chunking():
    _setup(SigConfig(), {}, None)
    for r in sample_records(12, max_chars=20_000):  # the numpy fast path = datasketch's MinHash.update_batch
        assert np.array_equal(signature(r["text"])[0], signature_datasketch(r["text"]).hashvalues)
    s = Shingler("word", 5)
    one = set(np.concatenate(list(s.hashes("The  quick, brown fox -- jumps over THE lazy dog."))).tolist())
    two = set(np.concatenate(list(s.hashes("the quick brown fox jumps over the lazy dog"))).tolist())
    assert one == two and len(one) == 5
    assert list(s.hashes("... --- !!!")) == []  # no words: no shingles (never a near duplicate of anything)
    assert normalize_text("  Caf\u0065\u0301\tAU  lait\n") == normalize_text("café au LAIT")
    # a long document is hashed in pieces; the shingle set must not depend on where the pieces end
    text = " ".join(r["text"] for r in sample_records(30, max_chars=100_000))
    for unit, n in (("word", 5), ("char", 9)):
        whole = set(np.concatenate(list(Shingler(unit, n).hashes(text))).tolist())
        pieces = set(np.concatenate(list(Shingler(unit, n, chunk=97, piece=13).hashes(text))).tolist())
        assert whole == pieces and len(whole) > 1000


def test_planted_duplicates_recall_and_precision(tmp_path):
    files = _write(tmp_path)
    keep = str(tmp_path / "k.keep.npz")
    r = dedup_files([str(f) for f in files], keep, workers=2, quiet=True)
    dropped = _dropped(keep)
    planted = {k for k, v in TRUTH.items() if v in ("exact", "near")}
    near = {k for k, v in TRUTH.items() if v == "near"}
    exact = {k for k, v in TRUTH.items() if v == "exact"}
    tp = len(set(dropped) & planted)
    precision = tp / max(len(dropped), 1)
    recall_near = len(set(dropped) & near) / len(near)
    recall_exact = len({k for k in exact if dropped.get(k) == EXACT}) / len(exact)
    # MinHash estimates against the true Jaccard of the word 5-gram sets (checks the hashing end to end)
    _setup(SigConfig(), {}, None)
    errs, true_j = [], []
    for orig, copy, kind in PAIRS:
        if kind != "exact":
            j = _jaccard(orig, copy)
            est = float((signature(orig)[0] == signature(copy)[0]).mean())
            errs.append(abs(est - j))
            if kind == "near":
                true_j.append(j)
    print(f"\nplanted: {len(near)} near (true Jaccard {min(true_j):.3f}..{max(true_j):.3f}), {len(exact)} exact, "
          f"{sum(v == 'negative' for v in TRUTH.values())} hard negatives among {r['documents']} documents; "
          f"threshold {DEFAULT_THRESHOLD}: near recall {recall_near:.3f}, exact recall {recall_exact:.3f}, "
          f"precision {precision:.3f} ({len(dropped)} dropped); |MinHash - Jaccard| max {max(errs):.3f}")
    assert recall_exact == 1.0
    assert recall_near >= 0.9 and precision >= 0.95
    assert not any(TRUTH.get(k) == "negative" for k in dropped)
    assert max(errs) < 0.15
    # the report counts what the keep-list drops, per subset and reason
    by_reason = {"exact_duplicate": sum(v == EXACT for v in dropped.values()), "near_duplicate": sum(v == NEAR for v in dropped.values())}
    assert {k: v["documents"] for k, v in r["removed"].items()} == {k: v for k, v in by_reason.items() if v}
    assert sum(s["documents"] for s in r["subsets"].values()) == len(A) + len(B)
    assert r["removed_documents"] == len(dropped) and r["kept_documents"] == len(A) + len(B) - len(dropped)
    for s in r["subsets"].values():
        assert s["chars"] >= sum(x["chars"] for x in s["removed"].values()) > 0


def test_tokenize_with_keep_list_equals_tokenizing_the_filtered_corpus(tmp_path):
    files = [str(f) for f in _write(tmp_path)]
    keep = str(tmp_path / "k.keep.npz")
    r = dedup_files(files, keep, tokenizer_model=str(NEOX), output_corpus=str(tmp_path / "filtered"), quiet=True)
    assert [os.path.basename(p) for p in r["output_corpus"]] == ["a.jsonl.zst", "b.jsonl.zst"]
    s = tokenize_files(files, str(tmp_path / "kl"), "hf", str(NEOX), keep_list=keep, quiet=True)
    f = tokenize_files(r["output_corpus"], str(tmp_path / "fc"), "hf", str(NEOX), quiet=True)
    full = tokenize_files(files, str(tmp_path / "full"), "hf", str(NEOX), quiet=True)
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(str(tmp_path / "kl") + ext, str(tmp_path / "fc") + ext, shallow=False)
    dropped = _dropped(keep)
    assert s["documents"] == f["documents"] == len(A) + len(B) - len(dropped)
    assert sum(s["dedup_removed"].values()) == len(dropped) and s["split_excluded"] == {}
    for name, v in r["subsets"].items():
        gone = sum(x["documents"] for x in v["removed"].values())
        assert s["dedup_removed"].get(name, 0) == gone
        assert full["subsets"][name]["documents"] - s["subsets"][name]["documents"] == gone
        # tokens removed as dedup reports them (EOD included) = what tokenize no longer writes
        assert full["subsets"][name]["tokens"] - s["subsets"][name]["tokens"] == sum(x["tokens"] for x in v["removed"].values())
    docs, _ = read_docs(str(tmp_path / "kl"))
    assert len(docs) == s["documents"]
    # the keep-list is part of tokenize's settings: another keep-list rebuilds, the same one is up to date
    assert tokenize_files(files, str(tmp_path / "kl"), "hf", str(NEOX), keep_list=keep, quiet=True)["up_to_date"]
    exact_only = str(tmp_path / "x.keep.npz")
    rx = dedup_files(files, exact_only, near=False, quiet=True)
    assert set(rx["removed"]) == {"exact_duplicate"} and rx["removed_documents"] == sum(v == "exact" for v in TRUTH.values())
    s2 = tokenize_files(files, str(tmp_path / "kl"), "hf", str(NEOX), keep_list=exact_only, quiet=True)
    assert not s2["up_to_date"] and s2["documents"] == len(A) + len(B) - rx["removed_documents"]


def test_dedup_result_does_not_depend_on_workers_partitions_or_resume(tmp_path):
    files = [str(f) for f in _write(tmp_path)]
    ref = dedup_files(files, str(tmp_path / "ref.keep.npz"), quiet=True)
    want = _dropped(str(tmp_path / "ref.keep.npz"))
    assert want
    # many partitions on disk (a tiny memory budget) and 3 workers: same groups, same first-kept documents
    r = dedup_files(files, str(tmp_path / "p.keep.npz"), workers=3, memory_gb=1e-6, keep_work=True, quiet=True)
    assert r["pass2"]["partitions"] > 10 and _dropped(str(tmp_path / "p.keep.npz")) == want
    # resume: a re-run reuses the finished files' signatures; a file whose marker is gone is redone
    os.remove(tmp_path / "p.keep.npz.work" / "f00001.done.json")
    r2 = dedup_files(files, str(tmp_path / "p.keep.npz"), workers=2, keep_work=True, quiet=True)
    assert r2["files_resumed"] == 1 and _dropped(str(tmp_path / "p.keep.npz")) == want
    r3 = dedup_files(files, str(tmp_path / "p.keep.npz"), quiet=True)
    assert r3["files_resumed"] == 2 and not os.path.exists(tmp_path / "p.keep.npz.work")
    assert ref["removed"] == r3["removed"]
    # a changed threshold reuses the signatures too (only pass 2 depends on it) and drops fewer
    strict = dedup_files(files, str(tmp_path / "s.keep.npz"), threshold=0.99, quiet=True)
    assert strict["removed_documents"] < ref["removed_documents"]


def test_keep_list_mismatches_are_clear_errors(tmp_path):
    files = [str(f) for f in _write(tmp_path)]
    keep = str(tmp_path / "k.keep.npz")
    dedup_files(files, keep, near=False, quiet=True)
    other = write_jsonl(tmp_path / "other.jsonl", A[:5])
    with pytest.raises(DataToolsError, match="other.jsonl is not one of the files keep-list"):
        tokenize_files([str(other)], str(tmp_path / "o"), "hf", str(NEOX), keep_list=keep, quiet=True)
    with pytest.raises(DataToolsError, match="made with text_key='text' but this run uses 'body'"):
        tokenize_files(files, str(tmp_path / "o"), "hf", str(NEOX), keep_list=keep, text_key="body", quiet=True)
    with pytest.raises(DataToolsError, match="not a mesh-data keep-list"):
        tokenize_files(files, str(tmp_path / "o"), "hf", str(NEOX), keep_list=files[1], quiet=True)
    write_jsonl(tmp_path / "b.jsonl", B[:-1])  # the input changed after dedup: its line numbers mean other documents
    with pytest.raises(DataToolsError, match="b.jsonl changed since keep-list"):
        tokenize_files(files, str(tmp_path / "o"), "hf", str(NEOX), keep_list=keep, quiet=True)
    # a moved (copied) input is found by its content fingerprint
    moved = tmp_path / "moved"
    moved.mkdir()
    write_jsonl(moved / "b.jsonl", B)
    dedup_files(files[:1] + [str(moved / "b.jsonl")], keep, near=False, quiet=True)
    os.replace(moved / "b.jsonl", tmp_path / "b.jsonl")
    s = tokenize_files(files, str(tmp_path / "ok"), "hf", str(NEOX), keep_list=keep, quiet=True)
    assert sum(s["dedup_removed"].values()) == sum(v == "exact" for v in TRUTH.values())
    with pytest.raises(DataToolsError, match="--threshold must be between 0 and 1"):
        dedup_files(files, keep, threshold=1.5, quiet=True)
    with pytest.raises(DataToolsError, match="give both --bands and --rows"):
        dedup_files(files, keep, bands=4, quiet=True)
    (tmp_path / "blocked.keep.npz.work").write_text("a file where the work directory goes")
    with pytest.raises(DataToolsError, match=r"cannot write \S*blocked.keep.npz.work: File exists; check the output location"):
        dedup_files(files, str(tmp_path / "blocked.keep.npz"), quiet=True)


def test_txt_paragraph_keep_list_and_filtered_corpus(tmp_path):
    paras = [r["text"].replace("\n\n", "\n").strip("\n") for r in sample_records(12)]
    body = "\n\n".join(paras + [paras[3].upper(), paras[5]]) + "\n"
    src = write_bytes(tmp_path / "in.txt.zst", body.encode())
    keep = str(tmp_path / "t.keep.npz")
    r = dedup_files([str(src)], keep, txt_unit="paragraph", output_corpus=str(tmp_path / "f"), quiet=True)
    assert r["removed"]["exact_duplicate"]["documents"] == 2
    s = tokenize_files([str(src)], str(tmp_path / "kl"), "hf", str(NEOX), keep_list=keep, txt_unit="paragraph", quiet=True)
    f = tokenize_files(r["output_corpus"], str(tmp_path / "fc"), "hf", str(NEOX), txt_unit="paragraph", quiet=True)
    assert s["documents"] == f["documents"] == 12 and s["dedup_removed"] == {"<no subset>": 2}
    assert filecmp.cmp(str(tmp_path / "kl.bin"), str(tmp_path / "fc.bin"), shallow=False)
    with pytest.raises(DataToolsError, match="made with txt_unit='paragraph' but this run uses 'line'"):
        tokenize_files([str(src)], str(tmp_path / "x"), "hf", str(NEOX), keep_list=keep, quiet=True)


def test_parquet_rows_keep_list(tmp_path):
    """Columnar inputs: locators are row numbers across row groups and batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools import load_tokenizer

    recs = sample_records(30)
    texts = [r["text"] for r in recs] + [recs[2]["text"].upper(), recs[7]["text"]]
    subsets = [r["meta"]["pile_set_name"] for r in recs] + ["copies", "copies"]
    pq.write_table(pa.table({"text": texts, "meta": [{"pile_set_name": s} for s in subsets]}), tmp_path / "p.parquet", row_group_size=7)
    keep = str(tmp_path / "p.keep.npz")
    r = dedup_files([str(tmp_path / "p.parquet")], keep, batch_bytes=5000, quiet=True)
    assert r["removed_documents"] == 2 and r["subsets"]["copies"]["removed"]["exact_duplicate"]["documents"] == 2
    s = tokenize_files([str(tmp_path / "p.parquet")], str(tmp_path / "t"), "hf", str(NEOX), keep_list=keep, batch_bytes=5000, quiet=True)
    assert s["dedup_removed"] == {"copies": 2}
    tok = load_tokenizer("hf", str(NEOX))
    docs, _ = read_docs(str(tmp_path / "t"))
    assert [tok.decode(d[:-1].tolist()) for d in docs] == texts[:30]
    with pytest.raises(DataToolsError, match="--output-corpus copies jsonl/txt inputs only"):
        dedup_files([str(tmp_path / "p.parquet")], keep, output_corpus=str(tmp_path / "o"), quiet=True)


def _split_of(prefix: str, files: list, records_per_file: list) -> dict:
    """normalised text -> set of splits it was assigned to, from the three keep-lists."""
    out: dict = {}
    for name in ("train", "valid", "test"):
        _, z = read_keep_list(f"{prefix}.{name}.keep.npz")
        for i, recs in enumerate(records_per_file):
            why = z[f"why{i}"]
            for line, rec in enumerate(recs, 1):
                if not (line < len(why) and why[line]):
                    out.setdefault(normalize_text(rec["text"]), set()).add(name)
    return out


def test_split_is_deterministic_whatever_the_order_or_sharding(tmp_path):
    recs = sample_records(900, max_chars=400)
    one = write_jsonl(tmp_path / "one.jsonl.zst", recs)
    r1 = split_files([str(one)], str(tmp_path / "s1"), split="80,10,10", quiet=True)
    shuffled = list(recs)
    random.Random(1).shuffle(shuffled)
    shards = [shuffled[:200], shuffled[200:450], shuffled[450:]]
    paths = [str(write_jsonl(tmp_path / f"part{i}.jsonl", s)) for i, s in enumerate(shards)]
    r2 = split_files(paths, str(tmp_path / "s2"), split="80,10,10", workers=2, quiet=True)
    a = _split_of(str(tmp_path / "s1"), [one], [recs])
    b = _split_of(str(tmp_path / "s2"), paths, shards)
    assert a == b and len(a) == len({normalize_text(x["text"]) for x in recs})
    assert all(len(v) == 1 for v in a.values())  # no document in two splits, none lost
    n = len(recs)
    got = {k: v["documents"] / n for k, v in r1["splits"].items()}
    print(f"\nsplit 80,10,10 of {n} documents: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()))
    assert abs(got["train"] - 0.8) < 0.04 and abs(got["valid"] - 0.1) < 0.03 and abs(got["test"] - 0.1) < 0.03
    assert {k: v["documents"] for k, v in r1["splits"].items()} == {k: v["documents"] for k, v in r2["splits"].items()}
    # another salt draws another split
    split_files([str(one)], str(tmp_path / "s3"), split="80,10,10", salt="other", quiet=True)
    assert _split_of(str(tmp_path / "s3"), [one], [recs]) != a


def test_split_datasets_for_the_trainer_and_dedup_drops_in_every_split(tmp_path):
    from pretrain.data_checks import check_prefixes

    files = [str(f) for f in _write(tmp_path)]
    keep = str(tmp_path / "d.keep.npz")
    dedup_files(files, keep, quiet=True)
    dropped = _dropped(keep)
    prefix = str(tmp_path / "corpus")
    r = split_files(files, prefix, split="6,2,2", keep_list=keep, tokenizer_model=str(NEOX), workers=2, quiet=True)
    assert sum(v["documents"] for v in r["splits"].values()) == len(A) + len(B) - len(dropped)
    check_prefixes([f"{prefix}.train"], "data.paths")  # the trainer's own up-front checks accept them
    check_prefixes([f"{prefix}.valid"], "data.valid_paths")
    check_prefixes([f"{prefix}.test"], "data.test_paths")
    seen = []
    for name, v in r["splits"].items():
        docs, _ = read_docs(f"{prefix}.{name}")
        assert len(docs) == v["documents"] and sum(len(d) for d in docs) == v["tokens"]
        meta = json.loads(open(f"{prefix}.{name}.meta.json").read())["summary"]
        assert sum(meta["dedup_removed"].values()) == len(dropped)  # dedup drops are reported in each split
        assert sum(meta["split_excluded"].values()) == len(A) + len(B) - len(dropped) - v["documents"]
        seen.append(v["documents"])
    # identical documents (the exact copies) share a split even without dedup
    r2 = split_files(files, str(tmp_path / "nodedup"), split="6,2,2", quiet=True)
    where = _split_of(str(tmp_path / "nodedup"), files, [A, B])
    assert all(len(v) == 1 for v in where.values())
    assert sum(v["documents"] for v in r2["splits"].values()) == len(A) + len(B)


def test_cli_dedup_split_and_tokenize_keep_list(tmp_path, capsys):
    files = [str(f) for f in _write(tmp_path)]
    keep = str(tmp_path / "c.keep.npz")
    assert main(["dedup", *files, "-o", keep, "-j", "2", "--summary-json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "wrote " + keep in out and "Jaccard >= 0.87, word 5-grams, 128 perms" in out and "shakespeare_milton" in out
    rep = json.loads((tmp_path / "d.json").read_text())
    assert rep["removed_documents"] == len(_dropped(keep))
    assert main(["tokenize", *files, "-o", str(tmp_path / "t"), "--tokenizer-model", str(NEOX), "--keep-list", keep, "-q"]) == 0
    assert main(["tokenize", *files, "-o", str(tmp_path / "t2"), "--tokenizer-model", str(NEOX), "--keep-list", keep, "--no-progress"]) == 0
    assert "keep-list  " in capsys.readouterr().out
    assert main(["split", *files, "-o", str(tmp_path / "sp"), "--split", "8,1,1", "--keep-list", keep]) == 0
    out = capsys.readouterr().out
    assert "train" in out and str(tmp_path / "sp.valid.keep.npz") in out
    rc = main(["tokenize", *files, "-o", str(tmp_path / "t3"), "--tokenizer-model", str(NEOX), "--keep-list", str(tmp_path / "nope.npz")])
    err = capsys.readouterr().err
    assert rc != 0 and "nope.npz does not exist" in err and len(err.strip().splitlines()) == 1
    assert main(["split", *files, "-o", str(tmp_path / "bad"), "--split", "1,2"]) != 0
    assert "--split '1,2': give three non-negative weights" in capsys.readouterr().err
    for cmd in ("dedup", "split"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0


def test_a_split_keep_list_needs_the_subset_filter_it_was_made_with(tmp_path):
    """Documents a split's own --subset filter left out have no split: tokenizing with its keep-lists but another
    filter would put them into every split (found in review), so that is refused."""
    recs = [{"text": r["text"], "meta": {"pile_set_name": "AB"[i % 2]}} for i, r in enumerate(sample_records(40))]
    src = write_jsonl(tmp_path / "ab.jsonl", recs)
    split_files([str(src)], str(tmp_path / "s"), split="8,1,1", subsets=["A"], quiet=True)
    with pytest.raises(DataToolsError, match="include_subsets"):
        tokenize_files([str(src)], str(tmp_path / "t"), "hf", str(NEOX), keep_list=str(tmp_path / "s.train.keep.npz"), quiet=True)
    tokenize_files([str(src)], str(tmp_path / "t"), "hf", str(NEOX), keep_list=str(tmp_path / "s.train.keep.npz"),
                   subsets=["A"], quiet=True)
