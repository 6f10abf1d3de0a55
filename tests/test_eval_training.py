"""Evaluation during training (`eval:` in the run config) and the watch-and-evaluate path (`mesh-eval --watch`).

A tiny MeSH model trained here for 2 steps with a checkpoint after each and eval.tasks set to the shipped local task
(tests/data/lm_eval, as tests/test_eval_cli.py): rank 0 evaluates each checkpoint in a background mesh-eval process,
the run goes on while it works, and metrics.jsonl ends with the results of both checkpoints at K = 1 and 2.
`mesh-eval --watch` then follows a checkpoint root: it evaluates what is there, stops on the run's final checkpoint
or on its idle timeout, and a restart evaluates only what is new."""

import json
import shutil
from pathlib import Path

import pytest

from test_eval_cli import HERE, MODEL, SP_MODEL, _offline, local_tasks  # noqa: F401  (_offline: the same offline env)


def run_config(root: Path, prefix: str, tasks_dir: Path, train_iters: int = 2, **eval_keys):
    from pretrain.config import build_run_config

    return build_run_config({
        "model": MODEL,
        "data": {"paths": [prefix], "split": "90,8,2"},
        "train": {"train_iters": train_iters, "micro_batch_size": 2, "global_batch_size": 2, "lr": 1e-2,
                  "eval_interval": 0, "eval_iters": 1, "log_interval": 100},
        "checkpoint": {"save_interval": 1, "keep_last": 0},
        "logging": {"dir": str(root / "run"), "wandb": {"mode": "disabled"}},
        "eval": {"tasks": ["mesh_tiny_cloze"], "include_path": str(tasks_dir), "num_loops": [1, 2], "limit": 10,
                 "threads": 1, **eval_keys},
    })


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_tools import tokenize_files

    root = tmp_path_factory.mktemp("evaltrain")
    (root / "data").mkdir()
    prefix = str(root / "data" / "corpus")
    tokenize_files([str(HERE / "data" / "export_corpus.txt")], prefix, tokenizer="sentencepiece",
                   tokenizer_model=str(SP_MODEL), quiet=True)
    return root, prefix, local_tasks(root / "tasks")


@pytest.fixture(scope="module")
def trained(corpus):
    """The run: train() returns normally once both background evaluations are logged."""
    from pretrain.train import train

    root, prefix, tasks_dir = corpus
    mp = pytest.MonkeyPatch()  # the evaluation processes inherit the environment: no downloads
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        result = train(run_config(root, prefix, tasks_dir))
    finally:
        mp.undo()
    result.pop("engine").destroy()
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root, result, records


def test_training_logs_task_results_of_every_checkpoint(trained):
    root, result, records = trained
    assert result["step"] == 2 and result["stopped_by"] is None
    evals = [r for r in records if r.get("event") == "eval_tasks"]
    assert sorted((r["checkpoint_step"], r["num_loops"]) for r in evals) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for r in evals:
        k = r["num_loops"]
        assert 0.0 <= r[f"tasks/mesh_tiny_cloze/acc@K{k}"] <= 1.0
        assert r["tokens_seen"] == r["checkpoint_step"] * 2 * 32 and r["eval_s"] > 0 and r["collect_s"] >= 0
    # the per-(checkpoint, K) files, tables and the logs of the background processes, under <run>/eval
    out = root / "run" / "eval"
    assert sorted(p.name for p in (out / "results").glob("*.json")) == [
        "step_00000001_K1.json", "step_00000001_K2.json", "step_00000002_K1.json", "step_00000002_K2.json"]
    assert len((out / "summary.csv").read_text().splitlines()) == 5  # the whole curve, though evaluated one by one
    assert {p.name for p in (out / "logs").iterdir()} == {"step_00000001.log", "step_00000002.log"}


