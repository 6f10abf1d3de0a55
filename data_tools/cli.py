"""mesh-data: command line for data_tools (tokenize, train-tokenizer, inspect, verify, merge)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DataToolsError

EPILOG = """examples:
  mesh-data tokenize data/sample/sample.jsonl.zst -o runs/data/sample_neox \\
      --tokenizer hf --tokenizer-model data/tokenizers/gpt-neox-20b.json --workers 2
  mesh-data tokenize 'pile/train/*.jsonl.zst' -o pile_neox --tokenizer-model gpt-neox-20b.json \\
      --workers 32 --exclude-subset Books3
  mesh-data train-tokenizer data/sample/sample.jsonl.zst -o data/tokenizers/sample_sp8k --vocab-size 8192
  mesh-data inspect runs/data/sample_neox -n 2
  mesh-data verify runs/data/sample_neox
  mesh-data merge shard00 shard01 -o pile_all
  mesh-data dedup 'pile/train/*.jsonl.zst' -o pile.keep.npz -j 32      # exact + MinHash near duplicates
  mesh-data tokenize 'pile/train/*.jsonl.zst' -o pile_dedup --tokenizer-model gpt-neox-20b.json --keep-list pile.keep.npz
  mesh-data split 'pile/train/*.jsonl.zst' -o pile --keep-list pile.keep.npz --tokenizer-model gpt-neox-20b.json
