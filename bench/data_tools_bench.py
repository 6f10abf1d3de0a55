"""Benchmark: mesh-data tokenize throughput vs the raw tokenizer, per worker count.

For each tokenizer (GPT-NeoX-20B via `tokenizers`, the shipped SentencePiece 8k model):
- raw: the tokenizer's own batch encode on the whole corpus held in memory, one thread
  (TOKENIZERS_PARALLELISM=false / num_threads=1): the per-core ceiling.
  It is fed the same ~1 MiB batches the pipeline uses.
- raw xN: N processes running the raw encode at once: what this machine allows N workers.
- pipeline: `tokenize_files` end to end (read .zst, parse JSON, tokenize, write .bin/.idx,
  merge, sidecar) with --workers 1..N.
Wall-clock rates need idle cores; tokens per CPU-second (all processes, from getrusage) shows the
parallel overhead even on a busy machine: flat across worker counts = nothing lost to parallelism.
Each point is the best of --repeats runs (this box is shared; best-of filters out other load).
Prints a table and writes JSON to bench/results/data_tools_cpu.json (or --out).

    .venv/bin/python bench/data_tools_bench.py [--inputs data/sample/sample.jsonl.zst] [--max-workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools import load_tokenizer, tokenize_files  # noqa: E402
from data_tools.readers import InputStream, expand_inputs, input_kind, iter_units  # noqa: E402
from data_tools.tokenizer import limit_threads  # noqa: E402
from data_tools.worker import ParseOptions, parse_unit  # noqa: E402

TOKENIZERS = {
    "hf": str(REPO / "data/tokenizers/gpt-neox-20b.json"),
    "sentencepiece": str(REPO / "data/tokenizers/sample_sp8k.model"),
}


def load_texts(inputs):
    texts = []
    for path in expand_inputs(inputs):
        kind = input_kind(path)
        with InputStream(path) as s:
            for unit, _ in iter_units(s, kind):
                if unit is not None:
                    text, _, skip = parse_unit(unit.raw, ParseOptions(kind=kind))
                    if skip is None:
                        texts.append(text)
    return texts


def _cpu_seconds():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _batches(texts, batch_chars=1 << 20):
    """The same ~1 MiB batches the pipeline hands its workers."""
    cur, size = [], 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= batch_chars:
            yield cur
            cur, size = [], 0
    if cur:
        yield cur


def raw_rate(kind, texts, repeats):
    tok = load_tokenizer(kind, TOKENIZERS[kind])
    best = cpu = None
    for _ in range(repeats):
        c, t = _cpu_seconds(), time.perf_counter()
        n = sum(len(x) for b in _batches(texts) for x in tok.encode_batch(b))
        dt, dc = time.perf_counter() - t, _cpu_seconds() - c
        best = dt if best is None or dt < best else best
        cpu = dc if cpu is None or dc < cpu else cpu
    return {"tokens": n, "seconds": round(best, 3), "tokens_per_s": round(n / best), "cpu_seconds": round(cpu, 3),
            "tokens_per_cpu_s": round(n / cpu)}


def _raw_child(kind, texts, q):
    limit_threads()
    tok = load_tokenizer(kind, TOKENIZERS[kind])
    t = time.perf_counter()
    n = sum(len(x) for b in _batches(texts) for x in tok.encode_batch(b))
    q.put((n, time.perf_counter() - t))


def raw_concurrent_rate(kind, texts, procs, repeats):
    """The raw tokenizer in `procs` processes at once, each on the whole corpus: the machine's own
    ceiling for N-way parallel tokenization (shared caches, memory bandwidth, neighbours)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    best = None
    for _ in range(repeats):
        q = ctx.Queue()
        ps = [ctx.Process(target=_raw_child, args=(kind, texts, q)) for _ in range(procs)]
        for p in ps:
            p.start()
        res = [q.get() for _ in ps]
        for p in ps:
            p.join()
        per_proc = sum(n / dt for n, dt in res) / procs
        best = per_proc if best is None or per_proc > best else best
    return {"processes": procs, "tokens_per_s_per_process": round(best), "tokens_per_s_total": round(best * procs)}