def test_no_rank_waits_for_an_evaluation(trained):
    """Step 2 is trained while step 1 is being evaluated: its start is logged before step 2's record, with the time
    the trainer spent starting it; the run waits only at the end, and says how long."""
    _, _, records = trained
    order = [(r.get("event"), r.get("checkpoint_step", r["step"])) for r in records]
    started_1 = order.index(("eval_tasks_started", 1))
    assert started_1 < order.index((None, 2)) < order.index(("eval_tasks_started", 2))
    starts = [r for r in records if r.get("event") == "eval_tasks_started"]
    assert len(starts) == 2 and all(r["launch_s"] >= 0 and r["pid"] > 0 for r in starts)
    wait = [r for r in records if r.get("event") == "eval_tasks_wait"]
    assert len(wait) == 1 and wait[0]["left_running"] is False and wait[0]["wait_s"] > 0
    assert records[-1]["event"] == "eval_tasks_wait"  # nothing is lost after it: the run waited for both


def test_watch_evaluates_new_checkpoints_until_idle_then_until_finished(trained, tmp_path, capsys):
    """A copy of the run's checkpoint root that holds only step 1 (training still going): --watch evaluates it and
    stops on its idle timeout; with step 2 (= train_iters) added, a restart evaluates step 2 only and stops at once
    on the finished marker."""
    from mesh_tools.eval.cli import main

    root, _, _ = trained
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    shutil.copytree(root / "run" / "checkpoints" / "step_00000001", ckpts / "step_00000001")
    out = tmp_path / "eval"
    # perplexity only: the watching is what is tested here, and it spares lm-eval's task indexing at each call
    args = ["--watch", "--checkpoint", str(ckpts), "--out", str(out), "--ppl", str(root / "data" / "corpus"),
            "--ppl-tokens", "64", "--num-loops", "2", "--device", "cpu", "--no-progress", "--wandb", "disabled",
            "--poll", "0.2", "--idle-timeout", "0.02"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "step_00000001: 1 evaluated, 0 cached" in text and "no new checkpoint" in text and "--watch idle" in text
    shutil.copytree(root / "run" / "checkpoints" / "step_00000002", ckpts / "step_00000002")
    assert main([*args[:-1], "5"]) == 0  # a long idle timeout: it must stop on the final checkpoint instead
    text = capsys.readouterr().out
    assert "step_00000001: 0 evaluated, 1 cached" in text and "step_00000002: 1 evaluated, 0 cached" in text
    assert "the run is finished (checkpoint at step 2 = train_iters)" in text and "--watch finished" in text
    assert sorted(p.name for p in (out / "results").glob("*.json")) == ["step_00000001_K2.json", "step_00000002_K2.json"]


def test_watch_takes_the_results_the_trainer_made(trained, capsys):
    """Same settings as the run's eval: section: --watch on the run itself finds everything cached."""
    from mesh_tools.eval.cli import main

    root, _, _ = trained
    assert main(["--watch", "--checkpoint", str(root / "run" / "checkpoints"), "--out", str(root / "run" / "eval"),
                 "--include-path", str(root / "tasks"), "--tasks", "mesh_tiny_cloze", "--num-loops", "1", "2",
                 "--limit", "10", "--no-progress", "--wandb", "disabled", "--poll", "0.2", "--idle-timeout", "1"]) == 0
    text = capsys.readouterr().out
    assert "step_00000002: 0 evaluated, 2 cached" in text and "--watch finished: 0 checkpoint(s)" in text


def test_an_evaluation_that_cannot_run_is_reported_once_and_training_goes_on(corpus, tmp_path):
    """An unknown task: mesh-eval's one-line error (exit 2) is logged as eval_tasks_failed with its log, no further
    evaluation is started, and training completes."""
    from pretrain.train import train

    _, prefix, tasks_dir = corpus
    cfg = run_config(tmp_path, prefix, tasks_dir, tasks=["mesh_no_such_task"], num_loops=[2])
    result = train(cfg)
    result.pop("engine").destroy()
    assert result["step"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    failed = [r for r in records if r.get("event") == "eval_tasks_failed"]
    assert len(failed) == 1 and failed[0]["rc"] == 2 and failed[0]["checkpoint_step"] == 1
    assert "unknown lm-eval task(s) ['mesh_no_such_task']" in Path(failed[0]["log"]).read_text()
    assert [r["checkpoint_step"] for r in records if r.get("event") == "eval_tasks_started"] == [1]
    assert not [r for r in records if r.get("event") == "eval_tasks"]
    # resumed for one more step: the checkpoint it resumes from was never evaluated, so it goes first
    cfg = run_config(tmp_path, prefix, tasks_dir, train_iters=3, tasks=["mesh_no_such_task"], num_loops=[2])
    cfg.checkpoint.resume = "auto"
    train(cfg).pop("engine").destroy()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint_step"] for r in records if r.get("event") == "eval_tasks_started"] == [1, 2]
    assert [r["checkpoint_step"] for r in records if r.get("event") == "eval_tasks_failed"] == [1, 2]


@pytest.mark.parametrize("keys, message", [
    ({"interval": 3}, "eval.interval: 3 is not a multiple of checkpoint.save_interval 2"),
    ({"device": "gpu"}, "eval.device: 'gpu' not in (cpu, cuda, cuda:N)"),
    ({"limit": 0}, "eval.limit: must be > 0"),
    ({"num_loops": [0]}, "eval.num_loops: loop counts must be >= 1"),
    ({"threads": 0}, "eval.threads: must be >= 1"),
    ({"taks": ["piqa"]}, "unknown key 'eval.taks'"),
])
def test_bad_eval_settings_are_one_line_errors_at_config_time(tmp_path, capsys, keys, message):
    """Through mesh-pretrain's loader and CLI: exit 2, one line, before anything is built."""
    import yaml

    from pretrain.cli import main

    cfg = {"model": MODEL, "data": {"paths": ["x"]}, "checkpoint": {"save_interval": 2},
           "eval": {"tasks": ["piqa"], **keys}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mesh-pretrain: error: ") and message in err and "\n" not in err, err


def test_eval_settings_that_depend_on_the_run(tmp_path):
    from mesh_megatron.config import ConfigError
    from pretrain.config import build_run_config

    vanilla = {"name": "v", "arch": "vanilla", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
               "seq_length": 32, "vocab_size": 256}
    with pytest.raises(ConfigError, match="eval.num_loops: a vanilla model has no loop count"):
        build_run_config({"model": vanilla, "eval": {"tasks": ["piqa"], "num_loops": [2]}})
    with pytest.raises(ConfigError, match=r"writes no checkpoint to evaluate"):
        build_run_config({"model": MODEL, "eval": {"tasks": ["piqa"]},
                          "checkpoint": {"save_interval": 0, "save_at_end": False}})
    # the section is inert without tasks, and multiples of the save interval are fine
    build_run_config({"model": MODEL, "checkpoint": {"save_interval": 0, "save_at_end": False}})
    build_run_config({"model": MODEL, "eval": {"tasks": ["piqa"], "interval": 4}, "checkpoint": {"save_interval": 2}})


def test_missing_eval_files_stop_the_run_before_it_builds(corpus, tmp_path):
    from mesh_megatron.config import ConfigError
    from pretrain.train import train

    _, prefix, _ = corpus
    with pytest.raises(ConfigError, match=r"eval.include_path: .*nope not found; give the directory of your lm-eval"):
        train(run_config(tmp_path, prefix, tmp_path / "nope"))
    assert not (tmp_path / "run").exists()


def test_a_stopped_run_does_not_wait_for_its_evaluation(corpus, tmp_path):
    """exit_at_step (as a preemption): the running evaluation is terminated, none is started for the stop's own
    checkpoint, and the run returns at once."""
    from pretrain.train import train

    _, prefix, tasks_dir = corpus
    cfg = run_config(tmp_path, prefix, tasks_dir, train_iters=4)
    cfg.train.exit_at_step = 2
    result = train(cfg)
    result.pop("engine").destroy()
    assert result["stopped_by"] == "exit_at_step 2"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint_step"] for r in records if r.get("event") == "eval_tasks_started"] == [1]
    assert [r["checkpoint_step"] for r in records if r.get("event") == "eval_tasks_stopped"] == [1]
    assert not [r for r in records if r.get("event") in ("eval_tasks", "eval_tasks_wait")]
