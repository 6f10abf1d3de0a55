"""MeSH: the memory buffer and its per-step read/write routers (paper §2; docs/paper.md §2).

    buffer      M = {m_0 .. m_{B-1}},   m_0 = h_emb,  m_{b>0} = 0                       (Eq. 2)
    routers     w_write^(t) = softmax(W_write^(t) h^(t)),  w_read^(t) = softmax(W_read^(t) h^(t))   (Eq. 3)
    core        h_m^(t) = f_core(h^(t))                                                  (Eq. 4)
    write       m_b <- m_b + w_write,b^(t) * h_m^(t)      (additive, every slot)          (Eq. 5)
    read        h^(t+1) = sum_b w_read,b^(t) * m_b        (reads the *updated* buffer)

Router pair 0 is the transitional write/read of the prelude output (query and value both h_pre) that makes h^(0);
pairs 1..K belong to the K loop iterations, queried by the core *input* h^(t). The read of the last iteration is
the "final read" that feeds the coda. That gives (K+1) x 2 x (D B + B) router parameters: 61,470 at 1.4B, as in the
paper's Table 5.

Routers are plain replicated `nn.Linear`s (D -> B, with bias): tiny, so every TP rank holds the full router and
computes the same weights from the same (full-hidden) activations. The softmax runs in fp32.

Pure torch, no project imports: the training model uses this file and every MeSH export ships it unchanged. It acts
per token, so it does not care whether activations are [seq, batch, hidden] (training) or [batch, seq, hidden] (HF).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def default_router_std(hidden_size: int) -> float:
    # Not stated in the paper; GPT-NeoX small_init sigma, truncated at 3 sigma, zero bias (as the 3rd-party port).
    return math.sqrt(2.0 / (5.0 * hidden_size))


def make_router(hidden_size: int, num_slots: int, std: float, dtype: torch.dtype | None) -> nn.Linear:
    lin = nn.Linear(hidden_size, num_slots, bias=True, dtype=dtype)
    nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
    nn.init.zeros_(lin.bias)
    return lin


def write(mem: torch.Tensor, value: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mem [B, s, b, d] + value [s, b, d] scaled per token and slot by w [s, b, B]."""
    return mem + value.unsqueeze(0) * w.permute(2, 0, 1).unsqueeze(-1)


def read(mem: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_b w[..., b] * mem[b]: [s, b, d]."""
    return (mem * w.permute(2, 0, 1).unsqueeze(-1)).sum(dim=0)


def write_read(mem: torch.Tensor, value: torch.Tensor, ww: torch.Tensor, wr: torch.Tensor, need_buffer: bool = True):
    """write() then read() of the updated buffer, in fewer passes over the buffer (the paper's Eq. 6 form):

        h = sum_b wr_b m_b  +  (sum_b wr_b ww_b) * value        (old buffer + gated value)

    Plain write-then-read streams the [B, s, b, d] buffer three times (read, write, read back); this streams it
    once for the read and once for the write, and not at all for the write when the updated buffer is not needed
    again (the final read before the coda). Same function up to float summation order (tests/test_model.py).
    """
    h = read(mem, wr) + (wr * ww).sum(dim=-1, keepdim=True) * value
    return (write(mem, value, ww) if need_buffer else None), h


class MeshConnection(nn.Module):
    """The MeSH hand-off between loop iterations; state is the buffer, carried only within one forward."""

    def __init__(self, hidden_size: int, num_loops: int, num_slots: int, router_std: float | None = None,
                 dtype: torch.dtype | None = None):
        """`num_loops`: K at training (router pairs = K + 1); `router_std`: init sigma, default GPT-NeoX small_init."""
        super().__init__()
        self.num_slots = num_slots
        steps = num_loops + 1  # transitional pair + one pair per trained loop iteration
        std = default_router_std(hidden_size) if router_std is None else router_std
        self.write_routers = nn.ModuleList(make_router(hidden_size, num_slots, std, dtype) for _ in range(steps))
        self.read_routers = nn.ModuleList(make_router(hidden_size, num_slots, std, dtype) for _ in range(steps))
        # Analysis / test hook: {step: (w_write [B], w_read [B])} replaces the routers' softmax at that step with
        # fixed per-slot weights (any real numbers), e.g. to show the buffer reproduces the fixed heuristics.
        self.forced_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _router_index(self, step: int) -> int:
        # Run with more loops than trained: the extra iterations reuse the last trained loop's routers.
        return min(step, len(self.write_routers) - 1)

    def weights(self, step: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.forced_weights is not None and step in self.forced_weights:
            ww, wr = self.forced_weights[step]
            shape = (*query.shape[:-1], self.num_slots)
            return ww.to(query).expand(shape), wr.to(query).expand(shape)
        i = self._router_index(step)
        ww = torch.softmax(self.write_routers[i](query).float(), dim=-1).to(query.dtype)
        wr = torch.softmax(self.read_routers[i](query).float(), dim=-1).to(query.dtype)
        return ww, wr

    def _cycle(self, step: int, mem: torch.Tensor, query: torch.Tensor, value: torch.Tensor, record, last: bool = False):
        ww, wr = self.weights(step, query)
        mem, h = write_read(mem, value, ww, wr, need_buffer=not last)
        if record is not None:
            record.append((f"mesh.write.{step}", ww.detach()))
            record.append((f"mesh.read.{step}", wr.detach()))
        return h, mem

    def start(self, h_emb: torch.Tensor, h_pre: torch.Tensor, record=None):
        """Eq. 2 buffer init, then the transitional write/read of the prelude output -> h^(0)."""
        mem = torch.cat([h_emb.unsqueeze(0), h_emb.new_zeros(self.num_slots - 1, *h_emb.shape)], dim=0)
        return self._cycle(0, mem, h_pre, h_pre, record)

    def step(self, t: int, h: torch.Tensor, h_core: torch.Tensor, mem: torch.Tensor, record=None, last: bool = False):
        """Loop iteration t: routers read h^(t) (the core input), the core output h_m^(t) is written, then read.
        `last`: this is the final read, so the updated buffer is not materialised."""
        return self._cycle(t + 1, mem, h, h_core, record, last)
