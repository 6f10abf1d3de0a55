"""experiments/loop_depth.py: its command line and bookkeeping (no training here: the trainer has its own tests)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "loop_depth.py"


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("loop_depth", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_lists_fixed_and_randomised_runs_and_writes_nothing(tmp_path):
    out, res = tmp_path / "out", tmp_path / "res"
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--seeds", "1", "2", "--out", str(out),
                        "--results-dir", str(res)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "uniform:1-4" in p.stdout  # K_train = 2 at the tiny scale: randomised over 1..2K
    for run in ("base-fixed-s1", "base-uniform1-4-s1", "mesh-fixed-s2", "mesh-uniform1-4-s2"):
        assert run in p.stdout
    assert "K=1..4" in p.stdout
    assert not out.exists() and not res.exists()


def test_a_bad_distribution_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--randomised", "gauss:3", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("loop_depth: error: ") and "uniform:A-B" in p.stderr


def test_summary_pairs_randomised_with_fixed_by_seed(exp):
    def ev(losses, loops):
        pts = [{"mode": "K", "k": k, "threshold": None, "loss": l, "loops_per_token": float(k)}
               for k, l in zip((1, 2), losses)]
        return {"points": pts + [{"mode": "exit", "k": 2, "threshold": 0.3, "loss": losses[1] + 0.1,
                                  "loops_per_token": loops}]}

    evals = {("base", "fixed", 1): ev([5.0, 4.0], 1.5), ("base", "fixed", 2): ev([5.2, 4.2], 1.7),
             ("base", "u", 1): ev([4.5, 4.1], 1.2), ("base", "u", 2): ev([4.6, 4.1], 1.4)}
    s = exp.summarize(evals, [("base", "fixed"), ("base", "u")], [1, 2])
    assert s["labels"] == ["K=1", "K=2", "exit 0.3 (K≤2)"]
    k1 = s["paired"]["base: u - fixed"]["K=1"]
    assert k1["deltas"] == pytest.approx([-0.5, -0.6]) and k1["wins"] == 2
    assert s["models"]["base/u"]["exit 0.3 (K≤2)"]["loops_per_token"] == pytest.approx(1.3)
    md = exp.results_markdown(s, "python experiments/loop_depth.py", "setup")
    assert "| base/u | 4.5500 ± 0.0707 [1.00] |" in md
