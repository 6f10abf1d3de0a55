"""Turn a batch of raw units into token arrays: parse -> validate -> filter -> tokenize.

Units are (line number, raw bytes) pairs for jsonl/txt, or `readers.Rows` (the text and subset
columns of consecutive rows, already extracted) for Parquet/Arrow; both go through the same checks.

Runs inside worker processes (or inline for --workers 1), so it imports nothing heavy: no torch,
no megatron. Results are plain numpy arrays + small lists so they pickle cheaply back to the writer.
Every unit ends up either as a document or as a counted skip/filter with its line number.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import numpy as np

from .sentences import split_sentences

# Skip reasons: defects of the input. Counted, reported with file:line, fatal under --strict.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_a_json_object"
MISSING_TEXT_KEY = "missing_text_key"
TEXT_NOT_STRING = "text_not_a_string"
INVALID_UTF8 = "invalid_utf8"
EMPTY_DOCUMENT = "empty_document"
SKIP_REASONS = (MALFORMED_JSON, NOT_AN_OBJECT, MISSING_TEXT_KEY, TEXT_NOT_STRING, INVALID_UTF8, EMPTY_DOCUMENT)


@dataclass(frozen=True)
class ParseOptions:
    kind: str  # "jsonl" | "txt" | "columnar"
    text_key: str = "text"
    subset_key: str = "meta.pile_set_name"
    include_subsets: frozenset | None = None  # None = keep all
    exclude_subsets: frozenset = frozenset()
    split_sentences: bool = False
    append_eod: bool = True


@dataclass
class BatchResult:
    tokens: np.ndarray  # all kept documents' tokens, concatenated
    seq_lengths: np.ndarray  # int64, one per sequence (= per document unless split_sentences)
    seqs_per_doc: np.ndarray  # int64, sequences in each kept document
    doc_subsets: list  # subset name (or None) per kept document
    skips: list = field(default_factory=list)  # (lineno, reason, detail)
    filtered: dict = field(default_factory=dict)  # subset name -> documents left out by the subset filter
    removed: dict = field(default_factory=dict)  # (keep-list reason, subset name) -> documents a keep-list drops


def _lookup(obj, dotted: str):
    """obj["a"]["b"] for "a.b"; KeyError if any level is missing. An exact key wins over the dotted path."""
    if dotted in obj:
        return obj[dotted]
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _short(raw: bytes, n: int = 60) -> str:
    s = raw[:n].decode("utf-8", errors="replace")
    return s + ("..." if len(raw) > n else "")


def parse_unit(raw: bytes, opts: ParseOptions):
    """-> (text, subset, None) for a document, or (None, None, (reason, detail)) for a skip."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, None, (INVALID_UTF8, f"byte {e.start}: {raw[max(0, e.start - 8):e.start + 8]!r}")
    subset = None
    if opts.kind == "jsonl":
        if not s.strip():
            return None, None, (EMPTY_DOCUMENT, "blank line")
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            return None, None, (MALFORMED_JSON, f"{e.msg} (column {e.colno}): {_short(raw)}")
        if not isinstance(obj, dict):
            return None, None, (NOT_AN_OBJECT, f"got {type(obj).__name__}")
        try:
            text = _lookup(obj, opts.text_key)
        except KeyError:
            keys = ", ".join(list(obj)[:8])
            return None, None, (MISSING_TEXT_KEY, f"no key {opts.text_key!r} (keys: {keys}); set --text-key")
        if not isinstance(text, str):
            return None, None, (TEXT_NOT_STRING, f"{opts.text_key!r} is {type(text).__name__}")
        try:
            subset = _subset_name(_lookup(obj, opts.subset_key))
        except KeyError:
            subset = None
        try:  # JSON escapes can produce lone surrogates ("\ud800"), which are not valid UTF-8 text
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return None, None, (INVALID_UTF8, f"unpaired surrogate {text[e.start]!r} at character {e.start}")
    else:
        text = s
    if not text.strip():
        return None, None, (EMPTY_DOCUMENT, "text is empty or whitespace only")
    return text, subset, None


def _subset_name(sub):
    """A subset value as a name; null counts as no subset (as in Arrow, where null and absent are one)."""
    if sub is None or isinstance(sub, str):
        return sub
    if isinstance(sub, bytes):
        return sub.decode("utf-8", errors="replace")
    return str(sub)


def parse_value(raw: bytes | None, sub, opts: ParseOptions):
    """One columnar row (text column as UTF-8 bytes or None for null, subset column value) ->
    (text, subset, None) or (None, None, (reason, detail)), with the checks parse_unit makes."""
    if raw is None:
        return None, None, (TEXT_NOT_STRING, f"{opts.text_key!r} is null")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, None, (INVALID_UTF8, f"byte {e.start}: {raw[max(0, e.start - 8):e.start + 8]!r}")
    if not text.strip():
        return None, None, (EMPTY_DOCUMENT, "text is empty or whitespace only")
    return text, _subset_name(sub), None


