"""Exact resume, preemption and crash safety, through the real CLI in separate processes (single process, CPU).

A: 12 steps uninterrupted.
B: same config, checkpoint every 3 steps; SIGTERM arrives while step 3's checkpoint is being written -> B finishes
   step 4, saves, exits 0.
C: --resume auto (from step 4); killed with SIGKILL inside step 9's save, after every file is written but before the
   commit rename -> step 6 stays the latest complete checkpoint.
D: --resume auto (from step 6) to the end.
Every step's loss in B, C and D equals A's exactly (CPU fp32, one thread, same op order: bit-identical), and so do
the final validation losses of A and D.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import fresh_job_env
from pretrain_data import VOCAB, make_dataset

STEPS = 12


def write_config(tmp: Path, data_prefix: str, name: str) -> Path:
    cfg = {
        "model": {"name": "resume", "arch": "mesh", "prelude_layers": 1, "core_layers": 1, "num_loops": 2, "coda_layers": 1,
                  "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32, "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64},
        "data": {"paths": [data_prefix], "split": "90,8,2"},
        "train": {"train_iters": STEPS, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3, "eval_interval": 0,
                  "eval_iters": 2, "log_interval": 1},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"save_interval": 3, "keep_last": 2},
        "logging": {"dir": str(tmp / name), "wandb": {"mode": "offline"}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(config: Path, *args, **extra_env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pretrain", "--config", str(config), *args], env=fresh_job_env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(pred, proc: subprocess.Popen, timeout=500.0):
    """Poll until pred() (generous timeout: CI boxes can be heavily shared); fail fast if the process died."""
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early (rc {proc.returncode}):\n{proc.communicate()[0][-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise TimeoutError(proc.communicate()[0][-3000:])
        time.sleep(0.05)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def evals(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = make_dataset(tmp / "data" / "synthetic")
    a_cfg, run_cfg = write_config(tmp, data, "a"), write_config(tmp, data, "b")
    run_dir = tmp / "b"
    ckpts = run_dir / "checkpoints"
    a = cli(a_cfg)  # runs alongside B (separate dirs)

    # B: SIGTERM during the (paused) save of step 3
    b = cli(run_cfg, MESH_PRETRAIN_PAUSE_BEFORE_COMMIT="3:600")
    wait_for(lambda: (ckpts / ".tmp-step_00000003" / "COMPLETE").exists(), b)
    b.send_signal(signal.SIGTERM)
    b_out = b.communicate(timeout=300)[0]
    a_out = a.communicate(timeout=300)[0]
    assert a.returncode == 0, a_out[-3000:]
    b_losses = losses(run_dir)

    # C: resume, SIGKILL inside step 9's save (files written, rename pending)
    c = cli(run_cfg, "--resume", "auto", MESH_PRETRAIN_PAUSE_BEFORE_COMMIT="9:600")
    wait_for(lambda: (ckpts / ".tmp-step_00000009" / "COMPLETE").exists(), c)
    c.kill()
    c_out = c.communicate(timeout=60)[0]
    after_kill = {
        "complete": sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")),
        "temps": sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-")),
        "latest": (ckpts / "latest").read_text().strip(),
    }
    c_losses = losses(run_dir)

    # D: resume to the end
    d = cli(run_cfg, "--resume", "auto")
    d_out = d.communicate(timeout=300)[0]
    return dict(tmp=tmp, run_dir=run_dir, ckpts=ckpts, a=losses(tmp / "a"), a_evals=evals(tmp / "a"), b_rc=b.returncode,
                b_out=b_out, b_losses=b_losses, c_rc=c.returncode, c_out=c_out, c_losses=c_losses, after_kill=after_kill,
                d_rc=d.returncode, d_out=d_out, d_losses=losses(run_dir), d_evals=evals(run_dir), run_cfg=run_cfg)


def test_sigterm_finishes_step_saves_and_exits_0(runs):
    assert runs["b_rc"] == 0, runs["b_out"][-3000:]
    assert "stopping on SIGTERM after step 4" in runs["b_out"]
    assert max(runs["b_losses"]) == 4


def test_kill_during_save_leaves_previous_checkpoint_loadable(runs):
    from pretrain.checkpoint import latest_checkpoint, load_full_model_state

    assert runs["c_rc"] == -signal.SIGKILL
    k = runs["after_kill"]
    assert k["temps"] == [".tmp-step_00000009"]
    assert k["latest"] == "step_00000006" and "step_00000006" in k["complete"] and "step_00000009" not in k["complete"]
    assert "removed unfinished checkpoint saves: .tmp-step_00000009" in runs["d_out"]
    assert "resumed from" in runs["d_out"] and "step_00000006 at step 6" in runs["d_out"]
    # keep_last 2 after D: only the two newest remain; the full state of the latest loads
    assert sorted(p.name for p in runs["ckpts"].iterdir() if p.name.startswith("step_")) == ["step_00000009", "step_00000012"]
    cfg, sd = load_full_model_state(runs["ckpts"])
    assert cfg["trainer_state"]["step"] == 12 and latest_checkpoint(runs["ckpts"]).name == "step_00000012"
    assert cfg["trainer_state"]["consumed_samples"] == 12 * 4 and "embed.weight" in sd


def test_resume_reproduces_uninterrupted_losses_exactly(runs):
    a = runs["a"]
    assert sorted(a) == list(range(1, STEPS + 1))
    assert runs["d_rc"] == 0, runs["d_out"][-3000:]
    # metrics.jsonl is appended by B, C and D: the last value per step is D's where D ran
    for step, loss in runs["d_losses"].items():
        assert loss == a[step], (step, loss, a[step])
    assert all(runs["b_losses"][s] == a[s] for s in range(1, 5))
    assert all(runs["c_losses"][s] == a[s] for s in range(5, 10))
    # validation after the final step matches too
    va = [e for e in runs["a_evals"] if "valid/loss" in e][-1]["valid/loss"]
    vd = [e for e in runs["d_evals"] if "valid/loss" in e][-1]["valid/loss"]
    assert va == vd
    assert a[STEPS] < a[1]
    # B, C and D logged into one wandb run (its id travels in the checkpoint)
    wb = list((runs["run_dir"] / "wandb").glob("offline-run-*"))
    assert len(wb) == 3 and len({p.name.rsplit("-", 1)[-1] for p in wb}) == 1


def test_mismatched_checkpoint_is_a_clear_error(runs):
    from mesh_megatron.config import ConfigError
    from pretrain.checkpoint import check_compatible, latest_checkpoint
    from pretrain.config import load_run_config

    ck = latest_checkpoint(runs["ckpts"])
    with pytest.raises(ConfigError, match=r"different model architecture \(hidden_size: checkpoint 32 vs config 64"):
        check_compatible(ck, load_run_config(runs["run_cfg"], {"model.hidden_size": "64"}), dp_size=1)
    with pytest.raises(ConfigError, match=r"global_batch_size=4, this run 8"):
        check_compatible(ck, load_run_config(runs["run_cfg"], {"train.global_batch_size": "8"}), dp_size=1)
    # another layout or runtime knobs are not refused (layouts are converted on load: test_checkpoint_elastic.py)
    _, notes = check_compatible(ck, load_run_config(runs["run_cfg"], {"parallel.tensor_parallel_size": "2",
                                                                    "model.recompute": "loop",
                                                                    "model.hidden_dropout": "0.1",
                                                                    "train.micro_batch_size": "1"}), dp_size=2)
    assert notes == ["model.hidden_dropout 0.0 -> 0.1", "model.recompute 'none' -> 'loop'", "train.micro_batch_size 2 -> 1"]
    # and through the CLI: exit code 2, one readable line, no traceback
    p = cli(runs["run_cfg"], "--resume", str(ck), "--model.num_loops", "3")
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 2 and "num_loops: checkpoint 2 vs config 3" in out and "Traceback" not in out


def test_resume_from_unfinished_save_is_refused(runs, tmp_path):
    from mesh_megatron.config import ConfigError
    from pretrain.checkpoint import resolve_resume

    bad = tmp_path / ".tmp-step_00000003"
    bad.mkdir()
    with pytest.raises(ConfigError, match="unfinished save"):
        resolve_resume(str(bad), runs["ckpts"])
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "nope"), runs["ckpts"])
