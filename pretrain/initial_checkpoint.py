"""A training checkpoint made from given weights, with no data and no training step: what `mesh-import` writes.

`write_initial_checkpoint(cfg, weights, step=N)` builds the model and the DeepSpeed engine the way the trainer does
(`Trainer.build`: same seed, parameter groups, DeepSpeed config, LR schedule, universal-checkpoint info), copies
the weights in, and saves through the trainer's own `pretrain.checkpoint.save`, so the result is an ordinary
complete checkpoint (manifest, run config, trainer state) that `mesh-pretrain --resume` continues from.

It is always written in one layout, fp32 ZeRO-0 at TP=1 and DP=1, from one process: that is the layout whose files
hold the full weights and a plain torch AdamW state. The optimizer has not stepped, so the Adam moments are absent;
a resume in this layout starts AdamW fresh, and a resume in any other layout (TP, DP, ZeRO stage, bf16) goes through
the universal conversion, whose fp32 ZeRO-0 path gives absent moments zeros and step 0 (pretrain/universal.py).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from pretrain import checkpoint as ckpt
from pretrain import distributed as pd
from pretrain import run_lock, universal
from pretrain.config import RunConfig

# Parameters a caller may leave out: they keep the seeded initialisation of a freshly built model.
FRESH_PREFIXES = ("connection.",)


def _single_process() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ckpt.CheckpointError(f"WORLD_SIZE={world}: an initial checkpoint is written by one process; run it "
                                   "without torchrun / srun (the resume then runs in any layout)")


def build_engine(cfg: RunConfig, seed: int | None = None):
    """(engine, model) as `Trainer.build` makes them, but in the import layout (one process, TP=1, fp32 ZeRO-0);
    `seed` (default train.seed) seeds every parameter the caller does not overwrite."""
    import deepspeed

    from mesh_megatron.model import MeshGPTModel
    from pretrain.schedule import build_scheduler
    from pretrain.train import deepspeed_config, param_groups

    pd.setup_groups(1, "auto", cfg.parallel.timeout_s)
    pd.setup_deepspeed()
    t = cfg.train
    pd.set_seed(t.seed if seed is None else seed)
    model = MeshGPTModel(cfg.model)
    universal.attach_info(model)
    universal.mark_tp_layout(model, 1)
    layout = replace(cfg, parallel=replace(cfg.parallel, tensor_parallel_size=1, zero_stage=0))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=deepspeed_config(layout, 1, "fp32"),
        mpu=pd.MegatronMPU(),
        lr_scheduler=lambda opt: build_scheduler(opt, t.train_iters, t.warmup_steps, t.min_lr_ratio),
    )
    return engine, model


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy `weights` (full TP=1 tensors, our names) into `model`; returns the names left at their fresh init (only
    FRESH_PREFIXES may be). Anything else missing, unexpected or mis-shaped is a CheckpointError naming it."""
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in weights]
    fresh = [n for n in missing if n.startswith(FRESH_PREFIXES)]
    missing = [n for n in missing if n not in fresh]
    unexpected = sorted(set(weights) - set(params))
    bad = [f"{n}: {tuple(weights[n].shape)} != {tuple(p.shape)}" for n, p in params.items()
           if n in weights and tuple(weights[n].shape) != tuple(p.shape)]
    if missing or unexpected or bad:
        raise ckpt.CheckpointError(
            f"{source}: the weights do not fit the model of the run config (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, mis-shaped {bad[:3]}); use a config whose model section matches the weights")
    with torch.no_grad():
        for name, p in params.items():
            if name in weights:
                p.copy_(weights[name].to(p.dtype))
    return fresh


def _advance_schedule(engine, step: int, global_batch_size: int) -> None:
    """Put the LR schedule and DeepSpeed's counters where a run that had made `step` steps has them."""
    sched = engine.lr_scheduler
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended, nothing has trained
        warnings.simplefilter("ignore")
        for _ in range(step):
            sched.step()
    engine.global_steps = step
    engine.global_samples = step * global_batch_size


def write_initial_checkpoint(cfg: RunConfig, weights: dict[str, torch.Tensor], *, step: int = 0,
                             seed: int | None = None, source: str = "weights") -> tuple[Path, list[str]]:
    """Save `weights` (full TP=1 state dict, MeshGPTModel names) as the complete checkpoint `step_<step>` of the run
    `cfg` (its checkpoint directory, which must hold no checkpoint yet), with a fresh optimizer, the LR schedule at
    `step` and the data position `step x global batch`. Parameters under FRESH_PREFIXES that `weights` lacks keep
    the model's seeded init (`seed`, default train.seed). One process. Returns (checkpoint, names left fresh)."""
    if step < 0:
        raise ckpt.CheckpointError(f"step {step}: must be >= 0")
    _single_process()
    root = cfg.checkpoint_dir
    lock = run_lock.lock_dirs([cfg.run_dir, root])
    try:
        existing = ckpt.latest_checkpoint(root)
        if existing is not None:
            raise ckpt.CheckpointError(f"{root}: already holds checkpoint {existing.name}; write the import into a new "
                                       "run (set logging.dir or checkpoint.dir to an empty directory)")
        engine, model = build_engine(cfg, seed)
        try:
            fresh = load_weights(model, weights, source)
            _advance_schedule(engine, step, cfg.train.global_batch_size)
            state = ckpt.TrainerState(
                step=step, consumed_samples=step * cfg.train.global_batch_size,
                tokens_seen=step * cfg.train.global_batch_size * cfg.model.seq_length,
                tensor_parallel_size=1, data_parallel_size=1, zero_stage=0,
                global_batch_size=cfg.train.global_batch_size, train_iters=cfg.train.train_iters, precision="fp32",
            )
            ckpt.clean_stale_temps(root)
            path = ckpt.save(engine, cfg, state, root)
            ckpt.write_atomic(cfg.run_dir / "run_config.yaml", cfg.to_yaml())
        finally:
            engine.destroy()
    finally:
        lock.release()
    return path, fresh


__all__ = ["write_initial_checkpoint", "build_engine", "load_weights", "FRESH_PREFIXES"]
