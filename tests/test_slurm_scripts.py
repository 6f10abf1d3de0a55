"""Slurm scripts and mesh-submit without a cluster: shell syntax, the rendered sbatch command, refusals."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh_tools.submit import main as submit_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/pretrain.sbatch", "slurm/eval.sbatch", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "slurm" / "local").glob("*.sh"))]


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


def test_submit_eval_adds_a_watch_job_after_each_training_job(capsys):
    """--eval: slurm/eval.sbatch (mesh-eval --watch) on 1 node / 1 GPU, started once its training job runs
    (after:<id>), following the run's checkpoint directory into <run dir>/eval; the arguments checked by mesh-eval's
    own parser before anything is queued."""
    rc = submit_main(["slurm/jobs/pythia-6.9b-mesh.yaml", "--dry-run", "--chain", "2", "--eval",
                      "--tasks lambada_openai piqa --num-loops 1 2 4 --idle-timeout 30"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [l for l in out.splitlines() if l.startswith("would run: ")]
    assert len(lines) == 4 and all("pretrain.sbatch" in l for l in lines[::2]) and all("eval.sbatch" in l for l in lines[1::2])
    for i, ev in enumerate(lines[1::2], 1):
        for part in ("--job-name=pythia-6.9b-mesh-eval", "--nodes=1", "--ntasks=1", "--gpus-per-node=1",
                     f"'--dependency=after:<id of training job {i}>'", "--time=48:00:00",
                     "slurm/eval.sbatch --checkpoint runs/pythia-6.9b-mesh/checkpoints --out runs/pythia-6.9b-mesh/eval "
                     "--device cuda --tasks lambada_openai piqa --num-loops 1 2 4 --idle-timeout 30"):
            assert part in ev, (part, ev)
    text = (ROOT / "slurm" / "eval.sbatch").read_text()
    assert 'exec "$PY" -m mesh_tools.eval.cli --watch' in text and "#SBATCH --requeue" in text
    # a typo in the evaluation arguments, or nothing to evaluate: one line, exit 2, nothing shown as submitted
    for spec, message in (("--tasks piqa --bogus", "unrecognized arguments: --bogus"),
                          ("--num-loops 2", "nothing to evaluate"), ("--watch --tasks piqa", "leave out --watch")):
        assert submit_main(["slurm/jobs/pythia-160m-mesh.yaml", "--dry-run", "--eval", spec]) == 2
        out, err = capsys.readouterr()
        assert "mesh-submit: --eval" in err and message in err and len(err.strip().splitlines()) == 1, err
        assert "would run" not in out


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


# --- submission checks: data, the job's python, the interpreter passed on (nothing queued when one fails) ------------

TINY = str(ROOT / "configs" / "tiny-mesh.yaml")


def _tiny_submit(*extra_args: str, data: str = "[data/x]") -> list[str]:
    return ["--config", TINY, "--nodes", "1", "--gpus-per-node", "0", "--log-dir", "logs", *extra_args,
            "--", "--data.paths", data]


def _prefix(d: Path, name: str = "data/x", exts=(".bin", ".idx")) -> None:
    (d / name).parent.mkdir(parents=True, exist_ok=True)
    for ext in exts:
        (d / (name + ext)).write_bytes(b"")


@pytest.fixture()
def no_sbatch(monkeypatch):
    """Only the venv's bin on PATH: a check that regressed cannot queue a real job on a developer's cluster (sbatch
    is then simply not found)."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    monkeypatch.delenv("MESH_PYTHON", raising=False)


def test_submit_refuses_a_missing_data_file_before_sbatch(tmp_path, monkeypatch, capsys, no_sbatch):
    tmp_path = tmp_path.resolve()  # compared with the cwd-based paths in the messages
    monkeypatch.chdir(tmp_path)
    _prefix(tmp_path, exts=(".bin",))  # the .idx is missing
    rc = submit_main(_tiny_submit())
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert f"data.paths: no {tmp_path}/data/x.idx (relative to the job's working directory {tmp_path})" in err
    assert "mesh-data tokenize" in err and "nothing submitted" in err
    assert "submitted job" not in out and not (tmp_path / "logs").exists()  # not even the log directory


def test_submit_resolves_relative_data_paths_where_the_job_runs(tmp_path, monkeypatch, capsys):
    tmp_path = tmp_path.resolve()
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    _prefix(here)
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    assert submit_main(_tiny_submit("--dry-run")) == 0
    assert "would not submit" not in capsys.readouterr().err
    # the same relative prefix submitted from another directory: the job would not find it
    monkeypatch.chdir(elsewhere)
    assert submit_main(_tiny_submit("--dry-run")) == 0
    err = capsys.readouterr().err
    assert f"would not submit: data.paths: no {elsewhere}/data/x.bin, {elsewhere}/data/x.idx" in err
    # ... unless the job is told to run where the data is
    assert submit_main(_tiny_submit("--dry-run", f"--sbatch-arg=--chdir={here}")) == 0
    assert "would not submit" not in capsys.readouterr().err
    # validation / test sets are checked too
    monkeypatch.chdir(here)
    assert submit_main(_tiny_submit("--dry-run") + ["--data.test_paths", "[data/t]"]) == 0
    assert f"data.test_paths: no {here}/data/t.bin, {here}/data/t.idx" in capsys.readouterr().err


