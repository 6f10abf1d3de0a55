"""mesh-import: a Hugging Face GPTNeoXForCausalLM (Pythia layout) becomes a training checkpoint.

The source is a small random GPTNeoXForCausalLM made here by transformers (every tensor perturbed, so biases and
LayerNorms are not at their init), with a tiny tokenizer; nothing is downloaded.
- HF -> import -> export gives back identical tensors; the imported checkpoint's logits equal HF's (< 1e-5).
- `mesh-pretrain --resume` continues from it: TP=1 ZeRO-0 (the import's own layout, native load) and TP=2 ZeRO-1
  (2 gloo processes, universal conversion) give the same losses (first step to 1e-5 relative), finite, decreasing.
- --init-recursive: the mapping (prelude / core / coda from source layers, block or average), the shapes, fresh
  seeded routers; 1+2R1+1 `base` from 4 layers computes the source model exactly; a MeSH import trains.
- CLI errors are one line with exit code 2; --help explains every flag.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import fresh_job_env
from pretrain_data import VOCAB, make_dataset

HIDDEN, HEADS, LAYERS = 64, 4, 4
STEPS = 4


def make_hf_model(out: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                        intermediate_size=4 * HIDDEN, max_position_embeddings=64)
    model = GPTNeoXForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(out))
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(out))
    return out


def run_yaml(path: Path, data: str, run_dir: Path, **model) -> Path:
    m = {"name": "imported", "arch": "vanilla", "num_layers": LAYERS, "hidden_size": HIDDEN,
         "num_attention_heads": HEADS, "seq_length": 32, "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64,
         "output_layer_init": "wang", **model}
    cfg = {
        "model": m,
        "data": {"paths": [data], "split": "90,8,2"},
        "train": {"train_iters": STEPS, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3, "warmup_iters": 1,
                  "eval_interval": 0, "eval_iters": 1, "log_interval": 1},
        "parallel": {"tensor_parallel_size": 1, "zero_stage": 0},
        "checkpoint": {"save_interval": 0, "keep_last": 0, "save_at_end": False},
        "logging": {"dir": str(run_dir), "wandb": {"mode": "disabled"}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def do_import(*argv) -> None:
    from mesh_tools.hf.importer import main

    assert main([str(a) for a in argv]) == 0


def pretrain(config: Path, resume: Path, run_dir: Path, nproc: int = 1, *extra: str) -> list[float]:
    """`mesh-pretrain --resume` in a fresh job (torchrun for nproc > 1); the losses of its steps."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pretrain"]
              if nproc > 1 else [sys.executable, "-m", "pretrain"])
    cmd = [*launch, "--config", str(config), "--resume", str(resume), "--logging.dir", str(run_dir), *extra]
    proc = subprocess.run(cmd, env=fresh_job_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "event" not in r]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import_hf")
    hf = make_hf_model(tmp / "hf")
    data = make_dataset(tmp / "data" / "synthetic")
    config = run_yaml(tmp / "run.yaml", data, tmp / "run")
    do_import("--hf", hf, "--config", config)
    return {"tmp": tmp, "hf": hf, "data": data, "config": config, "ckpt": tmp / "run" / "checkpoints" / "step_00000000"}


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def checkpoint_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    from mesh_tools.hf.export import load_checkpoint, reference_logits

    cfg, sd, _ = load_checkpoint(ckpt)
    return reference_logits(cfg, sd, ids)


IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def test_import_writes_a_step_0_checkpoint_with_the_tokenizer(world):
    ckpt, run = world["ckpt"], world["tmp"] / "run"
    assert (ckpt / "COMPLETE").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 0 and state["consumed_samples"] == 0 and state["zero_stage"] == 0
    assert (run / "tokenizer" / "tokenizer.json").is_file() and (run / "run_config.yaml").is_file()
    record = json.loads((run / "import.json").read_text())
    assert record["source"] == str(world["hf"].resolve()) and record["tokenizer"] == str(run / "tokenizer")


