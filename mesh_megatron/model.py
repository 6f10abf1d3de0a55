"""The language model: embeddings -> Prelude -> (Core, connection) x K -> Coda -> LN -> LM head.

Vanilla Pythia is the degenerate case with no loop (all layers in one unshared stack). The core is one
`Stack` called K times, so its weights exist once (one parameter, one checkpoint entry) however many loops run,
and K can be changed per call (`num_loops=`) at inference.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from torch import nn

from mesh_megatron import sequence_parallel
from mesh_megatron.config import ConfigError, ModelConfig
from mesh_megatron.rng import checkpoint
from mesh_megatron.layers import Stack, drawn_by_weight_init, layer_norm, megatron_config, rotary_freqs, torch_dtype
from mesh_megatron.standalone.connections import EarlyExit, build_connection, check_exit_threshold
from mesh_megatron.weight_init import initialize_parallel_weights


class MeshGPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("call pretrain.distributed.initialize_parallel(tp) before building the model")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        cfg.validate_parallel(tp)
        if cfg.sequence_parallel and tp > 1 and not sequence_parallel.buffers_allocatable():
            raise ConfigError(
                "model.sequence_parallel: needs CUDA (megatron-core's sequence-parallel all-gather / reduce-scatter "
                "allocate on the GPU); set it to false on CPU"
            )
        self.cfg = cfg
        self.tp_size = tp
        self.sequence_parallel = cfg.sequence_parallel and tp > 1
        mcfg = megatron_config(cfg, tp)
        dtype = torch_dtype(cfg.params_dtype)

        self.embed = tensor_parallel.VocabParallelEmbedding(
            cfg.padded_vocab_size, cfg.hidden_size, init_method=drawn_by_weight_init, config=mcfg,
            reduce_scatter_embeddings=self.sequence_parallel,
        )
        per_layer = cfg.recompute == "layer"
        if cfg.arch == "vanilla":
            self.layers = Stack(cfg, mcfg, tp, cfg.num_layers, per_layer)
        else:
            self.prelude = Stack(cfg, mcfg, tp, cfg.prelude_layers, per_layer)
            self.core = Stack(cfg, mcfg, tp, cfg.core_layers, per_layer)
            self.coda = Stack(cfg, mcfg, tp, cfg.coda_layers, per_layer)
            self.connection = build_connection(
                cfg.arch, cfg.connection, cfg.hidden_size, cfg.num_loops,
                num_slots=cfg.num_slots if cfg.arch == "mesh" else None, router_std=cfg.router_init_std, dtype=dtype,
            )
        self.final_ln = layer_norm(cfg)
        # Untied output embedding (Pythia); vocab split over TP ranks, logits stay split for the parallel CE.
        self.lm_head = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, cfg.padded_vocab_size, config=mcfg, init_method=drawn_by_weight_init, bias=False,
            gather_output=False,
        )
        # Every rank fills only its own shards, on their device; the same seed gives the same model at any TP size.
        initialize_parallel_weights(self, cfg)
        self._in_grad_summing_call = False

    # ------------------------------------------------------------------------------------------------
    def replicated_parameters(self) -> dict[str, torch.Tensor]:
        """Parameters every TP rank holds in full (must stay identical across TP ranks)."""
        return {n: p for n, p in self.named_parameters() if not getattr(p, "tensor_model_parallel", False)}

    # ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_loops: int | None = None,
        record: list | None = None,
        grad_loops: int | None = None,
        exit_threshold: float | None = None,
    ) -> torch.Tensor:
        """input_ids [b, s] -> per-token loss [b, s] (fp32) if labels are given, else TP-local logits [b, s, V/tp].

        `num_loops` overrides K for this call. `record`, if a list, receives (name, tensor) pairs of the states
        along the way (embeddings, loop inputs/outputs, router weights) for the probing diagnostics.
        `grad_loops` (truncated backprop, training): only the last `grad_loops` core iterations keep their graph; the
        earlier ones run the core without it (no activations kept), their outputs entering the connection as
        constants. The connections keep theirs (cheap), so gradients still reach the prelude through the paths that
        bypass the core: MeSH's buffer, the anchor / residual hand-offs (not the `base` connection's).
        `exit_threshold` (None or 0: off): per-token early exit (docs/architecture.md "Early exit"); a token whose
        state changes by less than this (relative) in an iteration keeps that state for the rest of the loop. `record`
        then also gets "loops_per_token" [b, s] and "exit_change.<t>" [b, s] (this rank's tokens under SP).
        """
        if self.sequence_parallel and torch.is_grad_enabled() and not self._in_grad_summing_call:
            # Replicated parameters see this rank's slice of the sequence: their gradients are summed over TP ranks.
            self._in_grad_summing_call = True
            try:
                return sequence_parallel.call_with_replicated_grads_summed(
                    self, self.replicated_parameters(), parallel_state.get_tensor_model_parallel_group(),
                    (input_ids, labels),
                    dict(num_loops=num_loops, record=record, grad_loops=grad_loops, exit_threshold=exit_threshold))
            finally:
                self._in_grad_summing_call = False
        cfg = self.cfg
        k = cfg.num_loops if num_loops is None else num_loops
        if cfg.arch != "vanilla" and k < 1:
            raise ValueError(f"num_loops must be >= 1, got {k}")
        h = self.embed(input_ids)
        if not self.sequence_parallel:
            h = h.transpose(0, 1).contiguous()  # [s, b, d]; under SP the embedding already returns [s/tp, b, d]
        if cfg.scale_embeddings:
            h = h * math.sqrt(cfg.hidden_size)
        freqs = rotary_freqs(cfg, input_ids.shape[1], h.device)
        rec = record is not None and record.append
        if rec:
            rec(("h_emb", h.detach()))

        if cfg.arch == "vanilla":
            h = self.layers(h, freqs)
        else:
            h_emb = h
            h_pre = self.prelude(h_emb, freqs)
            h, state = self.connection.start(h_emb, h_pre, record)
            if rec:
                rec(("h_pre", h_pre.detach()))
                rec(("h_loop.0", h.detach()))
            first_grad = 0 if grad_loops is None else max(0, k - grad_loops)
            threshold = check_exit_threshold(exit_threshold)
            exits = EarlyExit(threshold, h) if threshold is not None else None
            for t in range(k):
                if t < first_grad:
                    with torch.no_grad():
                        h_core = self.core(h, freqs)
                elif cfg.recompute == "loop" and torch.is_grad_enabled():
                    h_core = checkpoint(self.core, h, freqs)
                else:
                    h_core = self.core(h, freqs)
                h_in = h
                h, state = self.connection.step(t, h, h_core, state, record, last=t == k - 1)
                if exits is not None:
                    h = exits.step(h_in, h)
                if rec:
                    rec((f"h_core.{t}", h_core.detach()))
                    rec((f"h_loop.{t + 1}", h.detach()))
                    if exits is not None:
                        rec((f"exit_change.{t}", exits.change.t()))
                # Once every token is out the rest changes nothing; stop (not under SP: ranks hold different tokens
                # and must run the same collectives; not when recording: the probe reads every iteration's state).
                if (exits is not None and not self.sequence_parallel and not rec and t < k - 1
                        and exits.all_exited()):
                    break
            if rec and exits is not None:
                rec(("loops_per_token", exits.loops.t()))
            h = self.coda(h, freqs)
        if rec:
            rec(("h_out", h.detach()))

        logits, _ = self.lm_head(self.final_ln(h))  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()

    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """TP-local [b, s, V/tp] -> full [b, s, V] (padded vocab)."""
        if self.tp_size == 1:
            return local_logits
        # (megatron-core's gather_from_tensor_model_parallel_region allocates on CUDA; this runs on gloo too.)
        parts = [torch.empty_like(local_logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, local_logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=-1)
