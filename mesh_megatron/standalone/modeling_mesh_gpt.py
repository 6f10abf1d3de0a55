"""Hugging Face model of an exported recursive / MeSH transformer (shipped inside every such export).

    embeddings -> Prelude -> (Core, connection) x K -> Coda -> final LayerNorm -> LM head

Each layer is a GPT-NeoX (Pythia) block, y = x + Attn(LN1 x) + MLP(LN2 x), with rotary on the first rotary_pct of
each head and the fused QKV laid out [heads, (q, k, v), head_dim]. The core's layers exist once and run K times.
The connection between loops and the MeSH memory buffer are the training model's own code: connections.py and
mesh.py sit beside this file in the export (and in mesh_megatron/standalone/), imported relatively. The export's
logits-parity tests hold the GPT-NeoX block here to the megatron-core one used in training.

KV cache: a looped core calls the same layers K times with different inputs, so every *applied* layer gets its own
cache slot, keyed by its unrolled index (prelude 0..P-1, then loop t layer j at P + t*C + j, then the coda); never by
the shared layer object. The MeSH buffer, routers and loop connections act per token, so they need no cache: a
decoding step only recomputes them for the new tokens.

Early exit (`exit_threshold`, config or per call): a token whose state changes by less than the threshold (relative)
in a loop iteration keeps that state for the remaining iterations. The loop stays dense: later iterations still run the
core on the carried state, so every applied layer's cache slot holds that token's K/V and decoding with the cache
equals the full forward. `loops_per_token` (output field) says how many iterations updated each token.

Depends only on torch, transformers and its sibling files (no megatron-core, no mesh_megatron).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mesh_gpt import MeshGPTConfig
from .connections import EarlyExit, StaticCombConnection, build_connection, check_exit_threshold

# --- rotary (GPT-NeoX: rotate_half on the first rotary dims) -------------------------------------------------------


def rotary_cos_sin(config: MeshGPTConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """position_ids [b, s] -> cos, sin [b, 1, s, rot_dim] (fp32 angles, as on the training side)."""
    dim = int(config.head_dim * config.rotary_pct)
    inv_freq = 1.0 / (config.rotary_emb_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    if rot == 0:
        return t
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    return torch.cat([t_rot * cos + _rotate_half(t_rot) * sin, t_pass], dim=-1)


# --- the GPT-NeoX block --------------------------------------------------------------------------------------------


class MeshGPTAttention(nn.Module):
    def __init__(self, config: MeshGPTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, mask, cache: Cache | None, slot: int):
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # [b, h, s, d] each: per-head (q, k, v) layout, as GPT-NeoX
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, slot)
        if mask is None:  # no padding and no cached prefix: plain causal attention (as in training)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class MeshGPTMLP(nn.Module):
    def __init__(self, config: MeshGPTConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact (erf) GELU


class MeshGPTLayer(nn.Module):
    def __init__(self, config: MeshGPTConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = MeshGPTAttention(config)
        self.mlp = MeshGPTMLP(config)

    def forward(self, x, cos, sin, mask, cache, slot):
        # Parallel residual, summed in the training side's order.
        return x + self.attention(self.input_layernorm(x), cos, sin, mask, cache, slot) + self.mlp(self.post_attention_layernorm(x))


class MeshGPTStack(nn.ModuleList):
    def forward(self, x, cos, sin, mask, cache, first_slot: int):
        for j, layer in enumerate(self):
            x = layer(x, cos, sin, mask, cache, first_slot + j)
        return x


# --- masks -----------------------------------------------------------------------------------------------------------


def attention_mask_4d(attention_mask, b, s, past, device):
    """Boolean [b, 1, s, past+s] mask (True = attend) or None when plain causal attention is exact.

    Query i sits at cache index past+i and sees keys at indices <= past+i that are not padding. A query that sees no
    key at all (a left-padding position) is let see itself, so the softmax stays finite; its output is never used."""
    total = past + s
    if attention_mask is None and past == 0:
        return None
    if attention_mask is not None and attention_mask.shape[-1] != total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {total} (cached {past} + new {s})")
    if attention_mask is not None and bool(attention_mask.all()) and past == 0:
        return None
    q_idx = torch.arange(past, total, device=device)[:, None]
    k_idx = torch.arange(total, device=device)[None, :]
    mask = (k_idx <= q_idx)[None, None].expand(b, 1, s, total)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
        mask = mask | (k_idx == q_idx)[None, None]
    return mask


# --- models -------------------------------------------------------------------------------------------------------------


class MeshGPTPreTrainedModel(PreTrainedModel):
    config_class = MeshGPTConfig
    config: MeshGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MeshGPTLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, StaticCombConnection):
            with torch.no_grad():
                module.alpha.copy_(torch.tensor([1.0, 0.0, 0.0]))


class MeshGPTModel(MeshGPTPreTrainedModel):
    def __init__(self, config: MeshGPTConfig):
        super().__init__(config)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.prelude = MeshGPTStack(MeshGPTLayer(config) for _ in range(config.prelude_layers))
        self.core = MeshGPTStack(MeshGPTLayer(config) for _ in range(config.core_layers))
        self.coda = MeshGPTStack(MeshGPTLayer(config) for _ in range(config.coda_layers))
        self.connection = build_connection(
            config.arch, config.connection, config.hidden_size, config.trained_num_loops, num_slots=config.mesh_slots
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.loops_per_token: torch.Tensor | None = None
        self.reset_exit_stats()
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_in

    def set_input_embeddings(self, value):
        self.embed_in = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, num_loops=None,
                exit_threshold=None):
        """-> final hidden states [b, s, d]; sets `self.loops_per_token` [b, s] (iterations that updated each token)
        and adds the non-padding new tokens to `self.exit_stats` (see `average_loops_per_token`)."""
        cfg = self.config
        k = cfg.num_loops if num_loops is None else int(num_loops)
        threshold = check_exit_threshold(cfg.exit_threshold if exit_threshold is None else exit_threshold)
        if k < 1:
            raise ValueError(f"num_loops must be >= 1, got {k}")
        b, s = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_key_values is not None:
            # One slot per applied layer; a deeper run than the cache was made for (num_loops raised) adds slots.
            need = cfg.prelude_layers + cfg.core_layers * k + cfg.coda_layers
            while len(past_key_values.layers) < need:
                past_key_values.layers.append(DynamicLayer())
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=input_ids.device)[None].expand(b, s)
        h = self.embed_in(input_ids)
        if cfg.scale_embeddings:
            h = h * math.sqrt(cfg.hidden_size)
        cos, sin = rotary_cos_sin(cfg, position_ids, h.dtype)
        mask = attention_mask_4d(attention_mask, b, s, past, h.device)

        slot = 0
        h_pre = self.prelude(h, cos, sin, mask, past_key_values, slot)
        slot += cfg.prelude_layers
        x, state = self.connection.start(h, h_pre)
        exits = EarlyExit(threshold, x) if threshold is not None else None
        for t in range(k):
            h_core = self.core(x, cos, sin, mask, past_key_values, slot)
            slot += cfg.core_layers
            x_new, state = self.connection.step(t, x, h_core, state, last=t == k - 1)
            x = exits.step(x, x_new) if exits is not None else x_new
            # All tokens out: the rest changes nothing, but with a cache its slots must still be filled.
            if exits is not None and past_key_values is None and t < k - 1 and exits.all_exited():
                slot += cfg.core_layers * (k - 1 - t)
                break
        self.loops_per_token = exits.loops if exits is not None else torch.full((b, s), k, dtype=torch.long, device=h.device)
        self._count_loops(attention_mask, s)
        x = self.coda(x, cos, sin, mask, past_key_values, slot)
        return self.final_layer_norm(x)

    def _count_loops(self, attention_mask, s):
        # Tensors, not Python ints: no host sync per decoding step.
        loops = self.loops_per_token
        if attention_mask is not None:
            loops = loops * attention_mask[:, -s:].to(loops.dtype)  # padding counts neither loops nor tokens
        tokens = attention_mask[:, -s:].sum() if attention_mask is not None else loops.new_tensor(loops.numel())
        self.exit_stats["tokens"] = self.exit_stats["tokens"] + tokens.to(loops.device)
        self.exit_stats["loops"] = self.exit_stats["loops"] + loops.sum()

    @property
    def average_loops_per_token(self) -> float | None:
        """Mean loop iterations per (non-padding) token over every forward since the last `reset_exit_stats()`."""
        tokens = int(self.exit_stats["tokens"])
        return float(self.exit_stats["loops"]) / tokens if tokens else None

    def reset_exit_stats(self):
        """Zero the running token / loop counts behind `average_loops_per_token`."""
        self.exit_stats = {"tokens": 0, "loops": 0}


@dataclass
class MeshGPTCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus `loops_per_token` [b, s]: loop iterations that updated each input token."""

    loops_per_token: torch.LongTensor | None = None


class MeshGPTForCausalLM(MeshGPTPreTrainedModel, GenerationMixin):
    def __init__(self, config: MeshGPTConfig):
        super().__init__(config)
        self.model = MeshGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_in

    def set_input_embeddings(self, value):
        self.model.embed_in = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_loops: int | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        exit_threshold: float | None = None,
        **kwargs,
    ) -> MeshGPTCausalLMOutput:
        """`num_loops` overrides the config's (load-time) loop count for this call, `exit_threshold` its early-exit
        threshold (0: off for this call); the output's `loops_per_token` reports the loops each token ran."""
        if input_ids is None:
            raise ValueError("MeshGPTForCausalLM needs input_ids (inputs_embeds are not supported)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if not use_cache:
            past_key_values = None
        h = self.model(input_ids, attention_mask, position_ids, past_key_values, num_loops, exit_threshold)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return MeshGPTCausalLMOutput(loss=loss, logits=logits, past_key_values=past_key_values,
                                     loops_per_token=self.model.loops_per_token)


__all__ = ["MeshGPTCausalLMOutput", "MeshGPTForCausalLM", "MeshGPTModel", "MeshGPTPreTrainedModel"]
