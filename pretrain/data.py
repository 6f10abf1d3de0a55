"""Training data: megatron-core GPTDataset / BlendedMegatronDatasetBuilder over `.bin/.idx` prefixes, and a
deterministic batch order driven by one integer, the number of samples consumed so far.

Order: megatron-core shuffles documents and samples with `train.seed` and caches the indices (rank 0 builds them,
the others wait and read the cache). Step s uses global samples [s*G, (s+1)*G) (G = global batch); micro-batch m of
data-parallel rank r takes G/(micro*dp) consecutive slices exactly as Megatron's pretraining sampler does, so
tensor-parallel peers (same DP rank) read identical batches and DP ranks read disjoint ones. Saving
`consumed_samples` in a checkpoint is therefore enough to continue with the next unseen batch.
The indices depend on (seed, data, seq_length, number of train samples = train_iters x global batch): changing
train_iters or the global batch changes the order (as in Megatron / GPT-NeoX).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mesh_megatron.config import ConfigError
from pretrain.config import RunConfig
from pretrain.data_checks import check_prefixes, read_meta  # noqa: F401  (read_meta: part of this module's API)


@dataclass
class DatasetTokenizer:
    """What megatron-core's GPTDataset reads from its `tokenizer`: the vocabulary size (to pick the token dtype) and
    the end-of-document id. The text tokenizer itself is not needed to read already-tokenized `.bin` files."""

    vocab_size: int
    eod: int

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict:  # part of megatron-core's index-cache key
        return {"class": "DatasetTokenizer", "vocab_size": self.vocab_size, "eod": self.eod}


def dataset_tokenizer(cfg: RunConfig) -> DatasetTokenizer:
    """Vocab size / EOD id from the prefixes' sidecars, checked against the model's vocabulary."""
    eod, vocab = cfg.data.eod_id, None
    all_paths = cfg.data.paths + (cfg.data.valid_paths or []) + (cfg.data.test_paths or [])
    for prefix in all_paths:
        meta = read_meta(prefix)
        if meta is None:
            continue
        v = meta["vocab_size"]
        if v is not None and v > cfg.model.vocab_size:
            raise ConfigError(
                f"data.paths: '{prefix}' was tokenized with a vocabulary of {v} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}; set model.vocab_size >= {v} or use a dataset made with the model's tokenizer"
            )
        if eod is None and meta["eod_id"] is not None:
            eod = int(meta["eod_id"])
        vocab = max(vocab or 0, v or 0) or None
    return DatasetTokenizer(vocab_size=vocab or cfg.model.vocab_size, eod=0 if eod is None else eod)


def _tokens_per_split(prefix: str, split: list[float]) -> list[int]:
    """Tokens megatron-core would put in each split of one prefix (same document book-ends as its builder)."""
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths.astype("int64")  # a copy: the original is a view of the index mmap, closed with ds
    del ds
    n = len(lengths)
    out = []
    for book in convert_split_vector_to_split_matrix(split):
        if book is None:
            out.append(0)
        else:
            beg, end = int(round(book[0] * n)), int(round(book[1] * n))
            out.append(int(lengths[beg:end].sum()))
    return out


def effective_split(cfg: RunConfig) -> str:
    """The split string to hand megatron-core: a valid/test split that would get no complete sample in some prefix is
    dropped (megatron-core would loop forever looking for one), with a note; an empty train split is an error."""
    vals = [float(v) for v in cfg.data.split.split(",")]
    total = sum(vals)
    split = [v / total for v in vals]
    need = cfg.model.seq_length + 1
    dropped = []
    for prefix in cfg.data.paths:
        toks = _tokens_per_split(prefix, split)
        if toks[0] < need:
            raise ConfigError(
                f"data.split: the train split of '{prefix}' has {toks[0]} tokens, fewer than one sample of seq_length+1 = {need}; "
                "use more data or a larger train share"
            )
        for i, name in ((1, "valid"), (2, "test")):
            if vals[i] > 0 and toks[i] < need:
                vals[i] = 0.0
                dropped.append(f"{name} ({toks[i]} tokens in '{Path(prefix).name}')")
    if dropped and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(f"[pretrain] note: data.split '{cfg.data.split}' leaves too little data for: {', '.join(dropped)}; "
              "skipping that evaluation (give a larger share or data.valid_paths / data.test_paths)", flush=True)
    return ",".join(f"{v:g}" for v in vals)


def build_datasets(cfg: RunConfig, dp_size: int):
    """(train, valid, test) megatron-core datasets sized for this run (valid/test may be None)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, t = cfg.data, cfg.train
    if not d.paths:
        raise ConfigError(f"{cfg.source}: data.paths is empty; give at least one tokenized dataset prefix (PREFIX.bin/.idx)")
    check_prefixes(d.paths, "data.paths")
    check_prefixes(d.valid_paths or [], "data.valid_paths")
    check_prefixes(d.test_paths or [], "data.test_paths")
    # megatron-core logs every index build at INFO; keep the console for the training progress.
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)

    eval_samples = t.eval_iters * t.global_batch_size
    # The same fixed validation samples are used at every evaluation, so the curve is comparable.
    sizes = [t.train_iters * t.global_batch_size, eval_samples, eval_samples]
    weights = list(d.weights) if d.weights else None
    common = dict(
        random_seed=t.seed,
        sequence_length=cfg.model.seq_length,
        path_to_cache=d.cache_dir or str(cfg.run_dir / "data_cache"),
        tokenizer=dataset_tokenizer(cfg),
        reset_position_ids=False,  # Pythia: documents are packed, attention crosses EOD, no loss masking
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention is built into the model
        mid_level_dataset_surplus=0.05,
    )
    if d.valid_paths or d.test_paths:
        blend = lambda paths: (list(paths), None) if paths else None  # noqa: E731
        need = cfg.model.seq_length + 1
        for field, paths in (("data.paths", d.paths), ("data.valid_paths", d.valid_paths), ("data.test_paths", d.test_paths)):
            for prefix in paths or []:
                if _tokens_per_split(prefix, [1.0, 0.0, 0.0])[0] < need:
                    raise ConfigError(f"{field}: '{prefix}' has fewer tokens than one sample (seq_length+1 = {need})")
        ds_cfg = GPTDatasetConfig(
            blend_per_split=[(list(d.paths), weights), blend(d.valid_paths), blend(d.test_paths)], **common
        )
    else:
        ds_cfg = GPTDatasetConfig(blend=(list(d.paths), weights), split=effective_split(cfg), **common)
    try:
        train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, ds_cfg).build()
    except AssertionError as e:
        raise ConfigError(f"data: megatron-core could not build the datasets ({e}); check data.paths / data.split") from None
    if train is None or len(train) == 0:
        raise ConfigError(f"data.paths: no training samples of {cfg.model.seq_length} tokens; the data is too small for this seq_length/split")
    return train, valid, test


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "tokens": torch.stack([s["tokens"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
    }


def train_micro_batches(dataset, step: int, cfg: RunConfig, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """The micro-batches this DP rank processes at optimizer step `step` (consumed samples = step x global batch)."""
    mb, gb = cfg.train.micro_batch_size, cfg.train.global_batch_size
    start = step * gb
    grad_accum = gb // (mb * dp_size)
    out = []
    for m in range(grad_accum):
        base = start + m * mb * dp_size + dp_rank * mb
        out.append(_collate([dataset[(base + i) % len(dataset)] for i in range(mb)]))
    return out


def eval_micro_batches(dataset, cfg: RunConfig, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """A fixed slice of the validation/test split: the first eval_iters global batches, divided over DP ranks like
    training batches, so every layout (any TP / DP / micro-batch) evaluates exactly the same samples."""
    n = len(dataset)
    out = []
    for m in range(cfg.train.eval_iters):
        if (m + 1) * cfg.train.global_batch_size > n:
            break
        out.extend(train_micro_batches(dataset, m, cfg, dp_rank, dp_size))
    return out


class BatchPrefetcher:
    """Prepares the next optimizer step's micro-batches on a background thread while the current step trains.

    Batches are a pure function of the step (`train_micro_batches`), so prefetching changes neither the data order
    nor exact resume: the batches of step s are the same whether prepared ahead or on demand. The dataset reads are
    numpy memory-map slices, which release the GIL; with a GPU the tensors are pinned so the training thread's copy
    to the device can be non-blocking."""

    def __init__(self, dataset, cfg: RunConfig, dp_rank: int, dp_size: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.dataset, self.cfg, self.dp_rank, self.dp_size = dataset, cfg, dp_rank, dp_size
        self.pin = torch.cuda.is_available()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
        self._next: tuple[int, object] | None = None  # (step, future)

    def _prepare(self, step: int) -> list[dict[str, torch.Tensor]]:
        batches = train_micro_batches(self.dataset, step, self.cfg, self.dp_rank, self.dp_size)
        if self.pin:
            batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        return batches

    def batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of `step` (prepared ahead if it was the one expected), then starts on `step + 1`."""
        if self._next is not None and self._next[0] == step:
            out = self._next[1].result()
        else:
            if self._next is not None:
                self._next[1].cancel()
            out = self._prepare(step)
        self._next = (step + 1, self._pool.submit(self._prepare, step + 1))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._next = None
