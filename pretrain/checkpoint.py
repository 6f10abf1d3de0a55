"""Checkpoints: DeepSpeed engine state (model, optimizer incl. ZeRO partitions, LR scheduler) + the run's own state
(step, data position, RNG of every rank, resolved config), written atomically and pruned to the last K.

Layout (documented in docs/checkpoints.md):

    <checkpoint.dir>/
      latest                      text: name of the newest complete checkpoint (informational; resume scans)
      step_00000100/              one complete checkpoint (exists only after the atomic rename)
        mp_rank_XX_model_states.pt                 DeepSpeed: module weights per TP rank (ZeRO-3: placeholders)
        *zero_pp_rank_D_mp_rank_XX_optim_states.pt DeepSpeed: optimizer partitions (ZeRO >= 1) per (DP, TP) rank
        rng/rank_R.pt             python/numpy/torch(/cuda) RNG states of global rank R
        run_config.yaml           the fully resolved run config
        trainer_state.json        step, consumed samples, tokens seen, layout (TP, DP, ZeRO), wandb run id
        COMPLETE                  written last, before the rename
      .tmp-step_00000200/         a save in progress (or killed mid-way): ignored and cleaned up on the next start

All ranks write into `.tmp-<tag>`; after a barrier rank 0 writes the metadata and COMPLETE and renames the directory
to `<tag>` (one atomic rename), then updates `latest` (temp file + os.replace). A kill -9 at any point before the
rename leaves only a `.tmp-*` directory, so the previous checkpoint stays the latest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mesh_megatron.config import ConfigError

TAG_RE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # = step x global batch: the data position
    tokens_seen: int = 0
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    zero_stage: int = 0
    global_batch_size: int = 0
    train_iters: int = 0
    precision: str = "fp32"
    wandb_id: str | None = None
    saved_at: float = 0.0


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# --- finding checkpoints ------------------------------------------------------------------------------


def is_complete(path: Path) -> bool:
    return path.is_dir() and TAG_RE.match(path.name) is not None and (path / "COMPLETE").exists()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`none` -> None; `auto` -> latest complete checkpoint in `root` (or None); else a checkpoint dir (or a root)."""
    if resume in ("none", "", "no", "false"):
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if is_complete(path):
        return path
    if path.is_dir() and (latest := latest_checkpoint(path)) is not None:
        return latest
    if path.is_dir() and path.name.startswith(".tmp-"):
        raise ConfigError(f"checkpoint.resume: '{path}' is an unfinished save (the process died while writing it); resume from a step_* checkpoint")
    raise ConfigError(f"checkpoint.resume: '{path}' is not a complete checkpoint (no step_* directory with a COMPLETE marker)")


def clean_stale_temps(root: Path) -> list[Path]:
    """Remove `.tmp-*` directories left by a save that was killed (rank 0 only, at start)."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# --- RNG ----------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core import tensor_parallel

            st["cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
        except Exception:  # tracker not initialised (no dropout in TP regions)
            pass
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if torch.cuda.is_available() and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"])
        if "cuda_tracker" in st:
            from megatron.core import tensor_parallel

            tensor_parallel.get_cuda_rng_tracker().set_states(st["cuda_tracker"])


# --- atomic small files -------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


# --- save / load --------------------------------------------------------------------------------------


def save(engine, cfg, state: TrainerState, root: Path) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    import torch.distributed as dist

    rank = dist.get_rank()
    tag = tag_for(state.step)
    tmp_tag = f".tmp-{tag}"
    tmp = root / tmp_tag
    final = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    dist.barrier()
    state.saved_at = time.time()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"trainer_state": asdict(state)}, save_latest=False)
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        write_atomic(tmp / "run_config.yaml", cfg.to_yaml())
        write_atomic(tmp / "trainer_state.json", json.dumps(asdict(state), indent=2))
        write_atomic(tmp / "COMPLETE", f"{tag}\n")
        _fault_injection_pause(state.step)
        if final.exists():  # re-saving the same step (e.g. end of a run that just saved): swap atomically
            old = root / f".old-{tag}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        write_atomic(root / "latest", f"{tag}\n")
        prune(root, cfg.checkpoint.keep_last)
    dist.barrier()
    return final


_signal_seen = False


def note_signal() -> None:
    """Called by the trainer's SIGTERM/SIGUSR1 handler (ends a test pause early; the save itself always completes)."""
    global _signal_seen
    _signal_seen = True


def _fault_injection_pause(step: int) -> None:
    """Tests only: MESH_PRETRAIN_PAUSE_BEFORE_COMMIT=STEP:SECONDS sleeps at the worst moment of that step's save
    (every file written, directory not yet renamed) so a test can kill -9 the process there, or signal it."""
    spec = os.environ.get("MESH_PRETRAIN_PAUSE_BEFORE_COMMIT")
    if spec:
        at, secs = spec.split(":")
        deadline = time.time() + float(secs)
        while int(at) == step and time.time() < deadline and not _signal_seen:
            time.sleep(0.05)


def prune(root: Path, keep_last: int) -> list[Path]:
    if keep_last <= 0:
        return []
    done = complete_checkpoints(root)
    victims = done[:-keep_last]
    for p in victims:
        # rename first so a kill mid-delete never leaves a half-deleted directory that still looks complete
        doomed = root / f".old-{p.name}"
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return victims


