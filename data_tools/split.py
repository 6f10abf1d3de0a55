"""mesh-data split: deterministic document-level train / valid / test splits by a salted text hash.

A document's split is a function of its normalised text alone (the exact-dedup key of dedup.py:
NFC, lowercase, collapsed whitespace) and the salt: the 128-bit digest is mixed with the salt's key
into a number u in [0, 1), and u is compared with the cumulative weights of --split. So the split
of a document does not depend on file order, sharding, shuffling or -j, identical documents always
share a split, and held-out documents never reach training. Near-duplicates can still fall into
different splits: run `mesh-data dedup` first and pass its keep-list here, whose drops are kept in
every split's keep-list (tokenize then reports them as dedup_removed).

Output: one keep-list per split, PREFIX.{train,valid,test}.keep.npz (the documents of the other
splits are dropped with reason other_split), and with --tokenizer-model the three datasets
PREFIX.train, PREFIX.valid, PREFIX.test (.bin/.idx/.meta.json), made by tokenize with those
keep-lists: what the trainer's data.paths / data.valid_paths / data.test_paths take.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import numpy as np

from . import dedup
from .errors import DataToolsError

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT = "969,30,1"  # Megatron-LM's and GPT-NeoX's default --split, and the trainer's data.split
DEFAULT_SALT = "mesh-data-split/1"


def parse_split(spec: str) -> list[float]:
    """"969,30,1" -> cumulative fractions [0.969, 0.999]; DataToolsError naming the flag otherwise."""
    try:
        w = [float(x) for x in str(spec).replace(":", ",").split(",")]
    except ValueError:
        w = []
    if len(w) != 3 or any(x < 0 or x != x for x in w) or sum(w) <= 0:
        raise DataToolsError(f"--split {spec!r}: give three non-negative weights train,valid,test such as 969,30,1")
    total = sum(w)
    return [w[0] / total, (w[0] + w[1]) / total]


def assign(d0: np.ndarray, d1: np.ndarray, cumulative: list[float], salt: str) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of documents with digest halves d0, d1."""
    k = np.frombuffer(hashlib.blake2b(salt.encode("utf-8"), digest_size=16).digest(), dtype="<u8")
    with np.errstate(over="ignore"):
        u = dedup._fmix64(dedup._fmix64(d0 ^ k[0]) ^ d1 ^ k[1])
    frac = (u >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # uniform in [0, 1)
    return np.searchsorted(np.asarray(cumulative), frac, side="right").astype(np.uint8)


def keep_list_path(prefix: str, split: str) -> str:
    return f"{prefix}.{split}.keep.npz"


@dedup.one_line_os_errors
def split_files(
    inputs: list[str],
    output_prefix: str,
    *,
    split: str = DEFAULT_SPLIT,
    salt: str = DEFAULT_SALT,
    keep_list: str | None = None,
    workers: int = 1,
    tokenizer: str = "hf",
    tokenizer_model: str | None = None,
    tokenize_options: dict | None = None,
    text_key: str = "text",
    subset_key: str = "meta.pile_set_name",
    subsets: list[str] | None = None,
    exclude_subsets: list[str] | None = None,
    txt_unit: str = "line",
    batch_bytes: int = 1 << 20,
    keep_work: bool = False,
    quiet: bool = False,
) -> dict:
    """Write PREFIX.{train,valid,test}.keep.npz (and with tokenizer_model the three datasets PREFIX.SPLIT)."""
    from .pipeline import _file_identity
    from .readers import expand_inputs

    t0 = time.time()
    if workers < 1:
        raise DataToolsError(f"--workers must be >= 1, got {workers}")
    cumulative = parse_split(split)
    files = expand_inputs(list(inputs))
    identities = [_file_identity(f) for f in files]
    parse = dedup.parse_settings(text_key, subset_key, subsets, exclude_subsets, txt_unit)
    upstream = dedup.KeepList(keep_list, files, identities, parse) if keep_list else None
    if tokenizer_model:  # fail on a bad tokenizer before the pass over the corpus
        from .tokenizer import load_tokenizer

        load_tokenizer(tokenizer, tokenizer_model, (tokenize_options or {}).get("eod_token"))
    work = output_prefix + ".split.work"
    dedup.prepare_work(work, {"format": dedup.WORK_FORMAT, "normalization": dedup.NORMALIZATION, "parse": parse, "sig": "digest"}, quiet)
    cfg = dedup.SigConfig(near=False)
    markers = dedup.signature_pass(files, identities, work, cfg, dedup._opts_by_kind(parse), workers, batch_bytes,
                                   txt_unit, None, quiet, label="split")
    settings = {"split": split, "fractions": [round(cumulative[0], 12), round(cumulative[1] - cumulative[0], 12), round(1 - cumulative[1], 12)],
                "salt": salt, "normalization": dedup.NORMALIZATION, "input_keep_list": os.path.abspath(keep_list) if keep_list else None}
    writers = [dedup.KeepListWriter(keep_list_path(output_prefix, name)) for name in SPLITS]
    stats = [{"documents": 0, "chars": 0, "bytes": 0, "subsets": {}} for _ in SPLITS]
    total_docs = dropped_upstream = 0
    try:
        for i, m in enumerate(markers):  # one input file at a time: memory is one file's table
            docs = dedup.load_docs(work, i, m)
            part = assign(docs["d0"], docs["d1"], cumulative, salt)
            up = np.zeros(len(docs), dtype=np.uint8)
            if upstream is not None:  # its drops keep their reason in every split (tokenize: dedup_removed)
                uw = upstream.why(i)
                inside = docs["loc"] < len(uw)
                up[inside] = uw[docs["loc"][inside]]
                up[(up > 0) & ~np.isin(up, (dedup.EXACT, dedup.NEAR))] = dedup.DROPPED_UPSTREAM
            total_docs += len(docs)
            dropped_upstream += int((up > 0).sum())
            for s_idx, (w, st) in enumerate(zip(writers, stats)):
                why = np.where(up > 0, up, np.where(part != s_idx, dedup.OTHER_SPLIT, 0)).astype(np.uint8)
                w.add(dedup.dense_why(docs["loc"], why))
                sel = why == 0
                st["documents"] += int(sel.sum())
                st["chars"] += int(docs["chars"][sel].sum())
                st["bytes"] += int(docs["bytes"][sel].sum())
                for code, n in zip(*np.unique(docs["subset"][sel], return_counts=True)):
                    name = m["subsets"][code] if code >= 0 else "<no subset>"
                    st["subsets"][name] = st["subsets"].get(name, 0) + int(n)
        summary = {"output_prefix": output_prefix, "files": len(files), "settings": settings, "documents": total_docs,
                   "dropped_upstream": dropped_upstream, "splits": {}}
        for name, w, st in zip(SPLITS, writers, stats):
            st["subsets"] = dict(sorted(st["subsets"].items(), key=lambda kv: str(kv[0])))
            st["keep_list"] = keep_list_path(output_prefix, name)
            w.close("split", files, identities, parse, dict(settings, split_name=name), st)
            summary["splits"][name] = st
    finally:
        for w in writers:
            w.abort()  # no-op once closed
    if tokenizer_model:
        from .pipeline import tokenize_files

        for name in SPLITS:
            s = summary["splits"][name]
            if s["documents"] == 0:
                s["dataset"] = None  # megatron-core cannot read an empty dataset; nothing to evaluate on
                continue
            r = tokenize_files(files, f"{output_prefix}.{name}", tokenizer, tokenizer_model, workers,
                               text_key=text_key, subset_key=subset_key, subsets=subsets, exclude_subsets=exclude_subsets,
                               txt_unit=txt_unit, batch_bytes=batch_bytes, quiet=quiet, keep_list=s["keep_list"],
                               **(tokenize_options or {}))
            s["dataset"] = f"{output_prefix}.{name}"
            s["tokens"] = r["tokens"]
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    summary["wall_time_s"] = round(time.time() - t0, 3)
    return summary

