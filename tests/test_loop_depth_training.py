"""Training with a distribution over the loop count K (train.num_loops_train) and truncated backprop
(train.backprop_loops): K is a function of (seed, step), logged per step, exact resume holds, FLOPs follow the K run;
truncated backprop keeps the forward and drops the early core iterations' graph."""

import json

import numpy as np
import pytest
import torch

from mesh_megatron.config import ConfigError
from pretrain.loop_sampler import LoopSampler, parse
from pretrain_data import VOCAB, make_dataset

MODEL = {"name": "loops", "arch": "mesh", "prelude_layers": 1, "core_layers": 1, "num_loops": 2, "coda_layers": 1,
         "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32, "vocab_size": VOCAB,
         "make_vocab_size_divisible_by": 64}


def test_specs_and_draws():
    assert parse("fixed") == ("fixed",) and parse("uniform:1-4") == ("uniform", 1, 4)
    assert parse("lognormal-poisson:3") == ("lognormal-poisson", 3.0, 0.5)
    for bad in ("uniform:3-1", "poisson:0.5", "gauss:2", "uniform:0-2"):
        with pytest.raises(ConfigError, match="train.num_loops_train"):
            parse(bad)
    u = LoopSampler("uniform:1-4", seed=7, num_loops=2)
    draws = [u.k(s) for s in range(400)]
    assert set(draws) == {1, 2, 3, 4} and draws == [u.k(s) for s in range(400)]  # a function of the step
    assert draws != [LoopSampler("uniform:1-4", seed=8, num_loops=2).k(s) for s in range(400)]
    p = LoopSampler("poisson:3", seed=7, num_loops=2)
    ks = np.array([p.k(s) for s in range(4000)])
    assert ks.min() >= 1 and ks.max() <= 12 and abs(ks.mean() - 3) < 0.1
    ln = LoopSampler("lognormal-poisson:3", seed=7, num_loops=2, cap=6)
    ks = np.array([ln.k(s) for s in range(4000)])
    assert ks.min() >= 1 and ks.max() == 6 and 2.5 < ks.mean() < 3.2  # capped tail
    assert LoopSampler("fixed", seed=7, num_loops=3).k(5) == 3


def test_truncated_backprop_keeps_the_forward_and_drops_early_core_graphs(single_process):
    from mesh_megatron.config import ModelConfig
    from mesh_megatron.model import MeshGPTModel

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(MODEL, num_loops=3))
    model = MeshGPTModel(cfg)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))

    def grads(grad_loops):
        model.zero_grad()
        loss = model(ids, labels=ids, grad_loops=grad_loops).mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}

    full_loss, full = grads(None)
    same_loss, same = grads(3)
    cut_loss, cut = grads(1)
    assert full_loss == same_loss == cut_loss  # the forward pass is unchanged
    assert all(torch.equal(full[n], same[n]) for n in full)  # grad_loops >= K is full backprop
    core = [n for n in full if n.startswith("core.")]
    assert any(not torch.equal(full[n], cut[n]) for n in core)  # the core sees only its last iteration
    # MeSH's buffer bypasses the detached iterations: the prelude still learns
    assert any(cut[n] is not None and cut[n].abs().sum() > 0 for n in full if n.startswith("prelude."))


def config(data, run_dir, **train):
    return {
        "model": dict(MODEL),
        "data": {"paths": [data], "split": "90,8,2"},
        "train": {"train_iters": 6, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3, "eval_interval": 0,
                  "eval_iters": 1, "log_interval": 1, "num_loops_train": "uniform:1-4", "backprop_loops": 2, **train},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"save_interval": 0, "save_at_end": True},
        "logging": {"dir": str(run_dir), "wandb": {"mode": "disabled"}},
    }


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_random_k_is_logged_and_resume_is_exact(single_process, tmp_path):
    from pretrain.config import build_run_config
    from pretrain.train import Trainer

    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "data" / "synthetic")

    def run(name, **train):
        res = Trainer(build_run_config(config(data, tmp_path / name, **train), source=name)).run()
        res.pop("engine").destroy()

    run("straight")
    run("chunked", exit_at_step=3)
    d = config(data, tmp_path / "chunked")
    d["checkpoint"]["resume"] = "auto"
    res = Trainer(build_run_config(d, source="resumed")).run()
    res.pop("engine").destroy()
    a, b = records(tmp_path / "straight"), records(tmp_path / "chunked")
    sampler = LoopSampler("uniform:1-4", seed=1234, num_loops=2)
    assert [r["num_loops"] for r in a] == [sampler.k(s) for s in range(6)]
    assert len(set(r["num_loops"] for r in a)) > 1
    assert [(r["step"], r["loss"], r["num_loops"]) for r in b] == [(r["step"], r["loss"], r["num_loops"]) for r in a]


def test_flops_follow_the_k_run(single_process, tmp_path):
    from mesh_megatron.params import flops_per_token
    from pretrain.config import build_run_config
    from pretrain.train import Trainer

    data = make_dataset(tmp_path / "data" / "synthetic")
    trainer = Trainer(build_run_config(config(data, tmp_path / "x", backprop_loops=0), source="x"))
    trainer.cfg.train.backprop_loops = 0
    m = trainer.cfg.model
    assert trainer.flops_per_token(4) == flops_per_token(m, num_loops=4) > flops_per_token(m, num_loops=2)
    trainer.cfg.train.backprop_loops = 1
    f4, f1 = flops_per_token(m, num_loops=4), flops_per_token(m, num_loops=1)
    assert trainer.flops_per_token(4) == pytest.approx(f4 - 2 / 3 * (f4 - f1))
    assert trainer.flops_per_token(1) == f1


def test_vanilla_refuses_a_loop_distribution(tmp_path):
    from pretrain.config import build_run_config

    d = config("x", tmp_path)
    d["model"] = {"arch": "vanilla", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
                  "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64}
    with pytest.raises(ConfigError, match="a vanilla model has no loop"):
        build_run_config(d)


def test_loops_beyond_the_trained_k_reuse_the_last_router_pair(single_process):
    """model.num_loops = 2 allocates pairs 0 (transition), 1 and 2; a step drawn with K = 4 runs iterations 3 and 4
    on pair 2 (the choice documented in docs/results.md), which then gets their gradients too."""
    from mesh_megatron.config import ModelConfig
    from mesh_megatron.model import MeshGPTModel

    torch.manual_seed(0)
    model = MeshGPTModel(ModelConfig.from_dict(dict(MODEL)))
    conn = model.connection
    assert len(conn.read_routers) == 3 and [conn._router_index(s) for s in range(6)] == [0, 1, 2, 2, 2, 2]
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))

    def last_pair_grad(k):
        model.zero_grad()
        model(ids, labels=ids, num_loops=k).mean().backward()
        return conn.read_routers[2].weight.grad.clone()

    assert not torch.equal(last_pair_grad(2), last_pair_grad(4))
