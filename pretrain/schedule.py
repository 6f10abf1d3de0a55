"""Pythia's learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio` x peak at the last step."""

from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, train_iters: int, warmup: int, min_ratio: float) -> float:
    """Fraction of the peak LR used by optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_steps = max(train_iters - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train_iters: int, warmup: int, min_ratio: float):
    """A LambdaLR (its state = the step count, saved in checkpoints by DeepSpeed)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, train_iters, warmup, min_ratio))
