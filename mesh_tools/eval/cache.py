"""The result cache of mesh-eval: one JSON per (checkpoint step, loop count K) under OUT/results/, valid while the
settings that change the numbers (tasks and their local files, few-shot, limit, max length, perplexity data, dtype)
are the same. Batch size and device are left out: they do not change what is measured."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pretrain.checkpoint import write_atomic


@dataclass
class EvalSettings:
    """Everything that changes an evaluation's numbers."""

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    max_length: int | None = None  # None: the checkpoint's training sequence length
    ppl_prefixes: list[str] = field(default_factory=list)
    ppl_tokens: int = 65536
    dtype: str = "float32"
    exit_threshold: float | None = None  # per-token early exit (recursive / MeSH): docs/architecture.md, Early exit

    def key(self) -> str:
        """A short hash of the settings and of the local task files' contents (an edited task re-evaluates)."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        if self.include_path:
            root = Path(self.include_path)
            for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
                if p.is_file():
                    h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
                    h.update(hashlib.sha256(p.read_bytes()).digest())
        for prefix in self.ppl_prefixes:  # the data itself: size and mtime stand in for a hash of gigabytes
            for ext in (".bin", ".idx"):
                st = Path(prefix + ext).stat()
                h.update(f"{prefix}{ext}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def result_path(out: Path, step: int, num_loops: int | None) -> Path:
    return out / "results" / f"step_{step:08d}_K{num_loops if num_loops is not None else '-'}.json"


def load_cached(out: Path, step: int, num_loops: int | None, key: str) -> dict | None:
    """The stored result for (step, K) if it was made with the same settings, else None."""
    path = result_path(out, step, num_loops)
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("settings_key") == key else None


def load_all(out: Path, key: str) -> list[dict]:
    """Every stored result made with these settings (any checkpoint, even one pruned since)."""
    recs = []
    for path in sorted((out / "results").glob("step_*_K*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("settings_key") == key:
            recs.append(rec)
    return recs


def store(out: Path, rec: dict) -> Path:
    path = result_path(out, rec["step"], rec["num_loops"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(rec, indent=2, sort_keys=True, default=str) + "\n")
    return path