"""


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="input files or quoted globs: .jsonl, .jsonl.zst, .jsonl.gz, .txt (also .txt.zst/.gz), "
                   ".parquet, .arrow, or a Hugging Face save_to_disk directory (one input); documents keep this order")
    p.add_argument("--text-key", default="text", help="JSON key or Parquet/Arrow column holding the document text; dotted paths reach nested keys / struct fields (default: text)")
    p.add_argument("--subset-key", default="meta.pile_set_name", help="JSON key or column (dotted) naming the document's subset (default: meta.pile_set_name, as in the Pile)")
    p.add_argument("--subset", action="append", metavar="NAME", help="keep only documents of this subset (repeatable)")
    p.add_argument("--exclude-subset", action="append", metavar="NAME", help="drop documents of this subset, e.g. Books3 (repeatable)")
    p.add_argument("--txt-unit", choices=("line", "paragraph"), default="line",
                   help="for .txt inputs: one document per non-blank line, or per blank-line-separated paragraph (default: line)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mesh-data",
        description="Tokenize Pile-style corpora into Megatron indexed datasets (.bin/.idx), and inspect/verify/merge them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("tokenize", help="corpus files -> PREFIX.bin/.idx + PREFIX.meta.json",
                       description="Tokenize corpus files into one Megatron indexed dataset. One document per JSON line "
                                   "(or txt line/paragraph, or Parquet/Arrow row), EOD appended; output bytes do not depend on --workers. "
                                   "Bad lines are skipped, counted and reported with file:line (or fatal with --strict). "
                                   "Finished input files are kept in PREFIX.work/ so an interrupted run resumes.")
    _add_corpus_args(t)
    t.add_argument("-o", "--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin, .idx and .meta.json")
    t.add_argument("--keep-list", metavar="FILE", help="a keep-list from `mesh-data dedup` or `split`: the documents it drops are "
                   "skipped and counted per subset (dedup_removed, split_excluded)")
    t.add_argument("--tokenizer", default="hf", choices=("hf", "sentencepiece"),
                   help="hf: a Hugging Face tokenizer.json (e.g. GPT-NeoX-20B's); sentencepiece: a .model (default: hf)")
    t.add_argument("--tokenizer-model", required=True, help="path of the tokenizer.json or SentencePiece .model")
    t.add_argument("--eod-token", help="token appended after each document (default: <|endoftext|> / </s> for hf, the eos piece for sentencepiece)")
    t.add_argument("--no-eod", action="store_true", help="do not append the EOD token")
    t.add_argument("--split-sentences", action="store_true", help="store each sentence as its own sequence within the document (off by default)")
    t.add_argument("-j", "--workers", type=int, default=1, help="tokenizer worker processes (default: 1); up to the core count scales about linearly")
    t.add_argument("--strict", action="store_true", help="stop with an error at the first bad line instead of skipping it")
    t.add_argument("--force", action="store_true", help="rebuild even if the output is up to date with its inputs and settings")
    t.add_argument("--keep-work", action="store_true", help="keep the per-file shards in OUTPUT_PREFIX.work/ after success")
    t.add_argument("--batch-bytes", type=int, default=1 << 20, help="input bytes per work unit sent to a worker (default: 1 MiB)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--summary-json", help="also write the run summary as JSON to this file")
    t.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    t.add_argument("--task-index", type=int, metavar="I",
                   help="with --num-tasks N: tokenize only input files I, I+N, I+2N, ... (0-based, in input order) into "
                        "OUTPUT_PREFIX.work/ and stop before merging, as one task of a Slurm array (slurm/preprocess.sbatch); "
                        "the same command without these two flags then finds the shards done and only merges")
    t.add_argument("--num-tasks", type=int, metavar="N", help="number of tasks sharing the input files (see --task-index)")

    sp = sub.add_parser("submit-preprocess", help="tokenize on a Slurm cluster: a job array over the input files + a merge job",
                        description="Submit slurm/preprocess.sbatch twice: as a job array of --tasks tasks, each tokenizing its "
                                    "share of the input files (round-robin) with all cores of its node into OUTPUT_PREFIX.work/, "
                                    "then as one job that starts when every task succeeded (afterok) and merges. Arguments after "
                                    "`--` are those of `mesh-data tokenize`. Submitting the same command again after a failure or "
                                    "preemption redoes only the unfinished input files.")
    sp.add_argument("--tasks", type=int, required=True, help="array tasks (nodes used at once); at most one per input file")
    sp.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                    help="extra sbatch option for both jobs, repeatable (e.g. --sbatch-arg=--partition=cpu); without "
                         "--cpus-per-task each task takes a whole node (--exclusive)")
    sp.add_argument("--log-dir", default="logs/slurm", help="job logs: NAME-ARRAYID_TASK.out and NAME-merge-JOBID.out (default: logs/slurm)")
    sp.add_argument("--job-name", default="mesh-preprocess", help="Slurm job name (default: mesh-preprocess)")
    sp.add_argument("--script", help="the sbatch script (default: slurm/preprocess.sbatch of this checkout)")
    sp.add_argument("--dry-run", action="store_true", help="print the two sbatch commands; submit nothing")
    sp.add_argument("tokenize_args", nargs=argparse.REMAINDER, metavar="-- TOKENIZE_ARGS",
                    help="`mesh-data tokenize` arguments: inputs, -o, --tokenizer-model, ...")

    tt = sub.add_parser("train-tokenizer", help="train a SentencePiece BPE/unigram model on a corpus sample",
                        description="Train a lossless SentencePiece model (identity normalization, whitespace kept, byte "
                                    "fallback) on the first --max-chars characters of the corpus. Writes "
                                    "OUTPUT_PREFIX.model and .vocab; eos (id 2) is the EOD token.")
    _add_corpus_args(tt)
    tt.add_argument("-o", "--output-prefix", required=True, help="writes OUTPUT_PREFIX.model and OUTPUT_PREFIX.vocab")
    tt.add_argument("--vocab-size", type=int, default=8192, help="exact vocabulary size (default: 8192)")
    tt.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="default: bpe")
    tt.add_argument("--character-coverage", type=float, default=0.9995, help="share of characters covered by pieces; the rest fall back to bytes (default: 0.9995)")
    tt.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to <unk> instead of UTF-8 byte pieces (loses text)")
    tt.add_argument("--user-defined-symbols", default="", help="comma-separated special tokens that are always single pieces, e.g. '<|pad|>,<|sep|>'")
    tt.add_argument("--add-dummy-prefix", action="store_true", help="prepend a space to each text before encoding (SentencePiece's default; off here so decoding is exact)")
    tt.add_argument("--max-chars", type=int, default=200_000_000, help="characters of corpus to train on (default: 200M)")
    tt.add_argument("--threads", type=int, default=None, help="trainer threads (default: all cores)")
    tt.add_argument("-q", "--quiet", action="store_true", help="less trainer output")

    i = sub.add_parser("inspect", help="counts and detokenized sample documents of PREFIX.bin/.idx")
    i.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    i.add_argument("-n", "--num-docs", type=int, default=3, help="documents to show (default: 3)")
    i.add_argument("--start", type=int, default=0, help="first document to show (default: 0)")
    i.add_argument("--max-chars", type=int, default=400, help="characters shown per document (default: 400)")
    i.add_argument("--tokenizer", choices=("hf", "sentencepiece"), help="override the sidecar's tokenizer kind")
    i.add_argument("--tokenizer-model", help="override the sidecar's tokenizer file")
    i.add_argument("--json", action="store_true", help="print the result as JSON")

    v = sub.add_parser("verify", help="check .bin/.idx consistency; exit 1 on corruption")
    v.add_argument("prefixes", nargs="+", help="dataset prefixes")
    v.add_argument("--no-token-check", action="store_true", help="skip the scan of every token id against the vocabulary and EOD positions")

    m = sub.add_parser("merge", help="concatenate several .bin/.idx pairs (e.g. one per Pile shard) into one")
    m.add_argument("prefixes", nargs="+", help="input dataset prefixes, in output order")
    m.add_argument("-o", "--output-prefix", required=True, help="merged dataset prefix")
    _add_selection_parsers(sub)
    return ap


def _add_selection_parsers(sub) -> None:
    from .dedup import DEFAULT_NGRAM, DEFAULT_NUM_PERM, DEFAULT_SEED, DEFAULT_THRESHOLD
    from .split import DEFAULT_SALT, DEFAULT_SPLIT

    def tokenizer_args(p, need: str):
        p.add_argument("--tokenizer", default="hf", choices=("hf", "sentencepiece"), help="tokenizer kind (default: hf)")
        p.add_argument("--tokenizer-model", help=need)

    d = sub.add_parser("dedup", help="exact + near-duplicate (MinHash LSH) documents -> a keep-list for tokenize --keep-list",
                       description="Find exact duplicates (same text after NFC, lowercasing and collapsing whitespace) and near "
                                   "duplicates (MinHash LSH on word n-grams, datasketch) and write a keep-list: per input file, "
                                   "the line/row numbers of the dropped documents. The first document of each duplicate group "
                                   "(input order) is kept. Reports documents and characters/bytes (tokens with --tokenizer-model) "
                                   "removed per subset. Signatures of finished input files are kept in KEEP_LIST.work/, so an "
                                   "interrupted run resumes.")
    _add_corpus_args(d)
    d.add_argument("-o", "--keep-list", required=True, metavar="KEEP_LIST", help="the keep-list file to write, e.g. pile.keep.npz")
    d.add_argument("--exact-only", action="store_true", help="only exact duplicates (no MinHash; ~10x faster)")
    d.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"Jaccard similarity of the shingle sets above which documents are near duplicates (default: {DEFAULT_THRESHOLD}, "
                        "the threshold of Pythia's deduplicated Pile)")
    d.add_argument("--shingle", choices=("word", "char"), default="word", help="word n-grams or character k-grams (default: word)")
    d.add_argument("--ngram", type=int, default=DEFAULT_NGRAM, help=f"words (or characters) per shingle (default: {DEFAULT_NGRAM}, as pile_dedupe and datatrove/FineWeb)")
    d.add_argument("--num-perm", type=int, default=DEFAULT_NUM_PERM, help=f"MinHash permutations = signature length (default: {DEFAULT_NUM_PERM})")
    d.add_argument("--bands", type=int, help="LSH bands (with --rows); default: datasketch MinHashLSH's choice for --threshold")
    d.add_argument("--rows", type=int, help="rows (hashes) per LSH band (with --bands)")
    d.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"MinHash permutation seed (default: {DEFAULT_SEED})")
    d.add_argument("--no-verify", action="store_true", help="count every LSH band collision as a duplicate (default: only pairs whose signatures agree on >= --threshold)")
    d.add_argument("-j", "--workers", type=int, default=1, help="worker processes computing signatures (default: 1)")
    tokenizer_args(d, "also count the tokens removed, with this tokenizer (slower: every document is tokenized)")
    d.add_argument("--output-corpus", metavar="DIR", help="also write each jsonl/txt input minus the dropped documents to DIR/NAME.zst")
    d.add_argument("--memory-gb", type=float, default=2.0, help="memory for sorting one partition of hashes (default: 2); more documents use more partitions on disk")
    d.add_argument("--batch-bytes", type=int, default=1 << 20, help="input bytes per work unit sent to a worker (default: 1 MiB)")
    d.add_argument("--keep-work", action="store_true", help="keep the signatures in KEEP_LIST.work/ after success")
    d.add_argument("--summary-json", help="also write the report as JSON to this file")
    d.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    s = sub.add_parser("split", help="deterministic train/valid/test split of documents by a salted hash of their text",
                       description="Assign every document to train, valid or test by a salted hash of its normalised text, so a "
                                   "document's split does not depend on order, sharding or shuffling and identical documents share "
                                   "one. Writes PREFIX.{train,valid,test}.keep.npz, and with --tokenizer-model the datasets "
                                   "PREFIX.train / PREFIX.valid / PREFIX.test for data.paths / data.valid_paths / data.test_paths.")
    _add_corpus_args(s)
    s.add_argument("-o", "--output-prefix", required=True, help="writes OUTPUT_PREFIX.{train,valid,test}.keep.npz (and the datasets)")
    s.add_argument("--split", default=DEFAULT_SPLIT, help=f"train,valid,test weights (default: {DEFAULT_SPLIT}, Megatron's and data.split's default)")
    s.add_argument("--salt", default=DEFAULT_SALT, help=f"hash salt; another salt draws another split (default: {DEFAULT_SALT})")
    s.add_argument("--keep-list", metavar="FILE", help="a dedup keep-list: its dropped documents are dropped from every split")
    s.add_argument("-j", "--workers", type=int, default=1, help="worker processes (default: 1)")
    tokenizer_args(s, "also tokenize the three splits into OUTPUT_PREFIX.{train,valid,test}.bin/.idx with this tokenizer")
    s.add_argument("--eod-token", help="as for tokenize")
    s.add_argument("--no-eod", action="store_true", help="as for tokenize")
    s.add_argument("--batch-bytes", type=int, default=1 << 20, help="input bytes per work unit sent to a worker (default: 1 MiB)")
    s.add_argument("--keep-work", action="store_true", help="keep the hashes in OUTPUT_PREFIX.split.work/ after success")
    s.add_argument("--summary-json", help="also write the report as JSON to this file")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


def _run_selection(args) -> None:
    common = dict(text_key=args.text_key, subset_key=args.subset_key, subsets=args.subset, exclude_subsets=args.exclude_subset,
                  txt_unit=args.txt_unit, batch_bytes=args.batch_bytes, keep_work=args.keep_work, quiet=args.quiet)
    if args.cmd == "dedup":
        from .dedup import dedup_files

        r = dedup_files(args.inputs, args.keep_list, near=not args.exact_only, threshold=args.threshold, shingle=args.shingle,
                        ngram=args.ngram, num_perm=args.num_perm, bands=args.bands, rows=args.rows, seed=args.seed,
                        verify=not args.no_verify, workers=args.workers, tokenizer=args.tokenizer,
                        tokenizer_model=args.tokenizer_model, output_corpus=args.output_corpus, memory_gb=args.memory_gb, **common)
    else:
        from .split import split_files

        r = split_files(args.inputs, args.output_prefix, split=args.split, salt=args.salt, keep_list=args.keep_list,
                        workers=args.workers, tokenizer=args.tokenizer, tokenizer_model=args.tokenizer_model,
                        tokenize_options=dict(eod_token=args.eod_token, append_eod=not args.no_eod), **common)
    if args.summary_json:
        from .indexed import atomic_write_json

        atomic_write_json(args.summary_json, r)
    if args.quiet:
        return
    out = sys.stdout
    if args.cmd == "dedup":
        st = r["settings"]
        how = "exact only" if not st["near"] else (f"exact + near: Jaccard >= {st['threshold']}, {st['shingle']} {st['ngram']}-grams, "
                                                   f"{st['num_perm']} perms, {st['bands']} bands x {st['rows']} rows")
        print(f"wrote {r['keep_list']}  ({how})", file=out)
        print(f"  files      {r['files']} ({r['files_resumed']} resumed)", file=out)
        print(f"  documents  {r['documents']:,}, kept {r['kept_documents']:,}, removed {r['removed_documents']:,}", file=out)
        if r["skipped"]:
            print(f"  skipped    {json.dumps(r['skipped'])}", file=out)
        tok = st["tokenizer"] is not None
        unit = "tokens" if tok else "bytes"
        print(f"    {'subset':<28} {'docs':>9} {'exact':>8} {'near':>8} {unit + ' removed':>16}", file=out)
        for name, v in r["subsets"].items():
            ex = v["removed"].get("exact_duplicate", {})
            ne = v["removed"].get("near_duplicate", {})
            gone = ex.get(unit, 0) + ne.get(unit, 0)
            print(f"    {name:<28} {v['documents']:>9,} {ex.get('documents', 0):>8,} {ne.get('documents', 0):>8,} "
                  f"{gone:>9,} ({100 * gone / max(v[unit], 1):.1f}%)", file=out)
        for d in r.get("output_corpus") or []:
            print(f"  filtered corpus {d}", file=out)
        print(f"  wall time  {r['wall_time_s']:.2f} s  (signatures {r['text_mb_per_s']:.1f} MB/s of text, {r['workers']} workers)", file=out)
    else:
        print(f"split {r['documents']:,} documents ({r['settings']['split']}, salt {r['settings']['salt']!r})", file=out)
        for name, v in r["splits"].items():
            extra = f", {v['tokens']:,} tokens in {v['dataset']}" if v.get("dataset") else ""
            print(f"  {name:<6} {v['documents']:>9,} docs {v['bytes']:>13,} bytes  {v['keep_list']}{extra}", file=out)


def _print_summary(s: dict) -> None:
    out = sys.stdout
    if s.get("up_to_date"):
        print(f"up to date: {s['output_prefix']} ({s['documents']:,} documents, {s['tokens']:,} tokens)", file=out)
        return
    print(f"wrote {s['output_prefix']}.bin/.idx/.meta.json  ({s['dtype']})", file=out)
    print(f"  files      {s['files']} ({s['files_resumed']} resumed)", file=out)
    print(f"  documents  {s['documents']:,}", file=out)
    print(f"  tokens     {s['tokens']:,}", file=out)
    print(f"  skipped    {s['skipped_total']:,}" + (" " + json.dumps(s["skipped"]) if s["skipped"] else ""), file=out)
    for reason, exs in s["skip_examples"].items():
        for ex in exs:
            print(f"    {ex}", file=out)
    if s["filtered_by_subset"]:
        print(f"  filtered   {json.dumps(s['filtered_by_subset'])}", file=out)
    if s.get("keep_list"):
        print(f"  keep-list  {s['keep_list']}: dedup_removed {json.dumps(s['dedup_removed'])}, split_excluded {json.dumps(s['split_excluded'])}", file=out)
    if s["separator_lines"]:
        print(f"  blank separator lines (txt) {s['separator_lines']:,}", file=out)
    for name, v in s["subsets"].items():
        print(f"    {name:<28} {v['documents']:>9,} docs {v['tokens']:>13,} tokens", file=out)
    print(f"  wall time  {s['wall_time_s']:.2f} s  ({s['docs_per_s']:,.0f} docs/s, {s['tokens_per_s']:,.0f} tokens/s, {s['workers']} workers)", file=out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "tokenize":
            from .pipeline import tokenize_files

            s = tokenize_files(
                args.inputs, args.output_prefix, args.tokenizer, args.tokenizer_model, args.workers,
                text_key=args.text_key, subset_key=args.subset_key, subsets=args.subset,
                exclude_subsets=args.exclude_subset, split_sentences=args.split_sentences,
                append_eod=not args.no_eod, txt_unit=args.txt_unit, eod_token=args.eod_token,
                strict=args.strict, force=args.force, keep_work=args.keep_work, batch_bytes=args.batch_bytes,
                progress=False if args.no_progress or args.quiet else None, quiet=args.quiet, keep_list=args.keep_list,
                task_index=args.task_index, num_tasks=args.num_tasks,
            )
            if args.summary_json:
                from .indexed import atomic_write_json

                atomic_write_json(args.summary_json, s)
            if not args.quiet and s.get("task_index") is not None:
                print(f"task {s['task_index']}/{s['num_tasks']}: {s['files']} input files ({s['files_resumed']} done before) in "
                      f"{s['work_dir']}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['skipped_total']:,} skipped, "
                      f"{s['wall_time_s']:.1f} s; not merged (run without --task-index/--num-tasks to merge)")
            elif not args.quiet:
                _print_summary(s)
        elif args.cmd == "submit-preprocess":
            from .preprocess_job import submit_preprocess

            submit_preprocess(args.tokenize_args, args.tasks, args.sbatch_arg, args.log_dir, args.job_name, args.script, args.dry_run)
        elif args.cmd == "train-tokenizer":
            from .train_sp import train_tokenizer

            r = train_tokenizer(
                args.inputs, args.output_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
                character_coverage=args.character_coverage, byte_fallback=not args.no_byte_fallback,
                user_defined_symbols=[x for x in args.user_defined_symbols.split(",") if x],
                add_dummy_prefix=args.add_dummy_prefix, text_key=args.text_key, subset_key=args.subset_key,
                subsets=args.subset, exclude_subsets=args.exclude_subset, txt_unit=args.txt_unit,
                max_chars=args.max_chars, num_threads=args.threads, quiet=args.quiet,
            )
            print(json.dumps(r, indent=1))
        elif args.cmd == "inspect":
            from .inspect_data import inspect_dataset

            r = inspect_dataset(args.prefix, args.num_docs, args.max_chars, args.tokenizer, args.tokenizer_model, args.start)
            if args.json:
                print(json.dumps(r, indent=1, ensure_ascii=False))
            else:
                print(f"{r['prefix']}: {r['documents']:,} documents, {r['sequences']:,} sequences, {r['tokens']:,} tokens ({r['dtype']})")
                print(f"  tokens per document: min {r['doc_tokens_min']:,}, mean {r['doc_tokens_mean']:,.1f}, max {r['doc_tokens_max']:,}")
                if r["tokenizer"]:
                    t = r["tokenizer"]
                    print(f"  tokenizer: {t['kind']} {t['path']} (vocab {t['vocab_size']:,}, eod id {t['eod_id']})")
                for name, v in (r["subsets"] or {}).items():
                    print(f"    {name:<28} {v['documents']:>9,} docs {v['tokens']:>13,} tokens")
                for smp in r["samples"]:
                    print(f"--- document {smp['document']} ({smp['tokens']:,} tokens) ---")
                    print(smp["text"] + (" [...]" if smp["truncated"] else ""))
        elif args.cmd == "verify":
            from .indexed import verify

            for p in args.prefixes:
                r = verify(p, check_tokens=not args.no_token_check)
                print(f"OK {p}: {r['documents']:,} documents, {r['sequences']:,} sequences, {r['tokens']:,} tokens, {r['dtype']}"
                      + ("" if r["sidecar"] else " (no .meta.json sidecar: token ids not checked)"))
        elif args.cmd == "merge":
            from .merge import merge_datasets

            r = merge_datasets(args.prefixes, args.output_prefix)
            print(f"wrote {args.output_prefix}: {r['documents']:,} documents, {r['tokens']:,} tokens from {len(args.prefixes)} datasets ({r['seconds']:.1f} s)")
        elif args.cmd in ("dedup", "split"):
            _run_selection(args)
    except DataToolsError as e:
        print(f"mesh-data {args.cmd}: error: {e}", file=sys.stderr)
        return 130 if str(e).startswith("interrupted") else getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        print(f"mesh-data {args.cmd}: interrupted (no output was published)", file=sys.stderr)
        return 130
    return 0
