"""Data: megatron-core GPTDataset over .bin/.idx, blends, deterministic order, TP-identical / DP-disjoint batches,
the data position as a function of the step alone, and readable errors for missing or mismatched data."""

import pytest
import torch

from mesh_megatron.config import ConfigError
from pretrain.config import build_run_config
from pretrain.data import build_datasets, train_micro_batches
from pretrain_data import VOCAB, make_dataset


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    d = tmp_path_factory.mktemp("blend")
    return make_dataset(d / "a", n_docs=120, seed=1), make_dataset(d / "b", n_docs=60, seed=2)


def cfg_for(paths, tmp_path, **train):
    return build_run_config({
        "model": {"arch": "vanilla", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
                  "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64},
        "data": {"paths": list(paths), "split": "90,8,2"},
        "train": {"train_iters": 20, "micro_batch_size": 2, "global_batch_size": 8, **train},
        "logging": {"dir": str(tmp_path)},
    })


def samples(ds, n):
    return [ds[i]["tokens"] for i in range(n)]


def test_order_is_deterministic_given_the_seed(single_process, prefixes, tmp_path):
    a, _, _ = build_datasets(cfg_for(prefixes[:1], tmp_path / "x"), 1)
    b, _, _ = build_datasets(cfg_for(prefixes[:1], tmp_path / "y"), 1)  # separate cache: rebuilt from scratch
    c, _, _ = build_datasets(cfg_for(prefixes[:1], tmp_path / "z", seed=99), 1)
    assert all(torch.equal(x, y) for x, y in zip(samples(a, 50), samples(b, 50)))
    assert not all(torch.equal(x, y) for x, y in zip(samples(a, 50), samples(c, 50)))
    s = a[0]
    assert s["tokens"].shape == (32,) and torch.equal(s["tokens"][1:], s["labels"][:-1])  # labels shifted by one


def test_weighted_blend_follows_the_weights(single_process, prefixes, tmp_path):
    cfg = cfg_for(prefixes, tmp_path, train_iters=100)
    cfg.data.weights = [1.0, 3.0]
    train, valid, test = build_datasets(cfg, 1)
    ids = train.dataset_index[: len(train)]
    frac_b = float((ids == 1).mean())
    assert frac_b == pytest.approx(0.75, abs=0.02)
    assert valid is not None and test is not None


def test_dp_ranks_disjoint_and_position_is_the_step(single_process, prefixes, tmp_path):
    cfg = cfg_for(prefixes[:1], tmp_path)
    train, _, _ = build_datasets(cfg, 2)

    def seqs(step, rank, dp):
        return [tuple(t.tolist()) for b in train_micro_batches(train, step, cfg, rank, dp) for t in b["tokens"]]

    r0, r1 = seqs(3, 0, 2), seqs(3, 1, 2)
    assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)  # DP ranks: disjoint halves of the global batch
    # any DP layout covers the same global batch: the data position depends only on the step
    assert sorted(r0 + r1) == sorted(seqs(3, 0, 1))
    assert sorted(seqs(3, 0, 1)) == sorted(tuple(train[i]["tokens"].tolist()) for i in range(24, 32))


def test_missing_and_mismatched_data_are_clear_errors(single_process, prefixes, tmp_path):
    with pytest.raises(ConfigError, match=r"data.paths: dataset '.*nope' has no .*nope.bin; tokenize it with data_tools"):
        build_datasets(cfg_for([str(tmp_path / "nope")], tmp_path), 1)
    cfg = cfg_for(prefixes[:1], tmp_path)
    cfg.model = cfg.model.replace(vocab_size=128)
    with pytest.raises(ConfigError, match=r"tokenized with a vocabulary of 256 tokens but model.vocab_size is 128"):
        build_datasets(cfg, 1)


def test_split_too_small_for_a_sample_is_dropped_or_refused(single_process, tmp_path, capsys):
    small = make_dataset(tmp_path / "small", n_docs=20, seed=3)  # test share 2% of 20 docs = 0 documents
    cfg = cfg_for([small], tmp_path / "run")
    train, valid, test = build_datasets(cfg, 1)
    assert len(train) > 0 and valid is not None and test is None
    assert "too little data for: test" in capsys.readouterr().out
    cfg = cfg_for([small], tmp_path / "run2")
    cfg.data.split = "1,99,0"
    with pytest.raises(ConfigError, match=r"data.split: the train split of .* fewer than one sample"):
        build_datasets(cfg, 1)


def test_prefetcher_gives_the_batches_of_each_step(single_process, prefixes, tmp_path):
    """Prepared ahead, in order, out of order (a resume) or after a jump: always train_micro_batches of that step."""
    from pretrain.data import BatchPrefetcher

    cfg = cfg_for(prefixes[:1], tmp_path)
    train, _, _ = build_datasets(cfg, 2)
    pf = BatchPrefetcher(train, cfg, 1, 2)
    try:
        for step in (0, 1, 2, 7, 8, 3):
            got, want = pf.batches(step), train_micro_batches(train, step, cfg, 1, 2)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert all(torch.equal(g[k], w[k]) for k in w)
    finally:
        pf.close()
