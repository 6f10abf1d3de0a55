"""A preemption signal that reaches the ranks at different times (two processes, gloo, through the real CLI).

srun delivers a signal to each rank through its own node's slurmstepd, so one rank can stop the whole run (the MAX
all-reduce between steps) before the signal reaches another. The late copy then lands while that rank tears down.
CI saw exactly this: rank 0 restored the default handler after a stop it had not been signalled for, the late
SIGUSR1 killed it, and srun failed the job (rc 143) instead of requeueing it.

Here only rank 1 is signalled. Once rank 0 has stopped, both ranks are sent SIGUSR1 every 20 ms until they exit, which
covers the late copy, a repeated signal and Python's own shutdown, where it resets handlers to the default. Both ranks
must exit 0 after saving the same step.
"""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import fresh_job_env
from pretrain.launcher import free_port
from pretrain_data import VOCAB, make_dataset



def _config(tmp: Path, data: str, wandb_mode: str = "disabled") -> Path:
    cfg = {
        "model": {"name": "preempt", "arch": "mesh", "prelude_layers": 1, "core_layers": 1, "num_loops": 2, "coda_layers": 1,
                  "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32, "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64},
        "data": {"paths": [data], "split": "90,8,2"},
        # far more steps than the test lets it run: the stop comes from the signal
        "train": {"train_iters": 100000, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3, "eval_interval": 0, "log_interval": 1},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"save_interval": 2, "keep_last": 2, "save_at_end": False},
        "logging": {"dir": str(tmp / "run"), "wandb": {"mode": wandb_mode}},
    }
    path = tmp / "preempt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _wait_for(pattern: str, log: Path, procs: list[subprocess.Popen], timeout: float = 400.0) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        p.kill()
    raise AssertionError(f"'{pattern}' did not appear in {log.name}:\n{log.read_text(errors='replace')[-3000:]}")


def test_late_signal_on_one_rank_does_not_kill_a_stopped_run(tmp_path):
    data = make_dataset(tmp_path / "data" / "synthetic")
    config = _config(tmp_path, data)
    port = str(free_port())
    procs, logs = [], []
    for rank in range(2):
        log = tmp_path / f"rank{rank}.log"
        env = fresh_job_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with log.open("w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "pretrain", "--config", str(config)], env=env,
                                          stdout=out, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        _wait_for(r"saved checkpoint \S*step_00000002", logs[0], procs)
        procs[1].send_signal(signal.SIGUSR1)  # rank 0 gets none of its own: it stops because rank 1 did
        m = _wait_for(r"stopping on a signal to another rank after step (\d+)", logs[0], procs)
        stop_step = int(m.group(1))
        deadline = time.time() + 120
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            for p in procs:
                if p.poll() is None:
                    try:
                        p.send_signal(signal.SIGUSR1)
                    except ProcessLookupError:
                        pass
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    for rank, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode} (negative: killed by that signal):\n{text[-3000:]}"
    assert "stopped (SIGUSR1)" in texts[1], texts[1][-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{stop_step:08d}"
