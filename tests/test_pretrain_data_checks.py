"""Bad data fails before the expensive setup (process groups, DeepSpeed, the model), in one line naming the file and
the fix, exit 2, the same way on every rank: a truncated .bin, a corrupt .idx, a stale sidecar, token ids beyond
model.vocab_size in data without a sidecar (scanned once, then cached), a missing path.

The datasets are real .bin/.idx pairs written with megatron-core's IndexedDatasetBuilder (tests/pretrain_data.py)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import fresh_job_env
from mesh_megatron.config import ConfigError
from pretrain_data import VOCAB, make_dataset

# Printed by Trainer.setup once the data checks have passed (joining the process group, the resolved config, the
# per-phase setup times): none may appear when the data is bad.
SETUP_MARKS = ("[pretrain] setup", "[pretrain] resolved config")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("good") / "good", n_docs=60, seed=5)


def copy_dataset(src: str, dst: Path, sidecar: bool = True) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx") + ((".meta.json",) if sidecar else ()):
        shutil.copy(src + ext, str(dst) + ext)
    return str(dst)


def write_config(tmp: Path, paths: list[str], vocab: int = VOCAB, **data) -> Path:
    cfg = {
        "model": {"name": "checks", "arch": "vanilla", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                  "seq_length": 32, "vocab_size": vocab, "make_vocab_size_divisible_by": 64},
        "data": {"paths": paths, "split": "90,8,2", **data},
        "train": {"train_iters": 2, "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 0, "eval_iters": 1,
                  "log_interval": 1},
        "checkpoint": {"save_interval": 0},
        "logging": {"dir": str(tmp / "run"), "wandb": {"mode": "disabled"}},
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pretrain", "--config", str(config)], env=fresh_job_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=300)  # today's code trains (or hangs) instead of failing: bounded
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def assert_fails_before_setup(rc: int, out: str, err: str, *names: str) -> str:
    """Exit 2, exactly one line (the error, naming every given string), no traceback, no setup output."""
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mesh-pretrain: error: "), (rc, out[-2000:], err[-3000:])
    assert not any(mark in out for mark in SETUP_MARKS), out[-2000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_truncated_bin_is_one_line_before_setup(good, tmp_path):
    prefix = copy_dataset(good, tmp_path / "data" / "trunc")
    os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") // 2)  # an interrupted copy
    rc, out, err = finish(start(write_config(tmp_path, [prefix])))
    line = assert_fails_before_setup(rc, out, err, prefix + ".bin", "truncated", f"mesh-data verify {prefix}")
    assert "mesh-data tokenize" in line


def test_vocab_below_the_data_without_sidecar_is_found_by_a_cached_scan(good, tmp_path):
    prefix = copy_dataset(good, tmp_path / "data" / "nosidecar", sidecar=False)  # token ids up to VOCAB - 1 = 255
    config = write_config(tmp_path, [prefix], vocab=128)
    rc, out, err = finish(start(config))
    line = assert_fails_before_setup(rc, out, err, prefix + ".bin", "token id 255", "model.vocab_size is 128", "mesh-data tokenize")
    assert "scanning" in out
    assert Path(prefix + ".token_range.json").exists()
    rc, out, err = finish(start(config))  # the second run reads the cached largest id instead of scanning again
    assert assert_fails_before_setup(rc, out, err) == line
    assert "scanning" not in out


def test_missing_path_is_reported_before_setup(good, tmp_path):
    missing = str(tmp_path / "data" / "valid_text_document")
    rc, out, err = finish(start(write_config(tmp_path, [good], valid_paths=[missing])))
    assert_fails_before_setup(rc, out, err, "data.valid_paths", missing + ".bin", "mesh-data tokenize")


def test_every_rank_fails_the_same_way_without_hanging(good, tmp_path):
    """Two ranks before any process group exists: rank 0 scans and caches, rank 1 waits for the cache (it starts
    first here), both exit 2 with the same line; neither reaches the rendezvous (which would wait for the other)."""
    from pretrain.launcher import free_port

    prefix = copy_dataset(good, tmp_path / "data" / "ranks", sidecar=False)
    config = write_config(tmp_path, [prefix], vocab=128)
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    r1 = start(config, RANK="1", **env)
    r0 = start(config, RANK="0", **env)
    (rc0, out0, err0), (rc1, out1, err1) = finish(r0), finish(r1)
    line0 = assert_fails_before_setup(rc0, out0, err0, prefix + ".bin", "token id 255")
    assert assert_fails_before_setup(rc1, out1, err1) == line0
    assert "scanning" in out0 and "scanning" not in out1  # only rank 0 read the .bin


def _setup_error(cfg_path: Path) -> str:
    """The error Trainer.setup raises (in this process: it fails before any process group is created)."""
    from pretrain.config import load_run_config
    from pretrain.train import Trainer

    with pytest.raises(ConfigError) as e:
        Trainer(load_run_config(cfg_path)).setup()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_corrupt_index_and_stale_sidecar(good, tmp_path):
    prefix = copy_dataset(good, tmp_path / "data" / "shortidx")
    os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 8)  # loses the last document index
    msg = _setup_error(write_config(tmp_path / "a", [prefix]))
    assert prefix + ".idx" in msg and f"mesh-data verify {prefix}" in msg

    prefix = copy_dataset(good, tmp_path / "data" / "stale")
    meta = json.loads(Path(prefix + ".meta.json").read_text())
    Path(prefix + ".meta.json").write_text(json.dumps({**meta, "tokens": 12345}))  # the sidecar of other data
    msg = _setup_error(write_config(tmp_path / "b", [prefix]))
    assert prefix + ".meta.json" in msg and "tokens 12345" in msg


def test_scan_cache_falls_back_to_the_cache_dir_and_follows_the_bin(good, tmp_path):
    from pretrain.config import load_run_config
    from pretrain.data_checks import cache_files, check_data

    prefix = copy_dataset(good, tmp_path / "data" / "fallback", sidecar=False)
    Path(prefix + ".token_range.json").mkdir()  # the data directory cannot take the cache file
    cfg = load_run_config(write_config(tmp_path, [prefix], cache_dir=str(tmp_path / "cache")))
    check_data(cfg)  # ids < VOCAB: passes, and records the range in data.cache_dir
    cached = cache_files(prefix, tmp_path / "cache")[1]
    assert cached.is_file() and '"max_id": 255' in cached.read_text()
    # New data under the same name (other size and mtime): the cache no longer applies, the .bin is scanned again.
    big = make_dataset(tmp_path / "data" / "big", n_docs=60, seed=5, vocab=512)
    for ext in (".bin", ".idx"):
        shutil.copy(big + ext, prefix + ext)
    with pytest.raises(ConfigError, match=r"holds token id \d+ but model.vocab_size is 256") as e:
        check_data(cfg)
    assert int(re.search(r"token id (\d+)", str(e.value)).group(1)) > 255
