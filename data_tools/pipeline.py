"""tokenize: corpus files -> one Megatron .bin/.idx pair (+ PREFIX.meta.json), parallel and resumable.

Design (see docs/data.md):
- The main process streams each input file, cuts it into batches of ~batch_bytes of lines and
  hands them to a pool of worker processes (parse + tokenize). Results come back *in submission
  order* and at most 2 x workers + 1 batches are in flight, so memory is bounded and the output
  is byte-identical for any --workers.
- Each input file becomes one shard PREFIX.work/shard-NNNNN.{bin,idx}, written under temporary
  names and committed with a .done.json marker (input size/mtime + counts). A re-run with the same
  settings keeps committed shards and redoes the rest; different settings restart from scratch.
- When every shard is done they are concatenated with megatron-core's builder (add_index) into
  temporary names, renamed onto PREFIX.bin/.idx, and PREFIX.meta.json is written last.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import time

import numpy as np

from . import indexed
from .errors import DataToolsError
from .readers import FileBatches, expand_inputs, input_identity, input_size
from .tokenizer import file_sha256, load_tokenizer, normalize_kind
from .pool import Inline, WorkerPool
from .worker import SKIP_REASONS, ParseOptions, init_worker, run_batch, setup_worker, share_tokenizer

MAX_EXAMPLES_PER_REASON = 5
_MAX_UNITS_PER_BATCH = 4096


def _file_identity(path: str) -> dict:
    return input_identity(path)  # a save_to_disk directory: size and mtime of each of its Arrow files


def _new_stats() -> dict:
    return {
        "documents": 0,
        "sequences": 0,
        "tokens": 0,
        "skipped": {},
        "skip_examples": {},
        "filtered": {},
        "removed": {},  # keep-list reason -> subset -> documents
        "subsets": {},
        "separator_lines": 0,
    }


def _add_stats(total: dict, s: dict) -> None:
    for k in ("documents", "sequences", "tokens", "separator_lines"):
        total[k] += s[k]
    for reason, n in s["skipped"].items():
        total["skipped"][reason] = total["skipped"].get(reason, 0) + n
    for name, n in s["filtered"].items():
        total["filtered"][name] = total["filtered"].get(name, 0) + n
    for reason, by_subset in s.get("removed", {}).items():
        cur = total["removed"].setdefault(reason, {})
        for name, n in by_subset.items():
            cur[name] = cur.get(name, 0) + n
    for name, (d, t) in s["subsets"].items():
        cur = total["subsets"].setdefault(name, [0, 0])
        cur[0] += d
        cur[1] += t
    for reason, exs in s["skip_examples"].items():
        have = total["skip_examples"].setdefault(reason, [])
        have.extend(exs[: MAX_EXAMPLES_PER_REASON - len(have)])


def _batches(files: list[tuple[int, str]], opts_by_kind: dict, batch_bytes: int, txt_unit: str):
    """Yield ("batch", file_no, kind, units, disk_bytes) and ("end", file_no, separator_lines, None, disk_bytes).

    kind is "jsonl", "txt" or "columnar" (Parquet/Arrow: units are readers.Rows, see there)."""
    opts = opts_by_kind["columnar"]
    for file_no, path in files:
        reader = FileBatches(path, batch_bytes, txt_unit, opts.text_key, opts.subset_key, _MAX_UNITS_PER_BATCH)
        for kind, units, pos in reader:
            yield "batch", file_no, kind, units, pos
        yield "end", file_no, reader.separator_lines, None, reader.disk_bytes_read


def _settings(tok, tokenizer_kind, tokenizer_model, dtype, opts: ParseOptions, txt_unit) -> dict:
    return {
        "tokenizer_kind": tokenizer_kind,
        "tokenizer_sha256": file_sha256(tokenizer_model),
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "dtype": dtype.__name__,
        "text_key": opts.text_key,
        "subset_key": opts.subset_key,
        "include_subsets": sorted(opts.include_subsets) if opts.include_subsets is not None else None,
        "exclude_subsets": sorted(opts.exclude_subsets),
        "split_sentences": opts.split_sentences,
        "append_eod": opts.append_eod,
        "txt_unit": txt_unit,
        "format": indexed.META_FORMAT,
    }


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def tokenize_files(
    inputs: list[str],
    output_prefix: str,
    tokenizer: str = "hf",
    tokenizer_model: str | None = None,
    workers: int = 1,
    *,
    text_key: str = "text",
    subset_key: str = "meta.pile_set_name",
    subsets: list[str] | None = None,
    exclude_subsets: list[str] | None = None,
    split_sentences: bool = False,
    append_eod: bool = True,
    txt_unit: str = "line",
    eod_token: str | None = None,
    strict: bool = False,
    force: bool = False,
    keep_work: bool = False,
    batch_bytes: int = 1 << 20,
    progress: bool | None = None,
    quiet: bool = False,
    keep_list: str | None = None,
    task_index: int | None = None,
    num_tasks: int | None = None,
) -> dict:
    """Tokenize corpus files into OUTPUT_PREFIX.bin/.idx (+ .meta.json). Returns the run summary.

    inputs: files or globs (.jsonl, .jsonl.zst, .jsonl.gz, .txt[.zst|.gz], .parquet, .arrow) or save_to_disk
    directories; documents keep input order. text_key / subset_key: JSON keys or columns (dotted: nested).
    tokenizer: "hf" (a tokenizer.json) or "sentencepiece" (a .model); tokenizer_model: its path.
    subsets / exclude_subsets: keep only / drop documents whose `subset_key` (the Pile's
    meta.pile_set_name) is one of these. strict: the first bad line raises DataToolsError instead
    of being skipped and counted. force: rebuild even if the output is up to date.
    keep_list: a keep-list from `mesh-data dedup` / `split`; the documents it drops are skipped and
    counted per subset (dedup_removed, split_excluded).
    task_index / num_tasks (a Slurm array, slurm/preprocess.sbatch): tokenize only input files number
    task_index, task_index + num_tasks, ... into OUTPUT_PREFIX.work/ and stop before merging; the
    same call without them then finds those shards done and only merges.
    """
    t0 = time.time()
    if workers < 1:
        raise DataToolsError(f"--workers must be >= 1, got {workers}")
    if (task_index is None) != (num_tasks is None):
        raise DataToolsError("--task-index and --num-tasks go together (this task's number, 0-based, and the number of tasks)")
    if num_tasks is not None and not 0 <= task_index < num_tasks:
        raise DataToolsError(f"--task-index must be in [0, --num-tasks={num_tasks}), got {task_index}")

    def mine(i: int) -> bool:  # input file i is this task's (files are dealt round-robin)
        return num_tasks is None or i % num_tasks == task_index

    if txt_unit not in ("line", "paragraph"):
        raise DataToolsError(f"txt_unit must be 'line' or 'paragraph', not {txt_unit!r}")
    kind = normalize_kind(tokenizer)
    files = expand_inputs(list(inputs))
    tok = load_tokenizer(kind, tokenizer_model, eod_token)
    dtype = indexed.optimal_dtype(tok.vocab_size)
    base = dict(
        text_key=text_key,
        subset_key=subset_key,
        include_subsets=frozenset(subsets) if subsets else None,
        exclude_subsets=frozenset(exclude_subsets or ()),
        split_sentences=split_sentences,
        append_eod=append_eod,
    )
    opts_by_kind = {k: ParseOptions(kind=k, **base) for k in ("jsonl", "txt", "columnar")}
    settings = _settings(tok, kind, tokenizer_model, dtype, opts_by_kind["jsonl"], txt_unit)
    identities = [_file_identity(f) for f in files]
    keep = None
    if keep_list:
        from .dedup import KeepList, parse_settings

        keep = KeepList(keep_list, files, identities, parse_settings(text_key, subset_key, subsets, exclude_subsets, txt_unit))
        settings["keep_list_sha256"] = keep.sha256  # only when given, so older outputs stay up to date

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    indexed.ensure_dir(out_dir)
    try:
        meta = indexed.read_meta(output_prefix)
    except DataToolsError:
        meta = None  # an unreadable sidecar just means: rebuild
    if (
        not force
        and meta is not None
        and meta.get("settings") == settings
        and meta.get("inputs_identity") == identities
        and os.path.exists(indexed.idx_path(output_prefix))
        and os.path.exists(indexed.bin_path(output_prefix))
        and os.path.getsize(indexed.bin_path(output_prefix)) == meta["tokens"] * np.dtype(dtype).itemsize
    ):
        summary = dict(meta["summary"], up_to_date=True)
        _say(f"{output_prefix}: up to date with its inputs and settings (use --force to rebuild)", quiet)
        return summary

    # --- work dir: keep finished shards only if made with identical settings ---------------------
    work = output_prefix + ".work"
    settings_file = os.path.join(work, "settings.json")
    if os.path.isdir(work):
        if indexed.read_json_or_none(settings_file) != settings:
            if num_tasks is not None:  # the other tasks of the array may be writing there
                raise DataToolsError(
                    f"{work} holds shards made with other settings (tokenizer, flags or inputs' keep-list); array tasks "
                    f"do not clear it while other tasks may be writing there: delete it (rm -r {work}) and resubmit"
                )
            _say(f"{work}: left by a run with other settings; starting over", quiet)
            try:
                shutil.rmtree(work)
            except OSError as e:
                raise indexed.output_error(e, e.filename or work) from None
    indexed.ensure_dir(work)
    if not os.path.exists(settings_file):
        indexed.atomic_write_json(settings_file, settings)

    shard_prefix = [os.path.join(work, f"shard-{i:05d}") for i in range(len(files))]
    done_stats: dict[int, dict] = {}
    for i, ident in enumerate(identities):
        marker = shard_prefix[i] + ".done.json"
        if mine(i) and os.path.exists(marker):
            rec = indexed.read_json_or_none(marker)
            ok = rec is not None and rec.get("input") == ident and all(
                os.path.exists(fn(shard_prefix[i])) for fn in (indexed.bin_path, indexed.idx_path)
            )
            if ok:
                done_stats[i] = rec["stats"]
            else:
                os.remove(marker)
    pending = [(i, f) for i, f in enumerate(files) if i not in done_stats and mine(i)]
    if done_stats:
        _say(f"resuming: {len(done_stats)} of {len(files)} input files already tokenized in {work}", quiet)

    # --- tokenize pending files ------------------------------------------------------------------
    stats_by_file: dict[int, dict] = dict(done_stats)
    kept = f"input files finished before are kept in {work} and the same command resumes from them"
    if pending:
        try:
            _run_pending(
                pending, files, shard_prefix, identities, stats_by_file, tok, kind, tokenizer_model, eod_token,
                opts_by_kind, dtype, workers, batch_bytes, txt_unit, strict, progress, quiet, keep,
            )
        except indexed.OutputError as e:
            raise indexed.OutputError(f"{e}; {kept}") from None
    if num_tasks is not None:
        return _task_summary(output_prefix, work, task_index, num_tasks, [i for i in range(len(files)) if mine(i)],
                             stats_by_file, done_stats, workers, time.time() - t0)

    # --- merge shards into the final pair and publish --------------------------------------------
    total = _new_stats()
    for i in range(len(files)):
        _add_stats(total, stats_by_file[i])
    if total["documents"] == 0:
        shutil.rmtree(work, ignore_errors=True)
        raise DataToolsError(
            f"no documents kept from {len(files)} input file(s) (skipped: {total['skipped'] or 0}, filtered by subset: "
            f"{total['filtered'] or 0}{', dropped by the keep-list: ' + str(total['removed']) if total['removed'] else ''}); nothing written to {output_prefix} (megatron-core cannot read an empty dataset). "
            "Check --text-key / --subset / --exclude-subset."
        )
    try:
        if len(files) == 1:
            indexed.publish_pair(shard_prefix[0], output_prefix)  # one shard: a rename, no copy
        else:
            indexed.concatenate(shard_prefix, output_prefix, dtype)  # temp names until complete
    except indexed.OutputError as e:
        raise indexed.OutputError(f"{e}; the tokenized input files are kept in {work}: the same command then only merges them") from None

    wall = time.time() - t0
    summary = {
        "output_prefix": output_prefix,
        "files": len(files),
        "files_resumed": len(done_stats),
        "workers": workers,
        "dtype": dtype.__name__,
        "documents": total["documents"],
        "sequences": total["sequences"],
        "tokens": total["tokens"],
        "skipped": {r: total["skipped"][r] for r in SKIP_REASONS if r in total["skipped"]},
        "skipped_total": sum(total["skipped"].values()),
        "skip_examples": total["skip_examples"],
        "filtered_by_subset": total["filtered"],
        **_keep_list_summary(keep, total["removed"]),
        "subsets": {k: {"documents": v[0], "tokens": v[1]} for k, v in sorted(total["subsets"].items(), key=lambda kv: str(kv[0]))},
        "separator_lines": total["separator_lines"],
        "wall_time_s": round(wall, 3),
        "docs_per_s": round(total["documents"] / wall, 1) if wall > 0 else None,
        "tokens_per_s": round(total["tokens"] / wall, 1) if wall > 0 else None,
        "up_to_date": False,
    }
    meta = {
        "format": indexed.META_FORMAT,
        "tokenizer": {
            "kind": kind,
            "path": os.path.abspath(tokenizer_model),
            "relpath": os.path.relpath(os.path.abspath(tokenizer_model), out_dir),
            "sha256": settings["tokenizer_sha256"],
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "eod_token": tok.eod_token,
        },
        "dtype": dtype.__name__,
        "append_eod": append_eod,
        "documents": total["documents"],
        "sequences": total["sequences"],
        "tokens": total["tokens"],
        "inputs": [f for f in files],
        "inputs_identity": identities,
        "settings": settings,
        "summary": summary,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    indexed.atomic_write_json(indexed.meta_path(output_prefix), meta)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _keep_list_summary(keep, removed: dict) -> dict:
    """dedup_removed / split_excluded: {subset: documents} a keep-list dropped (only with a keep-list)."""
    if keep is None:
        return {}
    from .dedup import EXACT, NEAR, OTHER_SPLIT, REASONS

    def merged(reasons):
        out: dict = {}
        for r in reasons:
            for name, n in removed.get(REASONS[r], {}).items():
                out[name] = out.get(name, 0) + n
        return dict(sorted(out.items(), key=lambda kv: str(kv[0])))

    other = {r: v for r, v in removed.items() if r not in (REASONS[EXACT], REASONS[NEAR], REASONS[OTHER_SPLIT])}
    return {"keep_list": keep.path, "dedup_removed": merged((EXACT, NEAR)), "split_excluded": merged((OTHER_SPLIT,)),
            **({"keep_list_removed_other": other} if other else {})}


def _locator_span(kind: str, units: list) -> tuple[int, int]:
    """First and last line/row number of a batch (a columnar unit covers `count` rows)."""
    last = units[-1]
    return units[0][0], (last[0] + last[1] - 1 if kind == "columnar" else last[0])


def _task_summary(output_prefix, work, task_index, num_tasks, files_of_task, stats_by_file, done_stats, workers, wall) -> dict:
    total = _new_stats()
    for i in files_of_task:
        _add_stats(total, stats_by_file[i])
    return {
        "output_prefix": output_prefix,
        "work_dir": work,
        "task_index": task_index,
        "num_tasks": num_tasks,
        "files": len(files_of_task),
        "files_resumed": sum(i in done_stats for i in files_of_task),
        "workers": workers,
        "documents": total["documents"],
        "tokens": total["tokens"],
        "skipped_total": sum(total["skipped"].values()),
        "wall_time_s": round(wall, 3),
        "merged": False,
    }


def _run_pending(pending, files, shard_prefix, identities, stats_by_file, tok, kind, model, eod_token,
                 opts_by_kind, dtype, workers, batch_bytes, txt_unit, strict, progress, quiet, keep=None):
    from tqdm import tqdm

    share_tokenizer(tok, kind, model, eod_token)  # the forked workers (or this process) use the loaded tokenizer
    args = (kind, model, eod_token, opts_by_kind, dtype.__name__)
    executor = Inline(setup_worker, *args) if workers == 1 else WorkerPool(workers, init_worker, args, "tokenizer")
    total_bytes = sum(input_size(files[i]) for i, _ in pending)
    bar = tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr, mininterval=0.5,
        disable=(not progress) if progress is not None else (quiet or None),
    )
    max_inflight = 2 * workers + 1
    inflight: collections.deque = collections.deque()
    gen = _batches(pending, opts_by_kind, batch_bytes, txt_unit)
    writer: indexed.ShardWriter | None = None
    cur_file = None
    stats = None
    last_pos = 0
    docs_done = toks_done = 0
    t_start = time.time()
    exhausted = False
    aborted = True
    try:
        while True:
            while not exhausted and len(inflight) < max_inflight:
                try:
                    item = next(gen)
                except StopIteration:
                    exhausted = True
                    break
                except DataToolsError as e:
                    # a read error (e.g. truncated file) surfaces only after the batches queued
                    # before it are written, so files finished before it are committed for resume
                    inflight.append(("error", None, e))
                    exhausted = True
                    break
                if item[0] == "batch":
                    _, file_no, fkind, units, pos = item
                    drop = keep.for_span(file_no, *_locator_span(fkind, units)) if keep is not None else None
                    inflight.append(("batch", file_no, executor.submit(run_batch, fkind, units, drop), pos, units[0][0]))
                else:
                    inflight.append(item)
            if not inflight:
                break
            entry = inflight.popleft()
            if entry[0] == "error":
                raise entry[2]
            file_no = entry[1]
            if cur_file != file_no:
                cur_file = file_no
                writer = indexed.ShardWriter(shard_prefix[file_no], dtype)
                stats = _new_stats()
                last_pos = 0
            if entry[0] == "end":
                stats["separator_lines"] += entry[2]
                writer.commit()
                writer = None
                stats_by_file[file_no] = stats
                indexed.atomic_write_json(shard_prefix[file_no] + ".done.json", {"input": identities[file_no], "stats": stats})
                bar.update(max(entry[4] - last_pos, 0))
                cur_file = None
                continue
            res = entry[2].get()
            path = files[file_no]
            for lineno, reason, detail in res.skips:
                if strict:
                    raise DataToolsError(f"{path}:{lineno}: {reason}: {detail}\n(--strict is set; without it such lines are skipped and counted)")
                stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
                exs = stats["skip_examples"].setdefault(reason, [])
                if len(exs) < MAX_EXAMPLES_PER_REASON:
                    ex = f"{path}:{lineno}: {reason}: {detail}"
                    exs.append(ex)
                    if not quiet:
                        bar.write(f"skipped {ex}", file=sys.stderr)
            for name, n in res.filtered.items():
                stats["filtered"][name] = stats["filtered"].get(name, 0) + n
            if res.removed:
                from .dedup import REASONS

                for (code, name), n in res.removed.items():
                    by_subset = stats["removed"].setdefault(REASONS.get(code, f"reason_{code}"), {})
                    by_subset[name] = by_subset.get(name, 0) + n
            tok_off = 0
            seq_off = 0
            for d, n_seq in enumerate(res.seqs_per_doc.tolist()):
                lens = res.seq_lengths[seq_off:seq_off + n_seq].tolist()
                n_tok = sum(lens)
                writer.add_document(res.tokens[tok_off:tok_off + n_tok], lens)
                sub = res.doc_subsets[d]
                cur = stats["subsets"].setdefault(sub if sub is not None else "<no subset>", [0, 0])
                cur[0] += 1
                cur[1] += n_tok
                tok_off += n_tok
                seq_off += n_seq
            stats["documents"] += len(res.seqs_per_doc)
            stats["sequences"] += len(res.seq_lengths)
            stats["tokens"] += tok_off
            docs_done += len(res.seqs_per_doc)
            toks_done += tok_off
            pos = entry[3]
            bar.update(max(pos - last_pos, 0))
            last_pos = pos
            el = max(time.time() - t_start, 1e-9)
            bar.set_postfix_str(f"{docs_done / el:,.0f} docs/s, {toks_done / el:,.0f} tok/s", refresh=False)
        aborted = False
    except KeyboardInterrupt:
        raise DataToolsError(
            f"interrupted; finished input files are kept in {os.path.dirname(shard_prefix[0])} and a re-run with the same command resumes"
        ) from None
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
        executor.close(abort=aborted)
