"""End to end on real text: a slice of the shipped sample corpus, tokenized with the shipped SentencePiece model by
data_tools, trains the tiny MeSH model in this process and the loss falls; metrics go to console, JSONL and wandb
(offline); validation runs at extra loop counts; the checkpoint carries the resolved config."""

import io
import json
from pathlib import Path

import pytest
import yaml
import zstandard

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "sample.jsonl.zst"
SP_MODEL = ROOT / "data" / "tokenizers" / "sample_sp8k.model"
STEPS = 30


@pytest.fixture(scope="module")
def sample_prefix(tmp_path_factory):
    if not SAMPLE.exists() or not SP_MODEL.exists():
        pytest.skip("data/sample or data/tokenizers/sample_sp8k.model missing from this checkout")
    from data_tools import tokenize_files

    tmp = tmp_path_factory.mktemp("sample")
    # the first 100 documents keep the test fast (~0.2M tokens)
    with open(SAMPLE, "rb") as f:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        docs = [next(lines) for _ in range(100)]
    (tmp / "slice.jsonl").write_text("".join(docs))
    prefix = str(tmp / "slice_text_document")
    tokenize_files([str(tmp / "slice.jsonl")], prefix, tokenizer="sentencepiece", tokenizer_model=str(SP_MODEL),
                   workers=1, progress=False, quiet=True)
    return prefix


@pytest.fixture(scope="module")
def run(sample_prefix, tmp_path_factory):
    from pretrain.config import load_run_config
    from pretrain.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = load_run_config(ROOT / "configs" / "demo.yaml", {
        "data.paths": f"[{sample_prefix}]", "logging.dir": str(out), "train.train_iters": str(STEPS),
        "model.seq_length": "64", "train.eval_interval": "15", "train.eval_iters": "1", "train.log_interval": "10",
        "train.global_batch_size": "8", "data.split": "90,5,5",
        "train.eval_num_loops": "[1, 3]", "checkpoint.save_interval": "0", "train.warmup_iters": "4",
    })
    res = train(cfg)
    res.pop("engine").destroy()
    return res, out


def test_loss_falls_on_the_sample_corpus(run, capsys):
    res, _ = run
    losses = res["losses"]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 8.5  # ~ln(8192) = 9.01 at init
    assert last < first - 1.0, (first, last)
    valid = [e for e in res["evals"] if e["split"] == "valid"]
    assert valid[-1]["loss"] < valid[0]["loss"] < first


def test_metrics_jsonl_console_and_wandb_offline(run):
    res, out = run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "memory_gib", "step_time_s"):
        assert key in steps[0], key
    assert steps[-1]["tokens_seen"] == STEPS * 8 * 64
    assert any("valid/ppl" in r for r in records) and any("test/loss" in r for r in records)
    assert any(r.get("event") == "checkpoint" for r in records)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_validation_at_other_loop_counts(run):
    res, _ = run
    ks = {e["num_loops"] for e in res["evals"] if "@K" in e["split"]}
    assert ks == {1, 3}
    last = {e["split"]: e["loss"] for e in res["evals"] if e["step"] == STEPS}
    assert last["valid@K1"] != last["valid"] != last["valid@K3"]


def test_checkpoint_carries_resolved_config(run):
    res, out = run
    ck = Path(res["checkpoint"])
    assert ck.name == f"step_{STEPS:08d}" and (ck / "COMPLETE").exists()
    saved = yaml.safe_load((ck / "run_config.yaml").read_text())
    assert saved["train"]["train_iters"] == STEPS and saved["model"]["seq_length"] == 64
    assert saved == yaml.safe_load((out / "run_config.yaml").read_text())
