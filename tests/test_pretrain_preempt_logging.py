"""Preemption with wandb on (offline, the default): a SIGTERM to every process of the job still ends in a checkpoint
and exit 0 (two processes, gloo, through the real CLI).

Slurm's `scancel` / preemption signals every process of the job step (proctrack: the step's cgroup or process
tree), so wandb's service (`wandb-core`, a child of rank 0 in a session of its own) gets the SIGTERM too and exits at
once: a Go program cannot be told from outside to ignore SIGTERM. On the local 2-node Slurm the next `wandb.log`
then raised `ConnectionResetError` on rank 0 before the ranks agreed to stop, `wandb.finish()` raised again in
`metrics.close()`, rank 1 failed on the closed gloo connection: rc 1 and no checkpoint.

Here both ranks share one process group; the test sends SIGTERM to the group (os.killpg) and to every process
descending from the ranks outside it (wandb-core), as slurmstepd does. The run must save the step it stops at, exit 0
on both ranks, and say once, in one line, that wandb stopped.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


from conftest import fresh_job_env
from pretrain.launcher import free_port
from pretrain_data import make_dataset
from test_pretrain_preempt_ranks import _config, _wait_for


def _parents() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # exited while we looked
                pass
    return out


def _descendants(roots: list[int]) -> set[int]:
    parents, found = _parents(), set(roots)
    while True:
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def test_sigterm_to_the_whole_job_with_wandb_saves_and_exits_0(tmp_path):
    data = make_dataset(tmp_path / "data" / "synthetic")
    config = _config(tmp_path, data, wandb_mode="offline")
    port = str(free_port())
    procs, logs = [], []
    for rank in range(2):
        log = tmp_path / f"rank{rank}.log"
        env = fresh_job_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port)
        env.pop("WANDB_SERVICE", None)  # rank 0 starts its own wandb service, as in a job
        with log.open("w") as out:
            # one process group for the job, led by rank 0
            procs.append(subprocess.Popen([sys.executable, "-m", "pretrain", "--config", str(config)], env=env,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          process_group=0 if rank == 0 else procs[0].pid))
        logs.append(log)
    try:
        _wait_for(r"saved checkpoint \S*step_00000002", logs[0], procs)
        job = _descendants([p.pid for p in procs])
        services = [pid for pid in job if "wandb-core" in _cmdline(pid)]
        assert services, f"no wandb-core process under the ranks: {[_cmdline(p) for p in job]}"
        os.killpg(procs[0].pid, signal.SIGTERM)
        for pid in job:
            if pid not in (p.pid for p in procs):
                try:
                    os.kill(pid, signal.SIGTERM)  # wandb-core sits in a session of its own: killpg misses it
                except ProcessLookupError:
                    pass
        for p in procs:
            p.wait(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    for rank, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{text[-4000:]}"
        assert "Traceback" not in text, f"rank {rank}:\n{text[-4000:]}"
    m = re.search(r"stopping on SIGTERM after step (\d+); checkpoint saved", texts[0])
    assert m, texts[0][-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{int(m.group(1)):08d}"
    # the wandb failure is reported, once, in one line; wandb's own socket noise is not
    warnings = [line for line in texts[0].splitlines() if line.startswith("[metrics]")]
    assert len(warnings) == 1 and warnings[0].startswith("[metrics] warning: wandb"), texts[0][-3000:]
    assert "socket.send()" not in texts[0], texts[0][-3000:]


def test_metrics_log_and_close_survive_a_dead_wandb_service(tmp_path, monkeypatch, capsys):
    """The same failure in this process, deterministic: wandb-core gets SIGTERM between two records; logging goes on
    to metrics.jsonl, close() does not raise, and the warning is one line."""
    from pretrain.config import load_run_config
    from pretrain.metrics import Metrics

    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's own capture of stdout alone
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    cfg = load_run_config(_config(tmp_path, make_dataset(tmp_path / "data" / "synthetic"), wandb_mode="offline"))
    metrics = Metrics(cfg, 0, tmp_path / "run")
    assert metrics.wandb is not None, capsys.readouterr().err
    metrics.log({"step": 1, "loss": 5.0})
    services = [pid for pid in _descendants([os.getpid()]) if "wandb-core" in _cmdline(pid)]
    assert services, "wandb-core did not start under this process"
    for pid in services:
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 30
    while time.time() < deadline and any(_state(pid) not in ("Z", "") for pid in services):
        time.sleep(0.05)
    metrics.log({"step": 2, "loss": 4.0})
    metrics.log({"event": "stop", "step": 2, "reason": "SIGTERM"})
    metrics.close()
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("[metrics]")]
    assert len(warnings) == 1 and warnings[0].startswith("[metrics] warning: wandb"), err
    assert "socket.send()" not in err, err
    steps = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3, steps


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
