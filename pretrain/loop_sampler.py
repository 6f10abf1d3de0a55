"""The loop count K of each training step, drawn from a distribution (`train.num_loops_train`).

A recursive model's compute depth is a dial; training at one fixed K teaches it one setting. Sampling K per step
(Huginn, recurrent-depth pretraining, draws it from a log-normal Poisson) trains the model to use any K in a range.

The draw is a pure function of (train.seed, step): every rank of a step runs the same K (TP and DP ranks must agree)
and a resumed run continues the same sequence of K, so exact resume holds without any RNG state in the checkpoint.

Specs:
    fixed                       model.num_loops every step (the default; the paper's setup)
    uniform:A-B                 K uniform on A..B (inclusive)
    poisson:MEAN                K = 1 + Poisson(MEAN - 1): mean MEAN, at least 1
    lognormal-poisson:MEAN[:S]  Huginn's: K = 1 + Poisson(exp(N(log(MEAN - 1) - S^2/2, S))), S default 0.5: mean
                                MEAN, a heavier tail than Poisson
Every draw is capped at train.num_loops_max. Iterations beyond model.num_loops reuse the last trained loop's router
pair (MeSH; mesh_megatron/standalone/mesh.py), as at inference: docs/results.md, "Loop depth as a dial".
"""

from __future__ import annotations

import math
import re

import numpy as np

from mesh_megatron.config import ConfigError

_SPEC = re.compile(r"^(fixed|uniform:(\d+)-(\d+)|poisson:([\d.]+)|lognormal-poisson:([\d.]+)(?::([\d.]+))?)$")
_STREAM = 0x4C4F4F50  # "LOOP": keeps this draw independent of every other use of the seed


def parse(spec: str, field: str = "train.num_loops_train") -> tuple:
    """('fixed',) | ('uniform', a, b) | ('poisson', mean) | ('lognormal-poisson', mean, sigma); one-line error."""
    m = _SPEC.match(str(spec).strip())
    if not m:
        raise ConfigError(f"{field}: '{spec}' is not a loop-count distribution; use fixed, uniform:A-B, poisson:MEAN "
                          "or lognormal-poisson:MEAN[:SIGMA] (e.g. uniform:1-4)")
    if m.group(1) == "fixed":
        return ("fixed",)
    if m.group(2) is not None:
        a, b = int(m.group(2)), int(m.group(3))
        if not 1 <= a <= b:
            raise ConfigError(f"{field}: uniform:{a}-{b} needs 1 <= A <= B")
        return ("uniform", a, b)
    mean = float(m.group(4) or m.group(5))
    if mean < 1:
        raise ConfigError(f"{field}: the mean loop count must be >= 1, got {mean:g}")
    if m.group(4) is not None:
        return ("poisson", mean)
    sigma = float(m.group(6)) if m.group(6) else 0.5
    return ("lognormal-poisson", mean, sigma)


class LoopSampler:
    """K for each step: `k(step)`; `fixed` is True when every step runs model.num_loops."""

    def __init__(self, spec: str, seed: int, num_loops: int, cap: int | None = None) -> None:
        self.dist, self.seed, self.num_loops = parse(spec), seed, num_loops
        self.fixed = self.dist[0] == "fixed"
        if cap is None:
            cap = self.dist[2] if self.dist[0] == "uniform" else math.ceil(4 * self.dist[1]) if not self.fixed else num_loops
        self.cap = cap

    def k(self, step: int) -> int:
        kind = self.dist[0]
        if kind == "fixed":
            return self.num_loops
        rng = np.random.default_rng([self.seed, step, _STREAM])
        if kind == "uniform":
            k = int(rng.integers(self.dist[1], self.dist[2] + 1))
        elif kind == "poisson":
            k = 1 + int(rng.poisson(self.dist[1] - 1))
        else:
            mean, sigma = self.dist[1], self.dist[2]
            if mean == 1:
                k = 1
            else:
                rate = math.exp(rng.normal(math.log(mean - 1) - sigma ** 2 / 2, sigma))
                k = 1 + int(rng.poisson(rate))
        return max(1, min(k, self.cap))
