"""mesh-data dedup: drop exact and near-duplicate documents (MinHash LSH), written as a keep-list that
`mesh-data tokenize --keep-list` honours, and optionally as a filtered copy of the corpus.

Keys (the definitions docs/data.md states):
- exact: blake2b-128 of the normalised text: Unicode NFC, lowercased, every whitespace run one space,
  stripped. Documents differing only in case, composition or spacing are exact duplicates.
- near: MinHash signatures computed by datasketch's `MinHash` (num_perm 32-bit hashes, its affine32
  scheme, seed 1) over shingles of the NFC-lowercased text: word n-grams (words are maximal runs of
  letters/digits, `str.isalnum`; punctuation and spacing never matter) or character k-grams of the
  whitespace-collapsed text. Each shingle's 32-bit input hash is computed here, vectorised with numpy
  (a polynomial hash mod 2^64 of its code points, finalised with MurmurHash3's fmix64), because
  hashing each shingle string in Python would be the bottleneck. LSH bands (b x r rows) are chosen
  by datasketch's `MinHashLSH` for the threshold, unless given.

Three passes:
1. signatures (parallel over -j worker processes, resumable per input file): every document's locator
   (the line/row number tokenize reports), subset, size, digest and signature go to
   KEEP.work/fNNNNN.{docs,sig}, committed by renaming and then a .done.json marker.
2. duplicates (one process, bounded memory): digests and band keys are scattered to disk by key into
   partitions sized for --memory-gb, each partition is sorted, equal keys give candidate pairs (near
   candidates must also agree on >= threshold of their signature hashes unless --no-verify), and the
   pairs are merged by a union-find over all documents. In each group the first document in input
   order is kept, so the result does not depend on -j or on partitioning.
3. the keep-list (per input file: the locators of dropped documents and why), a report per subset,
   and with --output-corpus the input minus the dropped documents as .zst.

Memory: pass 1 holds only the batches in flight. Pass 2 holds 12 bytes per document (union-find
parent int64, three flag/result bytes) plus one partition (<= --memory-gb, 96 bytes per record
while sorting). Disk in the work dir: 53 bytes per document, plus num_perm x 4 for near dedup, plus
during pass 2 the scatter files, 24 + bands x 16 bytes per document. Not bounded: the per-document
arrays live in RAM (a billion documents need ~12 GB); pass 2 is one process and is not resumable
(it re-reads the signatures; a re-run after a kill in pass 2 redoes only pass 2).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np

from . import indexed
from .pool import Inline, WorkerPool
from .errors import DataToolsError

KEEP_FORMAT = "mesh-data-keep-list/1"
WORK_FORMAT = "mesh-data-dedup-work/1"
NORMALIZATION = "nfc+lower+collapse-whitespace"

# Settings that decide which unit a locator names and what its text is: a keep-list made with other
# values would drop the wrong documents.
LOCATOR_SETTINGS = ("text_key", "txt_unit")

# Why a document is not kept; stored per dropped document (uint8) in keep-lists.
EXACT, NEAR, OTHER_SPLIT, DROPPED_UPSTREAM = 1, 2, 3, 4
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate", OTHER_SPLIT: "other_split", DROPPED_UPSTREAM: "dropped_by_input_keep_list"}

# Defaults and their anchors (docs/data.md repeats them):
# - threshold 0.87: Pythia's deduplicated Pile, "near-deduplication with MinHashLSH and a threshold
#   of 0.87" (Biderman et al. 2023, arXiv 2304.01373, sec. 2.2; the paper names neither the shingles
#   nor num_perm).
# - word 5-grams: EleutherAI's pile_dedupe (generate_minhashes.py: nltk words, 5-grams) and
#   datatrove's MinhashConfig (n_grams=5, used for FineWeb).
# - num_perm 128: datasketch's default (pile_dedupe used 10, datatrove 14 bands x 8 = 112).
DEFAULT_THRESHOLD = 0.87
DEFAULT_NGRAM = 5
DEFAULT_NUM_PERM = 128
DEFAULT_SEED = 1

DOC_DTYPE = np.dtype([
    ("loc", "<i8"), ("subset", "<i4"), ("chars", "<i8"), ("bytes", "<i8"), ("tokens", "<i8"),
    ("d0", "<u8"), ("d1", "<u8"), ("shingled", "u1"),
])

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_BASE = 0x100000001B3  # odd, so invertible mod 2^64
_MIX = np.uint64(0x9E3779B97F4A7C15)


# --- keys ----------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """The exact-duplicate (and split) key's text: NFC, lowercase, whitespace runs -> one space, stripped."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=16).digest()


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _S33)
    h = h * _M1
    h = h ^ (h >> _S33)
    h = h * _M2
    return h ^ (h >> _S33)


