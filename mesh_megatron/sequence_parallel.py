"""Sequence parallelism's one extra duty: summing the gradients of TP-replicated parameters over the TP group.

Under sequence parallelism (megatron-core's `sequence_parallel`) the activations outside attention and MLP are split
along the sequence over the TP ranks; LayerNorms, row-parallel biases and the MeSH routers then see only this rank's
tokens, so their gradients are partial sums. Megatron-LM all-reduces them after the backward pass, in one call.

Here the sum runs inside autograd, so that it is complete before DeepSpeed's gradient hooks take the gradients
(ZeRO-2 and overlapped reduction consume them during the backward pass, per parameter): every forward first passes
the replicated parameters through `SumGradsOverTP`, an identity whose backward runs once all their gradients of that
micro-batch exist (after their last use in the backward pass: the earliest layer), and all-reduces them as one flat
fp32 buffer -- one collective per micro-batch instead of one per parameter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def buffers_allocatable() -> bool:
    """Whether megatron-core's sequence-parallel collectives can run here: they allocate their all-gather and
    reduce-scatter outputs on `torch.cuda.current_device()`, which has no answer without a GPU."""
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError):
        return False
    return True


class SumGradsOverTP(torch.autograd.Function):
    """Identity on a set of tensors; the backward all-reduces their gradients over `group` in one flat fp32 call."""

    @staticmethod
    def forward(ctx, group, *tensors: torch.Tensor):  # noqa: D102
        ctx.group = group
        return tensors

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # noqa: D102
        present = [g for g in grads if g is not None]
        if present:
            # fp32 whatever the parameter dtype: partial sums of bf16 gradients lose bits otherwise (Megatron sums
            # its fp32 main grads).
            flat = _flatten_dense_tensors([g.float() for g in present])
            dist.all_reduce(flat, group=ctx.group)
            summed = iter(t.to(g.dtype) for t, g in zip(_unflatten_dense_tensors(flat, present), present))
            grads = tuple(next(summed) if g is not None else None for g in grads)
        return (None, *grads)


def call_with_replicated_grads_summed(module: nn.Module, params: dict[str, nn.Parameter], group,
                                      args: tuple, kwargs: dict[str, Any]) -> Any:
    """`module(*args, **kwargs)` with its parameters `params` (name -> parameter) replaced, for this call, by their
    `SumGradsOverTP` outputs, so their gradients reach the parameters summed over the TP group. (Activation recompute
    later re-reads the parameters themselves, which hold the same values; the gradients still flow through the
    graph of this call.) The module's forward is entered again: it must not repeat this.
    """
    summed = SumGradsOverTP.apply(group, *params.values())
    return torch.func.functional_call(module, dict(zip(params, summed)), args, kwargs, tie_weights=False, strict=False)
