"""Slurm scripts and mesh-submit without a cluster: shell syntax, the rendered sbatch command, refusals."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh_tools.submit import main as submit_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/pretrain.sbatch", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "slurm" / "local").glob("*.sh"))]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_syntax(script):
    res = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_sbatch_header_has_requeue_signal_and_log_path():
    text = (ROOT / "slurm" / "pretrain.sbatch").read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --open-mode=append", "#SBATCH --output=logs/slurm/%x-%j.out"):
        assert directive in text
    assert "--checkpoint.resume auto" in text and "scontrol requeue" in text and "scontrol show hostnames" in text


def test_submit_dry_run_renders_a_chained_gpu_job(capsys):
    rc = submit_main(["slurm/jobs/pythia-6.9b-mesh.yaml", "--dry-run", "--chain", "2", "--partition", "gpu", "--", "--train.lr", "1e-4"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [l for l in out.splitlines() if l.startswith("would run: ")]
    assert len(lines) == 2
    first = lines[0]
    for part in ("--nodes=16", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=48:00:00",
                 "--output=logs/slurm/%x-%j.out", "--config configs/pythia-6.9b-mesh.yaml",
                 "--parallel.tensor_parallel_size 2", "--train.micro_batch_size 8", "--train.lr 1e-4"):
        assert part in first, part
    assert "--dependency=afterany:" in lines[1] and "--dependency" not in first


def test_submit_refuses_a_layout_that_does_not_divide(capsys):
    rc = submit_main(["slurm/jobs/pythia-1.4b-mesh.yaml", "--nodes", "3", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "not submitted" in err and "not divisible by micro_batch_size x data-parallel size" in err


def test_submit_rejects_an_unknown_override_before_queueing(tmp_path, capsys):
    pytest.importorskip("pretrain.config")
    job = tmp_path / "job.yaml"
    job.write_text("config: configs/pythia-160m-mesh.yaml\nnodes: 4\ngpus_per_node: 8\noverrides:\n  train.micro_batchsize: 4\n")
    rc = submit_main([str(job), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "micro_batchsize" in err


def test_local_cluster_scripts_refuse_politely_when_not_root():
    if shutil.which("setpriv") is None or sys.platform != "linux":
        pytest.skip("setpriv not available")
    import os

    if os.geteuid() != 0:
        res = subprocess.run([str(ROOT / "slurm/local/up.sh")], capture_output=True, text=True)
    else:  # drop to nobody to see the non-root path
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(ROOT / "slurm/local/up.sh")],
                             capture_output=True, text=True, env={"PATH": os.environ["PATH"], "SLURM_LOCAL_DIR": "/tmp/not-used"})
    assert res.returncode == 1 and "must run as root" in res.stderr


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS",
                "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


def _launch_env(monkeypatch, **values):
    for k in _LAUNCH_VARS:
        # set, then delete: monkeypatch records the original (even "absent") and restores it, so the variables that
        # env_from_slurm() writes do not leak into later tests
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    for k, v in values.items():
        monkeypatch.setenv(k, v)


def test_srun_task_with_an_inherited_single_process_rank_is_refused(monkeypatch):
    from mesh_megatron.config import ConfigError
    from pretrain.launcher import env_from_slurm

    # srun started 2 tasks, but RANK/WORLD_SIZE=1 leaked in from the submitting shell: each would train alone
    _launch_env(monkeypatch, SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", RANK="0", WORLD_SIZE="1",
                MASTER_ADDR="node1")
    with pytest.raises(ConfigError, match=r"srun started 2 tasks but RANK=0 WORLD_SIZE=1.*unset RANK WORLD_SIZE"):
        env_from_slurm()


def test_srun_and_torchrun_rank_variables_are_taken_as_launched(monkeypatch):
    import os

    from pretrain.launcher import env_from_slurm

    # srun directly: ranks from SLURM_*
    _launch_env(monkeypatch, SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID="0", MASTER_ADDR="node1")
    env_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "0")
    # torchrun (one agent per node) under srun: its own RANK/WORLD_SIZE win
    _launch_env(monkeypatch, SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", RANK="9", WORLD_SIZE="16",
                TORCHELASTIC_RUN_ID="abc", MASTER_ADDR="node1")
    env_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("9", "16")
