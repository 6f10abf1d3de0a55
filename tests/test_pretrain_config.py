"""Run configs: shipped YAMLs resolve with the paper's / Pythia's hyperparameters; overrides; clear errors; LR schedule;
CLI help / --print-config. No processes, no training."""

import glob
import math

import pytest
import yaml

from mesh_megatron.config import ConfigError
from pretrain.cli import main, split_overrides
from pretrain.config import build_run_config, load_run_config, read_yaml
from pretrain.schedule import lr_multiplier

RUN_CONFIGS = sorted(glob.glob("configs/*.yaml"))
PYTHIA_LR = {"160m": 6e-4, "410m": 3e-4, "1b": 2.5e-4, "1.4b": 2e-4, "2.8b": 1.6e-4, "6.9b": 1.2e-4}


@pytest.mark.parametrize("path", RUN_CONFIGS)
def test_every_shipped_config_resolves(path):
    cfg = load_run_config(path)
    assert cfg.data.paths and cfg.train.train_iters > 0 and cfg.logging.wandb.mode == "offline"
    assert yaml.safe_load(cfg.to_yaml())["model"] == cfg.model.to_dict()  # the saved config round-trips


@pytest.mark.parametrize("size", list(PYTHIA_LR))
@pytest.mark.parametrize("arch", ["vanilla", "vanilla-pythia", "recursive", "anchor", "mesh"])
def test_pythia_sizes_have_paper_hyperparameters(size, arch):
    cfg = load_run_config(f"configs/pythia-{size}-{arch}.yaml")
    t = cfg.train
    assert t.lr == PYTHIA_LR[size] and t.min_lr_ratio == 0.1 and t.warmup_fraction == 0.01
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay, t.grad_clip) == (0.9, 0.95, 1e-8, 0.01, 1.0)
    assert t.global_batch_size * cfg.model.seq_length == 2_097_152
    assert cfg.parallel.tensor_parallel_size == (2 if size == "6.9b" else 1)


def test_dotted_overrides_are_typed():
    cfg = load_run_config("configs/tiny-mesh.yaml", {"train.lr": "3e-4", "parallel.zero_stage": "3",
                                                     "data.paths": "[a, b]", "data.weights": "[1, 3]",
                                                     "logging.wandb.mode": "disabled", "model.num_loops": "3"})
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.parallel.zero_stage == 3 and cfg.data.paths == ["a", "b"] and cfg.data.weights == [1.0, 3.0]
    assert cfg.logging.wandb.mode == "disabled" and cfg.model.num_loops == 3


def test_split_overrides_forms():
    assert split_overrides(["--train.lr", "3e-4", "--parallel.zero_stage=2"]) == {"train.lr": "3e-4", "parallel.zero_stage": "2"}
    with pytest.raises(ConfigError, match="needs a value"):
        split_overrides(["--train.lr"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        split_overrides(["train.lr", "1"])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"train.lrr": "1"}, r"unknown option '--train.lrr' \(did you mean 'train.lr'\?\)"),
        ({"parallel.zero_stag": "1"}, r"did you mean 'parallel.zero_stage'"),
        ({"train.lr": "fast"}, r"'train.lr' must be float, got 'fast'"),
        ({"parallel.zero_stage": "4"}, r"parallel.zero_stage: must be 0, 1, 2 or 3"),
        ({"train.global_batch_size": "12"}, r"train.global_batch_size: 12 is not a multiple of micro_batch_size 8"),
        ({"data.weights": "[1.0]", "data.paths": "[a, b]"}, r"data.weights: 1 weights for 2 paths"),
        ({"data.split": "90,10"}, r"data.split"),
        ({"logging.wandb.mode": "onlin"}, r"did you mean 'online'"),
        ({"parallel.tensor_parallel_size": "3"}, r"num_attention_heads: 4 heads are not divisible by tensor parallel size 3"),
        ({"model.arch": "meshh"}, r"model.arch"),
        ({"model.sequence_parallel": "true", "parallel.tensor_parallel_size": "2", "parallel.zero_stage": "3"},
         r"model.sequence_parallel: not supported with parallel.zero_stage 3"),
    ],
)
def test_bad_values_are_clear_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_run_config("configs/tiny-mesh.yaml", overrides)


def test_unknown_keys_in_yaml_name_the_key(tmp_path):
    d = read_yaml("configs/tiny-mesh.yaml")  # resolved: the run sections come from configs/base/tiny-run.yaml
    d["train"]["warmup_fracton"] = 0.1
    with pytest.raises(ConfigError, match=r"unknown key 'train.warmup_fracton' \(did you mean 'warmup_fraction'\?\)"):
        build_run_config(d, source="x.yaml")
    d = read_yaml("configs/tiny-mesh.yaml")
    d["trian"] = {}
    with pytest.raises(ConfigError, match=r"x.yaml: unknown section 'trian' \(did you mean 'train'\?\)"):
        build_run_config(d, source="x.yaml")


def test_lr_schedule_is_pythia():
    n, w = 1000, 10
    lrs = [lr_multiplier(s, n, w, 0.1) for s in range(n)]
    assert lrs[0] == pytest.approx(0.1) and lrs[w - 1] == pytest.approx(1.0)  # linear warmup
    assert all(b <= a for a, b in zip(lrs[w:], lrs[w + 1:]))  # monotone cosine decay
    assert lrs[w + (n - w) // 2] == pytest.approx(0.55, abs=1e-2)
    assert lr_multiplier(n, n, w, 0.1) == pytest.approx(0.1) and min(lrs) >= 0.1 - 1e-12
    assert math.isclose(lr_multiplier(10**6, n, w, 0.1), 0.1)


def test_cli_print_config_and_errors(capsys):
    assert main(["--config", "configs/tiny-mesh.yaml", "--train.lr", "1e-3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "arch: mesh" in out
    assert main(["--config", "configs/tiny-mesh.yaml", "--train.lrate", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown option '--train.lrate'" in err and "did you mean 'train.lr'" in err
    assert main(["--config", "configs/nope.yaml"]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert main(["--list-options"]) == 0
    listing = capsys.readouterr().out
    assert "--train.lr " in listing and "--logging.wandb.mode " in listing and "--model.arch " in listing
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--resume" in capsys.readouterr().out