def test_round_trip_hf_import_export_identical(world, tmp_path):
    from safetensors.torch import load_file

    from mesh_tools.hf.export import main as export_main

    out = tmp_path / "export"
    # no --tokenizer: the export finds the one the import copied into the run directory
    assert export_main(["--checkpoint", str(world["ckpt"]), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    src, back = load_file(str(world["hf"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(src) == set(back)
    assert all(torch.equal(src[k], back[k]) for k in src), [k for k in src if not torch.equal(src[k], back[k])]
    a, b = json.loads((world["hf"] / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                "layer_norm_eps", "use_parallel_residual", "rope_parameters", "hidden_act"):
        assert a[key] == b[key], key


def test_logits_equal_hf_at_tp1(world):
    diff = (checkpoint_logits(world["ckpt"], IDS) - hf_logits(world["hf"], IDS)).abs().max().item()
    print(f"imported vs HF: max |logits diff| = {diff:.2e}")
    assert diff < 1e-5


def test_logits_equal_hf_at_tp2(world, tmp_path):
    """The imported (TP=1, ZeRO-0) checkpoint loaded into a TP=2 x ZeRO-1 model as a resume loads it."""
    from conftest import run_torchrun

    torch.save(IDS, tmp_path / "ids.pt")
    run_torchrun("import_tp_worker.py", world["config"], world["ckpt"], tmp_path / "run", tmp_path / "ids.pt",
                 tmp_path / "logits.pt", nproc=2)
    logits = torch.load(tmp_path / "logits.pt")[..., :VOCAB]
    diff = (logits - hf_logits(world["hf"], IDS)).abs().max().item()
    print(f"imported at TP=2 vs HF: max |logits diff| = {diff:.2e}")
    assert diff < 1e-5


def test_resume_continues_at_tp1_and_tp2_zero1(world):
    tmp = world["tmp"]
    tp1 = pretrain(world["config"], world["ckpt"], tmp / "tp1")
    tp2 = pretrain(world["config"], world["ckpt"], tmp / "tp2", 2,
                   "--parallel.tensor_parallel_size", "2", "--parallel.zero_stage", "1")
    print(f"losses TP=1 ZeRO-0 {tp1}, TP=2 ZeRO-1 {tp2}")
    assert len(tp1) == len(tp2) == STEPS
    assert all(torch.isfinite(torch.tensor(tp1))) and tp1[-1] < tp1[0]
    assert tp2[0] == pytest.approx(tp1[0], rel=1e-5)
    assert tp2 == pytest.approx(tp1, rel=1e-4)


# --- --init-recursive ----------------------------------------------------------------------------------------------


def test_recursive_base_k1_reproduces_the_source(world):
    """1 + 2R1 + 1 with the `base` connection from 4 layers is the source model, layer for layer."""
    tmp = world["tmp"]
    config = run_yaml(tmp / "rec.yaml", world["data"], tmp / "rec", arch="recursive", num_layers=0, prelude_layers=1,
                      core_layers=2, num_loops=1, coda_layers=1)
    do_import("--hf", world["hf"], "--config", config, "--init-recursive")
    record = json.loads((tmp / "rec" / "import.json").read_text())
    assert record["layer_mapping"] == {"prelude.0": [0], "core.0": [1], "core.1": [2], "coda.0": [3]}
    diff = (checkpoint_logits(tmp / "rec" / "checkpoints", IDS) - hf_logits(world["hf"], IDS)).abs().max().item()
    assert diff < 1e-5


def test_mesh_from_vanilla_shapes_mapping_routers_and_training(world):
    from megatron.core import parallel_state

    from mesh_megatron.config import ModelConfig
    from mesh_megatron.model import MeshGPTModel
    from mesh_tools.hf.convert import expected_shapes
    from pretrain.checkpoint import load_full_model_state
    from pretrain.distributed import initialize_parallel, set_seed

    tmp = world["tmp"]
    config = run_yaml(tmp / "mesh.yaml", world["data"], tmp / "mesh", arch="mesh", num_layers=0, prelude_layers=1,
                      core_layers=1, num_loops=2, coda_layers=1, scale_embeddings=True)
    do_import("--hf", world["hf"], "--config", config, "--init-recursive", "--core-init", "average", "--seed", "7")
    _, van = load_full_model_state(world["ckpt"])
    run_cfg, sd = load_full_model_state(tmp / "mesh" / "checkpoints")
    cfg = ModelConfig.from_dict(run_cfg["model"])
    assert {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("_extra_state")} == expected_shapes(cfg)
    for sub in ("attn.qkv.weight", "mlp.fc2.bias", "ln1.weight"):
        assert torch.equal(sd[f"prelude.0.{sub}"], van[f"layers.0.{sub}"])
        assert torch.equal(sd[f"coda.0.{sub}"], van[f"layers.3.{sub}"])
        assert torch.allclose(sd[f"core.0.{sub}"], (van[f"layers.1.{sub}"] + van[f"layers.2.{sub}"]) / 2)
    assert torch.equal(sd["lm_head.weight"], van["lm_head.weight"])
    assert torch.equal(sd["final_ln.weight"], van["final_ln.weight"])
    # scale_embeddings: the embedding is stored / sqrt(d), so the scaled lookup is the source's embedding
    assert torch.allclose(sd["embed.weight"] * HIDDEN**0.5, van["embed.weight"], rtol=1e-6)
    # routers: the seeded init of a fresh model of this config (seed 7), not copies of anything
    initialize_parallel(1)
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    set_seed(7)
    fresh = MeshGPTModel(cfg).state_dict()
    routers = [k for k in sd if k.startswith("connection.")]
    assert routers and all(torch.equal(sd[k], fresh[k]) for k in routers)
    losses = pretrain(config, tmp / "mesh" / "checkpoints", tmp / "mesh_train")
    print(f"MeSH from vanilla: losses {losses}")
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_recursive_mapping_rules():
    from mesh_megatron.config import ModelConfig
    from mesh_tools.hf.importer import HFImportError, recursive_mapping

    cfg = ModelConfig(arch="mesh", hidden_size=64, num_attention_heads=4, prelude_layers=2, core_layers=4,
                      num_loops=2, coda_layers=2)
    m = recursive_mapping(cfg, 12)
    assert m["prelude.1"] == [1] and m["core.0"] == [2] and m["core.3"] == [5] and m["coda.0"] == [10]
    assert recursive_mapping(cfg, 12, core_from=6)["core.0"] == [6]
    assert recursive_mapping(cfg, 12, "average")["core.1"] == [3, 7]  # layer 1 of the blocks 2-5 and 6-9
    with pytest.raises(HFImportError, match="average"):
        recursive_mapping(cfg, 13, "average")  # 2 + 2 x 4 + 2 = 12 != 13
    with pytest.raises(HFImportError, match="--core-from"):
        recursive_mapping(cfg, 12, core_from=10)


def test_step_advances_schedule_and_data_position(world, tmp_path):
    config = run_yaml(tmp_path / "s.yaml", world["data"], tmp_path / "s")
    do_import("--hf", world["hf"], "--config", config, "--step", "3")
    ckpt = tmp_path / "s" / "checkpoints" / "step_00000003"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["consumed_samples"] == 3 * 4 and state["tokens_seen"] == 3 * 4 * 32
    saved = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)
    assert saved["lr_scheduler"]["last_epoch"] == 3 and saved["global_steps"] == 3


def test_tied_embeddings_and_foreign_tensors(world):
    from mesh_tools.hf.importer import HFImportError, from_hf_state_dict, read_hf_weights
    from pretrain.config import load_run_config

    cfg = load_run_config(world["config"]).model
    hf = read_hf_weights(world["hf"])
    tied = {k: v for k, v in hf.items() if k != "embed_out.weight"}
    assert torch.equal(from_hf_state_dict(cfg, tied, "x")["lm_head.weight"], hf["gpt_neox.embed_in.weight"])
    with pytest.raises(HFImportError, match="GPT-NeoX does not have"):
        from_hf_state_dict(cfg, {**hf, "model.layers.0.mlp.gate_proj.weight": torch.zeros(1)}, "x")


# --- CLI ---------------------------------------------------------------------------------------------------------------


def test_help_explains_every_flag():
    from mesh_tools.hf.importer import build_parser

    text = build_parser().format_help()
    for flag in ("--hf", "--config", "--step", "--init-recursive", "--core-init", "--core-from", "--seed", "--resume auto"):
        assert flag in text


def _error(capsys, *argv) -> str:
    from mesh_tools.hf.importer import main

    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mesh-import: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    config = world["config"]
    assert "no such directory" in _error(capsys, "--hf", tmp_path / "nope", "--config", config)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert "is not GPT-NeoX" in _error(capsys, "--hf", llama, "--config", config)
    wide = run_yaml(tmp_path / "wide.yaml", world["data"], tmp_path / "wide", hidden_size=128)
    err = _error(capsys, "--hf", world["hf"], "--config", wide)
    assert "does not match" in err and "hidden_size: HF 64 vs config 128" in err
    deep = run_yaml(tmp_path / "deep.yaml", world["data"], tmp_path / "deep", num_layers=6)
    assert "num_layers" in _error(capsys, "--hf", world["hf"], "--config", deep)
    mesh = run_yaml(tmp_path / "m.yaml", world["data"], tmp_path / "m", arch="mesh", num_layers=0, prelude_layers=1,
                    core_layers=1, num_loops=2, coda_layers=1)
    assert "--init-recursive" in _error(capsys, "--hf", world["hf"], "--config", mesh)
    assert "already holds checkpoint step_00000000" in _error(capsys, "--hf", world["hf"], "--config", config)
    assert "unknown option" in _error(capsys, "--hf", world["hf"], "--config", config, "--train.lrr", "1")
