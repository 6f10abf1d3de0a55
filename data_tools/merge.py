"""merge: concatenate several .bin/.idx pairs (e.g. one per Pile shard) into one, with its sidecar."""

from __future__ import annotations

import os
import time

from . import indexed
from .errors import DataToolsError


def merge_datasets(prefixes: list[str], output_prefix: str) -> dict:
    """Concatenate pairs in the given order. Sidecars, when all present, must share the tokenizer;
    the merged sidecar sums their counts. Refuses to write onto one of its inputs."""
    out_abs = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out_abs for p in prefixes):
        raise DataToolsError(f"merge: the output prefix {output_prefix} is also an input; choose another output")
    metas = [indexed.read_meta(p) for p in prefixes]
    have = [m is not None for m in metas]
    if any(have) and not all(have):
        missing = [p for p, m in zip(prefixes, metas) if m is None]
        raise DataToolsError(f"merge: some inputs lack a .meta.json sidecar ({', '.join(missing)}); merge only datasets made by mesh-data tokenize, or none with sidecars")
    if all(have):
        shas = {m["tokenizer"]["sha256"] for m in metas}
        if len(shas) > 1:
            raise DataToolsError("merge: inputs were tokenized with different tokenizers: " + ", ".join(f"{p}: {m['tokenizer']['path']}" for p, m in zip(prefixes, metas)))
    t0 = time.time()
    indexed.merge(prefixes, output_prefix)
    report = indexed.verify(output_prefix, check_tokens=False)
    if all(have):
        first = metas[0]
        subsets: dict = {}
        for m in metas:
            for k, v in (m.get("summary", {}).get("subsets") or {}).items():
                cur = subsets.setdefault(k, {"documents": 0, "tokens": 0})
                cur["documents"] += v["documents"]
                cur["tokens"] += v["tokens"]
        meta = {
            "format": indexed.META_FORMAT,
            "tokenizer": dict(first["tokenizer"], relpath=os.path.relpath(first["tokenizer"]["path"], os.path.dirname(out_abs))),
            "dtype": report["dtype"],
            "append_eod": all(m.get("append_eod", True) for m in metas),
            "documents": report["documents"],
            "sequences": report["sequences"],
            "tokens": report["tokens"],
            "inputs": [x for m in metas for x in m.get("inputs", [])],
            "merged_from": list(prefixes),
            "summary": {"subsets": subsets, "documents": report["documents"], "tokens": report["tokens"]},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        indexed.atomic_write_json(indexed.meta_path(output_prefix), meta)
    report["seconds"] = round(time.time() - t0, 3)
    report["inputs"] = list(prefixes)
    return report