def test_submit_passes_its_own_python_to_the_job_unless_mesh_python_is_set(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MESH_PYTHON", raising=False)
    assert submit_main(["slurm/jobs/pythia-160m-mesh.yaml", "--dry-run"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("would run: ")]
    assert lines and lines[0].startswith(f"would run: MESH_PYTHON={shlex.quote(sys.executable)} sbatch "), lines
    # an explicit MESH_PYTHON (here the venv's other name for the same interpreter) is the one checked and passed on
    other = next((str(p) for p in sorted(Path(sys.executable).parent.glob("python3*")) if str(p) != sys.executable), None)
    assert other is not None, "a venv has python3 beside python"
    monkeypatch.setenv("MESH_PYTHON", other)
    assert submit_main(["slurm/jobs/pythia-160m-mesh.yaml", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert f"would run: MESH_PYTHON={shlex.quote(other)} sbatch " in out and "MESH_PYTHON" not in err


def test_submit_refuses_a_python_without_the_training_stack(tmp_path, monkeypatch, capsys, no_sbatch):
    """A real interpreter without the packages (a bare venv), as a job started with the wrong python would get."""
    tmp_path = tmp_path.resolve()
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, capture_output=True, timeout=120)
    monkeypatch.chdir(tmp_path)
    _prefix(tmp_path)
    monkeypatch.setenv("MESH_PYTHON", str(bare / "bin" / "python"))
    rc = submit_main(_tiny_submit())
    err = capsys.readouterr().err
    assert rc == 2 and f"MESH_PYTHON={bare}/bin/python: cannot import torch, deepspeed, megatron.core" in err, err
    assert "nothing submitted" in err and not (tmp_path / "logs").exists()
    monkeypatch.setenv("MESH_PYTHON", str(tmp_path / "no-such-python"))
    rc = submit_main(_tiny_submit())
    err = capsys.readouterr().err
    assert rc == 2 and f"MESH_PYTHON={tmp_path}/no-such-python: not an executable python" in err, err


# --- resubmitting a run on another node count / layout ----------------------------------------------------------


def test_submit_resumes_a_checkpoint_of_another_layout_and_refuses_a_batch_that_cannot_split(tmp_path, monkeypatch,
                                                                                             capsys, no_sbatch):
    from test_plan import write_checkpoint_metadata

    tmp_path = tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    _prefix(tmp_path)
    run_dir = tmp_path / "run"
    # 2 CPU nodes (DP 2) under ZeRO-1 saved step 4; tiny: global batch 16 = micro 8 x DP x accumulation
    write_checkpoint_metadata(TINY, {"logging.dir": str(run_dir), "parallel.zero_stage": "1"}, step=4,
                              tensor_parallel_size=1, data_parallel_size=2, zero_stage=1, precision="fp32")

    def submit(nodes: str, *trainer: str) -> tuple[int, str, str]:
        rc = submit_main(["--config", TINY, "--nodes", nodes, "--gpus-per-node", "0", "--dry-run", "--", "--data.paths",
                          "[data/x]", "--logging.dir", str(run_dir), "--parallel.zero_stage", "1", *trainer])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, err = submit("1")
    assert rc == 0 and "mesh-submit: resuming step_00000004 saved on TP 1 x DP 2 ZeRO-1 as TP 1 x DP 1 ZeRO-1: " \
                       "converted on load" in out, out + err
    assert "would run: " in out and "would not submit" not in err, err
    # another ZeRO stage on the same 2 nodes: converted as well
    rc, out, err = submit("2", "--parallel.zero_stage", "0")
    assert rc == 0 and "saved on TP 1 x DP 2 ZeRO-1 as TP 1 x DP 2 ZeRO-0: converted on load" in out, out + err
    # 3 CPU ranks cannot split 16 sequences of micro-batch 8: refused before queueing, naming what works
    rc, out, err = submit("3")
    assert rc == 2 and "would run" not in out, out
    assert ("mesh-submit: not submitted: train.global_batch_size: 16 is not divisible by micro_batch_size x "
            "data-parallel size = 8 x 3 = 24; the global batch must be a multiple of micro_batch_size x DP: with "
            "micro_batch_size 8, 1 rank per node and TP 1: --nodes 1, 2 work") in err, err
    assert len(err.strip().splitlines()) == 1, err
    # a new global batch would be refused by the trainer at the job's start (the data position): refused now
    rc, out, err = submit("1", "--train.global_batch_size", "32")
    assert rc == 2 and "checkpoint used train.global_batch_size=16, this run 32" in err, err
    assert len(err.strip().splitlines()) == 1 and "would run" not in out, err
    # fp32 ZeRO-0 keeps the whole optimizer state on every rank: a new DP size alone loads the files as they are
    run_dir = tmp_path / "zero0"
    write_checkpoint_metadata(TINY, {"logging.dir": str(run_dir)}, step=2, data_parallel_size=2, precision="fp32")
    rc, out, err = submit("1", "--parallel.zero_stage", "0")
    assert rc == 0 and ("resuming step_00000002 saved on TP 1 x DP 2 ZeRO-0 as TP 1 x DP 1 ZeRO-0: loaded as saved"
                        in out), out + err
