"""How one loop iteration hands its state to the next: the paper's baselines (docs/paper.md §3).

General form (Eq. 1): h^(t+1) = f_core(h^(t)) + h_sup^(t), h^(0) = f_pre(h_emb).

    base         h_sup = 0
    residual     h_sup = h^(t)          (doubles the identity path: f_core has its own residual stream)
    anchor       h_sup = h^(0)          (the prelude output, the state entering the loop)
    anchor_star  h_sup = h_emb          (raw token embeddings)
    a+b          the sum of the named supplements (Table 4 ablations)
    static_comb  h^(t+1) = a1 f_core(h^(t)) + a2 h^(0) + a3 h_emb, trainable scalars (Ng & Wang 2024)
    dynamic_comb the same, with (a1, a2, a3) per token from a per-iteration linear map of h^(t)

Every connection has the same two-call interface as MeshConnection: start(h_emb, h_pre) -> (h^(0), state) and
step(t, h, h_core, state) -> (h^(t+1), state), so the model's loop is one piece of code for all of them.

Pure torch, no project imports (only the sibling mesh.py, relatively): the training model and every recursive / MeSH
export use this same file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .connection_names import CONNECTIONS
from .mesh import MeshConnection


@dataclass
class LoopInputs:
    h_emb: torch.Tensor
    h0: torch.Tensor


class SupplementConnection(nn.Module):
    """base / residual / anchor / anchor_star and their sums: no parameters."""

    def __init__(self, supplements: tuple[str, ...]):
        super().__init__()
        self.supplements = supplements

    def start(self, h_emb, h_pre, record=None):
        return h_pre, LoopInputs(h_emb=h_emb, h0=h_pre)

    def step(self, t, h, h_core, state: LoopInputs, record=None, last=False):
        out = h_core
        for s in self.supplements:
            out = out + {"residual": h, "anchor": state.h0, "anchor_star": state.h_emb}[s]
        return out, state


class StaticCombConnection(nn.Module):
    """Trainable scalars (a1, a2, a3); initialised to (1, 0, 0), i.e. starting as the base recursion."""

    def __init__(self, dtype: torch.dtype | None = None):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([1.0, 0.0, 0.0], dtype=dtype))

    def start(self, h_emb, h_pre, record=None):
        return h_pre, LoopInputs(h_emb=h_emb, h0=h_pre)

    def step(self, t, h, h_core, state: LoopInputs, record=None, last=False):
        a = self.alpha
        return a[0] * h_core + a[1] * state.h0 + a[2] * state.h_emb, state


class DynamicCombConnection(nn.Module):
    """Per-token (a1, a2, a3) = W^(t) h^(t) + b^(t). The paper gives no functional form; this is our choice:
    one linear map per trained iteration (extra inference loops reuse the last), W = 0 and b = (1, 0, 0) at init."""

    def __init__(self, hidden_size: int, num_loops: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(hidden_size, 3, dtype=dtype) for _ in range(num_loops))
        for g in self.gates:
            nn.init.zeros_(g.weight)
            with torch.no_grad():
                g.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))

    def start(self, h_emb, h_pre, record=None):
        return h_pre, LoopInputs(h_emb=h_emb, h0=h_pre)

    def step(self, t, h, h_core, state: LoopInputs, record=None, last=False):
        a = self.gates[min(t, len(self.gates) - 1)](h).unsqueeze(-1)  # [s, b, 3, 1]
        return a[..., 0, :] * h_core + a[..., 1, :] * state.h0 + a[..., 2, :] * state.h_emb, state


def build_connection(arch: str, connection: str, hidden_size: int, num_loops: int, num_slots: int | None = None,
                     router_std: float | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The hand-off between loop iterations: MeSH for `arch` "mesh", else the named baseline `connection`.

    `num_loops` is K at training: it fixes how many per-iteration routers / gates exist (more loops at inference reuse
    the last). `num_slots` and `router_std` are MeSH's (None: GPT-NeoX small_init sigma)."""
    if arch == "mesh":
        if num_slots is None:
            raise ValueError("build_connection: arch 'mesh' needs num_slots")
        return MeshConnection(hidden_size, num_loops, num_slots, router_std=router_std, dtype=dtype)
    if arch != "recursive":
        raise ValueError(f"build_connection: arch must be 'recursive' or 'mesh', got {arch!r}")
    if connection not in CONNECTIONS:
        raise ValueError(f"build_connection: unknown connection {connection!r}; choose one of {CONNECTIONS}")
    if connection == "static_comb":
        return StaticCombConnection(dtype)
    if connection == "dynamic_comb":
        return DynamicCombConnection(hidden_size, num_loops, dtype)
    if connection == "base":
        return SupplementConnection(())
    return SupplementConnection(tuple(connection.split("+")))


# --- per-token early exit (docs/architecture.md "Early exit") ----------------------------------------------------------


def relative_change(h_old: torch.Tensor, h_new: torch.Tensor) -> torch.Tensor:
    """Per token ||h_new - h_old|| / ||h_old|| over the hidden (last) dim, in fp32: [..., d] -> [...]."""
    old = h_old.float()
    return (h_new.float() - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)


def check_exit_threshold(threshold) -> float | None:
    """The early-exit switch: None or 0 -> None (off); else a number >= 0 (inf: every token exits after one loop)."""
    if threshold is None:
        return None
    value = float(threshold)
    if value != value or value < 0:  # NaN or negative
        raise ValueError(f"exit_threshold must be None (off) or a number >= 0, got {threshold!r}")
    return value or None


class EarlyExit:
    """Tracks which tokens have left the loop. A token exits after the first iteration whose relative change of its
    state, ||h^(t+1) - h^(t)|| / ||h^(t)||, is below `threshold`; from then on its state is carried unchanged, so the
    dense loop still runs the core on it (its K/V in later iterations come from the carried state) while its value
    reaching the coda is the one it exited with. The connection's own state (MeSH buffer) needs no freezing: it is
    per token and reaches the token only through the new state, which is discarded.

    Layout-agnostic: token dims are every dim but the last ([s, b] in training, [b, s] in the HF model)."""

    def __init__(self, threshold: float, h0: torch.Tensor):
        self.threshold = threshold
        self.exited = torch.zeros(h0.shape[:-1], dtype=torch.bool, device=h0.device)
        self.loops = torch.zeros(h0.shape[:-1], dtype=torch.long, device=h0.device)  # iterations that updated a token
        self.change: torch.Tensor | None = None  # this iteration's relative change (of the candidate state)

    def step(self, h_old: torch.Tensor, h_new: torch.Tensor) -> torch.Tensor:
        """One loop iteration's hand-off -> the next state, with the already-exited tokens held at their old one."""
        frozen = self.exited
        self.loops += (~frozen).long()
        self.change = relative_change(h_old, h_new)
        self.exited = frozen | (self.change < self.threshold)  # monotone: an exited token stays exited
        return torch.where(frozen.unsqueeze(-1), h_old, h_new)

    def all_exited(self) -> bool:
        return bool(self.exited.all())
