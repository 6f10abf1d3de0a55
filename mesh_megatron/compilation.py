"""`model.compile`: torch.compile of the repeated unit (each NeoX layer), in place.

`nn.Module.compile()` compiles a module's call without wrapping it, so parameter names and state_dict keys are
those of the eager model (checkpoints load either way). Every layer runs the same code on parameters of the same
shapes, and dynamo passes a module's parameters as graph inputs, so all layers (prelude, core, coda) share one
compiled graph per (train/eval, grad mode, shapes); the number of loops K never enters it (the loop is Python
outside the compiled region), so a K drawn per step does not recompile.

Inductor fuses the layer's elementwise work (LayerNorms, bias + GELU, the rotary embedding of q and k, dropout and
the residual adds) around the matmuls of megatron-core's parallel linears.
"""

from __future__ import annotations

import torch
from torch import nn

_polyfill_registered = False


def _register_tp_group_polyfill() -> None:
    """Under dynamo, megatron-core's `get_tensor_model_parallel_group_if_none` without its DeprecationWarning.

    RowParallelLinear.forward passes `tp_group=None` on every call, so on rank 0 that function calls
    `warnings.warn`, which dynamo cannot trace: a graph break in the middle of every attention and MLP block,
    splitting the layer into three graphs and the fusions across them. The polyfill returns the same group."""
    global _polyfill_registered
    if _polyfill_registered:
        return
    from megatron.core import parallel_state
    from megatron.core import utils as mcore_utils

    @torch.compiler.substitute_in_graph(mcore_utils.get_tensor_model_parallel_group_if_none)
    def _tp_group_if_none(tp_group, is_expert=False, check_initialized=True):
        if not torch.distributed.is_initialized():
            return None
        if not parallel_state.is_initialized() or tp_group is not None:
            return tp_group
        if is_expert:
            return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
        return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)

    _polyfill_registered = True


def compile_layers(layers: nn.ModuleList) -> None:
    """Compile each module of `layers` in place (inductor; parameters and state_dict keys unchanged)."""
    _register_tp_group_polyfill()
    for layer in layers:
        layer.compile()
