"""Benchmark: mesh-data tokenize and dedup throughput per worker count, beside the raw tokenizer and
Megatron-LM's tools/preprocess_data.py, in one run.

For each tokenizer (GPT-NeoX-20B via `tokenizers`, the shipped SentencePiece 8k model):
- raw: the tokenizer's own batch encode on the whole corpus held in memory, one thread
  (TOKENIZERS_PARALLELISM=false / num_threads=1): the per-core ceiling.
  It is fed the same ~1 MiB batches the pipeline uses.
- raw xN: N processes running the raw encode at once: what this machine allows N workers.
- tokenize: `tokenize_files` end to end (read, parse, tokenize, write .bin/.idx, merge, sidecar)
  with --workers 1, 2, 4, ... up to --max-workers (default: the core count), on the inputs as given
  (by default the shipped .jsonl.zst) and on a Parquet copy of the same documents (pyarrow,
  1,000 rows per row group, snappy), written to a temp dir before any timing.
- Megatron-LM (with --megatron-lm DIR, a checkout): `python DIR/tools/preprocess_data.py` on a plain
  .jsonl copy of the same documents (it reads no .zst), same workers, same tokenizer (HuggingFaceTokenizer
  over a directory holding the tokenizer.json; GPTSentencePieceTokenizer for the .model), --append-eod.
  Timed from its "Opening <input>" line (after its imports) to its exit, like tokenize_files, which
  also starts its pool, loads the tokenizer per worker and writes .bin/.idx. mesh-data on that plain
  .jsonl is measured too, and the two outputs are compared byte for byte.
  Megatron-LM's megatron/training imports triton (via megatron-core's batch-invariant kernels) even
  to preprocess: on a CPU-only venv without it, pass a directory holding triton in --megatron-pythonpath.
- dedup: `dedup_files` (= `mesh-data dedup`) --exact-only and exact + MinHash (default settings) on
  the inputs as given, end to end (pass 1 signatures over -j workers, pass 2 in one process, keep-list),
  in MB/s of document text (UTF-8, 10^6 bytes). The shipped sample has no duplicates: this is the cost
  of finding none.
Wall-clock rates need idle cores; tokens per CPU-second (all processes, from getrusage) shows the
parallel overhead even on a busy machine: flat across worker counts = nothing lost to parallelism.
Each point is the best of --repeats runs (this box is shared; best-of filters out other load).
Nothing here asserts a time; the targets (per-worker rate >= 0.8 x raw, >= Megatron-LM at the same
workers, exact dedup >= 10 MB/s per worker) are printed as met or not.
Prints a table and writes JSON to bench/results/data_tools_cpu.json (or --out).

    .venv/bin/python bench/data_tools_bench.py [--input data/sample/sample.jsonl.zst] [--max-workers N]
        [--megatron-lm /path/to/Megatron-LM [--megatron-pythonpath DIR_WITH_TRITON]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools import load_tokenizer, tokenize_files  # noqa: E402
from data_tools.readers import FileBatches, expand_inputs  # noqa: E402
from data_tools.tokenizer import limit_threads  # noqa: E402
from data_tools.worker import ParseOptions, iter_parsed  # noqa: E402

TOKENIZERS = {
    "hf": str(REPO / "data/tokenizers/gpt-neox-20b.json"),
    "sentencepiece": str(REPO / "data/tokenizers/sample_sp8k.model"),
}
PARQUET_ROW_GROUP = 1000
EXACT_TARGET_MB_S = 10.0
RAW_RATIO_TARGET = 0.8


def load_docs(inputs):
    """(text, subset) of every document, parsed by the same readers tokenize uses."""
    docs = []
    for path in expand_inputs(inputs):
        for kind, units, _ in FileBatches(path):
            for _, text, subset, skip in iter_parsed(units, ParseOptions(kind=kind)):
                if skip is None:
                    docs.append((text, subset))
    return docs


def write_copies(docs, tmp):
    """The same documents as Parquet (text + meta.pile_set_name) and as plain .jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = [None if s is None else {"pile_set_name": s} for _, s in docs]
    table = pa.table({"text": [t for t, _ in docs], "meta": pa.array(meta, type=pa.struct([("pile_set_name", pa.string())]))})
    pq_path = os.path.join(tmp, "corpus.parquet")
    pq.write_table(table, pq_path, row_group_size=PARQUET_ROW_GROUP)
    jsonl_path = os.path.join(tmp, "corpus.jsonl")
    with open(jsonl_path, "w", encoding="utf-8") as f:
        for (t, s), m in zip(docs, meta):
            f.write(json.dumps({"text": t, "meta": m} if m else {"text": t}, ensure_ascii=False) + "\n")
    return pq_path, jsonl_path


