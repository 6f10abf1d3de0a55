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
