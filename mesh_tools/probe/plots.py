"""Figures from one or more `mesh-probe` result dicts, one panel (column) per model like the paper's Figs. 3-5:
skew bars (Fig. 3), CKA heatmaps (Fig. 4), normalised singular-value spectra on a log axis (Fig. 5), plus MeSH
routing heatmaps and a consecutive-CKA summary. Every file is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on training/CI machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _arr(x) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in x], dtype=float) if x and isinstance(x[0], list) \
        else np.array([np.nan if v is None else v for v in x], dtype=float)


def save_fig(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _title(r: dict, name: str) -> str:
    layout = str(r.get("model", {}).get("layout", ""))
    return f"{name}\n{layout} layers" if layout.isdigit() else f"{name}\n{layout}"


def plot_skew(results: list[dict], names: list[str], path: Path) -> Path:
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.6, 3.2), sharey=True, squeeze=False, layout="constrained")
    for ax, r, name in zip(axes[0], results, names):
        sk = r["skew"]
        x = np.arange(len(sk))
        means = [s["mean"] for s in sk]
        stds = [s["std"] for s in sk]
        colors = ["#8c8c8c" if s["block"] in ("prelude", "coda") else "#3b75af" for s in sk]
        ax.bar(x, means, yerr=stds, color=colors, capsize=3)
        tr = r.get("skew_transitions") or []
        if tr:  # h^(t) -> h^(t+1) transitions, drawn over the loop bars they belong to
            lx = [i for i, s in enumerate(sk) if s["block"].startswith("loop")]
            ax.scatter(lx[: len(tr)], [t["mean"] for t in tr], marker="_", s=300, color="#d1495b", zorder=3,
                       label="h(t)→h(t+1)")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_xticks(x, [s["block"] for s in sk], rotation=45 if len(sk) > 6 else 0, fontsize=8)
        ax.set_title(_title(r, name), fontsize=9)
    axes[0][0].set_ylabel("relative update norm r")
    fig.suptitle("Computation skew: 2‖f(h)−h‖ / (‖f(h)‖+‖h‖), mean ± std over samples", fontsize=10)
    return save_fig(fig, path)


def plot_cka(results: list[dict], names: list[str], path: Path) -> Path:
    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(3.4 * n + 0.6, 6.6), squeeze=False, layout="constrained")
    for col, (r, name) in enumerate(zip(results, names)):
        labels = r["state_labels"]
        for row, kern in enumerate(("rbf", "linear")):
            ax = axes[row][col]
            m = _arr(r[f"cka_{kern}"]["mean"])
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            if len(labels) <= 10:
                _annotate(ax, m, dark_below=0.6)
            ax.set_title((_title(r, name) + "\n" if row == 0 else "") + f"{kern} CKA", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.suptitle("CKA between states (tokens as examples; per sample, averaged)", fontsize=10)
    return save_fig(fig, path)


def _annotate(ax, m: np.ndarray, dark_below: float) -> None:
    """Write each finite cell's value on a heatmap, white on the dark end of the colour map."""
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] < dark_below else "black")


def plot_spectrum(results: list[dict], names: list[str], path: Path) -> Path:
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 0.6, 3.4), sharey=True, squeeze=False, layout="constrained")
    for ax, r, name in zip(axes[0], results, names):
        cmap = plt.get_cmap("plasma")
        states = r["states"]
        for i, (s, label) in enumerate(zip(states, r["state_labels"])):
            sp = r["spectrum"][s]
            mean, std = _arr(sp["mean"]), _arr(sp["std"])
            x = np.arange(mean.size)
            er = r["effective_rank"][s]["mean"]
            c = cmap(i / max(1, len(states) - 1) * 0.9)
            ax.plot(x, mean, color=c, lw=1.3, label=f"{label} (erank {er:.1f})")
            ax.fill_between(x, np.clip(mean - std, 1e-6, None), mean + std, color=c, alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel("singular value index i", fontsize=8)
        ax.set_title(_title(r, name), fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("σ_i / σ_0")
    fig.suptitle("Normalised singular-value spectrum of each state (mean ± std over samples)", fontsize=10)
    return save_fig(fig, path)


def plot_routing(results: list[dict], names: list[str], path: Path) -> Path | None:
    mesh = [(r, nm) for r, nm in zip(results, names) if r.get("routing")]
    if not mesh:
        return None
    n = len(mesh)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n + 0.6, 5.6), squeeze=False, layout="constrained")
    for col, (r, name) in enumerate(mesh):
        ro = r["routing"]
        for row, kind in enumerate(("write", "read")):
            ax = axes[row][col]
            m = _arr(ro[f"{kind}_mean"])
            im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", aspect="auto")
            ax.set_yticks(range(len(ro["step_labels"])), ro["step_labels"], fontsize=7)
            ax.set_xticks(range(ro["slots"]), [f"m{b}" for b in range(ro["slots"])], fontsize=7)
            _annotate(ax, m, dark_below=0.5)
            ax.set_title((_title(r, name) + "\n" if row == 0 else "") + f"mean {kind} weight", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.suptitle("MeSH routing: mean softmax weight per step and slot", fontsize=10)
    return save_fig(fig, path)


def plot_consecutive_cka(results: list[dict], names: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True, layout="constrained")
    for ax, kern in zip(axes, ("rbf", "linear")):
        for r, name in zip(results, names):
            cc = r["cka_consecutive"][kern]
            ax.errorbar(range(len(cc)), [c["mean"] for c in cc], yerr=[c["std"] for c in cc], marker="o",
                        capsize=2, label=name)
            ax.set_xticks(range(len(cc)), ["→".join(c["pair"]) for c in cc], rotation=45, fontsize=7)
        ax.set_title(f"{kern} CKA of consecutive states", fontsize=9)
    axes[0].set_ylabel("CKA")
    axes[1].legend(fontsize=7)
    return save_fig(fig, path)


def plot_all(results: list[dict], names: list[str], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    written = [
        plot_skew(results, names, out / "skew.png"),
        plot_cka(results, names, out / "cka.png"),
        plot_spectrum(results, names, out / "spectrum.png"),
        plot_consecutive_cka(results, names, out / "cka_consecutive.png"),
        plot_routing(results, names, out / "routing.png"),
    ]
    return [p for p in written if p is not None]
