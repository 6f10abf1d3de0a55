"""Build a TP=1 MeshGPTModel for probing from a trainer checkpoint, a plain state dict, or a fresh init."""

from __future__ import annotations

from pathlib import Path

import torch

from mesh_megatron.config import ConfigError, ModelConfig


def _build(cfg: ModelConfig, seed: int):
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import initialize_parallel, set_seed

    # Probing runs as one process: any TP layout of the checkpoint is merged to full weights first.
    initialize_parallel(1)
    set_seed(seed)
    return MeshGPTModel(cfg)


def _load_into(model, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    # megatron-core adds `_extra_state` entries (None) for its linears; they carry no weights.
    own_keys = {k for k, v in own.items() if not k.endswith("_extra_state")}
    got = {k for k in state if not k.endswith("_extra_state")}
    missing, unexpected = sorted(own_keys - got), sorted(got - own_keys)
    if missing or unexpected:
        raise ConfigError(
            f"{source}: weights do not match the model config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; is the config the one it was trained with?"
        )
    bad = [k for k in own_keys if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise ConfigError(f"{source}: '{k}' has shape {tuple(state[k].shape)}, the config gives {tuple(own[k].shape)}")
    model.load_state_dict({k: state[k] for k in own_keys}, strict=False)


def from_checkpoint(ckpt_dir: str | Path, seed: int = 0):
    """A `mesh-pretrain` checkpoint directory (any ZeRO stage / TP size) -> (model, model_config, run_config)."""
    try:
        from pretrain.checkpoint import load_full_model_state
    except ImportError as e:  # the trainer is a separate component of this repository
        raise ConfigError(f"--checkpoint needs the trainer package (pretrain.checkpoint): {e}") from e
    run_cfg, state = load_full_model_state(ckpt_dir)
    if "model" not in run_cfg:
        raise ConfigError(f"{ckpt_dir}: the checkpoint's run config has no 'model:' section")
    cfg = ModelConfig.from_dict(run_cfg["model"], f"{ckpt_dir} (run config)")
    model = _build(cfg, seed)
    _load_into(model, state, str(ckpt_dir))
    return model, cfg, run_cfg


def from_state_dict(config_yaml: str | Path, state_path: str | Path | None, seed: int = 0):
    """A model YAML (bare or with a `model:` section) + a torch.save'd full state dict (or None = fresh init)."""
    cfg = ModelConfig.from_yaml(str(config_yaml))
    model = _build(cfg, seed)
    if state_path is not None:
        p = Path(state_path)
        if not p.is_file():
            raise ConfigError(f"--state-dict {p}: no such file")
        state = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        _load_into(model, state, str(p))
    return model, cfg, {"model": cfg.to_dict()}