_TABLES: dict = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE^i and BASE^-i mod 2^64 for i < n (cached, grown by doubling)."""
    have = _TABLES.get("pow")
    if have is None or len(have[0]) < n:
        m = max(n, 2 * len(have[0]) if have else 4096)
        inv_base = pow(_BASE, -1, 1 << 64)
        out = []
        for b in (_BASE, inv_base):
            p = np.empty(m, np.uint64)
            p[0] = 1
            k = 1
            with np.errstate(over="ignore"):
                while k < m:
                    p[k:2 * k] = p[: min(k, m - k)] * np.uint64(pow(b, k, 1 << 64))
                    k *= 2
            out.append(p)
        _TABLES["pow"] = have = (out[0], out[1])
    return have


def _word_table() -> np.ndarray:
    t = _TABLES.get("word")
    if t is None:
        t = _TABLES["word"] = np.fromiter((chr(i).isalnum() for i in range(1 << 16)), dtype=bool, count=1 << 16)
    return t


def _span_hashes(cps: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """fmix64 of the polynomial hash of cps[s:e] (position independent), mixed with the length."""
    pw, inv = _powers(len(cps) + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(cps) + 1, np.uint64)
        np.cumsum(cps * pw[: len(cps)], out=prefix[1:])
        h = (prefix[ends] - prefix[starts]) * inv[starts] + (ends - starts).astype(np.uint64) * _MIX
        return _fmix64(h)


class Shingler:
    """Document text -> 32-bit shingle hashes (numpy arrays of at most `piece` values each).

    unit "word": n consecutive words; "char": k consecutive characters of the whitespace-collapsed
    text. A document shorter than one shingle is one shingle. The text is handled in pieces of
    `chunk` characters, so a very long document costs ~8 bytes per word, not per character x n.
    """

    def __init__(self, unit: str = "word", n: int = DEFAULT_NGRAM, chunk: int = 1 << 20, piece: int = 1 << 14):
        if unit not in ("word", "char"):
            raise DataToolsError(f"--shingle must be 'word' or 'char', not {unit!r}")
        if n < 1:
            raise DataToolsError(f"--ngram must be >= 1, got {n}")
        self.unit, self.n, self.chunk, self.piece = unit, n, max(chunk, 2 * n + 2), piece

    def hashes(self, text: str):
        h = self._word_hashes(text) if self.unit == "word" else self._char_hashes(text)
        for i in range(0, len(h), self.piece):
            yield (h[i:i + self.piece] >> np.uint64(32)).astype(np.uint32)

    def _cps(self, s: str) -> np.ndarray:
        return np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)

    def _word_hashes(self, text: str) -> np.ndarray:
        s = unicodedata.normalize("NFC", text).lower()
        table = _word_table()
        words = []
        pos = 0
        while pos < len(s):
            piece = s[pos:pos + self.chunk]
            cps = self._cps(piece)
            isw = np.ones(len(cps), dtype=bool)
            small = cps < (1 << 16)
            isw[small] = table[cps[small]]
            cut = len(cps)
            if pos + len(piece) < len(s):  # not the last piece: end at the last separator (a word longer than a piece is cut)
                seps = np.flatnonzero(~isw)
                if len(seps):
                    cut = int(seps[-1]) + 1
            isw = isw[:cut]
            edge = np.diff(np.concatenate(([False], isw, [False])).astype(np.int8))
            starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
            if len(starts):
                words.append(_span_hashes(cps[:cut], starts, ends))
            pos += cut
        if not words:
            return np.empty(0, np.uint64)
        w = np.concatenate(words)
        n = min(self.n, len(w))
        with np.errstate(over="ignore"):
            h = w[: len(w) - n + 1].copy()
            for k in range(1, n):
                h = h * _M2 + w[k: len(w) - n + 1 + k]
            return _fmix64(h + np.uint64(n))

    def _char_hashes(self, text: str) -> np.ndarray:
        s = " ".join(unicodedata.normalize("NFC", text).lower().split())
        k = min(self.n, len(s))
        if k == 0:
            return np.empty(0, np.uint64)
        out = []
        for pos in range(0, len(s) - k + 1, self.chunk):
            cps = self._cps(s[pos:pos + self.chunk + k - 1])
            starts = np.arange(len(cps) - k + 1)
            out.append(_span_hashes(cps, starts, starts + k))
        return np.concatenate(out)


# --- pass 1: signatures (worker side) ------------------------------------------------------------
@dataclass(frozen=True)
class SigConfig:
    near: bool = True
    shingle: str = "word"
    ngram: int = DEFAULT_NGRAM
    num_perm: int = DEFAULT_NUM_PERM
    seed: int = DEFAULT_SEED


_W: dict = {}


def _init_worker(cfg: SigConfig, opts_by_kind: dict, tok_spec) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops us
    _setup(cfg, opts_by_kind, tok_spec)


def _setup(cfg: SigConfig, opts_by_kind: dict, tok_spec) -> None:
    _W["cfg"], _W["opts"] = cfg, opts_by_kind
    if cfg.near:
        from datasketch import MinHash
        from datasketch.minhash import _fmix

        # hashfunc=int: the shingle hashes are already 32-bit integers (see Shingler)
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=int)
        if m.scheme != "affine32":
            import datasketch

            raise DataToolsError(f"datasketch {getattr(datasketch, '__version__', '?')} has another MinHash scheme; install datasketch==2.0.0")
        _W["minhash"], _W["fmix"] = m, _fmix
        _W["shingler"] = Shingler(cfg.shingle, cfg.ngram)
    if tok_spec is not None and _W.get("tok_spec") != tok_spec:
        from .tokenizer import limit_threads, load_tokenizer

        limit_threads()
        _W["tok"] = load_tokenizer(*tok_spec)
        _W["tok_spec"] = tok_spec
    elif tok_spec is None:
        _W.pop("tok", None)
        _W.pop("tok_spec", None)


def signature(text: str) -> tuple[np.ndarray, bool]:
    """(num_perm uint32 MinHash values, has shingles) of one document, in a set-up process.

    The values are exactly datasketch's `MinHash.update_batch` over the shingle hashes (its affine32
    scheme: MurmurHash3 fmix32 pre-mix, a * h + b mod 2^32 with its seeded permutations, minimum;
    tests/test_data_dedup.py checks the equality), computed on the numpy array directly:
    update_batch first calls hashfunc once per shingle in Python, which made signatures 1.5x slower."""
    m = _W["minhash"]
    a, b = m.permutations
    sig = m.hashvalues.copy()
    any_ = False
    with np.errstate(over="ignore"):
        for hv in _W["shingler"].hashes(text):
            h = _W["fmix"](hv.reshape(-1, 1), 32)
            np.minimum(sig, (h * a + b).min(axis=0), out=sig)
            any_ = True
    return sig, any_


def signature_datasketch(text: str):
    """The same signature through datasketch's public API (the reference the fast path is tested against)."""
    m = _W["minhash"].copy()
    for hv in _W["shingler"].hashes(text):
        m.update_batch(hv.tolist())
    return m


