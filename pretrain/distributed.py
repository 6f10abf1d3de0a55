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

from mesh_megatron import rng
from mesh_megatron.config import ConfigError
from pretrain.launcher import env_for_single_process, env_from_slurm


def initialize_parallel(tensor_parallel_size: int = 1, backend: str | None = None, timeout_s: int = 600,
                        announce: bool = False) -> None:
    """Initialise torch.distributed (if needed) and megatron-core's TP/DP groups.

    A lone process without launcher variables gets a one-process group, so the same code path runs everywhere.
    Layout and launch mistakes are ConfigErrors (one line, exit 2 in the CLIs). `announce`: rank 0 prints what it is
    about to wait on (the rendezvous blocks until every rank has joined, up to timeout_s).
    """
    if not dist.is_initialized():
        env_from_slurm()
        if "RANK" not in os.environ:
            env_for_single_process()
        # Checked before the rendezvous: a wrong layout is reported in the first second, by every rank alike.
        check_layout(int(os.environ.get("WORLD_SIZE", "1")), tensor_parallel_size)
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("parallel.backend: nccl needs a CUDA GPU and none is visible to this process; "
                              "use --parallel.backend auto (gloo on CPU)")
        if announce and os.environ.get("RANK", "0") == "0":
            n = int(os.environ.get("WORLD_SIZE", "1"))
            print(f"[pretrain] setup: joining the process group ({n} process{'es' if n > 1 else ''}, "
                  f"{backend}, rendezvous {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, "
                  f"timeout {timeout_s}s) ...", flush=True)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        except dist.DistNetworkError as e:
            if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
                raise
            raise ConfigError(
                f"MASTER_PORT {os.environ.get('MASTER_PORT')}: the rendezvous port on {os.environ.get('MASTER_ADDR')} is "
                "already in use (another job on this node?); set MASTER_PORT to a free port"
            ) from None
    check_layout(dist.get_world_size(), tensor_parallel_size)
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != tensor_parallel_size:
            raise RuntimeError("parallel_state already initialised with a different tensor parallel size; call destroy_parallel() first")
        return
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)


def check_layout(world: int, tensor_parallel_size: int) -> None:
    """Tensor parallelism splits the world into groups of tensor_parallel_size processes: it must divide it."""
    if world % tensor_parallel_size == 0:
        return
    if tensor_parallel_size > world:
        why = f"is larger than the {world} process{'es' if world > 1 else ''} launched"
    else:
        why = f"does not divide the {world} processes launched"
    raise ConfigError(
        f"parallel.tensor_parallel_size: {tensor_parallel_size} {why}; launch a multiple of {tensor_parallel_size} "
        f"processes (torchrun --nproc_per_node, srun --ntasks) or lower parallel.tensor_parallel_size"
    )


def destroy_parallel() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Same seed on every rank, so replicated weights and replicated-activation dropout agree across TP ranks; the
    model's TP-rank-specific dropout stream (heads, sequence-parallel slices) gets seed + 2718 + TP rank, on the GPU or
    the CPU alike (mesh_megatron.rng)."""
    random.seed(seed)
    np.random.seed(seed)
    rng.seed_streams(seed, ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0)


def setup(tensor_parallel_size: int, backend: str = "auto", timeout_s: int = 1800) -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and the TP/DP groups, then DeepSpeed's comm layer;
    idempotent. The trainer calls the two halves itself, to take the run-directory lock in between."""
    setup_groups(tensor_parallel_size, backend, timeout_s)
    setup_deepspeed()


def setup_groups(tensor_parallel_size: int, backend: str = "auto", timeout_s: int = 1800, announce: bool = False) -> None:
    """torch.distributed and the megatron-core TP/DP groups (cheap: no DeepSpeed yet). Re-creates the megatron-core
    groups when a different TP size is asked for in the same processes (tests run several layouts)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed must not probe for CUDA on a CPU box
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != tensor_parallel_size:
        ps.destroy_model_parallel()
    initialize_parallel(tensor_parallel_size, backend=None if backend == "auto" else backend, timeout_s=timeout_s,
                        announce=announce)


def setup_deepspeed() -> None:
    """Import DeepSpeed and register the existing process group with its comm layer (no new group is created).

    Nothing is compiled: on the CPU accelerator DeepSpeed's comm layer would otherwise build its shared-memory op
    (deepspeed_shm_comm) just in time, with torch.utils.cpp_extension into ~/.cache/torch_extensions. That build takes
    minutes, is redone whenever another environment sharing the cache built it differently, and waits forever on the
    lock file of a build that was killed. The op serves only DeepSpeed's inference all-reduce, never training, so it
    is marked unavailable in the table DeepSpeed consults before building it (the CUDA accelerator has no such op).
    """
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().get_op_builder("ShareMemCommBuilder") is not None:  # the table is probed on first use: CPU only
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
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


def any_rank_each(*flags: bool) -> list[bool]:
    """`any_rank` of several flags in one all-reduce: each true on every rank if it is true on any rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


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
