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
"""


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="input files or quoted globs: .jsonl, .jsonl.zst, .jsonl.gz, .txt (also .txt.zst/.gz); documents keep this order")
    p.add_argument("--text-key", default="text", help="JSON key holding the document text; dotted paths reach nested keys (default: text)")
    p.add_argument("--subset-key", default="meta.pile_set_name", help="JSON key (dotted) naming the document's subset (default: meta.pile_set_name, as in the Pile)")
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
                                   "(or txt line/paragraph), EOD appended; output bytes do not depend on --workers. "
                                   "Bad lines are skipped, counted and reported with file:line (or fatal with --strict). "
                                   "Finished input files are kept in PREFIX.work/ so an interrupted run resumes.")
    _add_corpus_args(t)
    t.add_argument("-o", "--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin, .idx and .meta.json")
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
    return ap


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
                progress=False if args.no_progress or args.quiet else None, quiet=args.quiet,
            )
            if args.summary_json:
                from .indexed import atomic_write_json

                atomic_write_json(args.summary_json, s)
            if not args.quiet:
                _print_summary(s)
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
    except DataToolsError as e:
        print(f"mesh-data {args.cmd}: error: {e}", file=sys.stderr)
        return 130 if str(e).startswith("interrupted") else 1
    except KeyboardInterrupt:
        print(f"mesh-data {args.cmd}: interrupted (no output was published)", file=sys.stderr)
        return 130
    return 0
