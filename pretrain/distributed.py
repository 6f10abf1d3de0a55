"""Process groups for the trainer: torch.distributed (from the launcher's environment, pretrain/launcher.py) with
megatron-core parallel_state on top, seeding, and the `mpu` object DeepSpeed asks for so that ZeRO partitions and
gradient all-reduces run over the data-parallel group only (TP peers hold different shards, so they must never be
averaged together).

`initialize_parallel` works for a single CPU process, `torchrun` on CPU (gloo) or GPU (nccl), and `srun` with one
task per GPU, so models and tests never care how they were launched.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from pretrain.launcher import env_for_single_process, env_from_slurm


def initialize_parallel(tensor_parallel_size: int = 1, backend: str | None = None, timeout_s: int = 600) -> None:
    """Initialise torch.distributed (if needed) and megatron-core's TP/DP groups.

    A lone process without launcher variables gets a one-process group, so the same code path runs everywhere.
    """
    if not dist.is_initialized():
        env_from_slurm()
        if "RANK" not in os.environ:
            env_for_single_process()
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % tensor_parallel_size:
        raise ValueError(f"world size {world} is not divisible by tensor_parallel_size {tensor_parallel_size}")
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != tensor_parallel_size:
            raise RuntimeError("parallel_state already initialised with a different tensor parallel size; call destroy_parallel() first")
        return
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)


def destroy_parallel() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
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
    if torch.cuda.is_available() and ps.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def setup(tensor_parallel_size: int, backend: str = "auto", timeout_s: int = 1800) -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and the TP/DP groups; idempotent, and re-creates the
    megatron-core groups when a different TP size is asked for in the same processes (tests run several layouts)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed must not probe for CUDA on a CPU box
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != tensor_parallel_size:
        ps.destroy_model_parallel()
    initialize_parallel(tensor_parallel_size, backend=None if backend == "auto" else backend, timeout_s=timeout_s)
    import deepspeed

    # Registers the existing process group with DeepSpeed's comm layer (no new group is created).
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


class MegatronMPU:
    """DeepSpeed's model-parallel-unit interface over megatron-core parallel_state (PP = 1: model parallel = TP)."""

    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def dp_rank() -> int:
    return ps.get_data_parallel_rank()


def dp_size() -> int:
    return ps.get_data_parallel_world_size()


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a signal that reached only some processes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def assert_replicated_in_sync(model: torch.nn.Module) -> None:
    """Raise if any TP-replicated parameter (LayerNorms, routers, biases of row-parallel layers) differs between the
    ranks of this TP group. They get identical gradients by construction; a drift means a missing all-reduce."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return
    group = ps.get_tensor_model_parallel_group()
    bad = []
    for name, p in model.named_parameters():
        if getattr(p, "tensor_model_parallel", False):
            continue
        data = p.detach()
        if hasattr(p, "ds_tensor"):  # ZeRO-3 keeps only a partition; compare the gathered value
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                data = p.detach().clone()
        hi, lo = data.clone(), data.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        if not torch.equal(hi, lo):
            bad.append(f"{name} (max diff {(hi - lo).abs().max().item():.3g})")
    if bad:
        raise AssertionError(f"TP-replicated parameters differ across tensor-parallel ranks: {', '.join(bad[:5])}")


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the (DP-reduced) gradients, each TP-split parameter counted once per shard and each replicated
    parameter once. DeepSpeed reports this itself for ZeRO >= 1; under ZeRO-0 the trainer computes it here."""
    sq = torch.zeros(1, dtype=torch.float64, device=next(model.parameters()).device)
    first = ps.get_tensor_model_parallel_rank() == 0
    for p in model.parameters():
        if p.grad is not None and (first or getattr(p, "tensor_model_parallel", False)):
            sq += p.grad.detach().double().pow(2).sum()
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
    return sq.sqrt().item()
