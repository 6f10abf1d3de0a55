"""Bad input never kills a run nor disappears silently; interrupted runs leave no valid-looking output."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_tools import tokenize_files, verify
from data_tools.cli import main
from data_tools.errors import DataToolsError
from test_data_helpers import NEOX, REPO, read_docs, sample_records, write_bytes, write_jsonl
from data_tools.tokenizer import load_tokenizer

RECORDS = sample_records(8)
BAD_LINES = [
    (b'{"text": "unterminated', "malformed_json"),
    (b'{"txt": "wrong key", "meta": {}}', "missing_text_key"),
    (b'{"text": "caf\xe9 latin-1 byte"}', "invalid_utf8"),
    (b'{"text": "lone surrogate \\ud800 here"}', "invalid_utf8"),
    (b'{"text": ""}', "empty_document"),
    (b'{"text": "  \\n\\t "}', "empty_document"),
    (b"", "empty_document"),
    (b'["a", "list"]', "not_a_json_object"),
    (b'{"text": 42}', "text_not_a_string"),
]


def _mixed_file(path):
    """good, bad, good, bad, ... so line numbers of the bad ones are known."""
    body, where = b"", {}
    good = iter(RECORDS)
    lineno = 0
    for raw, reason in BAD_LINES:
        body += json.dumps(next(good, {"text": "filler"})).encode() + b"\n"
        body += raw + b"\n"
        lineno += 2
        where.setdefault(reason, []).append(lineno)
    return write_bytes(path, body), where


def test_bad_lines_are_skipped_counted_and_located(tmp_path):
    src, where = _mixed_file(tmp_path / "mixed.jsonl.zst")
    s = tokenize_files([str(src)], str(tmp_path / "o"), "hf", str(NEOX), workers=2, batch_bytes=2000, quiet=True)
    assert s["skipped"] == {r: len(v) for r, v in where.items()}
    assert s["skipped_total"] == len(BAD_LINES) and s["documents"] == len(BAD_LINES)
    for reason, lines in where.items():
        assert s["skip_examples"][reason] == [ex for ex in s["skip_examples"][reason]]
        for ln, ex in zip(lines, s["skip_examples"][reason]):
            assert ex.startswith(f"{src}:{ln}: {reason}: "), ex
    docs, _ = read_docs(str(tmp_path / "o"))
    tok = load_tokenizer("hf", str(NEOX))
    expected = [r["text"] for r in RECORDS] + ["filler"]
    assert [tok.decode(d[:-1].tolist()) for d in docs] == expected


def test_strict_turns_the_first_bad_line_into_an_error(tmp_path):
    src, where = _mixed_file(tmp_path / "mixed.jsonl")
    with pytest.raises(DataToolsError, match=rf"(?s)mixed.jsonl:2: malformed_json: .*--strict"):
        tokenize_files([str(src)], str(tmp_path / "o"), "hf", str(NEOX), workers=2, strict=True, quiet=True)
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.meta.json").exists()


@pytest.mark.parametrize("suffix, msg", [(".jsonl.zst", "truncated zstd stream"), (".jsonl.gz", "truncated gzip stream")])
def test_truncated_compressed_file_names_the_file(tmp_path, suffix, msg):
    full = write_jsonl(tmp_path / f"full{suffix}", sample_records(20))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataToolsError, match=rf"{cut}: {msg}"):
        tokenize_files([str(cut)], str(tmp_path / "o"), "hf", str(NEOX), quiet=True)
    assert not list(tmp_path.glob("o.bin*")) and not list(tmp_path.glob("o.idx*"))


def test_failed_run_resumes_from_finished_files(tmp_path):
    recs = sample_records(24)
    good = [write_jsonl(tmp_path / f"f{i}.jsonl.zst", recs[8 * i: 8 * i + 8]) for i in range(3)]
    broken = tmp_path / "f1.jsonl.zst"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # the 2nd of 3 files is truncated
    prefix = str(tmp_path / "o")
    with pytest.raises(DataToolsError, match="truncated zstd"):
        tokenize_files([str(p) for p in good], prefix, "hf", str(NEOX), quiet=True)
    assert not any(os.path.exists(prefix + e) for e in (".bin", ".idx", ".meta.json"))
    work = sorted(os.listdir(prefix + ".work"))
    assert "shard-00000.done.json" in work and not any(n.startswith("shard-00001") for n in work)
    broken.write_bytes(data)  # repaired
    s = tokenize_files([str(p) for p in good], prefix, "hf", str(NEOX), workers=2, quiet=True)
    assert s["files_resumed"] == 1 and s["documents"] == 24 and not os.path.exists(prefix + ".work")
    fresh = str(tmp_path / "fresh")
    tokenize_files([str(p) for p in good], fresh, "hf", str(NEOX), quiet=True)
    for e in (".bin", ".idx"):
        assert filecmp.cmp(prefix + e, fresh + e, shallow=False)


def test_killed_process_leaves_old_output_intact_and_resumes(tmp_path):
    """SIGKILL a real `mesh-data tokenize` process mid-run (after its first input file is done)."""
    files = [str(write_jsonl(tmp_path / f"p{i}.jsonl", sample_records(40, start=40 * i, max_chars=4000))) for i in range(4)]
    prefix = str(tmp_path / "o")
    tokenize_files(files[:1], prefix, "hf", str(NEOX), quiet=True)  # an old, finished output
    old = {e: open(prefix + e, "rb").read() for e in (".bin", ".idx", ".meta.json")}
    cmd = [sys.executable, "-m", "data_tools", "tokenize", *files, "-o", prefix, "--tokenizer-model", str(NEOX), "-q"]
    proc = subprocess.Popen(cmd, cwd=REPO)
    marker = prefix + ".work/shard-00000.done.json"
    deadline = time.time() + 120
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed (machine too fast for this input)")
    # the old output is untouched and consistent; nothing half-written carries the final names
    for e, content in old.items():
        assert open(prefix + e, "rb").read() == content
    verify(prefix)
    s = tokenize_files(files, prefix, "hf", str(NEOX), quiet=True)  # the same command again
    assert s["files_resumed"] >= 1 and s["documents"] == 160
    verify(prefix)
    fresh = str(tmp_path / "fresh")
    tokenize_files(files, fresh, "hf", str(NEOX), quiet=True)
    for e in (".bin", ".idx"):
        assert filecmp.cmp(prefix + e, fresh + e, shallow=False)


def test_verify_detects_corruption(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", sample_records(6))
    p = str(tmp_path / "o")
    tokenize_files([str(src)], p, "hf", str(NEOX), quiet=True)
    good_bin, good_idx = open(p + ".bin", "rb").read(), open(p + ".idx", "rb").read()

    def run_verify():  # the CLI, in-process: exit code + stderr
        rc = main(["verify", p])
        return rc, capsys.readouterr().err

    cases = [
        (good_bin[:-2], good_idx, "index describes"),  # truncated .bin
        (good_bin, good_idx[:-5], "truncated or corrupt index"),
        (good_bin, b"XXXXXXXXX" + good_idx[9:], "magic"),
        (good_bin[:-2] + b"\xff\xff", good_idx, "outside the vocabulary"),  # token 65535 >= 50277
        (good_bin[:-2] + b"\x05\x00", good_idx, "do not end with the EOD"),
    ]
    for i, (b, x, msg) in enumerate(cases):
        open(p + ".bin", "wb").write(b)
        open(p + ".idx", "wb").write(x)
        with pytest.raises(DataToolsError, match=msg):
            verify(p)
        if i == 0:  # and through the CLI: non-zero exit with the message, no traceback
            rc, err = run_verify()
            assert rc == 1 and msg in err and err.startswith("mesh-data verify: error:")
    open(p + ".bin", "wb").write(good_bin)
    open(p + ".idx", "wb").write(good_idx)
    assert run_verify()[0] == 0
