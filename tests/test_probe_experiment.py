"""The experiment script's bookkeeping (no training here: the trainer is tested by its own suite)."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("small_scale", REPO / "experiments" / "small_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scales_compose_valid_matched_compute_run_configs(exp, tmp_path):
    from mesh_megatron.config import ModelConfig

    for scale in ("tiny", "small"):
        cfg, _ = exp.load_scale(scale)
        depths, flops = set(), {}
        for arch in cfg["archs"]:
            rc = exp.run_config(cfg, arch, 7, tmp_path / arch, "data/x", "disabled")
            mc = ModelConfig.from_dict(rc["model"], f"{scale}/{arch}")
            assert rc["train"]["seed"] == 7 and rc["data"]["paths"] == ["data/x"]
            depths.add(mc.effective_depth())
            flops[arch] = exp.model_costs(rc["model"])["flops_per_token"]
        assert len(depths) == 1  # every model has the vanilla model's depth
        assert max(flops.values()) / min(flops.values()) < 1.01  # matched compute within 1% (MeSH routers)


def test_metrics_reading_and_results_table(exp, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    lines = [{"step": 1, "loss": 9.0, "tokens_seen": 10}, {"step": 2, "loss": 8.0, "tokens_seen": 20},
             {"event": "eval", "step": 2, "valid/loss": 7.5, "valid/ppl": 1808.0},
             {"step": 2, "loss": 7.9, "tokens_seen": 20},  # a resumed run repeats step 2: the last record wins
             {"event": "eval", "step": 2, "test/loss": 7.6}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{truncated")
    m = exp.read_metrics(run)
    assert m["train"] == [(1, 9.0, 10), (2, 7.9, 20)] and m["valid"] == [(2, 7.5)] and m["test"] == [(2, 7.6)]
    cfg, _ = exp.load_scale("tiny")
    runs = {("base", 1): {**m, "valid": [(2, 7.5)]}, ("mesh", 1): {**m, "valid": [(2, 7.25)]}}
    summary = exp.summarize(cfg, ["base", "mesh"], [1], runs, {})
    md = exp.results_markdown(summary, cfg, "cmd")
    assert "| mesh | 1+2R2+1 |" in md and "-0.2500" in md
    exp.plot_curves(["base", "mesh"], [1], runs, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_scale_and_arch_are_clear_errors(exp, capsys):
    assert exp.main(["--scale", "huge"]) == 2
    assert "known scales" in capsys.readouterr().err
    assert exp.main(["--scale", "tiny", "--archs", "meshh"]) == 2
    assert "not in" in capsys.readouterr().err


def test_paired_differences_against_base(exp):
    p = exp.paired_vs({1: 5.0, 2: 5.1, 3: 4.9}, {1: 5.1, 2: 5.1, 3: 5.0, 4: 9.9})
    assert p["seeds"] == [1, 2, 3] and p["n"] == 3 and p["wins"] == 2
    assert p["deltas"] == pytest.approx([-0.1, 0.0, -0.1]) and p["mean"] == pytest.approx(-0.2 / 3)
    assert p["std"] == pytest.approx((0.01 / 3) ** 0.5)  # sample std of (-0.1, 0, -0.1)
    assert p["t"] == pytest.approx(p["mean"] / (p["std"] / 3 ** 0.5))
    assert exp.paired_vs({1: 5.0}, {2: 5.0}) is None  # no common seed: nothing to pair
    assert exp._paired_cell(p).startswith("-0.0667 ± 0.0577 (2/3 seeds lower, t = -2.0)")


def test_set_and_sweep_edit_the_scale_config(exp):
    cfg, _ = exp.load_scale("tiny")
    assert exp.set_dotted(cfg, "archs.mesh.router_init_std=2e-3", "--set") == ("archs.mesh.router_init_std", 0.002)
    assert cfg["archs"]["mesh"]["router_init_std"] == 0.002 and "router_init_std" not in cfg["archs"]["base"]
    grid = exp.variants(cfg, "train.lr=1.5e-3,6e-3")
    assert [label for label, _ in grid] == ["lr=1.5e-3", "lr=6e-3"]
    assert [c["train"]["lr"] for _, c in grid] == [0.0015, 0.006] and cfg["train"]["lr"] == 3.0e-3  # copies
    assert exp.variants(cfg, None) == [("", cfg)]
    # run names carry the sweep value only for the models it changes: an unchanged base run is shared
    (label, c), = exp.variants(cfg, "archs.mesh.mesh_slots=6")
    assert exp.run_name(cfg, c, label, "base", 1) == "base-s1"
    assert exp.run_name(cfg, c, label, "mesh", 1) == "mesh-mesh_slots6-s1"
    assert exp.run_name(cfg, cfg, "", "mesh", 1) == "mesh-s1"
    for bad, msg in [("train.lr", "KEY=VALUE"), ("optim.lr=1", "not a scale config section"),
                     ("archs.meshh.x=1", "archs.<arch>.<field>"), ("train..lr=1", "KEY=VALUE")]:
        with pytest.raises(exp.ExperimentError, match=msg.replace(".", r"\.").replace("<", ".").replace(">", ".")):
            exp.set_dotted(cfg, bad, "--set")
    with pytest.raises(exp.ExperimentError, match="expected KEY=V1,V2"):
        exp.variants(cfg, "train.lr=")
    # a typo in a trainer key is caught before any training, with the closest valid key
    cfg["train"]["lrr"] = 1
    with pytest.raises(exp.ExperimentError, match="did you mean 'lr'"):
        exp.validate_runs(cfg, ["base"], "tiny")


def test_sweep_with_concurrent_jobs_trains_probes_and_resumes(exp, tmp_path, capsys):
    """End to end through the real trainer and mesh-probe: 2 models x 2 learning rates, 2 runs at a time."""
    from pretrain_data import make_dataset

    prefix = make_dataset(tmp_path / "data" / "bigram", n_docs=400)
    args = ["--scale", "tiny", "--data", prefix, "--out", str(tmp_path / "out"), "--archs", "base", "mesh",
            "--seeds", "1", "--train-iters", "4", "--set", "train.eval_iters=2", "--set", "train.eval_interval=2",
            "--set", "train.log_interval=1", "--set", "probe.num_sequences=4", "--sweep", "train.lr=3e-3,6e-3",
            "--jobs", "2"]
    assert exp.main(args) == 0
    out = tmp_path / "out"
    # lr=3e-3 is the tiny scale's own learning rate: those runs are the plain base-s1 / mesh-s1, shared with a
    # comparison run without --sweep in the same OUT
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == ["base-lr6e-3-s1", "base-s1", "mesh-lr6e-3-s1", "mesh-s1"]
    res = json.loads((out / "results-lr.json").read_text())
    assert res["sweep"] == "train.lr=3e-3,6e-3" and [v["variant"] for v in res["variants"]] == ["lr=3e-3", "lr=6e-3"]
    for v in res["variants"]:
        base, mesh = v["rows"]
        assert base["paired_vs_base"] is None and mesh["paired_vs_base"]["n"] == 1
        assert mesh["paired_vs_base"]["mean"] == pytest.approx(mesh["valid_loss"] - base["valid_loss"])
        assert "probe" in mesh and len(mesh["probe"]["skew"]) == 4
    # the two learning rates really trained differently
    assert res["variants"][0]["rows"][0]["valid_loss"] != res["variants"][1]["rows"][0]["valid_loss"]
    for name in ("loss_curves-lr3e-3.png", "loss_curves-lr6e-3.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert (out / "results-lr.md").read_text().count("| mesh | 1+2R2+1 |") == 2
    capsys.readouterr()
    assert exp.main(args) == 0  # repeated command: every run is already trained and probed
    assert capsys.readouterr().out.count("already trained, skipping") == 4


def test_a_run_locked_by_another_invocation_is_waited_for(exp, tmp_path, capsys):
    """Two invocations sharing OUT: the second waits for the run the first holds, then finds it finished."""
    import fcntl
    import threading
    import time

    cfg, _ = exp.load_scale("tiny")
    run_dir = tmp_path / "runs" / "base-s1"
    run_dir.mkdir(parents=True)
    rc = exp.run_config(cfg, "base", 1, run_dir, "data/x", "disabled")
    (run_dir / "metrics.jsonl").write_text('{"event": "eval", "step": 4, "valid/loss": 6.5}\n')
    lock = open(tmp_path / "runs" / ".base-s1.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    got = {}

    class Args:
        force, wandb = False, "disabled"

    t = threading.Thread(target=lambda: got.update(r=exp.run_and_probe(cfg, "base", 1, run_dir, None, "data/x", Args, 1, {})))
    t.start()
    time.sleep(1.0)
    assert t.is_alive() and "another invocation is running it; waiting" in capsys.readouterr().out
    (run_dir / "experiment_done.json").write_text(json.dumps({"run_config": rc}))  # the holder finishes the run
    lock.close()  # ... and releases it
    t.join(timeout=30)
    assert not t.is_alive() and got["r"][0]["valid"] == [(4, 6.5)] and got["r"][1] is None
    assert "already trained, skipping" in capsys.readouterr().out


def test_a_finished_run_is_never_overwritten_by_other_settings(exp, tmp_path):
    cfg, _ = exp.load_scale("tiny")
    run_dir = tmp_path / "runs" / "base-s1"
    run_dir.mkdir(parents=True)
    (run_dir / "experiment_done.json").write_text(json.dumps({"run_config": exp.run_config(cfg, "base", 1, run_dir, "d", "disabled")}))
    exp.set_dotted(cfg, "train.lr=6e-3", "--set")

    class Args:
        force, wandb = False, "disabled"

    with pytest.raises(exp.ExperimentError, match=r"different settings \(train\.lr: 0\.003 -> 0\.006\).*--force"):
        exp.run_and_probe(cfg, "base", 1, run_dir, None, "d", Args, 1, {})
    assert (run_dir / "experiment_done.json").is_file()


def test_the_same_tokens_under_another_path_are_the_same_run(exp, tmp_path, capsys):
    """A finished run trained on --data X is reused when OUT's own tokenization gives identical files; other tokens
    under the same kind of path are still a different run."""
    import shutil

    from pretrain_data import make_dataset

    first = make_dataset(tmp_path / "a" / "d")
    moved = tmp_path / "b" / "d"
    moved.parent.mkdir()
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(first + ext, str(moved) + ext)
    other = make_dataset(tmp_path / "c" / "d", seed=1)

    cfg, _ = exp.load_scale("tiny")
    run_dir = tmp_path / "runs" / "base-s1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"event": "eval", "step": 4, "valid/loss": 6.5}\n')
    (run_dir / "experiment_done.json").write_text(json.dumps({"run_config": exp.run_config(cfg, "base", 1, run_dir, first, "disabled")}))

    class Args:
        force, wandb = False, "disabled"

    assert exp.run_and_probe(cfg, "base", 1, run_dir, None, str(moved), Args, 1, {})[0]["valid"] == [(4, 6.5)]
    assert "already trained, skipping" in capsys.readouterr().out
    with pytest.raises(exp.ExperimentError, match=r"different settings \(data\.paths: "):
        exp.run_and_probe(cfg, "base", 1, run_dir, None, other, Args, 1, {})


def test_small_scale_without_its_corpus_stops_with_the_command_that_makes_it(exp, tmp_path, monkeypatch, capsys):
    """A fresh clone has no corpus: one line naming the prefix and the mesh-data command, exit 2, nothing written."""
    import subprocess
    import sys

    small = REPO / "experiments" / "configs" / "small.yaml"
    cfg, _ = exp.load_scale("small")
    assert cfg["data"]["corpus"]["prefix"] == "data/corpus/corpus" and "tokenize" not in cfg["data"]
    assert "../shared" not in small.read_text()
    # the clone: a repository root without data/corpus/, the command run from that root
    monkeypatch.setattr(exp, "REPO", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert exp.main(["--scale", str(small), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("small_scale: error: data.corpus.prefix data/corpus/corpus: ")
    assert ("create it with: mesh-data tokenize SHARDS... -o data/corpus/corpus --tokenizer hf "
            "--tokenizer-model data/tokenizers/gpt-neox-20b.json -j 8") in err
    assert not (tmp_path / "out").exists()  # no run directory, nothing trained
    monkeypatch.undo()

    # the same from the command line, for a prefix set with --set or --data: exit 2, one line, no traceback
    missing = tmp_path / "elsewhere" / "corpus"
    for extra in (["--set", f"data.corpus.prefix={missing}"], ["--data", str(missing)]):
        p = subprocess.run([sys.executable, str(REPO / "experiments" / "small_scale.py"), "--scale", "small",
                            "--out", str(tmp_path / "out2"), *extra], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
        assert p.stderr.count("\n") == 1 and f"{missing}.bin/.idx missing" in p.stderr
        assert f"mesh-data tokenize SHARDS... -o {missing} --tokenizer hf" in p.stderr
    assert not (tmp_path / "out2").exists()


def test_small_scale_with_an_existing_corpus_gets_past_the_check(exp, tmp_path, capsys):
    """A prefix that `mesh-data tokenize -o PREFIX` wrote (data_tools, the small scale's tokenizer) is accepted, from
    --data or from data.corpus.prefix; --dry-run stops before training and writes nothing."""
    from data_tools import tokenize_files

    shard = tmp_path / "shard.jsonl"
    shard.write_text('{"text": "The first document of the corpus."}\n{"text": "And a second, slightly longer one."}\n')
    prefix = tmp_path / "corpus" / "corpus"
    tokenize_files([str(shard)], str(prefix), tokenizer="hf", quiet=True,
                   tokenizer_model=str(REPO / "data" / "tokenizers" / "gpt-neox-20b.json"))
    out = tmp_path / "out"
    for extra in (["--data", str(prefix)], ["--set", f"data.corpus.prefix={prefix}"]):
        assert exp.main(["--scale", "small", "--out", str(out), "--dry-run", *extra]) == 0
        o = capsys.readouterr().out
        assert f"dataset: {prefix}\n" in o and "would train 8 run(s)" in o and "mesh-s5678" in o
    assert not out.exists()
    # the tiny scale still tokenizes the shipped sample into OUT on first use (here only announced)
    assert exp.main(["--scale", "tiny", "--out", str(out), "--dry-run"]) == 0
    assert f"would tokenize 1 file(s) -> {out / 'data' / 'sample_text_document'}" in capsys.readouterr().out
    assert not out.exists()
