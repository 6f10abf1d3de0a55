"""mesh-export CLI and export robustness: clear errors for bad input (exit code 2, one readable line), corrupt or
incomplete weights refused with the offending tensors named, and atomic output (a failed export leaves neither a
partial directory nor a damaged previous export)."""

import subprocess
import sys

import pytest
import torch

from export_cases import CASES, model_state
from mesh_megatron.config import ModelConfig
from mesh_tools.hf import export as export_mod
from mesh_tools.hf.export import ExportError, build_parser, export_model, main
from mesh_tools.hf.tokenizer import TokenizerExportError, TokenizerSource
from test_export_tokenizer import SHIPPED

SHIPPED_SP = SHIPPED / "sample_sp8k.model"


def test_help_explains_every_flag():
    text = build_parser().format_help()
    for flag in ("--checkpoint", "--out", "--tokenizer", "--tokenizer-kind", "--eod-token", "--no-tokenizer", "--dtype",
                 "--max-shard-size", "--verify", "--force"):
        assert flag in text
    proc = subprocess.run([sys.executable, "-m", "mesh_tools.hf.export", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout


@pytest.mark.parametrize("kind", ["missing", "file", "empty_dir"])
def test_bad_checkpoint_paths_are_clear_errors(tmp_path, capsys, kind):
    ckpt = tmp_path / "ckpt"
    if kind == "file":
        ckpt.write_text("x")
    elif kind == "empty_dir":
        ckpt.mkdir()
    rc = main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--no-tokenizer"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mesh-export: error: ") and "--checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_non_empty_out_needs_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = main(["--checkpoint", str(tmp_path), "--out", str(out), "--no-tokenizer"])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


@pytest.fixture(scope="module")
def mesh_model(single_process):
    c = CASES["mesh"]
    return ModelConfig.from_dict(dict(c)), model_state(c)


@pytest.mark.parametrize("damage", ["missing", "shape", "nan", "extra"])
def test_incomplete_or_corrupt_weights_are_refused(mesh_model, tmp_path, damage):
    cfg, sd = mesh_model
    sd = dict(sd)
    if damage == "missing":
        del sd["connection.read_routers.2.weight"]
    elif damage == "shape":
        sd["core.1.mlp.fc1.weight"] = sd["core.1.mlp.fc1.weight"][:10]
    elif damage == "nan":
        sd["coda.0.ln1.weight"] = sd["coda.0.ln1.weight"].clone().fill_(float("nan"))
    else:
        sd["connection.write_routers.7.weight"] = torch.zeros(5, 64)
    match = {"missing": "missing tensor.*read_routers.2", "shape": "shape mismatch.*core.1.mlp.fc1", "nan": "non-finite.*coda.0.ln1",
             "extra": "unexpected tensor.*write_routers.7"}[damage]
    with pytest.raises(ExportError, match=match):
        export_model(cfg, sd, tmp_path / "out", tokenizer=None)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_nothing_and_keeps_previous(mesh_model, tmp_path, monkeypatch):
    cfg, sd = mesh_model
    out = tmp_path / "out"
    export_model(cfg, sd, out, tokenizer=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A tokenizer that fails: nothing is published, the old export is untouched, no temp dirs remain.
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"garbage")
    with pytest.raises(TokenizerExportError):
        export_model(cfg, sd, out, tokenizer=TokenizerSource("sentencepiece", bad), force=True)
    # A crash while writing weights (disk full, kill): same.
    def boom(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(export_mod, "_write_weights", boom)
    with pytest.raises(OSError):
        export_model(cfg, sd, out, tokenizer=None, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.model", "out"]


def test_sharded_bf16_export_loads(mesh_model, tmp_path):
    """Large models: weights split into several safetensors shards with an index; bf16 halves the size."""
    from mesh_tools.hf.export import load_export

    cfg, sd = mesh_model
    export_model(cfg, sd, tmp_path / "out", tokenizer=None, dtype="bfloat16", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    model = load_export(tmp_path / "out", dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"].to(torch.bfloat16))


def test_tokenizer_found_from_dataset_sidecar(tmp_path):
    """Default tokenizer: the one named by the first dataset's PREFIX.meta.json (as data_tools writes it)."""
    import json
    import shutil

    from mesh_tools.hf.export import tokenizer_from_run_config

    shutil.copyfile(SHIPPED_SP, tmp_path / "sp.model")
    (tmp_path / "data").mkdir()
    meta = {"tokenizer": {"kind": "sentencepiece", "path": "/nonexistent/sp.model", "relpath": "../sp.model", "eod_token": "</s>"}}
    (tmp_path / "data" / "corpus.meta.json").write_text(json.dumps(meta))
    src = tokenizer_from_run_config({"data": {"paths": [str(tmp_path / "data" / "corpus")]}})
    assert src.kind == "sentencepiece" and src.path.resolve() == (tmp_path / "sp.model").resolve() and src.eod_token == "</s>"
    (tmp_path / "data" / "synthetic.meta.json").write_text(json.dumps({"tokenizer": {"kind": "synthetic", "vocab_size": 256}}))
    assert tokenizer_from_run_config({"data": {"paths": [str(tmp_path / "data" / "synthetic")]}}) is None
    (tmp_path / "sp.model").unlink()
    with pytest.raises(ExportError, match="pass --tokenizer"):
        tokenizer_from_run_config({"data": {"paths": [str(tmp_path / "data" / "corpus")]}})
