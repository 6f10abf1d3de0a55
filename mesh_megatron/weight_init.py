"""Scale-ready, TP-invariant initialisation of the tensor-parallel weights.

megatron-core's parallel layers are built with `perform_initialization=False`: they only allocate this rank's shard,
on the device the model is built on (`torch.device("cuda")` context: the GPU; otherwise the CPU). This module then
fills every shard so that a seed gives the same full model at every TP size, with no full master copy of the model
anywhere:

- one base seed is drawn from the global torch (CPU) generator at build time, so `pretrain.distributed.set_seed`
  keeps deciding the model and every rank (TP and DP alike) draws the same one;
- each parallel weight gets its own generator, on the parameter's device, seeded from (base seed, qualified name):
  its values do not depend on what else the model holds or in which order it was built;
- the FULL weight is drawn in fp32 on that device (one parameter at a time, a transient), this rank keeps its slice
  along the split dim and copies it in the parameter's dtype.

The draws depend on the device's generator, so a CPU build and a GPU build of the same seed differ; at every TP size
on one device type they are bit-identical. Biases of the parallel layers are zeroed (megatron-core leaves them
uninitialised without `perform_initialization`); LayerNorms and the MeSH connections (plain torch, replicated, small)
initialise themselves from the global generator as before.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from mesh_megatron.config import ModelConfig
from mesh_megatron.layers import base_std, output_std

# parallel weight (name suffix) -> its std (the one place that says it; layers.py defines the two rules): small_init
# for the embeddings and input projections, the depth-scaled std for the two output projections (attn out, MLP down).
_STD: dict[str, Callable[[ModelConfig], float]] = {
    "embed.weight": base_std,
    "attn.qkv.weight": base_std,
    "attn.dense.weight": output_std,
    "mlp.fc1.weight": base_std,
    "mlp.fc2.weight": output_std,
    "lm_head.weight": base_std,
}

# The dim megatron-core splits each parallel layer's weight on (it records it only when it initialises itself).
_SPLIT_DIM = {VocabParallelEmbedding: 0, ColumnParallelLinear: 0, RowParallelLinear: 1}


def build_device() -> torch.device:
    """Where the trainer builds the model: this rank's GPU (`torch.cuda.current_device()`), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_std(cfg: ModelConfig, name: str) -> float:
    """The std of the parallel weight `name` (a qualified parameter name)."""
    for suffix, std in _STD.items():
        if name == suffix or name.endswith("." + suffix):
            return std(cfg)
    raise KeyError(f"no init std for the tensor-parallel weight '{name}' (add it to mesh_megatron.weight_init._STD)")


def parameter_seed(base_seed: int, name: str) -> int:
    """A 63-bit seed for parameter `name`: a hash of (base seed, name), the same on every rank and TP size."""
    digest = hashlib.blake2b(f"{base_seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draw_base_seed() -> int:
    """One draw from the global CPU generator (seeded alike on every rank by set_seed)."""
    # device="cpu" explicitly: under a CUDA default device this would otherwise draw from the CUDA generator
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu").item())


@torch.no_grad()
def fill_shard(weight: torch.Tensor, std: float, seed: int, split_dim: int, tp_rank: int, tp_size: int) -> None:
    """Draw the full weight N(0, std^2) in fp32 from a generator seeded with `seed` on `weight`'s device and copy
    this rank's slice (contiguous block `tp_rank` of `tp_size` along `split_dim`) into `weight`."""
    gen = torch.Generator(device=weight.device)
    gen.manual_seed(seed)
    if tp_size == 1 and weight.dtype == torch.float32:
        weight.normal_(0.0, std, generator=gen)  # the full tensor is the shard: draw in place (same stream)
        return
    full_shape = list(weight.shape)
    full_shape[split_dim] *= tp_size
    full = torch.empty(full_shape, dtype=torch.float32, device=weight.device).normal_(0.0, std, generator=gen)
    size = weight.shape[split_dim]
    weight.copy_(full.narrow(split_dim, tp_rank * size, size))


@torch.no_grad()
def initialize_parallel_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Initialise every megatron-core parallel layer of `model` (built with perform_initialization=False): weights
    TP-invariantly from the global generator's next draw (see the module doc), biases zero; and record on each weight
    the TP attributes megatron-core sets when it initialises (tensor_model_parallel, partition_dim / stride)."""
    base_seed = draw_base_seed()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for module_name, module in model.named_modules():
        split_dim = next((d for cls, d in _SPLIT_DIM.items() if isinstance(module, cls)), None)
        if split_dim is None:
            continue
        name = f"{module_name}.weight"
        weight = module.weight
        if not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=split_dim, stride=1)
        elif weight.partition_stride != 1:
            raise ValueError(f"'{name}': partition stride {weight.partition_stride} is not supported (only 1)")
        fill_shard(weight, init_std(cfg, name), parameter_seed(base_seed, name), split_dim, tp_rank, tp_size)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