def read_state(path: Path) -> tuple[TrainerState, dict]:
    try:
        st = json.loads((path / "trainer_state.json").read_text())
        run_cfg = yaml.safe_load((path / "run_config.yaml").read_text())
    except (FileNotFoundError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable checkpoint metadata ({e}); it is not a complete checkpoint of this trainer") from None
    known = TrainerState.__dataclass_fields__
    return TrainerState(**{k: v for k, v in st.items() if k in known}), run_cfg


def check_compatible(path: Path, cfg, dp_size: int) -> TrainerState:
    """Refuse, with a readable reason, a checkpoint that cannot be loaded into this run's layout / model."""
    state, saved = read_state(path)
    want = cfg.model.to_dict()
    have = saved.get("model", {})
    diff = [k for k in sorted(set(want) | set(have)) if k != "name" and want.get(k) != have.get(k)]
    if diff:
        details = ", ".join(f"{k}: checkpoint {have.get(k)!r} vs config {want.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"{path}: checkpoint was trained with a different model architecture ({details}); resume with the checkpoint's model config")
    tp = cfg.parallel.tensor_parallel_size
    if state.tensor_parallel_size != tp:
        raise ConfigError(
            f"{path}: checkpoint has tensor_parallel_size={state.tensor_parallel_size} but this run uses {tp}; "
            f"set --parallel.tensor_parallel_size {state.tensor_parallel_size} (or convert with pretrain.checkpoint.load_full_model_state)"
        )
    if state.zero_stage != cfg.parallel.zero_stage:
        raise ConfigError(
            f"{path}: checkpoint was saved with ZeRO stage {state.zero_stage} but this run uses {cfg.parallel.zero_stage}; "
            f"set --parallel.zero_stage {state.zero_stage}"
        )
    if state.zero_stage > 0 and state.data_parallel_size != dp_size:
        raise ConfigError(
            f"{path}: ZeRO-{state.zero_stage} optimizer states are partitioned over {state.data_parallel_size} data-parallel ranks, "
            f"this run has {dp_size}; launch with the same number of processes / TP size"
        )
    if state.global_batch_size != cfg.train.global_batch_size:
        raise ConfigError(
            f"{path}: checkpoint used train.global_batch_size={state.global_batch_size}, this run {cfg.train.global_batch_size}; "
            "the data position is counted in global batches, so keep it unchanged when resuming"
        )
    return state


def load(engine, path: Path, cfg, dp_size: int) -> TrainerState:
    """Collective. Restores model, optimizer, scheduler, this rank's RNG and returns the trainer state."""
    import torch.distributed as dist

    state = check_compatible(path, cfg, dp_size)
    load_path, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise ConfigError(f"{path}: DeepSpeed found no loadable model states in this checkpoint")
    rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


# --- full model state for export / analysis -----------------------------------------------------------


def _rank_files(ckpt: Path, tp_rank: int) -> list[Path]:
    pat = re.compile(rf"(^|_)mp_rank_{tp_rank:02d}_(model|optim)_states\.pt$")
    return [p for p in ckpt.iterdir() if pat.search(p.name)]


def _fp32_from_deepspeed(ckpt: Path, tp_rank: int, zero_stage: int) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 weights: from the fp32 master partitions of the optimizer (ZeRO >= 1, merged over DP
    ranks by deepspeed.utils.zero_to_fp32), or from the module weights (ZeRO 0)."""
    files = _rank_files(ckpt, tp_rank)
    if not files:
        raise ConfigError(f"{ckpt}: no DeepSpeed files for tensor-parallel rank {tp_rank}; the checkpoint is incomplete")
    if zero_stage == 0:
        sd = torch.load(ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in sd.items() if torch.is_tensor(v)}
    from deepspeed.utils.zero_to_fp32 import _get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

    # zero_to_fp32 globs every *_model_states / *_optim_states file of a directory, so give it only this TP
    # rank's files (links in a scratch directory).
    with tempfile.TemporaryDirectory() as scratch:
        for f in files:
            os.symlink(f.resolve(), Path(scratch) / f.name)
        sd = to_torch_tensor(_get_fp32_state_dict_from_zero_checkpoint(scratch, False))  # ZeRO-3 gives lazy tensors
    return {k: v.float().contiguous() for k, v in sd.items()}


def load_full_model_state(ckpt_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(run_config_dict, full_state_dict): ZeRO partitions (any stage) and TP shards gathered into one full, unsharded
    fp32 state dict with MeshGPTModel's parameter names, loadable into a TP=1 model with `load_state_dict`.

    `ckpt_dir` is a checkpoint (`.../step_00000100`) or a checkpoint root (its latest complete checkpoint is used).
    The returned config dict is the resolved run config (sections model, data, train, ...) plus a `trainer_state`
    entry with step, tokens_seen, consumed_samples and the training layout.
    """
    from mesh_megatron.tp_shards import merge_tp_state_dicts

    path = Path(ckpt_dir)
    if not is_complete(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ConfigError(f"{path}: not a complete checkpoint and contains none (missing COMPLETE marker or step_* dirs)")
        path = latest
    state, run_cfg = read_state(path)
    shards = [_fp32_from_deepspeed(path, r, state.zero_stage) for r in range(state.tensor_parallel_size)]
    full = merge_tp_state_dicts(shards)
    run_cfg = dict(run_cfg)
    run_cfg["trainer_state"] = asdict(state)
    run_cfg["checkpoint_path"] = str(path)
    return run_cfg, full
