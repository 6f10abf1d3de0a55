"""Elastic resume: a checkpoint saved in one layout continues in another (TP size, DP size, ZeRO stage), through
DeepSpeed's universal checkpoint (pretrain/universal.py), with the state of the uninterrupted run.

Source: TP=2 x DP=2, ZeRO-1, 6 steps, checkpoints at steps 3 and 6 (uninterrupted reference for steps 4-6).
Resumed from step 3: TP=1 x DP=1 ZeRO-0 | TP=1 x DP=3 ZeRO-2 | TP=2 x DP=1 ZeRO-3. Back from TP=1 to TP=2: the
TP=1 ZeRO-0 run's own checkpoint of step 4 resumed at TP=2 x DP=1 ZeRO-1.

Asserted for each: right after the load, the gathered fp32 master weights and both Adam moments of every parameter
equal those the checkpoint was saved with (exactly: they are copied, not recomputed), the LR and step are equal, and
the next steps' losses are within 1e-5 relative of the uninterrupted run (fp32; the global batch is the same, so a
new DP size changes only the summation order).
"""

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_torchrun
from pretrain_data import VOCAB, make_dataset

STEPS, SAVE_AT = 6, 3


def base_config(data_prefix: str, run_dir: Path) -> dict:
    return {
        "model": {"name": "elastic", "arch": "mesh", "prelude_layers": 1, "core_layers": 1, "num_loops": 2,
                  "coda_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
                  "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64},
        "data": {"paths": [data_prefix], "split": "90,8,2"},
        # micro 1 x 12: the global batch divides over DP 1, 2, 3 and 4
        "train": {"train_iters": STEPS, "micro_batch_size": 1, "global_batch_size": 12, "lr": 3e-3, "warmup_iters": 2,
                  "eval_interval": 0, "eval_iters": 1, "log_interval": 100, "grad_clip": 0.5},
        "parallel": {"zero_stage": 1, "tensor_parallel_size": 2},
        "checkpoint": {"save_interval": SAVE_AT, "keep_last": 0, "save_at_end": False},
        "logging": {"dir": str(run_dir), "wandb": {"mode": "disabled"}},
    }


def launch(tmp: Path, name: str, cfg: dict, nproc: int, dump_at: int) -> dict:
    path = tmp / f"{name}.config.json"
    path.write_text(json.dumps(cfg))
    run_torchrun("elastic_worker.py", path, tmp, name, dump_at, nproc=nproc)
    res = json.loads((tmp / f"{name}.json").read_text())
    for what in ("saved", "loaded"):
        f = tmp / f"{name}.{what}.pt"
        res[what] = torch.load(f, weights_only=False) if f.exists() else None
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    data = make_dataset(tmp / "data" / "synthetic")
    src = base_config(data, tmp / "source")
    out = {"source": launch(tmp, "source", src, nproc=4, dump_at=SAVE_AT)}
    step3 = tmp / "source" / "checkpoints" / f"step_{SAVE_AT:08d}"

    def resumed(name, nproc, tp, zero, resume, dump_at=-1, **extra):
        cfg = copy.deepcopy(src)
        cfg["parallel"] = {"tensor_parallel_size": tp, "zero_stage": zero}
        cfg["checkpoint"].update(resume=str(resume), **extra)
        cfg["logging"]["dir"] = str(tmp / name)
        out[name] = launch(tmp, name, cfg, nproc=nproc, dump_at=dump_at)

    resumed("tp1_dp1_zero0", 1, 1, 0, step3, dump_at=SAVE_AT + 1, save_interval=1)
    resumed("tp1_dp3_zero2", 3, 1, 2, step3)
    resumed("tp2_dp1_zero3", 2, 2, 3, step3)
    resumed("back_to_tp2", 2, 2, 1, tmp / "tp1_dp1_zero0" / "checkpoints" / f"step_{SAVE_AT + 1:08d}")
    out["step3"] = step3
    return out


# resumed run -> (run whose saved state it loaded, step)
CASES = {"tp1_dp1_zero0": ("source", SAVE_AT), "tp1_dp3_zero2": ("source", SAVE_AT),
         "tp2_dp1_zero3": ("source", SAVE_AT), "back_to_tp2": ("tp1_dp1_zero0", SAVE_AT + 1)}


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_state_equals_saved_state(runs, name):
    origin, step = CASES[name]
    saved, loaded = runs[origin]["saved"], runs[name]["loaded"]
    assert loaded["step"] == saved["step"] == step
    assert loaded["lr"] == saved["lr"]
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert saved[key].keys() == loaded[key].keys()
        for p in saved[key]:
            assert torch.equal(saved[key][p], loaded[key][p]), f"{name}: {key} of {p} differs after the load"


@pytest.mark.parametrize("name", list(CASES))
def test_next_losses_match_uninterrupted_run(runs, name):
    ref = runs["source"]["losses"]  # steps 1..6
    got = runs[name]["losses"]
    start = STEPS - len(got)  # steps start+1..6
    assert start == CASES[name][1]
    for i, loss in enumerate(got):
        want = ref[start + i]
        assert abs(loss - want) <= 1e-5 * abs(want), f"{name} step {start + i + 1}: {loss} vs {want}"


def test_universal_form_is_made_once_inside_the_checkpoint(runs):
    uni = runs["step3"] / "universal"
    assert (uni / "zero" / "optimizer_state.pt").exists()
    assert not list(runs["step3"].glob(".tmp-universal*")) and not (runs["step3"] / "latest_universal").exists()


def test_load_full_model_state_reads_a_converted_checkpoint(runs):
    """The export's reader ignores the universal form inside a checkpoint and gives the saved fp32 weights."""
    from pretrain.checkpoint import load_full_model_state

    _, full = load_full_model_state(runs["step3"])
    saved = runs["source"]["saved"]["fp32"]
    assert full.keys() == saved.keys()
    for k in saved:
        assert torch.equal(full[k], saved[k]), k


def test_mesh_checkpoint_info_verify_convert(runs, tmp_path):
    import shutil
    import subprocess
    import sys

    root = runs["step3"].parent

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mesh_tools.checkpoint_cli", *map(str, args)],
                              capture_output=True, text=True, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})

    info = cli("info", root)
    assert info.returncode == 0, info.stderr
    assert re.search(r"step_00000003 +3 +1,152 TP2 x DP2 ZeRO-1 +fp32 +yes +yes", info.stdout), info.stdout
    assert re.search(r"step_00000006 +6 .* ZeRO-1 +fp32 +yes +-", info.stdout), info.stdout
    copy = tmp_path / "step_00000006"
    shutil.copytree(root / "step_00000006", copy)
    # what a conversion killed mid-way leaves (it never leaves `universal/` itself: that appears by one rename)
    (copy / ".tmp-universal" / "zero").mkdir(parents=True)
    (copy / ".universal-input-x").mkdir()
    conv = cli("convert", copy)
    assert conv.returncode == 0 and (copy / "universal" / "zero" / "optimizer_state.pt").exists(), conv.stderr
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".")) == []
    assert cli("verify", copy).returncode == 0
    victim = max((p for p in copy.iterdir() if p.is_file() and p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        f.write(b"\xff" * 64)
    bad = cli("verify", copy)
    assert bad.returncode == 1 and f"{victim.name}: content differs" in bad.stdout, bad.stdout
    missing = cli("info", tmp_path / "nothing")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "mesh-checkpoint: error:" in missing.stderr


def test_checkpoint_from_before_this_change_converts(runs, tmp_path):
    """A checkpoint as main wrote it before elastic resume (no TP-split info in its model-states files, plain-text
    COMPLETE) converts; its universal form holds the same full fp32 weights the export reads."""
    import shutil

    from deepspeed.checkpoint.constants import PARAM, UNIVERSAL_CHECKPOINT_INFO

    from pretrain.checkpoint import load_full_model_state
    from pretrain.universal import convert

    old = tmp_path / "step_00000006"
    shutil.copytree(runs["step3"].parent / "step_00000006", old)
    for f in old.glob("*model_states.pt"):
        sd = torch.load(f, weights_only=False)
        assert sd.pop(UNIVERSAL_CHECKPOINT_INFO, None) is not None
        torch.save(sd, f)
    (old / "COMPLETE").write_text("step_00000006\n")
    uni = convert(old)
    _, full = load_full_model_state(old)
    for name, w in full.items():
        assert torch.equal(torch.load(uni / "zero" / name / "fp32.pt", weights_only=False)[PARAM], w), name
