"""mesh-eval end to end on a tiny MeSH model trained here for 2 steps (a checkpoint after each): lm-eval on a local
task (public-domain Shakespeare lines, tests/data/lm_eval) and perplexity on a .bin/.idx prefix at K in {1, 2}, one
JSON per (checkpoint, K), tables, plots, wandb offline, a cached re-run, one-line errors; and the export defects a
new user hit (lm-eval's max_length assert, the tokenizer's custom-code prompt, an unwritable --out found late,
0600 weights)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent
SP_MODEL = ROOT / "data" / "tokenizers" / "sample_sp8k.model"
TASK = HERE / "data" / "lm_eval"
MODEL = {"name": "eval-tiny", "arch": "mesh", "prelude_layers": 1, "core_layers": 1, "num_loops": 2, "coda_layers": 1,
         "scale_embeddings": True, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32, "vocab_size": 8192,
         "make_vocab_size_divisible_by": 64}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint root with step 1 and step 2 of a tiny MeSH model (trained in this process), its dataset prefix."""
    from data_tools import tokenize_files
    from pretrain.config import build_run_config
    from pretrain.train import train

    root = tmp_path_factory.mktemp("evalrun")
    (root / "data").mkdir()
    prefix = str(root / "data" / "corpus")
    tokenize_files([str(HERE / "data" / "export_corpus.txt")], prefix, tokenizer="sentencepiece", tokenizer_model=str(SP_MODEL), quiet=True)
    cfg = build_run_config({
        "model": MODEL,
        "data": {"paths": [prefix], "split": "90,8,2"},
        "train": {"train_iters": 2, "micro_batch_size": 2, "global_batch_size": 2, "lr": 1e-2, "eval_interval": 0, "eval_iters": 1, "log_interval": 100},
        "checkpoint": {"save_interval": 1, "keep_last": 0},
        "logging": {"dir": str(root / "run"), "wandb": {"mode": "disabled"}},
    })
    train(cfg).pop("engine").destroy()
    return root / "run" / "checkpoints", prefix


def local_tasks(dst: Path) -> Path:
    """The shipped tiny task with its data path made absolute (lm-eval reads it relative to the working directory)."""
    dst.mkdir(parents=True, exist_ok=True)
    text = (TASK / "mesh_tiny_cloze.yaml").read_text().replace("test: mesh_tiny_cloze.jsonl", f"test: {TASK / 'mesh_tiny_cloze.jsonl'}")
    (dst / "mesh_tiny_cloze.yaml").write_text(text)
    return dst


