"""Start-up never hangs and setup mistakes are one line, through the real CLI in separate processes (CPU, gloo).

- No just-in-time build: DeepSpeed's CPU comm layer used to compile `deepspeed_shm_comm` with torch.utils.cpp_extension
  at start; a `lock` left in its build directory by a killed build made every later run wait forever, silently.
  Here a stale lock sits exactly where torch would look (TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/lock): the run must
  finish, and nothing may be built into that directory.
- One run per directory: a second run on a directory whose first run is alive exits 2 at once, naming the first's
  pid, before it builds or deletes anything; the first finishes normally. A holder killed with SIGKILL leaves no
  stale lock: the next run starts (and then holds the lock itself).
- One-line errors (exit 2, no traceback; --debug shows it): tensor_parallel_size larger than / not dividing the world,
  nccl without a GPU, a rendezvous port in use, a run directory that cannot be created.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import fresh_job_env
from pretrain.launcher import free_port
from pretrain_data import VOCAB, make_dataset

TIMEOUT = 300  # generous: CI boxes are shared; a hang is what these tests are about, so every wait is bounded


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "synthetic", n_docs=60)


def write_config(tmp: Path, data: str, run_dir: Path, steps: int = 2) -> Path:
    cfg = {
        "model": {"name": "startup", "arch": "mesh", "prelude_layers": 1, "core_layers": 1, "num_loops": 2, "coda_layers": 1,
                  "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32, "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64},
        "data": {"paths": [data], "split": "90,8,2"},
        "train": {"train_iters": steps, "micro_batch_size": 2, "global_batch_size": 2, "lr": 3e-3, "eval_interval": 0,
                  "eval_iters": 1, "log_interval": 1},
        "parallel": {"zero_stage": 0},
        "checkpoint": {"save_interval": 1, "keep_last": 2},
        "logging": {"dir": str(run_dir), "wandb": {"mode": "disabled"}},
    }
    path = tmp / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pretrain", "--config", str(config), *args], env=fresh_job_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    try:
        return proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {TIMEOUT}s (hung?):\n{proc.communicate()[0][-3000:]}") from None


def wait_for(pred, proc: subprocess.Popen) -> None:
    deadline = time.time() + TIMEOUT
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early (rc {proc.returncode}):\n{proc.communicate()[0][-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)


def lock_holder_pid(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / ".run.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_stale_torch_extension_lock_does_not_block_and_nothing_is_built(tmp_path, data):
    ext = tmp_path / "torch_extensions"
    stale = ext / "deepspeed_shm_comm" / "lock"  # torch.utils.cpp_extension's FileBaton for that op
    stale.parent.mkdir(parents=True)
    stale.touch()
    p = start(write_config(tmp_path, data, tmp_path / "run"), TORCH_EXTENSIONS_DIR=str(ext))
    out = finish(p)
    assert p.returncode == 0, out[-3000:]
    assert "setup: importing DeepSpeed" in out  # the phase that used to block is named before it starts
    assert re.search(r"\[pretrain\] setup .*distributed [\d.]+s, imports [\d.]+s", out), out[-3000:]  # time per phase
    built = sorted(str(f.relative_to(ext)) for f in ext.rglob("*"))
    assert built == ["deepspeed_shm_comm", "deepspeed_shm_comm/lock"], built


def test_second_run_on_a_directory_exits_2_naming_the_first(tmp_path, data):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, data, run_dir, steps=4)
    ckpts = run_dir / "checkpoints"
    # The first run pauses inside step 1's save (files written, rename pending) until it is signalled.
    first = start(config, MESH_PRETRAIN_PAUSE_BEFORE_COMMIT=f"1:{TIMEOUT}")
    try:
        wait_for(lambda: (ckpts / ".tmp-step_00000001" / "COMPLETE").exists(), first)
        second = start(config)
        out2 = finish(second)
        assert second.returncode == 2, out2[-3000:]
        assert f"another run is using this directory (held by pid {first.pid} on host {socket.gethostname()}" in out2
        assert "Traceback" not in out2 and "importing DeepSpeed" not in out2  # refused before the expensive setup
        assert (ckpts / ".tmp-step_00000001").is_dir()  # the second run did not clean up the first's save in progress
        first.send_signal(signal.SIGTERM)
        out1 = finish(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out1[-3000:]
    stop = re.search(r"stopping on SIGTERM after step (\d+); checkpoint saved", out1)
    assert stop, out1[-3000:]
    assert (ckpts / "latest").read_text().strip() == f"step_{int(stop.group(1)):08d}"
    assert (ckpts / "step_00000001" / "COMPLETE").exists()  # the save the second run found in progress completed


def test_sigkilled_holder_leaves_no_stale_lock(tmp_path, data):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, data, run_dir)
    holder = start(config, MESH_PRETRAIN_PAUSE_BEFORE_COMMIT=f"1:{TIMEOUT}")
    try:
        wait_for(lambda: (run_dir / "checkpoints" / ".tmp-step_00000001" / "COMPLETE").exists(), holder)
        assert lock_holder_pid(run_dir) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    nxt = start(config)
    out = finish(nxt)
    assert nxt.returncode == 0, out[-3000:]
    assert "removed unfinished checkpoint saves: .tmp-step_00000001" in out
    assert lock_holder_pid(run_dir) == nxt.pid  # the lock file outlives its holder; the lock did not


def test_every_rank_of_a_refused_run_exits_2(tmp_path, data):
    """Rank 0 decides and tells the others (one all-reduce): no rank is left waiting in a collective."""
    from pretrain.run_lock import lock_dirs

    run_dir = tmp_path / "run"
    config = write_config(tmp_path, data, run_dir)
    held = lock_dirs([run_dir])  # this test process is the live holder (the same OS lock a trainer takes)
    port = str(free_port())
    ranks = [start(config, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
             for r in range(2)]
    outs = [finish(p) for p in ranks]
    held.release()
    for p, out in zip(ranks, outs):
        assert p.returncode == 2 and "Traceback" not in out and "importing DeepSpeed" not in out, out[-3000:]
    assert f"held by pid {os.getpid()} on host {socket.gethostname()}" in outs[0]
    assert f"{run_dir}: rank 0 could not lock the run directory" in outs[1]


def _not_a_dir(tmp_path: Path) -> dict:
    (tmp_path / "file").write_text("")
    return {"args": ["--logging.dir", str(tmp_path / "file" / "run")], "env": {},
            "expect": f"{tmp_path / 'file' / 'run'}: cannot create the run directory"}


def _port_in_use(tmp_path: Path, sock: socket.socket) -> dict:
    port = sock.getsockname()[1]
    return {"args": [], "env": dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
            "expect": f"MASTER_PORT {port}: the rendezvous port on 127.0.0.1 is already in use"}


CASES = {
    "tp_larger_than_world": lambda tmp, sock: {
        "args": ["--parallel.tensor_parallel_size", "2"], "env": {},
        "expect": "parallel.tensor_parallel_size: 2 is larger than the 1 process launched; launch a multiple of 2"},
    # rank 0 of a 3-process world: refused before the rendezvous, so it needs no peers (it used to wait for them)
    "tp_not_dividing_world": lambda tmp, sock: {
        "args": ["--parallel.tensor_parallel_size", "2", "--parallel.timeout_s", "60"],
        "env": dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
        "expect": "parallel.tensor_parallel_size: 2 does not divide the 3 processes launched"},
    "nccl_without_gpu": lambda tmp, sock: {
        "args": ["--parallel.backend", "nccl"], "env": {}, "expect": "parallel.backend: nccl needs a CUDA GPU"},
    "port_in_use": _port_in_use,
    "run_dir_not_creatable": lambda tmp, sock: _not_a_dir(tmp),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_setup_errors_are_one_line_exit_2(tmp_path, data, case):
    if case == "nccl_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible: nccl is valid here")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        c = CASES[case](tmp_path, sock)
        config = write_config(tmp_path, data, tmp_path / "run")
        p = start(config, *c["args"], **c["env"])
        out = finish(p)
        assert p.returncode == 2, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("mesh-pretrain: error:")]
        assert len(errors) == 1 and c["expect"] in errors[0], out[-3000:]
        assert "importing DeepSpeed" not in out  # found before the expensive part of the setup
        if case == "tp_larger_than_world":  # --debug: the same error, raised with its traceback
            p = start(config, *c["args"], "--debug", **c["env"])
            out = finish(p)
            assert p.returncode == 1 and "Traceback" in out and c["expect"] in out, out[-3000:]
