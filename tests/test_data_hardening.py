"""data_tools as a new user meets it (issue 16, item 6) and the Slurm array split of tokenize (item 2), without Slurm.

- long documents are encoded in pieces that give the ids of the whole text, with bounded memory;
- an output on a read-only or full filesystem is one line naming the path, exit 2, no partial files
  (real tmpfs mounts; skipped where mounting is not permitted);
- tokenize imports neither torch nor megatron-core, and still writes megatron-core's exact bytes;
- --task-index/--num-tasks: tasks tokenize their share into PREFIX.work/, the plain run only merges,
  byte for byte the output of one run; `mesh-data submit-preprocess` renders the array + merge jobs.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import data_tools.tokenizer as T
from data_tools import tokenize_files
from data_tools.cli import main
from data_tools.errors import DataToolsError
from test_data_helpers import NEOX, REPO, SP8K, sample_records, write_jsonl

# Separators and characters around which a wrong cut would change the ids: runs of spaces (GPT-NeoX has
# added tokens for them), newlines, tabs, non-breaking / ideographic spaces, combining marks, contractions,
# special-token text, SentencePiece's own whitespace symbol.
AWKWARD = ["  ", "   ", "\n", "\n\n", " \n ", "\t", "\u00a0", "\u3000", "e\u0301", " \u0301", "'s", " 's", "<|endoftext|>",
           "x" * 40, " 12345", "   \n   x", "\u65e5\u672c\u8a9e", "\r\n", " .", "\u2581", "  x  ", "\u0085", "\u2028"]


def _long_text(n_chars: int, seed: int = 0) -> str:
    """Real sample text interleaved with AWKWARD pieces, about n_chars long."""
    rng = np.random.default_rng(seed)
    texts = [r["text"] for r in sample_records(120, max_chars=4000)]
    parts, size = [], 0
    while size < n_chars:
        p = texts[rng.integers(len(texts))][: int(rng.integers(1, 4000))] if rng.random() < 0.6 else AWKWARD[rng.integers(len(AWKWARD))]
        parts.append(p)
        size += len(p)
    return "".join(parts)


@pytest.fixture(scope="module")
def sp_dummy_prefix(tmp_path_factory):
    """A SentencePiece BPE model with the dummy prefix on (like Llama's): pieces then skip the space at each cut."""
    from data_tools.train_sp import train_tokenizer

    d = tmp_path_factory.mktemp("spdummy")
    src = write_jsonl(d / "c.jsonl", sample_records(200))
    train_tokenizer([str(src)], str(d / "sp"), vocab_size=600, add_dummy_prefix=True, quiet=True, num_threads=1)
    return str(d / "sp.model")


@pytest.mark.parametrize("kind", ["hf", "sentencepiece", "sentencepiece-dummy-prefix"])
def test_long_texts_are_encoded_in_pieces_with_the_ids_of_the_whole_text(kind, monkeypatch, sp_dummy_prefix):
    model = {"hf": str(NEOX), "sentencepiece": str(SP8K), "sentencepiece-dummy-prefix": sp_dummy_prefix}[kind]
    tok = T.load_tokenizer(kind.split("-")[0], model)
    assert tok.can_cut(), f"{model}: expected a tokenizer whose long texts can be cut"
    assert tok._skip == (1 if kind == "sentencepiece-dummy-prefix" else 0)
    monkeypatch.setattr(T, "PIECE_CHARS", 1000)  # ~200 cuts in 200k characters
    for seed in range(3):
        text = _long_text(200_000, seed)
        whole = tok._encode_ids([text])[0]  # the library on the whole text
        assert len(T._pieces(text, tok._cut, tok._skip)) > 100
        assert tok.encode(text) == whole
        # in a batch among short texts, order kept
        assert tok.encode_batch(["short one", text, "another"]) == [tok._encode_ids(["short one"])[0], whole, tok._encode_ids(["another"])[0]]


def test_a_long_document_is_tokenized_with_bounded_memory(tmp_path):
    """A 2M-character document: before, the peak RSS grew ~250 bytes per character (~500 MB here;
    7.5 GB for 50 MB); in pieces it stays near the size of the ids. Same ids as encoding it whole."""
    text = _long_text(2_000_000, seed=7)
    src = write_jsonl(tmp_path / "long.jsonl", [{"text": text}, {"text": "a short document"}])
    code = (
        "import resource, sys, data_tools\n"
        "from data_tools.tokenizer import load_tokenizer\n"
        f"load_tokenizer('hf', {str(NEOX)!r})\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"data_tools.tokenize_files([{str(src)!r}], {str(tmp_path / 'o')!r}, 'hf', {str(NEOX)!r}, quiet=True)\n"
        "print('GROWTH_MB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    growth = float(res.stdout.split("GROWTH_MB")[1])
    print(f"peak RSS growth while tokenizing a {len(text):,}-character document: {growth:.0f} MB")
    assert growth < 200, f"tokenizing grew the peak RSS by {growth:.0f} MB"
    from test_data_helpers import read_docs

    docs, _ = read_docs(str(tmp_path / "o"))
    tok = T.load_tokenizer("hf", str(NEOX))
    assert docs[0][:-1].tolist() == tok._encode_ids([text])[0] and docs[0][-1] == tok.eod_id


def test_a_text_without_cut_points_and_other_tokenizers_are_encoded_whole(monkeypatch):
    monkeypatch.setattr(T, "PIECE_CHARS", 100)
    assert T._pieces("x" * 1000, T._HF_CUT) == ["x" * 1000]  # no whitespace: one piece
    assert T._pieces("a " * 200, T._HF_CUT) == ["a " * 50 + "a", *[" a" * 50] * 2, " a" * 49 + " "]
    tok = T.load_tokenizer("hf", str(NEOX))
    tok._cuttable = False  # e.g. a Metaspace or Llama-3 pre-tokenizer: the whole text, as before
    text = _long_text(5000)
    assert tok.encode(text) == tok._encode_ids([text])[0]


# --- writing: no torch, megatron-core's bytes --------------------------------------------------------------------

def _rebuild_with_megatron(prefix: str, out: str) -> None:
    """PREFIX rewritten document by document by megatron-core's own IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    ds = IndexedDataset(prefix)
    b = IndexedDatasetBuilder(out + ".bin", dtype=ds.index.dtype)
    di = ds.document_indices
    for d in range(len(di) - 1):
        seqs = [ds[i] for i in range(di[d], di[d + 1])]
        b.add_document(np.concatenate(seqs), [len(s) for s in seqs])
    b.finalize(out + ".idx")


def _same_pair(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + ext, b + ext, shallow=False) for ext in (".bin", ".idx"))


def test_tokenize_imports_no_torch_and_writes_megatron_cores_bytes(tmp_path):
    files = [str(write_jsonl(tmp_path / f"in{i}.jsonl", sample_records(8, start=8 * i))) for i in range(3)]
    prefix = str(tmp_path / "out")
    code = (
        "import sys, data_tools\n"
        f"data_tools.tokenize_files({files!r}, {prefix!r}, 'hf', {str(NEOX)!r}, split_sentences=True, keep_work=True, quiet=True)\n"
        "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron'}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, f"tokenize imported {res.stdout.strip()} (seconds of CPU per process before the first document)"

    # every shard and the merged pair are byte for byte what megatron-core's builder writes for the same documents
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    shards = [f"{prefix}.work/shard-{i:05d}" for i in range(3)]
    for s in shards:
        _rebuild_with_megatron(s, s + ".mc")
        assert _same_pair(s, s + ".mc"), s
    b = IndexedDatasetBuilder(str(tmp_path / "merged_mc.bin"), dtype=np.uint16)
    for s in shards:
        b.add_index(s)
    b.finalize(str(tmp_path / "merged_mc.idx"))
    assert _same_pair(prefix, str(tmp_path / "merged_mc"))

    # int32 tokens (vocabularies >= 65500), documents of several sequences and an empty one, the same
    from data_tools import indexed

    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, 200_000, n).astype(np.int32), [n - n // 3, n // 3]) for n in rng.integers(1, 500, 30)] + [(np.zeros(0, np.int32), [])]
    w = indexed.ShardWriter(str(tmp_path / "i32"), np.int32)
    b = IndexedDatasetBuilder(str(tmp_path / "i32_mc.bin"), dtype=np.int32)
    for tokens, lens in docs:
        w.add_document(tokens, lens)
        b.add_document(tokens, lens)
    w.commit()
    b.finalize(str(tmp_path / "i32_mc.idx"))
    assert _same_pair(str(tmp_path / "i32"), str(tmp_path / "i32_mc"))
    assert indexed.optimal_dtype(65499) is np.uint16 and indexed.optimal_dtype(65500) is np.int32


# --- read-only and full filesystems (real tmpfs mounts) ----------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro=False) -> a fresh tmpfs directory; unmounted at the end. Skips where mounting is not permitted."""
    mounted = []

    def mount(size: str, ro: bool = False) -> Path:
        d = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
        mounted.append(d)
        if ro:
            assert subprocess.run(["mount", "-o", "remount,ro", str(d)]).returncode == 0
        return d

    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _cli(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.err


def _one_line_error(rc, err, *must):
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("mesh-data tokenize: error: cannot write "), err
    for m in must:
        assert m in err, (m, err)


@pytest.mark.parametrize("sub", ["", "new/dir/"])
def test_read_only_output_is_one_line_naming_the_path(tmp_path, tmpfs, capsys, sub):
    ro = tmpfs("1m", ro=True)
    src = write_jsonl(tmp_path / "in.jsonl", sample_records(4))
    rc, err = _cli(["tokenize", str(src), "-o", f"{ro}/{sub}out", "--tokenizer-model", str(NEOX), "--no-progress"], capsys)
    _one_line_error(rc, err, str(ro), "read-only file system", "-o")


def test_full_disk_is_one_line_with_the_bytes_and_a_rerun_resumes(tmp_path, tmpfs, capsys):
    # 1) a shard does not fit: no partial file is left, the message names the path and the free bytes
    full = tmpfs("64k")
    src = write_jsonl(tmp_path / "big.jsonl", sample_records(60))  # ~100 KB of uint16 tokens
    rc, err = _cli(["tokenize", str(src), "-o", f"{full}/out", "--tokenizer-model", str(NEOX), "--no-progress"], capsys)
    _one_line_error(rc, err, f"{full}/out.work/shard-00000.partial.bin", "no space left on device", "bytes free", "kept in")
    assert not [p for p in full.rglob("*") if "partial" in p.name or p.suffix in (".bin", ".idx")], list(full.rglob("*"))

    # 2) the shards fit but the merged pair does not: the message says how many bytes the merge writes
    room = tmpfs("96k")
    files = [str(write_jsonl(tmp_path / f"s{i}.jsonl", sample_records(12, start=12 * i))) for i in range(2)]
    args = [*files, "-o", f"{room}/out", "--tokenizer-model", str(NEOX), "--no-progress"]
    rc, err = _cli(["tokenize", *args], capsys)
    _one_line_error(rc, err, f"{room}/out.partial.bin", "no space left on device", "this step writes", "only merges")
    assert sorted(p.name for p in room.iterdir()) == ["out.work"]
    assert len(list((room / "out.work").glob("*.done.json"))) == 2

    # 3) with room again, the same command only merges, into the bytes of a run elsewhere
    subprocess.run(["mount", "-o", "remount,size=2m", str(room)], check=True)
    s = tokenize_files(files, f"{room}/out", "hf", str(NEOX), quiet=True)
    tokenize_files(files, str(tmp_path / "ref"), "hf", str(NEOX), quiet=True)
    assert s["files_resumed"] == 2 and _same_pair(f"{room}/out", str(tmp_path / "ref"))


# --- --task-index / --num-tasks and submit-preprocess ------------------------------------------------------------

def _inputs(tmp_path, n=5):
    return [str(write_jsonl(tmp_path / f"in{i}.jsonl{'.zst' if i % 2 else ''}", sample_records(5, start=5 * i))) for i in range(n)]


def test_tasks_then_merge_equal_one_run_byte_for_byte(tmp_path, capsys):
    files = _inputs(tmp_path)
    common = [*files, "--tokenizer-model", str(NEOX), "--no-progress", "--split-sentences"]
    assert main(["tokenize", *common, "-o", str(tmp_path / "one")]) == 0
    split = str(tmp_path / "split")
    for task in (1, 0):  # any order, as array tasks run
        assert main(["tokenize", *common, "-o", split, "--task-index", str(task), "--num-tasks", "2"]) == 0
        assert not os.path.exists(split + ".bin") and not os.path.exists(split + ".meta.json")
    out = capsys.readouterr().out
    assert "task 1/2: 2 input files" in out and "task 0/2: 3 input files" in out and "not merged" in out
    work = Path(split + ".work")
    assert sorted(p.name for p in work.glob("*.done.json")) == [f"shard-{i:05d}.done.json" for i in range(5)]

    # a re-run of a task whose shard was lost (preempted before its marker) redoes only that file
    (work / "shard-00002.done.json").unlink()
    s = tokenize_files(files, split, "hf", str(NEOX), split_sentences=True, task_index=0, num_tasks=2, quiet=True)
    assert s["files"] == 3 and s["files_resumed"] == 2

    assert main(["tokenize", *common, "-o", split]) == 0
    assert "files      5 (5 resumed)" in capsys.readouterr().out
    assert _same_pair(str(tmp_path / "one"), split)
    assert json.loads(Path(split + ".meta.json").read_text())["documents"] == json.loads((tmp_path / "one.meta.json").read_text())["documents"]


def test_task_flags_are_checked_and_a_task_never_clears_the_shared_work_dir(tmp_path):
    files = _inputs(tmp_path, 2)
    with pytest.raises(DataToolsError, match=r"--task-index must be in \[0, --num-tasks=2\), got 2"):
        tokenize_files(files, str(tmp_path / "o"), "hf", str(NEOX), task_index=2, num_tasks=2, quiet=True)
    with pytest.raises(DataToolsError, match="go together"):
        tokenize_files(files, str(tmp_path / "o"), "hf", str(NEOX), num_tasks=2, quiet=True)
    tokenize_files(files, str(tmp_path / "o"), "hf", str(NEOX), task_index=0, num_tasks=2, quiet=True)
    # the same array with other settings must not delete the shards other tasks may be writing
    with pytest.raises(DataToolsError, match=r"o\.work holds shards made with other settings.*rm -r"):
        tokenize_files(files, str(tmp_path / "o"), "hf", str(NEOX), task_index=1, num_tasks=2, append_eod=False, quiet=True)
    assert (tmp_path / "o.work" / "shard-00000.done.json").exists()


def test_submit_preprocess_dry_run_renders_the_array_and_the_merge_job(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = _inputs(tmp_path, 3)
    rc = main(["submit-preprocess", "--tasks", "8", "--dry-run", "--sbatch-arg=--partition=cpu", "--",
               *files, "-o", "out", "--tokenizer-model", str(NEOX)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "3 tasks" in cap.err or "tasks -> 3" in cap.err  # no idle tasks: one input file each at most
    array, merge = [l for l in cap.out.splitlines() if l.startswith("would run: ")]
    script = str(REPO / "slurm" / "preprocess.sbatch")
    for part in ("--array=0-2", "--exclusive", "--partition=cpu", f"--chdir={tmp_path}", script, "-o out", f"MESH_PYTHON={sys.executable}"):
        assert part in array, part
    for part in ("--dependency=afterok:ARRAY_JOB_ID", "--kill-on-invalid-dep=yes", "--partition=cpu", script, "-o out"):
        assert part in merge, part
    assert "--array" not in merge and "--task-index" not in array + merge

    # checked before anything is queued
    assert main(["submit-preprocess", "--tasks", "2", "--dry-run", "--", *files, "-o", "out", "--tokenizer-model", "nope.json"]) == 1
    assert "tokenizer model nope.json does not exist" in capsys.readouterr().err
    assert main(["submit-preprocess", "--tasks", "2", "--dry-run", "--", *files, "-o", "out", "--tokenizer-model", str(NEOX),
                 "--num-tasks", "2"]) == 1
    assert "sets --task-index/--num-tasks itself" in capsys.readouterr().err


def test_preprocess_sbatch_is_valid_bash_and_passes_the_task_to_tokenize(tmp_path):
    """The script run as array task 1 of 3 and as the merge job, with a stand-in python that prints its arguments."""
    script = REPO / "slurm" / "preprocess.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "py"
    fake.write_text('#!/bin/sh\necho "ARGS $*"\n')
    fake.chmod(0o755)
    base = {"PATH": os.environ["PATH"], "MESH_PYTHON": str(fake), "SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "16"}
    task = {**base, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": "2", "SLURM_ARRAY_JOB_ID": "6"}
    out = subprocess.run(["bash", str(script), "a.jsonl", "-o", "out"], env=task, capture_output=True, text=True).stdout
    assert "ARGS -m data_tools tokenize -j 16 --no-progress a.jsonl -o out --task-index 1 --num-tasks 3" in out, out
    out = subprocess.run(["bash", str(script), "a.jsonl", "-o", "out"], env=base, capture_output=True, text=True).stdout
    assert "ARGS -m data_tools tokenize -j 16 --no-progress a.jsonl -o out\n" in out, out
    # an array that is not 0..N-1 would deal the files wrongly: refused
    bad = subprocess.run(["bash", str(script), "a.jsonl"], env={**task, "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "3"},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--array=0-2" in bad.stderr


def test_cut_points_respect_sentencepieces_escaped_space_and_greedy_added_tokens(monkeypatch, tmp_path):
    """Two cases the fuzz alphabet missed (found in review): a literal U+2581 beside a cut is whitespace to
    SentencePiece, so "x\u2581 \u2581y" must not be cut there; and a tokenizer.json whose added token swallows the
    spaces next to it (rstrip / lstrip / single_word) is encoded whole."""
    import json

    monkeypatch.setattr(T, "PIECE_CHARS", 50)
    sp = T.load_tokenizer("sentencepiece", str(SP8K))
    words = [r["text"].split()[0] for r in sample_records(40)]
    text = " ".join(f"{w}\u2581 \u2581{w}" if i % 3 == 0 else w for i, w in enumerate(words * 40))
    assert len(text) > 20 * T.PIECE_CHARS
    assert sp.encode(text) == sp._encode_ids([text])[0]

    cfg = json.loads(NEOX.read_text())
    for t in cfg["added_tokens"]:
        if t["content"] == "<|endoftext|>":
            t["rstrip"] = True
    greedy = tmp_path / "greedy.json"
    greedy.write_text(json.dumps(cfg))
    hf = T.load_tokenizer("hf", str(greedy))
    assert not hf.can_cut()
    text = ("x" * 41 + "<|endoftext|>   y ") * 200
    assert hf.encode(text) == hf._encode_ids([text])[0]


def test_dedup_into_a_read_only_directory_is_the_same_one_line_and_exit_2(tmp_path, tmpfs, capsys):
    """dedup / split report write errors like tokenize (one line naming the path, exit 2), not a generic message."""
    src = write_jsonl(tmp_path / "c.jsonl", sample_records(20))
    ro = tmpfs("1m", ro=True)
    rc = main(["dedup", str(src), "-o", str(ro / "keep.npz"), "--exact-only", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "read-only file system" in err and str(ro) in err, err
