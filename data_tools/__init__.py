"""data_tools: corpus files (Pile-style jsonl / jsonl.zst / jsonl.gz / txt) -> Megatron .bin/.idx.

Python API (names are imported lazily, so `import data_tools` is cheap):
    tokenize_files(inputs, output_prefix, tokenizer="hf", tokenizer_model=..., workers=1, ...) -> summary
        (task_index=I, num_tasks=N: only this task's share of the files, not merged; see slurm/preprocess.sbatch)
    submit_preprocess(tokenize_args, tasks, sbatch_args) -> job ids of a Slurm array + its merge job
    load_tokenizer(kind, path) -> object with .encode/.decode/.vocab_size/.eod_id
    train_tokenizer(inputs, model_prefix, vocab_size=8192, ...) -> report
    verify(prefix) / inspect_dataset(prefix) / merge_datasets(prefixes, output_prefix)
    read_meta(prefix) -> the PREFIX.meta.json sidecar (tokenizer kind/path/vocab size/eod id) or None
CLI: `mesh-data --help` or `python -m data_tools --help`.
"""

_LAZY = {
    "tokenize_files": ("pipeline", "tokenize_files"),
    "load_tokenizer": ("tokenizer", "load_tokenizer"),
    "train_tokenizer": ("train_sp", "train_tokenizer"),
    "verify": ("indexed", "verify"),
    "read_meta": ("indexed", "read_meta"),
    "inspect_dataset": ("inspect_data", "inspect_dataset"),
    "merge_datasets": ("merge", "merge_datasets"),
    "submit_preprocess": ("preprocess_job", "submit_preprocess"),
    "DataToolsError": ("errors", "DataToolsError"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
