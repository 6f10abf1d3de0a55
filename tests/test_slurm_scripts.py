"""Slurm scripts and mesh-submit without a cluster: shell syntax, the rendered sbatch command, refusals."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh_megatron.submit import main as submit_main

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
