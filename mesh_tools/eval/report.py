"""mesh-eval's combined outputs: a table (Markdown + CSV) with one row per (checkpoint, K) and one column per metric,
and one plot per metric against training tokens with a line per loop count K (matplotlib, a project dependency)."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from pretrain.checkpoint import write_atomic

KEYS = ("step", "tokens_seen", "num_loops")


def metric_names(records: list[dict]) -> list[str]:
    """Every metric in the records, task metrics first then perplexities, each sorted."""
    names = {m for r in records for m in r["metrics"]}
    return sorted(names, key=lambda m: (m.startswith("ppl/") or m.startswith("loss/"), m))


def _sorted(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["step"], r["num_loops"] if r["num_loops"] is not None else 0))


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_tables(records: list[dict], out: Path) -> tuple[Path, Path]:
    """OUT/summary.csv and OUT/summary.md."""
    names = metric_names(records)
    rows = [[r["step"], r["tokens_seen"], r["num_loops"] if r["num_loops"] is not None else "-",
             *[r["metrics"].get(m) for m in names]] for r in _sorted(records)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*KEYS, *names])
    w.writerows([["" if v is None else v for v in row] for row in rows])
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    write_atomic(csv_path, buf.getvalue())
    header = ["step", "tokens", "K", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    write_atomic(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def _plot_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png"


def write_plots(records: list[dict], out: Path) -> list[Path]:
    """OUT/plots/<metric>.png: the metric against training tokens, one line per K."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    recs = _sorted(records)
    loops = sorted({r["num_loops"] for r in recs}, key=lambda k: k if k is not None else 0)
    for metric in metric_names(recs):
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in loops:
            pts = sorted((r["tokens_seen"], r["metrics"][metric]) for r in recs
                         if r["num_loops"] == k and r["metrics"].get(metric) is not None and r["tokens_seen"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"K={k}" if k is not None else "vanilla")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        if metric.startswith("ppl/"):
            ax.set_yscale("log")
        path = plot_dir / _plot_name(metric)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        paths.append(path)
    return paths