def format_label(inputs):
    names = {os.path.basename(p.rstrip("/")).lower() for p in expand_inputs(inputs)}
    return "+".join(sorted({n.split(".", 1)[1] if "." in n else "dir" for n in names}))


def worker_counts(max_workers):
    ws, w = [], 1
    while w <= max_workers:
        ws.append(w)
        w *= 2
    if max_workers not in ws:
        ws.append(max_workers)
    return ws


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


def pipeline_rate(kind, inputs, workers, repeats, prefix):
    best = cpu = None
    for _ in range(repeats):
        c, t = _cpu_seconds(), time.perf_counter()
        s = tokenize_files(inputs, prefix, kind, TOKENIZERS[kind], workers=workers, force=True, progress=False, quiet=True)
        dt, dc = time.perf_counter() - t, _cpu_seconds() - c
        best = dt if best is None or dt < best else best
        cpu = dc if cpu is None or dc < cpu else cpu
    n = s["tokens"]
    return {"tokens": n, "documents": s["documents"], "seconds": round(best, 3), "tokens_per_s": round(n / best),
            "cpu_seconds": round(cpu, 3), "tokens_per_cpu_s": round(n / cpu)}


def _same_files(a, b):
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as fa, open(b + ext, "rb") as fb:
            while True:
                x, y = fa.read(1 << 20), fb.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    break
    return True


