"""End to end: real training checkpoints saved with tensor parallelism 2 and ZeRO-3 (4 gloo processes: TP=2 x DP=2),
exported by `mesh-export --checkpoint ... --verify`, reproduce the training-side model's logits (fp32 CPU, < 1e-4);
the tokenizer is found through the dataset's PREFIX.meta.json (data_tools, shipped SentencePiece model); a corrupt or
incomplete checkpoint is a clear error."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_torchrun

HERE = Path(__file__).parent
ROOT = HERE.parent
pytest.importorskip("pretrain.checkpoint", reason="needs the trainer (pretrain.checkpoint.load_full_model_state)")

MODELS = {
    "mesh": {"arch": "mesh", "prelude_layers": 1, "core_layers": 1, "num_loops": 2, "coda_layers": 1, "scale_embeddings": True},
    # (vanilla and the other connections share this path; their TP=2 shard exports are in tests/test_export_tp.py)
}


def run_config(name: str, model: dict, data_prefix: str, run_dir: Path) -> dict:
    return {
        "model": {"name": f"export-{name}", **model, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
                  "vocab_size": 8192, "make_vocab_size_divisible_by": 64},
        "data": {"paths": [data_prefix], "split": "90,8,2"},
        "train": {"train_iters": 1, "micro_batch_size": 2, "global_batch_size": 4, "lr": 1e-2, "eval_interval": 0,
                  "eval_iters": 1, "log_interval": 100},
        "parallel": {"zero_stage": 3, "tensor_parallel_size": 2},
        "checkpoint": {"save_interval": 0, "save_at_end": True},
        "logging": {"dir": str(run_dir), "wandb": {"mode": "disabled"}},
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from data_tools import tokenize_files

    root = tmp_path_factory.mktemp("ckpt")
    prefix = str(root / "data" / "corpus")
    (root / "data").mkdir()
    tokenize_files([str(HERE / "data" / "export_corpus.txt")], prefix, tokenizer="sentencepiece",
                   tokenizer_model=str(ROOT / "data" / "tokenizers" / "sample_sp8k.model"), quiet=True)
    spec = {name: run_config(name, m, prefix, root / name) for name, m in MODELS.items()}
    (root / "spec.json").write_text(json.dumps(spec))
    run_torchrun("export_ckpt_worker.py", root / "spec.json", nproc=4)
    return {name: root / name / "checkpoints" for name in MODELS}


@pytest.mark.parametrize("name", list(MODELS))
def test_tp2_zero3_checkpoint_exports_with_parity(single_process, checkpoints, tmp_path, capsys, name):
    from pretrain.checkpoint import load_full_model_state

    from mesh_megatron.config import ModelConfig
    from mesh_tools.hf.export import load_export, main, reference_logits

    out = tmp_path / "hf"
    rc = main(["--checkpoint", str(checkpoints[name]), "--out", str(out), "--verify"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "verified: max |logits diff|" in text.out
    run_cfg, sd = load_full_model_state(checkpoints[name])
    assert run_cfg["trainer_state"]["tensor_parallel_size"] == 2 and run_cfg["trainer_state"]["zero_stage"] == 3
    cfg = ModelConfig.from_dict(run_cfg["model"])
    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(3))
    ref = reference_logits(cfg, sd, ids)
    with torch.no_grad():
        got = load_export(out)(input_ids=ids, use_cache=False).logits
    diff = (got - ref).abs().max().item()
    print(f"{name} TP=2 ZeRO-3 checkpoint: max |logits diff| = {diff:.2e}")
    assert diff < 1e-4
    # tokenizer from the dataset sidecar; model card with tokens seen and the training config
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == 8192
    card = (out / "README.md").read_text()
    assert f"| Tokens seen | {run_cfg['trainer_state']['tokens_seen']:,} |" in card and "zero_stage: 3" in card


def test_corrupt_and_incomplete_checkpoints_are_clear_errors(checkpoints, tmp_path, capsys):
    from mesh_tools.hf.export import main

    src = next(p for p in checkpoints["mesh"].iterdir() if p.name.startswith("step_"))
    # incomplete: the COMPLETE marker is missing (a save that never finished)
    bad = tmp_path / "incomplete" / src.name
    shutil.copytree(src, bad)
    (bad / "COMPLETE").unlink()
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "mesh-export: error:" in err and "complete" in err and "Traceback" not in err
    # corrupt: a truncated weights file
    bad = tmp_path / "corrupt" / src.name
    shutil.copytree(src, bad)
    victim = max((p for p in bad.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "mesh-export: error:" in err and "Traceback" not in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
