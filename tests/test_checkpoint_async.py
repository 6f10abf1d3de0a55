"""Asynchronous checkpoint saves (`checkpoint.async_save: true`), through the real CLI in separate processes (single
process, CPU, fp32, ZeRO-1). Three runs side by side, then two more:

S: 8 steps, synchronous saves every 2 steps (the reference).
A: the same with async_save; the background writer sleeps after the first file of step 2's save and of step 8's
   (MESH_PRETRAIN_PAUSE_ASYNC_WRITE=2:4,8:3): step 4's save must first wait for and commit step 2's, and the run must
   wait for step 8's before it exits.
K: async_save, killed with SIGKILL while the writer is half-way through step 6's files.
K2: --resume auto in K's directory: continues from step 4 (written in the background) to the end.
E: async_save; step 4's temp directory is removed while the writer sleeps, so its next write fails: the run stops
   with the synchronous path's one-line CheckpointError (exit 2) and step 2 stays the latest checkpoint.
"""

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from pretrain_data import VOCAB, make_dataset
from test_pretrain_resume import cli, losses, wait_for

STEPS = 8
PAUSE = 4.0  # seconds the writer sleeps in A's step-2 save: far longer than A's steps 3-4 take


def write_config(tmp: Path, data_prefix: str, name: str, async_save: bool) -> Path:
    cfg = {
        "model": {"name": "async", "arch": "mesh", "prelude_layers": 1, "core_layers": 1, "num_loops": 2, "coda_layers": 1,
                  "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32, "vocab_size": VOCAB,
                  "make_vocab_size_divisible_by": 64},
        "data": {"paths": [data_prefix], "split": "90,8,2"},
        "train": {"train_iters": STEPS, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3, "eval_interval": 0,
                  "eval_iters": 2, "log_interval": 1},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"save_interval": 2, "keep_last": 0, "async_save": async_save},
        "logging": {"dir": str(tmp / name), "wandb": {"mode": "disabled"}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def events(run_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == kind]


def first_file_written(tmp_dir: Path) -> bool:
    return tmp_dir.is_dir() and any(p.suffix == ".pt" for p in tmp_dir.iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("async")
    data = make_dataset(tmp / "data" / "synthetic")
    s = cli(write_config(tmp, data, "s", False))
    a = cli(write_config(tmp, data, "a", True), MESH_PRETRAIN_PAUSE_ASYNC_WRITE=f"2:{PAUSE},8:3")
    k_cfg = write_config(tmp, data, "k", True)
    k = cli(k_cfg, MESH_PRETRAIN_PAUSE_ASYNC_WRITE="6:600")
    k_ckpts = tmp / "k" / "checkpoints"
    wait_for(lambda: first_file_written(k_ckpts / ".tmp-step_00000006"), k)
    k.kill()
    k.communicate(timeout=60)
    after_kill = {
        "complete": sorted(p.name for p in k_ckpts.iterdir() if p.name.startswith("step_")),
        "temps": sorted(p.name for p in k_ckpts.iterdir() if p.name.startswith(".tmp-")),
        "latest": (k_ckpts / "latest").read_text().strip(),
    }
    k2 = cli(k_cfg, "--resume", "auto")
    e = cli(write_config(tmp, data, "e", True), MESH_PRETRAIN_PAUSE_ASYNC_WRITE="4:3")
    e_tmp = tmp / "e" / "checkpoints" / ".tmp-step_00000004"
    wait_for(lambda: first_file_written(e_tmp), e)
    shutil.rmtree(e_tmp)  # the writer is asleep after its first file: its next one has nowhere to go
    out = {name: p.communicate(timeout=300)[0] for name, p in (("s", s), ("a", a), ("k2", k2), ("e", e))}
    return dict(tmp=tmp, out=out, rc={"s": s.returncode, "a": a.returncode, "k": k.returncode, "k2": k2.returncode,
                                      "e": e.returncode}, after_kill=after_kill)


def same_content(x, y, where: str) -> None:
    """x and y hold the same keys and values; tensors equal in dtype, shape and every element. `saved_at` (the
    wall-clock time of the save) is the one value allowed to differ."""
    if torch.is_tensor(x):
        assert torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and set(x) == set(y), f"{where}: keys {sorted(map(str, set(x) ^ set(y)))}"
        for key in x:
            if key != "saved_at":
                same_content(x[key], y[key], f"{where}.{key}")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            same_content(u, v, f"{where}[{i}]")
    elif hasattr(x, "__array__") and not isinstance(x, (int, float)):
        assert (x == y).all(), where
    elif hasattr(x, "__dict__") and not callable(x):  # e.g. DeepSpeed's loss scaler: no __eq__ of its own
        assert type(x) is type(y), where
        same_content(vars(x), vars(y), where)
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


def test_async_checkpoints_hold_what_sync_checkpoints_hold(runs):
    assert runs["rc"]["s"] == 0, runs["out"]["s"][-3000:]
    assert runs["rc"]["a"] == 0, runs["out"]["a"][-3000:]
    s_root, a_root = runs["tmp"] / "s" / "checkpoints", runs["tmp"] / "a" / "checkpoints"
    tags = [f"step_{n:08d}" for n in range(2, STEPS + 1, 2)]
    assert sorted(p.name for p in a_root.iterdir() if p.name.startswith("step_")) == tags
    assert not [p for p in a_root.rglob("*") if p.name.startswith(".") and p.name != ".run.lock"]  # no temp left
    for tag in tags:
        s_files = sorted(str(p.relative_to(s_root / tag)) for p in (s_root / tag).rglob("*") if p.is_file())
        a_files = sorted(str(p.relative_to(a_root / tag)) for p in (a_root / tag).rglob("*") if p.is_file())
        assert s_files == a_files and "rng/rank_0.pt" in a_files and "COMPLETE" in a_files, (tag, s_files, a_files)
        for name in a_files:
            if name.endswith(".pt"):
                same_content(torch.load(s_root / tag / name, weights_only=False),
                             torch.load(a_root / tag / name, weights_only=False), f"{tag}/{name}")
        same_content(json.loads((s_root / tag / "trainer_state.json").read_text()),
                     json.loads((a_root / tag / "trainer_state.json").read_text()), f"{tag}/trainer_state.json")
        s_cfg, a_cfg = (yaml.safe_load((root / tag / "run_config.yaml").read_text()) for root in (s_root, a_root))
        assert a_cfg["checkpoint"].pop("async_save") is True and s_cfg["checkpoint"].pop("async_save") is False
        for c in (s_cfg, a_cfg):
            c["logging"].pop("dir")
        assert s_cfg == a_cfg
    # saving in the background changes nothing in the training itself
    assert losses(runs["tmp"] / "a") == losses(runs["tmp"] / "s")


def test_one_save_in_flight_and_the_run_waits_for_the_last(runs):
    saved = events(runs["tmp"] / "a", "checkpoint")
    assert [e["step"] for e in saved] == [2, 4, 6, 8] and all(e["async"] for e in saved)
    # the writer slept PAUSE s inside step 2's save: step 4's save waited for it and committed it first
    assert saved[0]["committed_after_step"] == 4
    # the run waited for step 8's slow write (3 s) before exiting 0, and committed it
    assert saved[-1]["committed_after_step"] == STEPS
    assert "step_00000008 (written in the background; committed after step 8)" in runs["out"]["a"]
    assert (runs["tmp"] / "a" / "checkpoints" / "step_00000008" / "COMPLETE").exists()
    assert (runs["tmp"] / "a" / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def test_kill_during_background_write_keeps_previous_checkpoint_and_resume_is_exact(runs):
    from pretrain.checkpoint import latest_checkpoint, load_full_model_state

    assert runs["rc"]["k"] == -signal.SIGKILL
    k = runs["after_kill"]
    assert k["temps"] == [".tmp-step_00000006"]
    assert k["latest"] == "step_00000004" and k["complete"] == ["step_00000002", "step_00000004"]
    out = runs["out"]["k2"]
    assert runs["rc"]["k2"] == 0, out[-3000:]
    assert "removed unfinished checkpoint saves: .tmp-step_00000006" in out
    assert "resumed from" in out and "step_00000004 at step 4" in out
    # resumed from a checkpoint written in the background: every later step's loss equals the uninterrupted run's
    ref, resumed = losses(runs["tmp"] / "s"), losses(runs["tmp"] / "k")
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert all(resumed[s] == ref[s] for s in range(1, STEPS + 1)), (resumed, ref)
    ckpts = runs["tmp"] / "k" / "checkpoints"
    cfg, sd = load_full_model_state(ckpts)
    assert latest_checkpoint(ckpts).name == "step_00000008" and cfg["trainer_state"]["step"] == STEPS
    assert "embed.weight" in sd


def test_failed_background_write_is_the_sync_error(runs):
    out, root = runs["out"]["e"], runs["tmp"] / "e" / "checkpoints"
    assert runs["rc"]["e"] == 2, out[-3000:]
    assert "Traceback" not in out
    line = next(ln for ln in out.splitlines() if "could not write checkpoint step_00000004" in ln)
    assert "does not exist" in line and "stays step_00000002" in line and "--resume auto" in line
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(("step_", ".tmp-"))) == ["step_00000002"]
    failed = events(runs["tmp"] / "e", "checkpoint_failed")
    assert [e["step"] for e in failed] == [4]