class Megatron:
    """Megatron-LM's tools/preprocess_data.py from a checkout, run as its users run it."""

    def __init__(self, checkout, pythonpath, extra_args, tmp, timeout):
        self.checkout, self.extra, self.tmp, self.timeout = checkout, shlex.split(extra_args), tmp, timeout
        self.script = os.path.join(checkout, "tools", "preprocess_data.py") if checkout else None
        self.env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
        if pythonpath:
            self.env["PYTHONPATH"] = os.pathsep.join(x for x in (pythonpath, os.environ.get("PYTHONPATH")) if x)
        self.reason = None
        if not checkout:
            self.reason = "no --megatron-lm DIR given (a Megatron-LM checkout; the megatron-core pip package does not ship tools/)"
        elif not os.path.isfile(self.script):
            self.reason = f"{self.script} does not exist"

    def version(self):
        try:
            src = open(os.path.join(self.checkout, "megatron", "core", "package_info.py")).read()
            return "core_v" + ".".join(re.search(rf"^{k} = (\d+)", src, re.M).group(1) for k in ("MAJOR", "MINOR", "PATCH"))
        except (OSError, AttributeError):
            return None

    def tokenizer_args(self, kind):
        if kind == "sentencepiece":
            return ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", TOKENIZERS[kind]]
        # AutoTokenizer needs a directory; the eos token is its eod (the one tokenize appends)
        d = os.path.join(self.tmp, "hf_tokenizer")
        if not os.path.isdir(d):
            os.makedirs(d)
            shutil.copy(TOKENIZERS[kind], os.path.join(d, "tokenizer.json"))
            eod = load_tokenizer(kind, TOKENIZERS[kind]).eod_token
            with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eod, "eos_token": eod, "unk_token": eod}, f)
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", d]

    def command(self, kind, jsonl, workers, prefix):
        return [sys.executable, self.script, "--input", jsonl, "--output-prefix", prefix, "--workers", str(workers),
                "--append-eod", "--log-interval", "1000000000", *self.tokenizer_args(kind), *self.extra]

    def run_once(self, cmd, prefix):
        """-> seconds from "Opening" to exit, or raises RuntimeError(reason)."""
        err_path = prefix + ".stderr"
        with open(err_path, "w") as err:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=self.env, cwd=self.tmp,
                                 start_new_session=True)
            opened = []

            def watch():
                for line in p.stdout:
                    if not opened and line.startswith("Opening"):
                        opened.append(time.perf_counter())

            th = threading.Thread(target=watch, daemon=True)
            th.start()
            try:
                rc = p.wait(self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
                raise RuntimeError(f"timed out after {self.timeout} s") from None
            end = time.perf_counter()
            th.join()
        lines = [x.strip() for x in open(err_path, errors="replace") if x.strip() and "warn" not in x.lower()]
        errors = [x for x in lines if re.match(r"^\w*(Error|Exception)\b", x)]
        if rc != 0 or errors or not opened or not os.path.isfile(prefix + "_text_document.idx"):
            raise RuntimeError(f"exit {rc}: " + (errors[-1] if errors else lines[-1] if lines else "no output"))
        return end - opened[0]

    def rate(self, kind, jsonl, workers, repeats, reference_prefix):
        from data_tools import indexed

        prefix = os.path.join(self.tmp, f"megatron_{kind}_{workers}")
        cmd = self.command(kind, jsonl, workers, prefix)
        best = None
        for _ in range(repeats):
            dt = self.run_once(cmd, prefix)
            best = dt if best is None or dt < best else best
        out = prefix + "_text_document"
        ds = indexed.read_dataset(out)
        n = int(ds.sequence_lengths.astype("int64").sum())
        return {"tokens": n, "documents": len(ds.document_indices) - 1, "seconds": round(best, 3),
                "tokens_per_s": round(n / best), "identical_to_mesh_data": _same_files(out, reference_prefix),
                "command": " ".join(shlex.quote(os.path.relpath(c, self.tmp) if c.startswith(self.tmp) else c) for c in cmd)}


def _megatron_core_version():
    """preprocess_data.py imports megatron.core from this venv (its checkout is appended to sys.path last)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return None


def dedup_rate(inputs, near, workers, repeats, tmp):
    from data_tools.dedup import dedup_files

    best = cpu = sig = None
    for r in range(repeats):
        keep = os.path.join(tmp, f"dedup_{int(near)}_{workers}_{r}.keep.npz")  # a fresh work dir: no resuming
        c, t = _cpu_seconds(), time.perf_counter()
        s = dedup_files(inputs, keep, near=near, workers=workers, quiet=True)
        dt, dc = time.perf_counter() - t, _cpu_seconds() - c
        best = dt if best is None or dt < best else best
        cpu = dc if cpu is None or dc < cpu else cpu
        sig = s["text_mb_per_s"] if sig is None or s["text_mb_per_s"] > sig else sig
        os.remove(keep)
    mb = sum(v["bytes"] for v in s["subsets"].values()) / 1e6
    st = s["settings"]
    return {"documents": s["documents"], "removed_documents": s["removed_documents"], "text_mb": round(mb, 3),
            "seconds": round(best, 3), "mb_per_s": round(mb / best, 2), "mb_per_s_per_worker": round(mb / best / workers, 2),
            "signature_pass_mb_per_s": sig, "cpu_seconds": round(cpu, 3), "mb_per_cpu_s": round(mb / cpu, 2),
            "settings": {k: st[k] for k in ("threshold", "shingle", "ngram", "num_perm", "bands", "rows") if st.get(k) is not None}}


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
    ap.add_argument("--input", "--inputs", dest="inputs", nargs="+", default=[str(REPO / "data/sample/sample.jsonl.zst")],
                    help="corpus files (default: the shipped sample)")
    ap.add_argument("--tokenizers", nargs="+", default=["hf", "sentencepiece"], choices=sorted(TOKENIZERS), help="which tokenizers to measure")
    ap.add_argument("--max-workers", type=int, default=os.cpu_count() or 1,
                    help="largest --workers measured; 1, 2, 4, ... up to it (default: core count)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per point; the best is kept (default: 3)")
    ap.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"), metavar="DIR",
                    help="a Megatron-LM checkout whose tools/preprocess_data.py to measure (default: $MEGATRON_LM; none: row skipped)")
    ap.add_argument("--megatron-pythonpath", default=os.environ.get("MEGATRON_PYTHONPATH", ""), metavar="PATHS",
                    help="extra PYTHONPATH for it, e.g. a directory holding triton (`pip install --target DIR triton`)")
    ap.add_argument("--megatron-args", default="--legacy-tokenizer",
                    help="extra preprocess_data.py arguments (default: --legacy-tokenizer, its faster tokenizer wrapper "
                         "in core_v0.16; the same ids)")
    ap.add_argument("--megatron-timeout", type=int, default=600, help="seconds before one Megatron-LM run is killed")
    ap.add_argument("--no-dedup", action="store_true", help="skip the dedup rows")
    ap.add_argument("--out", default=str(REPO / "bench/results/data_tools_cpu.json"), help="JSON results file")
    args = ap.parse_args()

    limit_threads()
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    docs = load_docs(args.inputs)
    texts = [t for t, _ in docs]
    chars = sum(len(t) for t in texts)
    label = format_label(args.inputs)
    ws = worker_counts(args.max_workers)
    results = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "loadavg_at_start": [round(x, 2) for x in load0],
                           "note": "shared 2-core CPU dev box; other jobs ran concurrently, so each point is the best of the repeats"},
               "inputs": [os.path.relpath(p, REPO) if p.startswith(str(REPO)) else p for p in args.inputs],
               "input_format": label, "documents": len(texts), "characters": chars, "repeats": args.repeats,
               "worker_counts": ws, "parquet_copy": {"row_group_rows": PARQUET_ROW_GROUP, "compression": "snappy"},
               "targets": {"per_worker_vs_raw": RAW_RATIO_TARGET, "exact_dedup_mb_per_s_per_worker": EXACT_TARGET_MB_S,
                           "vs_megatron_lm": 1.0},
               "tokenizers": {}}
    rows, dedup_rows, notes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        pq_path, jsonl_path = write_copies(docs, tmp)
        results["sizes_mb"] = {label: round(sum(os.path.getsize(p) for p in expand_inputs(args.inputs)) / 1e6, 2),
                               "parquet": round(os.path.getsize(pq_path) / 1e6, 2), "plain-jsonl": round(os.path.getsize(jsonl_path) / 1e6, 2)}
        mlm = Megatron(args.megatron_lm, args.megatron_pythonpath, args.megatron_args, tmp, args.megatron_timeout)
        formats = [(label, args.inputs, "pipeline"), ("parquet", [pq_path], "pipeline_parquet")]
        if mlm.reason is None:
            formats.append(("plain-jsonl", [jsonl_path], "pipeline_jsonl"))  # Megatron-LM's own input, for a like-for-like row
        # import what each reader and the writer need once, outside the timings
        tokenize_files([pq_path, jsonl_path], os.path.join(tmp, "warmup"), "hf", TOKENIZERS["hf"], force=True, progress=False, quiet=True)
        for kind in args.tokenizers:
            raw = raw_rate(kind, texts, args.repeats)
            entry = {"model": os.path.relpath(TOKENIZERS[kind], REPO), "raw_single_thread": raw, "raw_concurrent": {}}
            rows.append((kind, "-", "raw batch-encode", 1, raw["seconds"], raw["tokens_per_s"], raw["tokens_per_s"], 1.0, 1.0, raw["tokens_per_cpu_s"]))
            for n in ws[1:]:
                rc = raw_concurrent_rate(kind, texts, n, args.repeats)
                rc["per_process_vs_raw"] = round(rc["tokens_per_s_per_process"] / raw["tokens_per_s"], 3)
                entry["raw_concurrent"][str(n)] = rc
                rows.append((kind, "-", f"raw x{n} processes", n, float("nan"), rc["tokens_per_s_total"], rc["tokens_per_s_per_process"],
                             rc["per_process_vs_raw"], rc["tokens_per_s_total"] / raw["tokens_per_s"], 0))
            for fmt, inputs, key in formats:
                entry[key] = {}
                base = None
                for w in ws:
                    p = pipeline_rate(kind, inputs, w, args.repeats, os.path.join(tmp, f"{kind}_{key}_{w}"))
                    assert p["tokens"] == raw["tokens"] + p["documents"], "pipeline tokens = raw tokens + one EOD per document"
                    base = base or p["tokens_per_s"]
                    p["tokens_per_s_per_worker"] = round(p["tokens_per_s"] / w)
                    p["per_worker_vs_raw"] = round(p["tokens_per_s"] / w / raw["tokens_per_s"], 3)
                    p["speedup_vs_1_worker"] = round(p["tokens_per_s"] / base, 3)
                    entry[key][str(w)] = p
                    rows.append((kind, fmt, "mesh-data tokenize", w, p["seconds"], p["tokens_per_s"], p["tokens_per_s_per_worker"],
                                 p["per_worker_vs_raw"], p["speedup_vs_1_worker"], p["tokens_per_cpu_s"]))
            m = entry["megatron_preprocess_data"] = {"checkout": args.megatron_lm, "version": mlm.version() if mlm.reason is None else None,
                                                     "megatron_core_imported": _megatron_core_version(), "pythonpath": args.megatron_pythonpath or None,
                                                     "input": "the same documents as plain .jsonl", "extra_args": args.megatron_args}
            if mlm.reason is None:
                m["workers"] = {}
                base = None
                for w in ws:
                    try:
                        r = mlm.rate(kind, jsonl_path, w, args.repeats, os.path.join(tmp, f"{kind}_pipeline_jsonl_{w}"))
                    except RuntimeError as e:
                        m["not_measured"] = f"{w} workers: {e}"
                        break
                    base = base or r["tokens_per_s"]
                    r["tokens_per_s_per_worker"] = round(r["tokens_per_s"] / w)
                    r["per_worker_vs_raw"] = round(r["tokens_per_s"] / w / raw["tokens_per_s"], 3)
                    r["speedup_vs_1_worker"] = round(r["tokens_per_s"] / base, 3)
                    for fmt, _, key in formats:
                        r[f"mesh_data_{key}_vs_megatron"] = round(entry[key][str(w)]["tokens_per_s"] / r["tokens_per_s"], 3)
                    m["workers"][str(w)] = r
                    rows.append((kind, "plain-jsonl", "Megatron-LM preprocess", w, r["seconds"], r["tokens_per_s"], r["tokens_per_s_per_worker"],
                                 r["per_worker_vs_raw"], r["speedup_vs_1_worker"], 0))
            else:
                m["not_measured"] = mlm.reason
            if "not_measured" in m:
                notes.append(f"{kind}: Megatron-LM not measured ({m['not_measured']})")
                rows.append((kind, "plain-jsonl", "Megatron-LM preprocess", 0, float("nan"), 0, 0, float("nan"), float("nan"), 0))
            results["tokenizers"][kind] = entry
        if not args.no_dedup:
            results["dedup"] = {"input": label, "text": "MB = 10^6 bytes of UTF-8 document text; end to end (signatures, duplicate search, keep-list)"}
            for mode, near in (("exact", False), ("exact+minhash", True)):
                results["dedup"][mode] = {}
                for w in ws:
                    d = dedup_rate(args.inputs, near, w, args.repeats, tmp)
                    results["dedup"][mode][str(w)] = d
                    dedup_rows.append((mode, w, d))
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["bench_seconds"] = round(time.perf_counter() - t_start, 1)

    print(f"{len(texts)} documents, {chars:,} characters; cores={os.cpu_count()}; load avg at start {load0[0]:.1f}, "
          f"at end {results['loadavg_at_end'][0]:.1f}; best of {args.repeats}; sizes (MB): {results['sizes_mb']}")
    hdr = (f"{'tokenizer':<14}{'input':<13}{'what':<24}{'workers':>8}{'seconds':>9}{'tok/s':>12}{'tok/s/worker':>14}"
           f"{'vs raw':>8}{'speedup':>9}{'tok/cpu-s':>11}")
    print(hdr)
    print("-" * len(hdr))
    for k, fmt, what, w, sec, tps, tpw, vr, sp, tpc in rows:
        if w == 0:
            print(f"{k:<14}{fmt:<13}{what:<24}  not measured (see below)")
            continue
        print(f"{k:<14}{fmt:<13}{what:<24}{w:>8}{sec:>9.2f}{tps:>12,}{tpw:>14,}{vr:>8.2f}{sp:>9.2f}{tpc or '-':>11}")
    for kind, entry in results["tokenizers"].items():
        for fmt, _, key in formats:
            low = [w for w, p in entry[key].items() if p["per_worker_vs_raw"] < RAW_RATIO_TARGET]
            print(f"{kind} {fmt}: per-worker rate >= {RAW_RATIO_TARGET} x raw at workers "
                  f"{[w for w in entry[key] if w not in low]}" + (f"; below at {low}" if low else ""))
        for w, r in entry["megatron_preprocess_data"].get("workers", {}).items():
            print(f"{kind} {w} workers: mesh-data / Megatron-LM = {r['mesh_data_pipeline_vs_megatron']:.2f} ({label}), "
                  f"{r['mesh_data_pipeline_jsonl_vs_megatron']:.2f} (same .jsonl); outputs identical: {r['identical_to_mesh_data']}")
    if dedup_rows:
        print()
        hdr = f"{'dedup':<16}{'workers':>8}{'seconds':>9}{'MB/s':>8}{'MB/s/worker':>13}{'pass-1 MB/s':>13}{'MB/cpu-s':>10}{'removed':>9}"
        print(hdr)
        print("-" * len(hdr))
        for mode, w, d in dedup_rows:
            print(f"{mode:<16}{w:>8}{d['seconds']:>9.2f}{d['mb_per_s']:>8.2f}{d['mb_per_s_per_worker']:>13.2f}"
                  f"{d['signature_pass_mb_per_s']:>13.2f}{d['mb_per_cpu_s']:>10.2f}{d['removed_documents']:>9}")
        low = [w for m, w, d in dedup_rows if m == "exact" and d["mb_per_s_per_worker"] < EXACT_TARGET_MB_S]
        print(f"exact dedup >= {EXACT_TARGET_MB_S} MB/s per worker: " + ("met at every worker count" if not low else f"below at workers {low}"))
    for n in notes:
        print(n)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} ({results['bench_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
