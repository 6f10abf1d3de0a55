"""Checkpoint integrity: every save writes a manifest (size + xxh3-128 of every file) into COMPLETE; a resume verifies
the checkpoint against it before anything is built (real trainer, DeepSpeed, CPU, one process).

- 4 KiB flipped in the middle of the newest checkpoint's largest file, or that file truncated: `--resume auto` moves
  it aside as `<tag>.corrupt` with one line naming the file, uses the previous checkpoint, and the run finishes.
- The same checkpoint named explicitly: exit 2, one line, no traceback, pointing at the previous good checkpoint.
- A checkpoint of the old format (plain-text COMPLETE) still resumes, with a note.
- load_full_model_state (mesh-export) refuses a damaged checkpoint in one line.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fresh_job_env
from pretrain_data import VOCAB, make_dataset


def run_config(data_prefix: str, run_dir: Path, iters: int, resume: str = "none") -> dict:
    return {
        "model": {"name": "integrity", "arch": "mesh", "prelude_layers": 1, "core_layers": 1, "num_loops": 2,
                  "coda_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32, "vocab_size": VOCAB,
                  "make_vocab_size_divisible_by": 64},
        "data": {"paths": [data_prefix], "split": "90,8,2"},
        "train": {"train_iters": iters, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3, "eval_interval": 0,
                  "eval_iters": 1, "log_interval": 1},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"save_interval": 1, "keep_last": 0, "save_at_end": False, "resume": resume},
        "logging": {"dir": str(run_dir), "wandb": {"mode": "disabled"}},
    }


def train(d: dict) -> dict:
    from pretrain.config import build_run_config
    from pretrain.train import train as run

    res = run(build_run_config(d, source="integrity"))
    res.pop("engine").destroy()
    return res


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory with step_1 and step_2 (ZeRO-1: model states + optimizer partition + RNG + metadata)."""
    tmp = tmp_path_factory.mktemp("integrity")
    data = make_dataset(tmp / "data" / "synthetic", n_docs=60)
    train(run_config(data, tmp / "run", iters=2))
    return data, tmp / "run"


@pytest.fixture
def run(saved, tmp_path):
    """A fresh copy of the saved run directory: (data prefix, run dir, checkpoint root)."""
    data, src = saved
    shutil.copytree(src, tmp_path / "run")
    return data, tmp_path / "run", tmp_path / "run" / "checkpoints"