def eval_args(ckpts, prefix, out, tasks_dir, loops=("1", "2")):
    return ["--checkpoint", str(ckpts), "--out", str(out), "--include-path", str(tasks_dir), "--tasks", "mesh_tiny_cloze",
            "--num-loops", *loops, "--ppl", prefix, "--ppl-tokens", "128", "--limit", "10", "--batch-size", "8",
            "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory):
    from mesh_tools.eval.cli import main

    ckpts, prefix = run
    base = tmp_path_factory.mktemp("eval")
    tasks_dir = local_tasks(base / "tasks")
    out = base / "out"
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_CACHE", str(base / "hf_datasets"))
    try:
        rc = main(eval_args(ckpts, prefix, out, tasks_dir))
    finally:
        mp.undo()
    assert rc == 0
    return out, tasks_dir


def test_results_tables_plots_and_wandb(evaluated):
    out, _ = evaluated
    files = sorted(p.name for p in (out / "results").glob("*.json"))
    assert files == ["step_00000001_K1.json", "step_00000001_K2.json", "step_00000002_K1.json", "step_00000002_K2.json"]
    rec = json.loads((out / "results" / "step_00000002_K2.json").read_text())
    assert rec["num_loops"] == 2 and rec["trained_num_loops"] == 2 and rec["step"] == 2 and rec["tokens_seen"] == 2 * 2 * 32
    assert rec["max_length"] == 32  # the training length: longer contexts are truncated from the left
    assert rec["lm_eval"]["results"]["mesh_tiny_cloze"]["sample_len"] == 10
    assert 0.0 <= rec["metrics"]["mesh_tiny_cloze/acc"] <= 1.0 and rec["metrics"]["ppl/corpus"] > 1.0
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["step", "tokens_seen", "num_loops"] and len(rows) == 5
    md = (out / "summary.md").read_text()
    assert "| step | tokens | K | mesh_tiny_cloze/acc" in md and md.count("\n") == 6
    for metric in ("mesh_tiny_cloze_acc", "ppl_corpus", "loss_corpus"):
        assert (out / "plots" / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run"
    # the two loop counts are different computations of the same weights
    r1 = json.loads((out / "results" / "step_00000002_K1.json").read_text())
    assert r1["metrics"]["ppl/corpus"] != rec["metrics"]["ppl/corpus"]


def test_rerun_evaluates_only_what_is_new(evaluated, run, monkeypatch, capsys):
    from mesh_tools.eval import runner
    from mesh_tools.eval.cli import main

    out, tasks_dir = evaluated
    ckpts, prefix = run
    gathered, before = [], {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    real_load = runner.load_checkpoint
    monkeypatch.setattr(runner, "load_checkpoint", lambda p: gathered.append(Path(p).name) or real_load(p))
    assert main(eval_args(ckpts, prefix, out, tasks_dir)) == 0
    assert "0 evaluated, 4 cached" in capsys.readouterr().out and gathered == []
    # one more loop count: only (step 1, K=3) and (step 2, K=3) run; the cached results stay untouched
    assert main(eval_args(ckpts, prefix, out, tasks_dir, loops=("1", "2", "3"))) == 0
    assert "2 evaluated, 4 cached" in capsys.readouterr().out
    assert gathered == ["step_00000001", "step_00000002"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json") if "K3" not in p.name} == before
    assert len((out / "summary.csv").read_text().splitlines()) == 7


def test_perplexity_matches_training_model(evaluated, run, single_process):
    """ppl/corpus in the JSON equals exp(mean loss) of the training-side MeshGPTModel on the same windows."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mesh_megatron.config import ModelConfig
    from mesh_tools.hf.export import reference_logits
    from pretrain.checkpoint import load_full_model_state

    out, _ = evaluated
    ckpts, prefix = run
    rec = json.loads((out / "results" / "step_00000002_K2.json").read_text())
    run_cfg, sd = load_full_model_state(ckpts / "step_00000002")
    cfg = ModelConfig.from_dict(run_cfg["model"])
    ds = IndexedDataset(prefix)
    stream = torch.cat([torch.from_numpy(ds[i].astype("int64")) for i in range(len(ds))])[: 4 * 32 + 1]
    windows = torch.stack([stream[w * 32: w * 32 + 33] for w in range(4)])
    logits = reference_logits(cfg, sd, windows[:, :-1], num_loops=2)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
    assert rec["perplexity"][prefix]["tokens"] == 128
    assert math.isclose(rec["metrics"]["loss/corpus"], loss, rel_tol=1e-5), (rec["metrics"]["loss/corpus"], loss)


@pytest.mark.parametrize("case", ["no_checkpoint", "incomplete_step", "unknown_task", "no_ppl_data", "out_is_file", "zero_loops", "nothing"])
def test_errors_are_one_line_exit_2(run, tmp_path, capsys, case):
    from mesh_tools.eval.cli import main

    ckpts, prefix = run
    tasks_dir = local_tasks(tmp_path / "tasks")
    args = eval_args(ckpts, prefix, tmp_path / "out", tasks_dir)
    if case == "no_checkpoint":
        args[1] = str(tmp_path / "nope")
    elif case == "incomplete_step":
        (tmp_path / "step_00000009").mkdir()
        args[1] = str(tmp_path / "step_00000009")
    elif case == "unknown_task":
        args[args.index("mesh_tiny_cloze")] = "mesh_no_such_task"
    elif case == "no_ppl_data":
        args[args.index(prefix)] = str(tmp_path / "missing")
    elif case == "out_is_file":
        (tmp_path / "file").write_text("x")
        args[3] = str(tmp_path / "file" / "out")
    elif case == "zero_loops":
        args[args.index("--num-loops") + 1] = "0"
    elif case == "nothing":
        args = ["--checkpoint", str(ckpts), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mesh-eval: error: ") and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "results").exists()


# --- export defects ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    from mesh_tools.hf.export import main

    ckpts, _ = run
    out = tmp_path_factory.mktemp("export") / "hf"
    old = os.umask(0o022)
    try:
        assert main(["--checkpoint", str(ckpts), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    return out


def test_export_lm_eval_scores_continuations_longer_than_training_length(exported, tmp_path):
    """lm-eval on the export, no max_length given: a continuation longer than the 32-token training length scored
    (before: `assert len(continuation_enc) <= self.max_length`, because the export advertised 32)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    line = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do shake the darling buds of May, and summer's lease hath all too short a date"
    docs = [{"context": "Sonnet eighteen:", "choices": [line, line.upper()], "label": 0}] * 2
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    yaml_text = (TASK / "mesh_tiny_cloze.yaml").read_text().replace("task: mesh_tiny_cloze", "task: mesh_long_cont")
    (tmp_path / "long.yaml").write_text(yaml_text.replace("test: mesh_tiny_cloze.jsonl", f"test: {tmp_path / 'long.jsonl'}"))
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(exported, trust_remote_code=True)(line)["input_ids"]) > 32
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={exported},trust_remote_code=True,dtype=float32",
                                  tasks=["mesh_long_cont"], task_manager=TaskManager(include_path=str(tmp_path)), device="cpu",
                                  batch_size=2)
    assert res["results"]["mesh_long_cont"]["sample_len"] == 2
    config = json.loads((exported / "config.json").read_text())
    assert config["max_position_embeddings"] == 2048 and "| Training sequence length | 32 |" in (exported / "README.md").read_text()


def test_export_card_tokenizer_line_loads_without_a_prompt(exported):
    """The model card's AutoTokenizer line, run with no answer available on stdin, loads without asking to run code."""
    card = (exported / "README.md").read_text()
    line = next(ln for ln in card.splitlines() if "AutoTokenizer.from_pretrained(path" in ln)
    code = f"from transformers import AutoTokenizer\npath = {str(exported)!r}\n{line}\nprint('ids', tok('Hello world')['input_ids'])\n"
    proc = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ids [" in proc.stdout, proc.stderr[-2000:]


def test_export_weights_are_world_readable(exported):
    modes = {p.name: p.stat().st_mode & 0o777 for p in exported.iterdir()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}


def test_export_unwritable_out_fails_before_gathering(run, tmp_path, capsys, monkeypatch):
    import pretrain.checkpoint
    from mesh_tools.hf.export import main

    ckpts, _ = run
    gathered = []
    real = pretrain.checkpoint.load_full_model_state
    monkeypatch.setattr(pretrain.checkpoint, "load_full_model_state", lambda p: gathered.append(p) or real(p))
    (tmp_path / "a_file").write_text("x")
    assert main(["--checkpoint", str(ckpts), "--out", str(tmp_path / "a_file" / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mesh-export: error: --out ") and "\n" not in err, err
    assert gathered == []


def test_exit_threshold_reports_loops_per_token(evaluated, run, tmp_path):
    """--exit-threshold: recorded per (checkpoint, K) with the average loops per token; an infinite threshold is
    one loop for every token (the K=1 perplexity), and the setting is part of the cache key."""
    from mesh_tools.eval.cli import main

    out, _ = evaluated
    ckpts, prefix = run
    common = ["--checkpoint", str(ckpts / "step_00000002"), "--ppl", prefix, "--ppl-tokens", "128", "--num-loops",
              "2", "--no-progress", "--device", "cpu", "--wandb", "disabled"]
    assert main([*common, "--out", str(tmp_path / "inf"), "--exit-threshold", "1e30"]) == 0
    inf = json.loads((tmp_path / "inf" / "results" / "step_00000002_K2.json").read_text())
    k1 = json.loads((out / "results" / "step_00000002_K1.json").read_text())
    assert inf["metrics"]["loops_per_token"] == 1.0 and inf["settings"]["exit_threshold"] == 1e30
    assert inf["metrics"]["ppl/corpus"] == pytest.approx(k1["metrics"]["ppl/corpus"], rel=1e-6)
    assert main([*common, "--out", str(tmp_path / "mid"), "--exit-threshold", "0.3"]) == 0
    mid = json.loads((tmp_path / "mid" / "results" / "step_00000002_K2.json").read_text())
    assert 1.0 <= mid["metrics"]["loops_per_token"] <= 2.0
    assert mid["settings_key"] != inf["settings_key"]
    assert main([*common, "--out", str(tmp_path / "bad"), "--exit-threshold", "-1"]) == 2