def pipeline_rate(kind, inputs, workers, repeats, tmp):
    best = cpu = None
    for r in range(repeats):
        c, t = _cpu_seconds(), time.perf_counter()
        s = tokenize_files(inputs, os.path.join(tmp, f"{kind}_{workers}_{r}"), kind, TOKENIZERS[kind], workers=workers,
                           force=True, progress=False, quiet=True)
        dt, dc = time.perf_counter() - t, _cpu_seconds() - c
        best = dt if best is None or dt < best else best
        cpu = dc if cpu is None or dc < cpu else cpu
    n = s["tokens"]
    return {"tokens": n, "documents": s["documents"], "seconds": round(best, 3), "tokens_per_s": round(n / best),
            "cpu_seconds": round(cpu, 3), "tokens_per_cpu_s": round(n / cpu)}


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", nargs="+", default=[str(REPO / "data/sample/sample.jsonl.zst")], help="corpus files (default: the shipped sample)")
    ap.add_argument("--tokenizers", nargs="+", default=["hf", "sentencepiece"], choices=sorted(TOKENIZERS), help="which tokenizers to measure")
    ap.add_argument("--max-workers", type=int, default=os.cpu_count() or 1, help="largest --workers measured (default: core count)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per point; the best is kept (default: 3)")
    ap.add_argument("--out", default=str(REPO / "bench/results/data_tools_cpu.json"), help="JSON results file")
    args = ap.parse_args()

    limit_threads()
    from data_tools import indexed

    indexed._idx()  # import megatron-core once, outside the timings
    load0 = os.getloadavg()
    texts = load_texts(args.inputs)
    chars = sum(len(t) for t in texts)
    results = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "loadavg_at_start": [round(x, 2) for x in load0],
                           "note": "shared 2-core CPU dev box; other jobs ran concurrently, so each point is the best of the repeats"},
               "inputs": args.inputs, "documents": len(texts), "characters": chars, "repeats": args.repeats, "tokenizers": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.tokenizers:
            raw = raw_rate(kind, texts, args.repeats)
            entry = {"model": os.path.relpath(TOKENIZERS[kind], REPO), "raw_single_thread": raw, "pipeline": {}}
            rows.append((kind, "raw batch-encode", 1, raw["seconds"], raw["tokens_per_s"], raw["tokens_per_s"], 1.0, 1.0, raw["tokens_per_cpu_s"]))
            entry["raw_concurrent"] = {}
            for n in range(2, args.max_workers + 1):
                rc = raw_concurrent_rate(kind, texts, n, args.repeats)
                rc["per_process_vs_raw"] = round(rc["tokens_per_s_per_process"] / raw["tokens_per_s"], 3)
                entry["raw_concurrent"][str(n)] = rc
                rows.append((kind, f"raw x{n} processes", n, float("nan"), rc["tokens_per_s_total"], rc["tokens_per_s_per_process"],
                             rc["per_process_vs_raw"], rc["tokens_per_s_total"] / raw["tokens_per_s"], 0))
            base = None
            for w in range(1, args.max_workers + 1):
                p = pipeline_rate(kind, args.inputs, w, args.repeats, tmp)
                assert p["tokens"] == raw["tokens"] + p["documents"], "pipeline tokens = raw tokens + one EOD per document"
                base = base or p["tokens_per_s"]
                p["tokens_per_s_per_worker"] = round(p["tokens_per_s"] / w)
                p["per_worker_vs_raw"] = round(p["tokens_per_s"] / w / raw["tokens_per_s"], 3)
                p["speedup_vs_1_worker"] = round(p["tokens_per_s"] / base, 3)
                entry["pipeline"][str(w)] = p
                rows.append((kind, "mesh-data tokenize", w, p["seconds"], p["tokens_per_s"], p["tokens_per_s_per_worker"],
                             p["per_worker_vs_raw"], p["speedup_vs_1_worker"], p["tokens_per_cpu_s"]))
            results["tokenizers"][kind] = entry
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    hdr = f"{'tokenizer':<14}{'what':<20}{'workers':>8}{'seconds':>9}{'tok/s':>12}{'tok/s/worker':>14}{'vs raw':>8}{'speedup':>9}{'tok/cpu-s':>12}"
    print(f"{len(texts)} documents, {chars:,} characters; cores={os.cpu_count()}; load avg at start {load0[0]:.1f}")
    print(hdr)
    print("-" * len(hdr))
    for k, what, w, sec, tps, tpw, vr, sp, tpc in rows:
        print(f"{k:<14}{what:<20}{w:>8}{sec:>9.2f}{tps:>12,}{tpw:>14,}{vr:>8.2f}{sp:>9.2f}{tpc or '-':>12}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