def largest_file(ck: Path) -> Path:
    return max((p for p in ck.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_4k(f: Path) -> None:
    """Invert 4 KiB in the middle of a file, as a bad disk block or a torn copy would leave it."""
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    f.write_bytes(bytes(data))


def truncate(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 3)


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name == "latest" or p.name.startswith("step_"))


def test_every_save_writes_a_manifest_of_every_file(saved):
    from pretrain.manifest import hash_file

    _, run_dir = saved
    ck = run_dir / "checkpoints" / "step_00000002"
    doc = json.loads((ck / "COMPLETE").read_text())
    assert doc["tag"] == "step_00000002" and doc["format"] == 1 and doc["hash"] == "xxh3_128"
    on_disk = sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(doc["files"]) == on_disk  # not itself; the metadata rank 0 writes last included
    assert {"run_config.yaml", "trainer_state.json", "rng/rank_0.pt", "mp_rank_00_model_states.pt"} <= set(on_disk)
    for rel, entry in doc["files"].items():
        assert (entry["size"], entry["hash"]) == hash_file(ck / rel), rel


@pytest.mark.parametrize("damage", [flip_4k, truncate], ids=["4KiB-flipped", "truncated"])
def test_auto_resume_sets_a_damaged_checkpoint_aside_and_uses_the_previous_one(run, damage, capsys):
    data, run_dir, root = run
    bad = largest_file(root / "step_00000002")
    damage(bad)
    capsys.readouterr()
    res = train(run_config(data, run_dir, iters=3, resume="auto"))
    out = capsys.readouterr().out
    why = "content differs from the manifest (hash mismatch: corrupted)" if damage is flip_4k else "(truncated)"
    lines = [line for line in out.splitlines() if "not resuming from step_00000002" in line]
    assert len(lines) == 1, out[-3000:]
    assert lines[0].startswith(f"[pretrain] {bad}: ") and why in lines[0], lines[0]
    assert lines[0].endswith(f"moved it to {root / 'step_00000002.corrupt'}, using the previous checkpoint "
                             "step_00000001 instead")
    assert "[pretrain] verified " in out and " of step_00000001 in " in out
    assert f"resumed from {root / 'step_00000001'} at step 1" in out
    assert res["step"] == 3 and len(res["losses"]) == 2  # steps 2 and 3 trained again
    assert entries(root) == ["latest", "step_00000001", "step_00000002", "step_00000002.corrupt", "step_00000003"]


def test_explicit_damaged_checkpoint_is_refused_in_one_line(run, tmp_path):
    data, run_dir, root = run
    bad = root / "step_00000002" / "mp_rank_00_model_states.pt"
    flip_4k(bad)
    cfg = tmp_path / "explicit.yaml"
    cfg.write_text(json.dumps(run_config(data, run_dir, iters=3, resume=str(root / "step_00000002"))))
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(cfg)], env=fresh_job_env(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mesh-pretrain: error:")]
    assert errors == [f"mesh-pretrain: error: {bad}: content differs from the manifest (hash mismatch: corrupted); "
                      "checkpoint step_00000002 is damaged and cannot be resumed from: resume from "
                      f"{root / 'step_00000001'} (the newest earlier checkpoint that verifies) or with --resume "
                      "auto"], out[-3000:]
    assert entries(root) == ["latest", "step_00000001", "step_00000002"]  # named explicitly: left where it is


def test_missing_file_and_no_earlier_checkpoint(run):
    """Resolution alone (no model is built): a file the manifest lists is gone, and nothing earlier to fall back to."""
    from pretrain.checkpoint import CheckpointError, resolve_verified

    _, _, root = run
    shutil.rmtree(root / "step_00000001")
    (root / "step_00000002" / "rng" / "rank_0.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        resolve_verified("auto", root)
    assert str(e.value) == (f"{root / 'step_00000002' / 'rng' / 'rank_0.pt'}: missing; moved step_00000002 aside to "
                            f"{root / 'step_00000002.corrupt'}, and {root} has no earlier complete checkpoint: start "
                            "from scratch with --resume none")
    assert resolve_verified("auto", root) is None  # the next run starts from scratch


def test_checkpoint_without_manifest_still_resumes(run, capsys):
    data, run_dir, root = run
    (root / "step_00000002" / "COMPLETE").write_text("step_00000002\n")  # what saves wrote before manifests
    capsys.readouterr()
    res = train(run_config(data, run_dir, iters=3, resume="auto"))
    out = capsys.readouterr().out
    assert (f"[pretrain] {root / 'step_00000002'}: no manifest (written before integrity checks); not verified"
            in out), out[-3000:]
    assert f"resumed from {root / 'step_00000002'} at step 2" in out
    assert res["step"] == 3 and len(res["losses"]) == 1


def test_load_full_model_state_refuses_a_damaged_checkpoint(run):
    from mesh_megatron.config import ConfigError
    from pretrain.checkpoint import load_full_model_state

    _, _, root = run
    bad = root / "step_00000002" / "mp_rank_00_model_states.pt"
    flip_4k(bad)
    with pytest.raises(ConfigError) as e:
        load_full_model_state(root)
    assert str(e.value) == (f"{bad}: content differs from the manifest (hash mismatch: corrupted); checkpoint "
                            f"step_00000002 is damaged: use {root / 'step_00000001'}, the newest earlier checkpoint "
                            "that verifies")
    load_full_model_state(root / "step_00000001")  # an intact one loads
