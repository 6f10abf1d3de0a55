"""Run a model over token windows with `record=[]` and reduce every sample's states to the paper's statistics.

States probed (paper §3; docs/paper.md §6): h_emb, h^(0) (loop input), h^(1..K) (after each iteration;
for MeSH after the read), h_out (coda output before the final LayerNorm). A vanilla model has no loop: its states are
the embeddings and every layer's output (forward hooks), as a reference.

Skew blocks: prelude (h_emb -> h_pre), each core iteration (h^(t) -> f_core(h^(t)) = h_core.t), each full
transition (h^(t) -> h^(t+1), which differs from the core block for anchor / MeSH: the paper does not say which one
it plots, so both are reported), coda (h^(K) -> h_out). Vanilla: one block per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from mesh_tools.probe import metrics as M


@dataclass
class _Acc:
    """Per-sample values of one statistic; reduced to mean/std at the end."""
    values: list = field(default_factory=list)

    def add(self, v) -> None:
        self.values.append(np.asarray(v, dtype=np.float64))

    def reduce(self) -> dict:
        a = np.stack(self.values)
        with np.errstate(invalid="ignore"):
            mean, std = np.nanmean(a, axis=0), np.nanstd(a, axis=0)
        return {"mean": _tolist(mean), "std": _tolist(std), "n": int(a.shape[0])}


def _tolist(a: np.ndarray):
    a = np.where(np.isfinite(a), a, np.nan)
    out = a.tolist()
    return _nan_to_none(out)


def _nan_to_none(x):
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def state_plan(cfg, num_loops: int) -> dict:
    """Which recorded tensors are the probed states and the skew blocks, with display labels."""
    if cfg.arch == "vanilla":
        n = cfg.num_layers
        states = [("h_emb", "emb")] + [(f"layer.{i}", f"L{i + 1}") for i in range(n - 1)] + [("h_out", "out")]
        inputs = ["h_emb"] + [f"layer.{i}" for i in range(n - 1)]
        outputs = [f"layer.{i}" for i in range(n - 1)] + ["h_out"]
        blocks = [(f"layer {i + 1}", a, b) for i, (a, b) in enumerate(zip(inputs, outputs))]
        return {"states": states, "blocks": blocks, "transitions": []}
    states = [("h_emb", "emb")] + [(f"h_loop.{t}", f"h{t}") for t in range(num_loops + 1)] + [("h_out", "out")]
    blocks = [("prelude", "h_emb", "h_pre")]
    blocks += [(f"loop {t + 1}", f"h_loop.{t}", f"h_core.{t}") for t in range(num_loops)]
    blocks += [("coda", f"h_loop.{num_loops}", "h_out")]
    transitions = [(f"h{t}->h{t + 1}", f"h_loop.{t}", f"h_loop.{t + 1}") for t in range(num_loops)]
    return {"states": states, "blocks": blocks, "transitions": transitions}


def _vanilla_hooks(model, record: list):
    handles = []
    layers = list(model.layers)
    for i, layer in enumerate(layers[:-1]):
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: record.append((f"layer.{i}", out.detach()))))
    return handles


@torch.no_grad()
def probe(model, windows: torch.Tensor, batch_size: int = 8, num_loops: int | None = None, top_k: int = 50,
          device: str | torch.device = "cpu", progress: bool = True, exit_threshold: float | None = None) -> dict:
    """windows Long[n, s+1] -> statistics dict (see mesh_tools.probe.cli for the JSON layout)."""
    cfg = model.cfg
    k = cfg.num_loops if num_loops is None else num_loops
    plan = state_plan(cfg, k)
    names = [n for n, _ in plan["states"]]
    acc: dict[str, _Acc] = {}

    def add(key, v):
        acc.setdefault(key, _Acc()).add(v)

    route_keys: list[str] = []
    model.eval()
    it = range(0, windows.shape[0], batch_size)
    for start in tqdm(it, desc="probe", unit="batch", disable=not progress):
        batch = windows[start:start + batch_size].to(device)
        record: list = []
        handles = _vanilla_hooks(model, record) if cfg.arch == "vanilla" else []
        try:
            looped = {} if cfg.arch == "vanilla" else {"num_loops": k, "exit_threshold": exit_threshold}
            loss = model(batch[:, :-1], labels=batch[:, 1:], record=record, **looped)
        finally:
            for h in handles:
                h.remove()
        rec = dict(record)
        missing = [n for n in names + [b for _, a, b in plan["blocks"]] if n not in rec]
        if missing:
            raise RuntimeError(f"the model did not record {missing}; is it a mesh_megatron MeshGPTModel?")
        for j in range(batch.shape[0]):
            add("loss", float(loss[j].float().mean()))
            if "loops_per_token" in rec:  # early exit: the states after a token's exit are its carried state
                add("loops_per_token", float(rec["loops_per_token"][:, j].float().mean()))
            states = [rec[n][:, j, :] for n in names]
            add("cka_rbf", M.cka_matrix(states, "rbf").cpu().numpy())
            add("cka_linear", M.cka_matrix(states, "linear").cpu().numpy())
            for n, s in zip(names, states):
                sv = M.singular_values(s)
                # min(top_k, tokens, hidden) values: every sample of a run has the same length
                spec = (sv[:top_k] / sv[0]).cpu().numpy() if sv[0] > 0 else np.zeros(min(top_k, sv.numel()))
                add(f"spectrum:{n}", spec)
                add(f"erank:{n}", M.effective_rank(sv))
            for label, a, b in plan["blocks"] + plan["transitions"]:
                add(f"skew:{label}", M.skew(rec[a][:, j, :], rec[b][:, j, :]))
            for key, w in rec.items():
                if key.startswith("mesh."):
                    if key not in route_keys:
                        route_keys.append(key)
                    wj = w[:, j, :].double()
                    add(f"route:{key}", wj.mean(dim=0).cpu().numpy())
                    ent = -(wj.clamp_min(1e-30).log() * wj).sum(-1).mean()
                    add(f"route_entropy:{key}", float(ent))

    labels = [l for _, l in plan["states"]]
    out: dict = {
        "num_loops": None if cfg.arch == "vanilla" else k,
        "exit_threshold": exit_threshold,
        "loops_per_token": acc["loops_per_token"].reduce() if "loops_per_token" in acc else None,
        "states": names,
        "state_labels": labels,
        "loss": acc["loss"].reduce(),
        "cka_rbf": acc["cka_rbf"].reduce(),
        "cka_linear": acc["cka_linear"].reduce(),
        "spectrum": {n: acc[f"spectrum:{n}"].reduce() for n in names},
        "effective_rank": {n: acc[f"erank:{n}"].reduce() for n in names},
        "skew": [{"block": label, "input": a, "output": b, **acc[f"skew:{label}"].reduce()} for label, a, b in plan["blocks"]],
        "skew_transitions": [{"block": label, "input": a, "output": b, **acc[f"skew:{label}"].reduce()}
                             for label, a, b in plan["transitions"]],
    }
    out["loss"]["ppl"] = math.exp(min(out["loss"]["mean"], 50.0))
    out["cka_consecutive"] = {
        kern: [{"pair": [labels[i], labels[i + 1]], "mean": out[f"cka_{kern}"]["mean"][i][i + 1],
                "std": out[f"cka_{kern}"]["std"][i][i + 1]} for i in range(len(names) - 1)]
        for kern in ("rbf", "linear")
    }
    if route_keys:
        steps = sorted({int(k.rsplit(".", 1)[1]) for k in route_keys})
        out["routing"] = {
            "steps": steps,
            "step_labels": ["transitional" if s == 0 else f"loop {s}" for s in steps],
            "slots": int(cfg.num_slots),
            **{f"{kind}_{stat}": [acc[f"route:mesh.{kind}.{s}"].reduce()[stat] for s in steps]
               for kind in ("write", "read") for stat in ("mean", "std")},
            **{f"{kind}_entropy": [acc[f"route_entropy:mesh.{kind}.{s}"].reduce()["mean"] for s in steps]
               for kind in ("write", "read")},
        }
    else:
        out["routing"] = None
    return out
