"""Launcher environment: who started this process (a lone shell, torchrun, or srun) and what that means for
torch.distributed's env:// rendezvous variables.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* itself; srun (one task per device) sets SLURM_*, which is
mapped here; a lone process gets a one-process world on a free port.
"""

from __future__ import annotations

import os
import socket

from mesh_megatron.config import ConfigError

# torch.distributed's env:// rendezvous variables. A process that starts a job of its own (a test, an experiment run)
# must not inherit them from its parent, or it joins (or collides with) the parent's group.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_TORCHRUN_MARK = "TORCHELASTIC_RUN_ID"  # set by torchrun for its workers: their RANK/WORLD_SIZE are authoritative


def env_from_slurm() -> None:
    """Map SLURM_* to the torchrun variables when launched by `srun` directly (one task per device)."""
    if "SLURM_PROCID" not in os.environ:
        return
    if "RANK" in os.environ:
        # torchrun under srun sets RANK itself. Otherwise RANK/WORLD_SIZE came from the submitting shell (sbatch
        # exports it): every task would start a world of its own and they would overwrite one checkpoint directory.
        step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
        if _TORCHRUN_MARK not in os.environ and step_tasks > 1 and int(os.environ.get("WORLD_SIZE", "1")) < step_tasks:
            raise ConfigError(  # the CLIs print it as one line, exit 2
                f"srun started {step_tasks} tasks but RANK={os.environ['RANK']} WORLD_SIZE={os.environ.get('WORLD_SIZE', '?')} "
                "are set in the environment (inherited from the shell that submitted the job?): each task would train "
                "alone. `unset RANK WORLD_SIZE LOCAL_RANK` before srun (slurm/pretrain.sbatch does), or launch with torchrun"
            )
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError(  # one line, exit 2
            "launched by srun without MASTER_ADDR: export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) "
            "in the sbatch script (see slurm/)"
        )


def env_for_single_process() -> None:
    """No launcher: a one-process world on a free local port."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
