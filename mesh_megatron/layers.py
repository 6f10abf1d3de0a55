"""The GPT-NeoX (Pythia) transformer layer on megatron-core tensor-parallel linears.

    y = x + Attn(LN1(x)) + MLP(LN2(x))          (parallel "gpt-j" residual, pre-LN, biases everywhere)

Activations are [seq, batch, hidden] as in megatron-core, so sequence parallelism (seq split over TP ranks)
falls out of the parallel linears: ColumnParallelLinear all-gathers the sequence, RowParallelLinear
reduce-scatters it back.

The fused QKV projection keeps GPT-NeoX's per-head layout [heads, (q, k, v), head_dim] on its output dim,
so a TP split of that dim hands each rank whole heads, and the weights map 1:1 to Hugging Face GPTNeoX.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from mesh_megatron.compilation import compile_layers
from mesh_megatron.config import ModelConfig
from mesh_megatron.rng import checkpoint, fork_tp_stream

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


# --- initialisation -------------------------------------------------------------------------------


def drawn_by_weight_init(weight: torch.Tensor) -> None:
    """The init_method megatron-core's parallel layers require. Built with perform_initialization=False they never call
    it: mesh_megatron/weight_init.py draws their weights (its _STD table holds each weight's std)."""
    raise RuntimeError("megatron-core initialised a parallel weight itself; mesh_megatron.weight_init draws them")


def base_std(cfg: ModelConfig) -> float:
    """Pythia's small_init: sqrt(2 / (5 d)) (Nguyen & Salazar 2019); or a plain std."""
    return math.sqrt(2.0 / (5.0 * cfg.hidden_size)) if cfg.init_method == "small_init" else cfg.init_std


def output_std(cfg: ModelConfig) -> float:
    """Std of the attention-out and MLP-down projections, scaled by the *unrolled* depth N.

    wang:   2 / (N sqrt(d))          (Pythia / GPT-NeoX wang_init)
    scaled: base_std / sqrt(2 N)     (the MeSH paper's "depth-aware" init, N = compute depth)
    """
    n = cfg.effective_depth()
    if cfg.output_layer_init == "wang":
        return 2.0 / (n * math.sqrt(cfg.hidden_size))
    return base_std(cfg) / math.sqrt(2.0 * n)


def megatron_config(cfg: ModelConfig, tp_size: int) -> TransformerConfig:
    """The megatron-core config its parallel layers read (parallelism, dtype, init placement)."""
    return TransformerConfig(
        num_layers=max(cfg.effective_depth(), 1),
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_size,
        tensor_model_parallel_size=tp_size,
        sequence_parallel=cfg.sequence_parallel and tp_size > 1,
        params_dtype=torch_dtype(cfg.params_dtype),
        # megatron-core only allocates this rank's shards -- on the GPU when the model is built under a CUDA default
        # device (`with torch.device("cuda")`), else on the host -- and mesh_megatron.weight_init fills them: the same
        # seed gives the same model at any TP size with no full master weights on the host.
        use_cpu_initialization=torch.get_default_device().type != "cuda",
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        rotary_interleaved=False,
    )


# --- rotary ------------------------------------------------------------------------------------------


def rotary_freqs(cfg: ModelConfig, seq_len: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """GPT-NeoX rotary angles for the first rotary_pct of each head's dims: [seq, 1, 1, rot_dim].

    (megatron-core's RotaryEmbedding module computes the same but only on CUDA; applying them uses its
    `apply_rotary_pos_emb`.)
    """
    dim = int(cfg.head_dim * cfg.rotary_pct)
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


# --- sub-layers ---------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, mcfg: TransformerConfig, tp_size: int):
        super().__init__()
        self.cfg = cfg
        self.heads_local = cfg.num_attention_heads // tp_size
        self.qkv = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, 3 * cfg.hidden_size, config=mcfg, init_method=drawn_by_weight_init, bias=True, gather_output=False
        )
        self.dense = tensor_parallel.RowParallelLinear(
            cfg.hidden_size, cfg.hidden_size, config=mcfg, init_method=drawn_by_weight_init, bias=True,
            input_is_parallel=True, skip_bias_add=False,
        )
        self.mcfg = mcfg

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
        qkv, _ = self.qkv(x)  # [s, b, 3 * hidden / tp]
        s, b, _ = qkv.shape
        qkv = qkv.view(s, b, self.heads_local, 3, self.cfg.head_dim)
        q, k, v = qkv.unbind(dim=3)  # each [s, b, h, d]
        if freqs is not None and freqs.shape[-1] > 0:
            q = apply_rotary_pos_emb(q, freqs, self.mcfg)
            k = apply_rotary_pos_emb(k, freqs, self.mcfg)
        # SDPA picks flash / memory-efficient kernels on GPU.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
        p = self.cfg.attention_dropout if self.training else 0.0
        # Heads differ per TP rank, so their dropout masks come from the TP-rank-specific stream.
        with fork_tp_stream() if p > 0 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads_local * self.cfg.head_dim)
        out, _ = self.dense(out)
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mcfg: TransformerConfig):
        super().__init__()
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, cfg.ffn_size, config=mcfg, init_method=drawn_by_weight_init, bias=True, gather_output=False
        )
        self.fc2 = tensor_parallel.RowParallelLinear(
            cfg.ffn_size, cfg.hidden_size, config=mcfg, init_method=drawn_by_weight_init, bias=True,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x)
        h, _ = self.fc2(F.gelu(h))  # exact (erf) GELU, as GPT-NeoX / HF "gelu"
        return h


def layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, dtype=torch_dtype(cfg.params_dtype))


class NeoXLayer(nn.Module):
    """One GPT-NeoX block: x + Attn(LN1 x) + MLP(LN2 x)."""

    def __init__(self, cfg: ModelConfig, mcfg: TransformerConfig, tp_size: int):
        super().__init__()
        self.ln1 = layer_norm(cfg)
        self.ln2 = layer_norm(cfg)
        self.attn = SelfAttention(cfg, mcfg, tp_size)
        self.mlp = MLP(cfg, mcfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        # Under sequence parallelism each TP rank holds its own slice of the sequence: its hidden-dropout mask must be
        # its own too (the default stream would give every slice the same mask).
        self.own_masks = mcfg.sequence_parallel and cfg.hidden_dropout > 0

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
        attn, mlp = self.attn(self.ln1(x), freqs), self.mlp(self.ln2(x))
        with fork_tp_stream() if self.own_masks and self.training else contextlib.nullcontext():
            return x + self.dropout(attn) + self.dropout(mlp)


class Stack(nn.ModuleList):
    """A run of NeoX layers (prelude, core, coda or the whole vanilla model)."""

    def __init__(self, cfg: ModelConfig, mcfg: TransformerConfig, tp_size: int, n: int, recompute_layers: bool = False):
        super().__init__(NeoXLayer(cfg, mcfg, tp_size) for _ in range(n))
        self.recompute_layers = recompute_layers
        if cfg.compile:
            compile_layers(self)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            if self.recompute_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, freqs)
            else:
                x = layer(x, freqs)
        return x