def sig_batch(kind: str, units: list) -> dict:
    """Parse a batch of units like tokenize does and compute each document's row (and signature)."""
    from .worker import iter_selected

    cfg: SigConfig = _W["cfg"]
    opts = _W["opts"][kind]
    locs, subsets, texts, skips, filtered = [], [], [], [], {}
    for lineno, text, subset in iter_selected(units, opts, skips, filtered):
        locs.append(lineno)
        subsets.append(subset)
        texts.append(text)
    n = len(texts)
    rows = np.zeros(n, dtype=DOC_DTYPE)
    rows["loc"] = locs
    digests = b"".join(text_digest(t) for t in texts)
    d = np.frombuffer(digests, dtype="<u8").reshape(n, 2) if n else np.zeros((0, 2), "<u8")
    rows["d0"], rows["d1"] = d[:, 0], d[:, 1]
    rows["chars"] = [len(t) for t in texts]
    rows["bytes"] = [len(t.encode("utf-8")) for t in texts]
    tok = _W.get("tok")
    if tok is not None and n:
        rows["tokens"] = [len(ids) + 1 for ids in tok.encode_batch(texts)]  # + EOD, as tokenize counts
    else:
        rows["tokens"] = -1
    sig = None
    if cfg.near:
        sig = np.empty((n, cfg.num_perm), dtype=np.uint32)
        for i, t in enumerate(texts):
            sig[i], has = signature(t)
            rows["shingled"][i] = has
    return {"rows": rows, "subsets": subsets, "sig": sig, "skips": skips, "filtered": filtered}


# --- pass 1: driver ------------------------------------------------------------------------------

def _file_paths(work: str, i: int) -> dict:
    base = os.path.join(work, f"f{i:05d}")
    return {"docs": base + ".docs", "sig": base + ".sig", "done": base + ".done.json"}


class _FileWriter:
    def __init__(self, paths: dict, near: bool):
        self.paths = paths
        self.docs = open(paths["docs"] + ".partial", "wb")
        self.sig = open(paths["sig"] + ".partial", "wb") if near else None
        self.subsets: dict = {}
        self.stats = {"units": 0, "documents": 0, "skipped": {}, "skip_examples": {}, "filtered": {}}

    def add(self, res: dict, path: str, quiet: bool) -> None:
        rows = res["rows"]
        codes = [-1 if s is None else self.subsets.setdefault(s, len(self.subsets)) for s in res["subsets"]]
        rows["subset"] = codes
        self.docs.write(rows.tobytes())
        if self.sig is not None:
            self.sig.write(np.ascontiguousarray(res["sig"]).tobytes())
        st = self.stats
        st["documents"] += len(rows)
        st["units"] += len(rows) + len(res["skips"]) + sum(res["filtered"].values())
        for lineno, reason, detail in res["skips"]:
            st["skipped"][reason] = st["skipped"].get(reason, 0) + 1
            exs = st["skip_examples"].setdefault(reason, [])
            if len(exs) < 5:
                exs.append(f"{path}:{lineno}: {reason}: {detail}")
                if not quiet:
                    print(f"skipped {exs[-1]}", file=sys.stderr)
        for k, v in res["filtered"].items():
            st["filtered"][k] = st["filtered"].get(k, 0) + v

    def commit(self, identity: dict) -> dict:
        for f, key in ((self.docs, "docs"), (self.sig, "sig")):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(self.paths[key] + ".partial", self.paths[key])
        rec = {"input": identity, "subsets": list(self.subsets), "stats": self.stats}
        indexed.atomic_write_json(self.paths["done"], rec)
        return rec

    def abort(self) -> None:
        for f, key in ((self.docs, "docs"), (self.sig, "sig")):
            if f is not None:
                f.close()
                try:
                    os.remove(self.paths[key] + ".partial")
                except OSError:
                    pass


def signature_pass(files, identities, work, cfg: SigConfig, opts_by_kind, workers, batch_bytes, txt_unit,
                   tok_spec, quiet, label="dedup") -> list[dict]:
    """Pass 1 over every input file not already done in `work` (same settings); returns the markers."""
    from tqdm import tqdm

    from .pipeline import _batches

    done: dict[int, dict] = {}
    for i, ident in enumerate(identities):
        p = _file_paths(work, i)
        rec = indexed.read_json_or_none(p["done"]) if os.path.exists(p["done"]) else None
        if rec is not None and rec.get("input") == ident and os.path.exists(p["docs"]) and (not cfg.near or os.path.exists(p["sig"])):
            done[i] = dict(rec, resumed=True)
    pending = [(i, f) for i, f in enumerate(files) if i not in done]
    if done and not quiet:
        print(f"resuming: {len(done)} of {len(files)} input files already hashed in {work}", file=sys.stderr)
    if not pending:
        return [done[i] for i in range(len(files))]
    from .readers import input_size

    args = (cfg, opts_by_kind, tok_spec)
    executor = Inline(_setup, *args) if workers == 1 else WorkerPool(workers, _init_worker, args, "dedup")
    bar = tqdm(total=sum(input_size(f) for _, f in pending), unit="B", unit_scale=True, desc=label, file=sys.stderr,
               mininterval=0.5, disable=quiet or None)
    inflight: collections.deque = collections.deque()
    gen = _batches(pending, opts_by_kind, batch_bytes, txt_unit)
    writer = None
    cur = None
    last_pos = 0
    exhausted = False
    aborted = True
    try:
        while True:
            while not exhausted and len(inflight) < 2 * workers + 1:
                try:
                    item = next(gen)
                except StopIteration:
                    exhausted = True
                    break
                except DataToolsError as e:  # files finished before a read error stay committed
                    inflight.append(("error", e))
                    exhausted = True
                    break
                if item[0] == "batch":
                    _, file_no, kind, units, pos = item
                    inflight.append(("batch", file_no, executor.submit(sig_batch, kind, units), pos))
                else:
                    inflight.append(("end", item[1], None, item[4]))
            if not inflight:
                break
            entry = inflight.popleft()
            if entry[0] == "error":
                raise entry[1]
            _, file_no, fut, pos = entry
            if cur != file_no:
                cur, last_pos = file_no, 0
                writer = _FileWriter(_file_paths(work, file_no), cfg.near)
            if entry[0] == "end":
                done[file_no] = writer.commit(identities[file_no])
                writer = None
                cur = None
            else:
                writer.add(fut.get(), files[file_no], quiet)
            bar.update(max(pos - last_pos, 0))
            last_pos = pos
        aborted = False
    except KeyboardInterrupt:
        raise DataToolsError(f"interrupted; finished input files are kept in {work} and a re-run with the same command resumes") from None
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
        executor.close(abort=aborted)
    return [done[i] for i in range(len(files))]


