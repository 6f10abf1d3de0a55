"""Process groups and seeding: torch.distributed from torchrun / Slurm env, megatron-core parallel_state on top.

One call (`initialize_parallel`) works for a single CPU process, `torchrun` on CPU (gloo) or GPU (nccl), and
`srun` with one task per GPU, so models and tests never care how they were launched.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


# torch.distributed's env:// rendezvous variables. A process that starts a job of its own (a test, an experiment run)
# must not inherit them from its parent, or it joins (or collides with) the parent's group.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_TORCHRUN_MARK = "TORCHELASTIC_RUN_ID"  # set by torchrun for its workers: their RANK/WORLD_SIZE are authoritative


def _env_from_slurm() -> None:
    """Map SLURM_* to the torchrun variables when launched by `srun` directly (one task per device)."""
    if "SLURM_PROCID" not in os.environ:
        return
    if "RANK" in os.environ:
        # torchrun under srun sets RANK itself. Otherwise RANK/WORLD_SIZE came from the submitting shell (sbatch
        # exports it): every task would start a world of its own and they would overwrite one checkpoint directory.
        step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
        if _TORCHRUN_MARK not in os.environ and step_tasks > 1 and int(os.environ.get("WORLD_SIZE", "1")) < step_tasks:
            from mesh_megatron.config import ConfigError  # the CLIs print it as one line, exit 2

            raise ConfigError(
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
        raise RuntimeError(
            "launched by srun without MASTER_ADDR: export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) "
            "in the sbatch script (see slurm/)"
        )


def initialize_parallel(tensor_parallel_size: int = 1, backend: str | None = None, timeout_s: int = 600) -> None:
    """Initialise torch.distributed (if needed) and megatron-core's TP/DP groups.

    A lone process without launcher variables gets a one-process group, so the same code path runs everywhere.
    """
    if not dist.is_initialized():
        _env_from_slurm()
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % tensor_parallel_size:
        raise ValueError(f"world size {world} is not divisible by tensor_parallel_size {tensor_parallel_size}")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel_size:
            raise RuntimeError("parallel_state already initialised with a different tensor parallel size; call destroy_parallel() first")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Same seed on every rank, so replicated weights (built from full master weights) agree across TP ranks.

    On GPU, megatron-core's RNG tracker additionally gets a TP-rank-specific stream for dropout inside
    tensor-parallel regions. The tracker is CUDA-only (it asserts without CUDA), so on CPU it is not used.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available() and parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
