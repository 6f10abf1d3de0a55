"""`model.compile`: each NeoX layer torch.compile'd in place (inductor on the CPU here), fp32.

- The compiled model computes the eager one: per-step losses over 3 AdamW steps (K changing per step) within 1e-5,
  every gradient within 1e-4 of its tensor's largest entry, eval logits within 1e-5; the same state_dict keys.
- The layer compiles to one graph per mode, none of it broken: K varying per step and the three stacks (prelude, core,
  coda) reuse it.
- Under compile, activation recompute (loop and layer) replays the forward's dropout masks: with hidden dropout 0.1 the
  losses and gradients equal the no-recompute run exactly.
- A trainer run (ZeRO-1, K drawn per step) trains with it, compiling at most a training and an evaluation graph; its
  checkpoint resumes with compile off (a printed note) and continues within 1e-5 of the compiled run.

All models share one shape (hidden 32, seq 32, micro-batch 2), so the file compiles the layer once per mode, plus
once for the dropout model (~55 s cold on 2 cores, most of it inductor's C++ compiles).
"""

import shutil

import pytest
import torch

from mesh_megatron.config import ConfigError, ModelConfig
from pretrain_data import VOCAB, make_dataset

MODEL = dict(arch="mesh", prelude_layers=1, core_layers=1, num_loops=2, coda_layers=1, hidden_size=32,
             num_attention_heads=4, seq_length=32, vocab_size=VOCAB, make_vocab_size_divisible_by=64)
LOSS_TOL = 1e-5  # fp32: the fused kernels sum in another order than eager's (observed ~5e-8)
GRAD_TOL = 1e-4  # relative to the largest entry of each gradient


def dynamo_stats() -> tuple[int, int]:
    """(compiled graphs so far, graph breaks so far) in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def build(seed: int = 0, **kw):
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import set_seed

    set_seed(seed)
    return MeshGPTModel(ModelConfig.from_dict({**MODEL, **kw}))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(step))
    return x[:, :-1], x[:, 1:]


def train_steps(model, loops: list[int]) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """AdamW steps, K per step from `loops`; each step's loss and gradients."""
    from pretrain.distributed import set_seed

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, grads = [], []
    for step, k in enumerate(loops):
        set_seed(100 + step)  # dropout draws from the same generator state in both models
        x, y = batch(step)
        loss = model(x, labels=y, num_loops=k).mean()
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})  # K=1: routers
        opt.step()
    return losses, grads


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = GRAD_TOL) -> None:
    assert set(got) == set(want)
    for name, g in want.items():
        scale = g.abs().max().clamp_min(1e-12)
        assert (got[name] - g).abs().max() / scale <= tol, name


def test_compile_is_a_validated_bool_and_stays_out_of_the_hf_config():
    from mesh_tools.hf.convert import hf_config_dict

    with pytest.raises(ConfigError, match=r"model\.compile: must be true or false, got 'yes'"):
        ModelConfig.from_dict({**MODEL, "compile": "yes"})
    cfg = ModelConfig.from_dict({**MODEL, "compile": True})
    assert cfg.compile is True and "compile" not in hf_config_dict(cfg)
    assert hf_config_dict(cfg) == hf_config_dict(cfg.replace(compile=False))


def test_compiled_model_matches_eager(single_process):
    eager, compiled = build(), build(compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert a is None or torch.equal(a, b), name
    graphs0, breaks0 = dynamo_stats()
    loops = [2, 1, 3]
    want_losses, want_grads = train_steps(eager, loops)
    got_losses, got_grads = train_steps(compiled, loops)
    assert got_losses == pytest.approx(want_losses, abs=LOSS_TOL, rel=0)
    for got, want in zip(got_grads, want_grads):
        assert_grads_close(got, want)
    # one graph for the training layer (cached from an earlier test, or new), whatever K
    graphs1, breaks1 = dynamo_stats()
    assert graphs1 - graphs0 <= 1 and breaks1 == breaks0

    eager.eval(), compiled.eval()
    with torch.no_grad():
        for k in (1, 4):
            x, _ = batch(7)
            torch.testing.assert_close(compiled(x, num_loops=k), eager(x, num_loops=k), atol=LOSS_TOL, rtol=0)
    graphs2, breaks2 = dynamo_stats()
    assert graphs2 - graphs1 <= 1 and breaks2 == breaks0


def test_compiled_recompute_replays_dropout(single_process):
    # Hidden dropout only: attention dropout forks the TP RNG stream, which dynamo runs outside the graph (more
    # graphs to compile here, the same replay by mesh_megatron.rng.checkpoint).
    dropout = dict(hidden_dropout=0.1, compile=True)
    want_losses, want_grads = train_steps(build(**dropout), [2, 3])
    for recompute in ("loop", "layer"):
        got_losses, got_grads = train_steps(build(recompute=recompute, **dropout), [2, 3])
        assert got_losses == want_losses, recompute
        for got, want in zip(got_grads, want_grads):
            assert_grads_close(got, want, tol=0.0)


def run_config(data_prefix: str, run_dir, compile: bool, resume: str = "none") -> dict:
    return {
        "model": {**MODEL, "name": "compile", "compile": compile},
        "data": {"paths": [data_prefix], "split": "90,8,2"},
        "train": {"train_iters": 4, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3, "eval_interval": 0,
                  "eval_iters": 1, "log_interval": 1, "num_loops_train": "uniform:1-3"},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"save_interval": 2, "keep_last": 0, "resume": resume},
        "logging": {"dir": str(run_dir), "wandb": {"mode": "disabled"}},
    }


def train(d: dict) -> dict:
    from pretrain.config import build_run_config
    from pretrain.train import train as run

    res = run(build_run_config(d, source="compile"))
    res.pop("engine").destroy()
    return res


def test_trainer_runs_compiled_and_resumes_with_compile_toggled(tmp_path, capsys):
    data = make_dataset(tmp_path / "data" / "synthetic", n_docs=60)
    graphs0, breaks0 = dynamo_stats()
    compiled = train(run_config(data, tmp_path / "a", compile=True))
    assert len(compiled["losses"]) == 4 and all(l == l for l in compiled["losses"])
    # K drawn from 1-3 per step: at most the training and the evaluation graph (none if an earlier test made them)
    graphs1, breaks1 = dynamo_stats()
    assert graphs1 - graphs0 <= 2 and breaks1 == breaks0
    # resume the compiled run's step-2 checkpoint eagerly
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000004")
    ck = tmp_path / "b" / "checkpoints" / "step_00000002"
    capsys.readouterr()
    eager = train(run_config(data, tmp_path / "b", compile=False, resume=str(ck)))
    out = capsys.readouterr().out
    assert "model.compile True -> False" in out, out[-3000:]
    assert eager["losses"] == pytest.approx(compiled["losses"][2:], abs=LOSS_TOL, rel=0)