# --- pass 2: duplicates --------------------------------------------------------------------------
def lsh_params(threshold: float, num_perm: int, bands: int | None = None, rows: int | None = None) -> tuple[int, int]:
    """(bands, rows per band): given, or datasketch MinHashLSH's choice minimising false pos. + neg."""
    if not 0.0 < threshold < 1.0:
        raise DataToolsError(f"--threshold must be between 0 and 1 (exclusive), got {threshold}")
    if (bands is None) != (rows is None):
        raise DataToolsError("give both --bands and --rows, or neither (then datasketch picks them for --threshold)")
    if bands is not None:
        if bands < 1 or rows < 1 or bands * rows > num_perm:
            raise DataToolsError(f"--bands x --rows = {bands} x {rows} must be >= 1 and at most --num-perm ({num_perm})")
        return bands, rows
    from datasketch import MinHashLSH

    try:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        return lsh.b, lsh.r
    except ValueError:  # its index wants >= 2 bands; one band (all rows) is fine for our buckets
        from datasketch.lsh import _optimal_param

        return _optimal_param(threshold, num_perm, 0.5, 0.5)


def _band_keys(sig: np.ndarray, b: int, r: int) -> np.ndarray:
    out = np.empty((len(sig), b), np.uint64)
    with np.errstate(over="ignore"):
        for j in range(b):
            h = np.full(len(sig), np.uint64(j + 1) * _MIX, dtype=np.uint64)
            for k in range(r):
                h = _fmix64(h * _M2 + sig[:, j * r + k].astype(np.uint64))
            out[:, j] = h
    return out


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = parent[x]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            break
        r = rr
    parent[x] = r  # path compression for the queried nodes
    return r


