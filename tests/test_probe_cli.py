"""mesh-probe end to end at TP=1 on CPU: a tiny .bin/.idx written with megatron-core's IndexedDatasetBuilder,
tiny vanilla / recursive / MeSH models (weights passed as a state dict), JSON contents and PNG outputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SEQ = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_dataset(prefix: Path, n_docs=12, vocab=8192, seed=0):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for _ in range(n_docs):
        doc = rng.integers(1, vocab, size=int(rng.integers(20, 80)))
        b.add_item(torch.from_numpy(np.append(doc, 0).astype(np.int32)))  # EOD = 0 at the end, as data_tools writes
        b.end_document()
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


def _config(tmp: Path, name: str, **over) -> Path:
    d = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["model"]
    d.update(seq_length=SEQ, **over)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"model": d}))
    return p


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, single_process_module):
    tmp = tmp_path_factory.mktemp("probe")
    prefix = _write_dataset(tmp / "toks")
    return tmp, prefix


@pytest.fixture(scope="module")
def single_process_module():
    from pretrain.distributed import initialize_parallel, set_seed

    initialize_parallel(1)
    set_seed(1234)


def _model_and_state(tmp: Path, name: str, seed: int, **over):
    from mesh_megatron.config import ModelConfig
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import set_seed

    cfg_path = _config(tmp, name, **over)
    set_seed(seed)
    model = MeshGPTModel(ModelConfig.from_yaml(cfg_path))
    sd_path = tmp / f"{name}-{seed}.pt"
    torch.save(model.state_dict(), sd_path)
    return model, cfg_path, sd_path


def _run(argv):
    from mesh_tools.probe.cli import main

    return main(argv)


def test_mesh_probe_json_and_plots(workdir):
    from mesh_tools.probe.data import load_windows

    tmp, prefix = workdir
    model, cfg, sd = _model_and_state(tmp, "tiny-mesh", seed=7)
    out = tmp / "out-mesh"
    rc = _run(["run", "--config", str(cfg), "--state-dict", str(sd), "--data", prefix, "--num-sequences", "6",
               "--batch-size", "4", "--out", str(out), "--name", "mesh"])
    assert rc == 0
    r = json.loads((out / "probe.json").read_text())
    assert r["state_labels"] == ["emb", "h0", "h1", "h2", "out"]
    assert r["data"]["num_sequences"] == 6 and r["data"]["seq_length"] == SEQ
    for kern in ("rbf", "linear"):
        m = np.array(r[f"cka_{kern}"]["mean"])
        assert m.shape == (5, 5)
        assert np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)
        assert (m[np.triu_indices(5, 1)] < 0.9999).all()  # distinct states are not identical
    assert [s["block"] for s in r["skew"]] == ["prelude", "loop 1", "loop 2", "coda"]
    assert all(0.0 < s["mean"] <= 2.0 for s in r["skew"])
    assert [len(r["spectrum"][s]["mean"]) for s in r["states"]] == [SEQ] * 5  # min(top 50, tokens, hidden)
    assert all(r["spectrum"][s]["mean"][0] == pytest.approx(1.0) for s in r["states"])
    assert all(1.0 <= r["effective_rank"][s]["mean"] <= 64 for s in r["states"])
    ro = r["routing"]
    assert ro["steps"] == [0, 1, 2] and ro["slots"] == model.cfg.num_slots == len(ro["read_mean"][0])
    for kind in ("write", "read"):
        assert np.allclose(np.array(ro[f"{kind}_mean"]).sum(axis=1), 1.0)  # softmax over slots
    # The loaded weights are the model's: the probe's loss equals the original model's on the same windows.
    w = load_windows(prefix, 6, SEQ)
    with torch.no_grad():
        ref = model(w[:, :-1], labels=w[:, 1:]).mean(dim=1)
    assert r["loss"]["mean"] == pytest.approx(ref.mean().item(), rel=1e-5)
    for name in ("skew", "cka", "spectrum", "cka_consecutive", "routing"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


def test_base_recursive_transition_equals_core_block_and_extra_loops(workdir):
    tmp, prefix = workdir
    _, cfg, sd = _model_and_state(tmp, "tiny-recursive", seed=3)
    out = tmp / "out-base"
    assert _run(["run", "--config", str(cfg), "--state-dict", str(sd), "--data", prefix, "--num-sequences", "4",
                 "--num-loops", "3", "--out", str(out), "--no-plots"]) == 0
    r = json.loads((out / "probe.json").read_text())
    assert r["routing"] is None and r["num_loops"] == 3
    assert r["state_labels"] == ["emb", "h0", "h1", "h2", "h3", "out"]
    # base: h^(t+1) = f_core(h^(t)), so the transition and the core block are the same update.
    core = [s["mean"] for s in r["skew"] if s["block"].startswith("loop")]
    assert core == pytest.approx([t["mean"] for t in r["skew_transitions"]], abs=1e-12)
    assert not (out / "cka.png").exists()


def test_vanilla_states_are_layers_and_compare(workdir):
    tmp, prefix = workdir
    _, cfg, sd = _model_and_state(tmp, "tiny-vanilla", seed=1)
    out = tmp / "out-vanilla"
    assert _run(["run", "--config", str(cfg), "--state-dict", str(sd), "--data", prefix, "--num-sequences", "4",
                 "--out", str(out), "--no-plots"]) == 0
    r = json.loads((out / "probe.json").read_text())
    assert r["state_labels"] == ["emb", "L1", "L2", "L3", "L4", "L5", "out"]
    assert len(r["skew"]) == 6 and r["routing"] is None
    cmp_dir = tmp / "cmp"
    assert _run(["compare", str(out), str(tmp / "out-mesh" / "probe.json"), "--names", "vanilla", "mesh",
                 "--out", str(cmp_dir)]) == 0
    assert sorted(p.name for p in cmp_dir.glob("*.png")) == ["cka.png", "cka_consecutive.png", "routing.png",
                                                              "skew.png", "spectrum.png"]


def test_fresh_init_and_clear_errors(workdir, capsys):
    tmp, prefix = workdir
    cfg = _config(tmp, "tiny-anchor")
    assert _run(["run", "--config", str(cfg), "--data", prefix, "--num-sequences", "2", "--out", str(tmp / "o1"),
                 "--no-plots"]) == 0
    capsys.readouterr()
    assert _run(["run", "--config", str(cfg), "--data", str(tmp / "nope"), "--out", str(tmp / "o2")]) == 2
    assert "missing" in capsys.readouterr().err and not (tmp / "o2" / "probe.json").exists()
    # Weights of another architecture: named mismatch, not a shape traceback.
    _, _, mesh_sd = _model_and_state(tmp, "tiny-mesh", seed=7)
    assert _run(["run", "--config", str(cfg), "--state-dict", str(mesh_sd), "--data", prefix,
                 "--out", str(tmp / "o3")]) == 2
    assert "do not match the model config" in capsys.readouterr().err
    # Token ids beyond the model's vocabulary (data tokenized for another model).
    big = _write_dataset(tmp / "bigvocab", n_docs=4, vocab=50000, seed=1)
    assert _run(["run", "--config", str(cfg), "--data", big, "--num-sequences", "2", "--out", str(tmp / "o4")]) == 2
    assert "different tokenizer" in capsys.readouterr().err
    assert _run(["run", "--config", str(cfg), "--data", prefix, "--doc-range", "0.5:0.2", "--out", str(tmp / "o5")]) == 2
    assert "start < end" in capsys.readouterr().err


def test_exit_threshold_records_loops_per_token(workdir):
    """--exit-threshold: probe.json records the average loops per token (an infinite threshold: one loop each, the
    K=1 loss); off, nothing is recorded."""
    tmp, prefix = workdir
    _, cfg, sd = _model_and_state(tmp, "tiny-mesh", seed=5)
    common = ["run", "--config", str(cfg), "--state-dict", str(sd), "--data", prefix, "--num-sequences", "4",
              "--no-plots"]
    assert _run([*common, "--num-loops", "2", "--exit-threshold", "1e30", "--out", str(tmp / "ee")]) == 0
    assert _run([*common, "--num-loops", "1", "--out", str(tmp / "k1")]) == 0
    ee, k1 = (json.loads((tmp / d / "probe.json").read_text()) for d in ("ee", "k1"))
    assert ee["exit_threshold"] == 1e30 and ee["loops_per_token"]["mean"] == 1.0
    assert ee["loss"]["mean"] == pytest.approx(k1["loss"]["mean"], rel=1e-6)
    assert k1["loops_per_token"] is None and k1["exit_threshold"] is None