def iter_parsed(units: list, opts: ParseOptions):
    """Yield (line or row number, text, subset, skip) for every unit of a batch, in order."""
    if opts.kind == "columnar":
        for first, count, texts, subsets, problem in units:
            for k in range(count):
                if problem is not None:
                    yield first + k, None, None, problem
                    continue
                text, subset, skip = parse_value(texts[k], subsets[k] if subsets is not None else None, opts)
                yield first + k, text, subset, skip
        return
    for lineno, raw in units:
        text, subset, skip = parse_unit(raw, opts)
        yield lineno, text, subset, skip


def _selected(subset, opts: ParseOptions) -> bool:
    if subset in opts.exclude_subsets:
        return False
    if opts.include_subsets is not None and subset not in opts.include_subsets:
        return False
    return True


def iter_selected(units: list, opts: ParseOptions, skips: list, filtered: dict):
    """(line/row number, text, subset) of each document of the batch that parses and passes the subset filter;
    the others are counted into `skips` ((lineno, reason, detail)) and `filtered` ({subset: count}).
    tokenize and dedup read documents through this, so they agree on which documents exist."""
    for lineno, text, subset, skip in iter_parsed(units, opts):
        if skip is not None:
            skips.append((lineno, skip[0], skip[1]))
        elif not _selected(subset, opts):
            key = subset if subset is not None else "<no subset>"
            filtered[key] = filtered.get(key, 0) + 1
        else:
            yield lineno, text, subset


def process_batch(tokenizer, units: list, opts: ParseOptions, dtype, drop: dict | None = None) -> BatchResult:
    """drop: {line/row number: keep-list reason code} of documents a keep-list leaves out (see dedup.py)."""
    texts: list[str] = []
    subsets: list = []
    skips: list = []
    filtered: dict = {}
    removed: dict = {}
    for lineno, text, subset in iter_selected(units, opts, skips, filtered):
        if drop and lineno in drop:  # counted per reason and subset, never silently
            key = (drop[lineno], subset if subset is not None else "<no subset>")
            removed[key] = removed.get(key, 0) + 1
            continue
        texts.append(text)
        subsets.append(subset)

    eod = [tokenizer.eod_id] if opts.append_eod else []
    if opts.split_sentences:
        pieces_per_doc = [split_sentences(t) for t in texts]
        flat = [p for ps in pieces_per_doc for p in ps]
        encoded = tokenizer.encode_batch(flat) if flat else []
        seqs: list[list[int]] = []
        seqs_per_doc = []
        pos = 0
        for ps in pieces_per_doc:
            doc = encoded[pos:pos + len(ps)]
            pos += len(ps)
            doc[-1] = doc[-1] + eod  # Megatron convention: EOD ends the document's last sequence
            seqs.extend(doc)
            seqs_per_doc.append(len(doc))
    else:
        seqs = [ids + eod for ids in tokenizer.encode_batch(texts)] if texts else []
        seqs_per_doc = [1] * len(seqs)
    seq_lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))
    total = int(seq_lengths.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=total)
    return BatchResult(tokens, seq_lengths, np.asarray(seqs_per_doc, dtype=np.int64), subsets, skips, filtered, removed)


# --- worker-process side -------------------------------------------------------------------------
_STATE: dict = {}


def share_tokenizer(tok, kind: str, model: str, eod_token) -> None:
    """Called in the parent before forking: workers inherit the loaded tokenizer instead of each
    parsing the file again (GPT-NeoX's takes ~0.2 s of CPU per process)."""
    _STATE["tok"] = tok
    _STATE["model"] = (kind, model, eod_token)


def init_worker(kind: str, model: str, eod_token, opts_by_kind: dict, dtype_name: str) -> None:
    import signal

    # Ctrl-C reaches the whole process group; the main process alone handles it (and stops us)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_worker(kind, model, eod_token, opts_by_kind, dtype_name)


def setup_worker(kind: str, model: str, eod_token, opts_by_kind: dict, dtype_name: str) -> None:
    """What run_batch needs, in a worker or (--workers 1) in the main process: a single-threaded tokenizer."""
    from .tokenizer import limit_threads, load_tokenizer

    limit_threads()
    if _STATE.get("model") != (kind, model, eod_token):  # not inherited through fork (or share_tokenizer): load it
        _STATE["tok"] = load_tokenizer(kind, model, eod_token)
        _STATE["model"] = (kind, model, eod_token)
    _STATE["opts"] = opts_by_kind
    _STATE["dtype"] = np.dtype(dtype_name)


def run_batch(kind: str, units: list, drop: dict | None = None) -> BatchResult:
    return process_batch(_STATE["tok"], units, _STATE["opts"][kind], _STATE["dtype"], drop)