def _union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Merge the sets of each pair; a set's root is its smallest member (= first in input order)."""
    while len(u):
        ru, rv = _find(parent, u), _find(parent, v)
        ne = ru != rv
        if not ne.any():
            return
        u, v, ru, rv = u[ne], v[ne], ru[ne], rv[ne]
        # several pairs may name the same root: minimum.at keeps one link each round, the loop the rest
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def _run_edges(equal_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted records with equal_prev[i] = key[i] == key[i-1]: pairs (run's first, i) and (i-1, i)."""
    idx = np.arange(len(equal_prev))
    first = np.maximum.accumulate(np.where(equal_prev, 0, idx))
    dup = np.flatnonzero(equal_prev)
    a = np.concatenate((first[dup], (dup - 1)[first[dup] != dup - 1]))
    b = np.concatenate((dup, dup[first[dup] != dup - 1]))
    return a, b


class _Spill:
    """Append-only record files per (key space, partition), read back one partition at a time."""

    def __init__(self, root: str, dtype: np.dtype):
        self.root, self.dtype, self.have = root, dtype, set()
        shutil.rmtree(root, ignore_errors=True)  # left by an interrupted run
        os.makedirs(root)

    def add(self, name: str, part: np.ndarray, nparts: int, recs: np.ndarray) -> None:
        if nparts == 1:
            return self._append(name, 0, recs)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(nparts + 1))
        for p in range(nparts):
            if bounds[p + 1] > bounds[p]:
                self._append(name, p, recs[order[bounds[p]:bounds[p + 1]]])

    def _append(self, name: str, p: int, recs: np.ndarray) -> None:
        # open/append/close per chunk: (bands + 1) x partitions files would exceed the open-file limit
        with open(os.path.join(self.root, f"{name}-{p:04d}.bin"), "ab") as f:
            f.write(recs.tobytes())
        self.have.add((name, p))

    def load(self, name: str, p: int) -> np.ndarray:
        if (name, p) not in self.have:
            return np.zeros(0, self.dtype)
        self.have.discard((name, p))
        path = os.path.join(self.root, f"{name}-{p:04d}.bin")
        recs = np.fromfile(path, dtype=self.dtype)
        os.remove(path)
        return recs

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


class _Sigs:
    """Random access to signature rows by global document id (memory-mapped sig files)."""

    def __init__(self, work: str, counts: list[int], num_perm: int):
        self.off = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.mm = [np.memmap(_file_paths(work, i)["sig"], dtype=np.uint32, mode="r", shape=(n, num_perm)) if n else None
                   for i, n in enumerate(counts)]
        self.num_perm = num_perm

    def rows(self, gids: np.ndarray) -> np.ndarray:
        out = np.empty((len(gids), self.num_perm), np.uint32)
        f = np.searchsorted(self.off, gids, side="right") - 1
        for fi in np.unique(f):
            m = f == fi
            out[m] = self.mm[fi][gids[m] - self.off[fi]]
        return out


def find_duplicates(work: str, counts: list[int], near: bool, threshold: float, num_perm: int, bands: int, rows: int,
                    verify: bool, memory_bytes: int, quiet: bool) -> tuple[np.ndarray, dict]:
    """Pass 2 -> (why per document: 0 kept, EXACT or NEAR; stats)."""
    t0 = time.time()
    n_docs = int(sum(counts))
    off = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    parent = np.arange(n_docs, dtype=np.int64)
    exact = np.zeros(n_docs, dtype=bool)
    shingled = np.zeros(n_docs, dtype=bool)
    # ~4x a record's bytes per record in memory while sorting one partition
    nparts = max(1, -(-n_docs * 24 * 4 // max(memory_bytes, 1)))
    if nparts > 4096:
        raise DataToolsError(f"{n_docs:,} documents need {nparts} partitions of --memory-gb each; raise --memory-gb")
    xdt = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("g", "<i8")])
    bdt = np.dtype([("k0", "<u8"), ("g", "<i8")])
    spill_x = _Spill(os.path.join(work, "scatter-x"), xdt)
    spill_b = _Spill(os.path.join(work, "scatter-b"), bdt)
    stats = {"partitions": nparts, "bands": bands if near else None, "rows": rows if near else None,
             "candidate_pairs": 0, "verified_pairs": 0}
    try:
        chunk = max(1, (64 << 20) // (num_perm * 4))
        for i, n in enumerate(counts):
            if not n:
                continue
            docs = np.fromfile(_file_paths(work, i)["docs"], dtype=DOC_DTYPE)
            g = off[i] + np.arange(n, dtype=np.int64)
            shingled[off[i]:off[i + 1]] = docs["shingled"].astype(bool)
            recs = np.empty(n, xdt)
            recs["k0"], recs["k1"], recs["g"] = docs["d0"], docs["d1"], g
            spill_x.add("x", (docs["d0"] >> np.uint64(40)) % np.uint64(nparts), nparts, recs)
            if near:
                mm = np.memmap(_file_paths(work, i)["sig"], dtype=np.uint32, mode="r", shape=(n, num_perm))
                for s in range(0, n, chunk):
                    keys = _band_keys(np.asarray(mm[s:s + chunk]), bands, rows)
                    brec = np.empty(len(keys), bdt)
                    brec["g"] = g[s:s + chunk]
                    for j in range(bands):
                        brec["k0"] = keys[:, j]
                        spill_b.add(f"b{j:03d}", (keys[:, j] >> np.uint64(40)) % np.uint64(nparts), nparts, brec)
                del mm
        for p in range(nparts):
            recs = spill_x.load("x", p)
            recs = recs[np.lexsort((recs["g"], recs["k1"], recs["k0"]))]
            eq = np.zeros(len(recs), dtype=bool)
            eq[1:] = (recs["k0"][1:] == recs["k0"][:-1]) & (recs["k1"][1:] == recs["k1"][:-1])
            idx = np.arange(len(recs))
            first = np.maximum.accumulate(np.where(eq, 0, idx))
            dup = np.flatnonzero(eq)
            exact[recs["g"][dup]] = True
            _union(parent, recs["g"][first[dup]], recs["g"][dup])
        if near:
            sigs = _Sigs(work, counts, num_perm) if verify else None
            for j in range(bands):
                for p in range(nparts):
                    recs = spill_b.load(f"b{j:03d}", p)
                    recs = recs[shingled[recs["g"]] & ~exact[recs["g"]]]  # exact copies share their first's keys
                    recs = recs[np.lexsort((recs["g"], recs["k0"]))]
                    eq = np.zeros(len(recs), dtype=bool)
                    eq[1:] = recs["k0"][1:] == recs["k0"][:-1]
                    a, b = _run_edges(eq)
                    u, v = recs["g"][a], recs["g"][b]
                    stats["candidate_pairs"] += len(u)
                    if verify and len(u):
                        keep = np.zeros(len(u), dtype=bool)
                        for s in range(0, len(u), 1 << 15):
                            su, sv = sigs.rows(u[s:s + (1 << 15)]), sigs.rows(v[s:s + (1 << 15)])
                            keep[s:s + (1 << 15)] = (su == sv).mean(axis=1) >= threshold
                        u, v = u[keep], v[keep]
                    stats["verified_pairs"] += len(u)
                    _union(parent, u, v)
    finally:
        spill_x.close()
        spill_b.close()
    why = np.zeros(n_docs, dtype=np.uint8)
    for s in range(0, n_docs, 1 << 22):  # in chunks: no second array of 8 bytes per document
        ids = np.arange(s, min(s + (1 << 22), n_docs), dtype=np.int64)
        dropped = _find(parent, ids) != ids
        why[s:s + len(ids)][dropped & exact[ids]] = EXACT
        why[s:s + len(ids)][dropped & ~exact[ids]] = NEAR
    stats["seconds"] = round(time.time() - t0, 3)
    return why, stats


# --- keep-lists ----------------------------------------------------------------------------------
def fingerprint(path: str) -> str:
    """Content fingerprint that survives copying (mtime changes): sizes and the first/last 64 KiB."""
    from .readers import hf_dataset_files

    h = hashlib.blake2b(digest_size=16)
    for f in (hf_dataset_files(path) if os.path.isdir(path) else [path]):
        size = os.path.getsize(f)
        h.update(f"{os.path.basename(f)}:{size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
            if size > 1 << 16:
                fh.seek(max(size - (1 << 16), 1 << 16))
                h.update(fh.read())
    return h.hexdigest()


def parse_settings(text_key, subset_key, subsets, exclude_subsets, txt_unit, extra: dict | None = None) -> dict:
    """What defines "a document and its locator"; a keep-list is only valid with the same values."""
    d = {"text_key": text_key, "subset_key": subset_key, "txt_unit": txt_unit,
         "include_subsets": sorted(subsets) if subsets else None, "exclude_subsets": sorted(exclude_subsets or ())}
    d.update(extra or {})
    return d


class KeepListWriter:
    """Writes a keep-list file one input file at a time (memory: one file's array).

    Format: a numpy .npz (zip, deflated) with `why{i}` per input file i, a uint8 array indexed by
    locator (the 1-based line or row number tokenize reports; 0 = keep, else a REASONS code; locators
    past its end are kept), and `header`, UTF-8 JSON: format, parse settings, per-file identity,
    fingerprint and drop counts, the run's settings and report. Dense by locator because a split's
    valid/test lists drop almost everything, and deflate stores long runs in a few bytes.
    """

    def __init__(self, path: str):
        import zipfile

        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.tmp = f"{path}.tmp.{os.getpid()}"
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
        self.sha = hashlib.sha256()
        self.dropped: list[int] = []

    def _put(self, name: str, arr: np.ndarray) -> None:
        with self.zip.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, arr, allow_pickle=False)

    def add(self, why_by_locator: np.ndarray) -> None:
        arr = np.ascontiguousarray(np.trim_zeros(why_by_locator, "b"), dtype=np.uint8)
        self._put(f"why{len(self.dropped)}", arr)
        self.sha.update(len(arr).to_bytes(8, "little") + arr.tobytes())
        self.dropped.append(int(np.count_nonzero(arr)))

    def close(self, kind: str, files: list[str], identities: list[dict], parse: dict, settings: dict, summary: dict) -> None:
        entries = [dict(identity=ident, fingerprint=fingerprint(f), dropped=n) for f, ident, n in zip(files, identities, self.dropped)]
        # what tokenize's up-to-date check compares: the drops and what they refer to (not zip timestamps)
        self.sha.update(json.dumps([parse, [(e["identity"], e["fingerprint"]) for e in entries]]).encode())
        header = {"format": KEEP_FORMAT, "kind": kind, "reasons": {str(k): v for k, v in REASONS.items()}, "parse": parse,
                  "settings": settings, "files": entries, "summary": summary, "content_sha256": self.sha.hexdigest(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._put("header", np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
        self.zip.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.zip.fp is None:  # closed (published, or aborted before)
            return
        self.zip.close()
        try:
            os.remove(self.tmp)
        except OSError:
            pass


def dense_why(locs: np.ndarray, why: np.ndarray) -> np.ndarray:
    out = np.zeros(int(locs.max()) + 1 if len(locs) else 0, dtype=np.uint8)
    out[locs] = why
    return out


def read_keep_list(path: str) -> tuple[dict, object]:
    """(header, lazy npz) of a keep-list; DataToolsError naming the file if it is not one."""
    try:
        z = np.load(path, allow_pickle=False)
        header = json.loads(bytes(z["header"]).decode())
    except FileNotFoundError:
        raise DataToolsError(f"keep-list {path} does not exist; make it with mesh-data dedup or mesh-data split") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataToolsError(f"{path}: not a mesh-data keep-list ({type(e).__name__}: {e}); make it with mesh-data dedup or mesh-data split") from None
    fmt = header.get("format") if isinstance(header, dict) else None
    if fmt != KEEP_FORMAT:
        raise DataToolsError(f"{path}: unknown keep-list format {fmt!r} (expected {KEEP_FORMAT}); re-make it with this mesh-data")
    return header, z


class KeepList:
    """A keep-list matched to the input files of a run (by path, else by content fingerprint)."""

    def __init__(self, path: str, files: list[str], identities: list[dict], parse: dict):
        self.path = os.path.abspath(path)
        header, self._z = read_keep_list(path)
        self.header = header
        # a different subset key or filter only changes which documents count as filtered, except for a split:
        # documents its own filter left out have no split, and would be kept in every split's dataset
        keys = LOCATOR_SETTINGS
        if header.get("kind") == "split":
            keys += ("subset_key", "include_subsets", "exclude_subsets")
        for key in keys:
            if header["parse"].get(key) != parse.get(key):
                raise DataToolsError(
                    f"{path}: made with {key}={header['parse'].get(key)!r} but this run uses {parse.get(key)!r}; "
                    "a keep-list's document numbers are only valid with the same reading settings"
                )
        entries = header["files"]
        by_path: dict = {}
        by_fp: dict = {}
        for j, e in enumerate(entries):
            by_path.setdefault(e["identity"]["path"], j)
            by_fp.setdefault(e["fingerprint"], []).append(j)
        self.entry = []
        for f, ident in zip(files, identities):
            j = by_path.get(ident["path"])
            if j is not None and entries[j]["identity"] != ident and entries[j]["fingerprint"] != fingerprint(f):
                raise DataToolsError(f"{f} changed since keep-list {path} was made from it; re-run mesh-data dedup/split on it")
            if j is None:
                cands = by_fp.get(fingerprint(f), [])
                if len(cands) != 1:
                    raise DataToolsError(
                        f"{f} is not one of the files keep-list {path} was made from ({len(entries)} files, e.g. "
                        f"{entries[0]['identity']['path'] if entries else '-'}); run mesh-data dedup/split on the same inputs"
                    )
                j = cands[0]
            self.entry.append(j)
        self.sha256 = header["content_sha256"]
        self._cache: tuple[int, np.ndarray] | None = None

    def why(self, file_no: int) -> np.ndarray:
        """Reason code by locator for input file file_no (one file's array is kept in memory)."""
        if self._cache is None or self._cache[0] != file_no:
            self._cache = (file_no, np.asarray(self._z[f"why{self.entry[file_no]}"]))
        return self._cache[1]

    def dropped(self, file_no: int) -> int:
        return self.header["files"][self.entry[file_no]]["dropped"]

    def for_span(self, file_no: int, lo: int, hi: int) -> dict | None:
        """{locator: reason code} of the dropped documents with lo <= locator <= hi; None if none."""
        if not self.dropped(file_no):
            return None
        seg = self.why(file_no)[lo:hi + 1]
        nz = np.flatnonzero(seg)
        if not len(nz):
            return None
        return dict(zip((nz + lo).tolist(), seg[nz].tolist()))


# --- report --------------------------------------------------------------------------------------
def load_docs(work: str, i: int, marker: dict) -> np.ndarray:
    return np.fromfile(_file_paths(work, i)["docs"], dtype=DOC_DTYPE) if marker["stats"]["documents"] else np.zeros(0, DOC_DTYPE)


def _new_sizes() -> dict:
    return {"documents": 0, "chars": 0, "bytes": 0, "tokens": 0}


def report_file(subsets: dict, names: list, docs: np.ndarray, w: np.ndarray, reason_codes: dict) -> None:
    """Add one file's documents to the per-subset report: totals and removed per reason code."""
    for code in np.unique(docs["subset"]) if len(docs) else []:
        m = docs["subset"] == code
        name = names[code] if code >= 0 else "<no subset>"
        s = subsets.setdefault(name, dict(_new_sizes(), removed={}))
        sub, ws = docs[m], w[m]
        s["documents"] += int(m.sum())
        for k in ("chars", "bytes", "tokens"):
            s[k] += int(sub[k].sum())
        for c, reason in reason_codes.items():
            mc = ws == c
            if mc.any():
                r = s["removed"].setdefault(reason, _new_sizes())
                r["documents"] += int(mc.sum())
                for k in ("chars", "bytes", "tokens"):
                    r[k] += int(sub[k][mc].sum())


def _totals(subsets: dict) -> dict:
    t = dict(_new_sizes(), removed={})
    for s in subsets.values():
        for k in ("documents", "chars", "bytes", "tokens"):
            t[k] += s[k]
        for reason, r in s["removed"].items():
            tr = t["removed"].setdefault(reason, _new_sizes())
            for k in tr:
                tr[k] += r[k]
    return t


# --- filtered corpus -----------------------------------------------------------------------------
def check_output_corpus(files: list[str]) -> None:
    from .readers import input_kind

    for f in files:
        kind = input_kind(f)
        if kind not in ("jsonl", "txt"):
            raise DataToolsError(f"{f}: --output-corpus copies jsonl/txt inputs only; for {kind} inputs use the keep-list (tokenize --keep-list)")


def write_filtered_corpus(files: list[str], keep: KeepList, out_dir: str, txt_unit: str) -> list[str]:
    """Each jsonl/txt input minus its dropped documents, verbatim, as OUT_DIR/NAME.{jsonl,txt}.zst."""
    import zstandard

    from .readers import InputStream, input_kind, iter_units

    names = []
    for f in files:
        base = os.path.basename(f.rstrip("/"))
        for suf in (".zst", ".gz"):
            if base.lower().endswith(suf):
                base = base[: -len(suf)]
        names.append(base)
    unique = len(set(names)) == len(names)
    os.makedirs(out_dir, exist_ok=True)
    outs = []
    for i, f in enumerate(files):
        kind = input_kind(f)
        why = keep.why(i)
        name = names[i] if unique else f"{i:05d}-{names[i]}"
        out = os.path.join(out_dir, name + ".zst")
        tmp = out + ".partial"
        sep = b"\n\n" if kind == "txt" and txt_unit == "paragraph" else b"\n"
        with open(tmp, "wb") as fh, zstandard.ZstdCompressor(level=3).stream_writer(fh, closefd=False) as zw, InputStream(f) as stream:
            for unit, _ in iter_units(stream, kind, txt_unit):
                if unit is not None and not (unit.lineno < len(why) and why[unit.lineno]):
                    zw.write(unit.raw + sep)
        os.replace(tmp, out)
        outs.append(out)
    return outs


# --- entry point ---------------------------------------------------------------------------------
def _opts_by_kind(parse: dict, extra_opts: dict | None = None) -> dict:
    """The parse options tokenize would use (same kinds, same keys), so locators and skips agree."""
    from .worker import ParseOptions

    base = dict(text_key=parse["text_key"], subset_key=parse["subset_key"],
                include_subsets=frozenset(parse["include_subsets"]) if parse["include_subsets"] else None,
                exclude_subsets=frozenset(parse["exclude_subsets"]))
    base.update(extra_opts or {})
    return {k: ParseOptions(kind=k, **base) for k in ("jsonl", "txt", "columnar")}


def prepare_work(work: str, settings: dict, quiet: bool) -> None:
    sf = os.path.join(work, "settings.json")
    if os.path.isdir(work) and indexed.read_json_or_none(sf) != settings:
        if not quiet:
            print(f"{work}: left by a run with other settings; starting over", file=sys.stderr)
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(sf):
        indexed.atomic_write_json(sf, settings)


def one_line_os_errors(fn):
    """A full disk or unwritable output directory ends as one DataToolsError naming the path."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                raise DataToolsError(f"{e.filename or 'a file'}: {e.strerror or e}") from None  # e.g. an input vanished mid-run
            # the same one line (and exit 2) as tokenize's write errors; the work files are written next to -o
            raise indexed.output_error(e, e.filename or "the output (-o)") from None

    return wrapper


@one_line_os_errors
def dedup_files(
    inputs: list[str],
    keep_list: str,
    *,
    near: bool = True,
    threshold: float = DEFAULT_THRESHOLD,
    shingle: str = "word",
    ngram: int = DEFAULT_NGRAM,
    num_perm: int = DEFAULT_NUM_PERM,
    bands: int | None = None,
    rows: int | None = None,
    seed: int = DEFAULT_SEED,
    verify: bool = True,
    workers: int = 1,
    tokenizer: str | None = None,
    tokenizer_model: str | None = None,
    text_key: str = "text",
    subset_key: str = "meta.pile_set_name",
    subsets: list[str] | None = None,
    exclude_subsets: list[str] | None = None,
    txt_unit: str = "line",
    output_corpus: str | None = None,
    memory_gb: float = 2.0,
    batch_bytes: int = 1 << 20,
    keep_work: bool = False,
    quiet: bool = False,
) -> dict:
    """Find exact (and near, unless near=False) duplicates in `inputs`; write the keep-list `keep_list`
    (and with output_corpus, the inputs minus the duplicates). Returns the report."""
    from .pipeline import _file_identity
    from .readers import expand_inputs

    t0 = time.time()
    if workers < 1:
        raise DataToolsError(f"--workers must be >= 1, got {workers}")
    if num_perm < 2:
        raise DataToolsError(f"--num-perm must be >= 2, got {num_perm}")
    if memory_gb <= 0:
        raise DataToolsError(f"--memory-gb must be > 0, got {memory_gb}")
    b, r = lsh_params(threshold, num_perm, bands, rows) if near else (0, 0)
    files = expand_inputs(list(inputs))
    identities = [_file_identity(f) for f in files]
    parse = parse_settings(text_key, subset_key, subsets, exclude_subsets, txt_unit)
    cfg = SigConfig(near=near, shingle=shingle, ngram=ngram, num_perm=num_perm, seed=seed)
    Shingler(shingle, ngram)  # validate flags before any work
    if output_corpus:
        check_output_corpus(files)
    tok_spec = None
    tok_sha = None
    if tokenizer_model:
        from .tokenizer import file_sha256, load_tokenizer, normalize_kind

        tok_spec = (normalize_kind(tokenizer or "hf"), tokenizer_model, None)
        load_tokenizer(*tok_spec)  # fail early on a bad tokenizer
        tok_sha = file_sha256(tokenizer_model)
    work = keep_list + ".work"
    work_settings = {"format": WORK_FORMAT, "normalization": NORMALIZATION, "sig": asdict(cfg), "parse": parse,
                     "tokenizer": [tok_spec[0], tok_sha] if tok_spec else None}
    prepare_work(work, work_settings, quiet)
    opts = _opts_by_kind(parse)
    markers = signature_pass(files, identities, work, cfg, opts, workers, batch_bytes, txt_unit, tok_spec, quiet)
    t1 = time.time()
    counts = [m["stats"]["documents"] for m in markers]
    why, dstats = find_duplicates(work, counts, near, threshold, num_perm, b, r, verify, int(memory_gb * (1 << 30)), quiet)
    writer = KeepListWriter(keep_list)
    try:
        subsets_report: dict = {}
        off = 0
        for i, m in enumerate(markers):
            docs = load_docs(work, i, m)
            w = why[off:off + len(docs)]
            off += len(docs)
            report_file(subsets_report, m["subsets"], docs, w, {EXACT: REASONS[EXACT], NEAR: REASONS[NEAR]})
            writer.add(dense_why(docs["loc"], w))
        summary = _dedup_summary(keep_list, files, markers, subsets_report, tok_spec, near, threshold, shingle, ngram,
                                 num_perm, b, r, seed, verify, workers, dstats, t1 - t0)
        writer.close("dedup", files, identities, parse, summary["settings"], summary)
    finally:
        writer.abort()  # no-op once closed
    if output_corpus:
        keep = KeepList(keep_list, files, identities, parse)
        summary["output_corpus"] = write_filtered_corpus(files, keep, output_corpus, txt_unit)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    summary["wall_time_s"] = round(time.time() - t0, 3)
    return summary


def _dedup_summary(keep_list, files, markers, subsets_report, tok_spec, near, threshold, shingle, ngram, num_perm, b, r, seed,
                   verify, workers, dstats, sig_seconds) -> dict:
    subsets_report = dict(sorted(subsets_report.items(), key=lambda kv: str(kv[0])))
    totals = _totals(subsets_report)
    if tok_spec is None:  # no tokenizer: sizes are characters and bytes only
        for rec in [totals, *subsets_report.values()]:
            for x in [rec, *rec["removed"].values()]:
                x["tokens"] = None
    skipped: dict = {}
    examples: dict = {}
    for m in markers:
        for k, v in m["stats"]["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        for k, v in m["stats"]["skip_examples"].items():
            examples.setdefault(k, []).extend(v[: 5 - len(examples.get(k, []))])
    settings = {"normalization": NORMALIZATION, "near": near, "threshold": threshold if near else None,
                "shingle": shingle if near else None, "ngram": ngram if near else None,
                "num_perm": num_perm if near else None, "bands": b or None, "rows": r or None, "seed": seed,
                "verify": verify if near else None, "keep": "first document of each duplicate group, in input order",
                "tokenizer": [tok_spec[0], os.path.abspath(tok_spec[1])] if tok_spec else None}
    bytes_in = sum(int(d["bytes"]) for d in subsets_report.values())
    summary = {
        "keep_list": keep_list,
        "files": len(files),
        "files_resumed": sum(1 for m in markers if m.get("resumed")),
        "workers": workers,
        "documents": totals["documents"],
        "removed": totals["removed"],
        "removed_documents": sum(v["documents"] for v in totals["removed"].values()),
        "kept_documents": totals["documents"] - sum(v["documents"] for v in totals["removed"].values()),
        "subsets": subsets_report,
        "skipped": skipped,
        "skip_examples": examples,
        "settings": settings,
        "pass2": dstats,
        "signature_seconds": round(sig_seconds, 3),
        "text_mb_per_s": round(bytes_in / 1e6 / max(sig_seconds, 1e-9), 2),
    }
    return summary
