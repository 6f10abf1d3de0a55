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

Nothing non-finite is ever committed: before writing, every rank checks its own weights and optimizer state (ZeRO
partitions included) and the ranks agree in one all-reduce; a save that fails while writing (disk full, any OSError)
is abandoned the same way on every rank (temp directory removed, `latest` untouched, one-line `CheckpointError`).
Loading checks the same state after DeepSpeed has read it: a non-finite checkpoint (written before these checks, or
corrupted since) is moved aside as `<tag>.nonfinite` and, under `--resume auto`, the previous complete one is loaded.
"""

from __future__ import annotations

import errno
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


class CheckpointError(ConfigError):
    """A checkpoint that was not written (non-finite state, disk full) or cannot be used. A ConfigError, so the CLI
    prints it as one line and exits 2; the previous complete checkpoint is untouched."""


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
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a full disk must not leave temp files behind
        raise


# --- finiteness of the training state -----------------------------------------------------------------


def _state_tensors(engine):
    """(description, tensor) for everything this rank writes to / reads from a checkpoint: its module weights (under
    ZeRO-3 its own partition), and the optimizer's master weights and moments (its ZeRO partition at ZeRO >= 1)."""
    names = {}
    for name, p in engine.module.named_parameters():
        names[id(p)] = name
        yield f"weight {name}", p.ds_tensor if hasattr(p, "ds_tensor") else p
    # DeepSpeed's wrappers (ZeRO, bf16) step a plain torch optimizer whose params are the fp32 master partitions.
    opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
    tensors = [(f"param group {gi} partition {pi}", p) for gi, g in enumerate(opt.param_groups)
               for pi, p in enumerate(g["params"])]
    listed = {id(p) for _, p in tensors}
    # ZeRO-3 puts its fp32 partitions into the param groups only while it steps; they stay the keys of the state.
    tensors += [(f"partition {i}", p) for i, p in enumerate(opt.state) if id(p) not in listed]
    for what, p in tensors:
        what = names.get(id(p), what)
        if id(p) not in names:
            yield f"fp32 master weights ({what})", p
        for key, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.is_floating_point():
                yield f"optimizer {key} ({what})", v


def nonfinite_state(engine) -> str | None:
    """Not collective. The first tensor of this rank's training state holding a NaN or inf (its description), or
    None. One host sync: a float64 sum per tensor (finite bf16/fp32 values cannot overflow it; a NaN or inf makes it
    non-finite), all sums checked at once."""
    items = [(what, t) for what, t in _state_tensors(engine) if t.numel()]
    if not items:
        return None
    sums = torch.stack([t.detach().sum(dtype=torch.float64).to(items[0][1].device) for _, t in items])
    if torch.isfinite(sums.sum()).item():
        return None
    return items[int((~torch.isfinite(sums)).nonzero()[0, 0])][0]


def _any_rank(*flags: bool) -> list[bool]:
    """Collective: each flag true on every rank if it is true on any rank (one MAX all-reduce)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def _per_rank(note: str | None) -> str:
    """Collective: the ranks' notes joined as 'rank R: note' (only ranks that have one)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return f"rank 0: {note}" if note else ""
    notes = [None] * dist.get_world_size()
    dist.all_gather_object(notes, note)
    return "; ".join(f"rank {r}: {n}" for r, n in enumerate(notes) if n)


# --- disk space ---------------------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def _space_note(root: Path, needed: int | None) -> str:
    """'N free, M needed' for the filesystem of `root` (free inodes too when they ran out)."""
    try:
        st = os.statvfs(root)
    except OSError:
        return "free space unknown"
    note = f"{_fmt_bytes(st.f_bavail * st.f_frsize)} free"
    if st.f_files and st.f_favail == 0:
        note += ", no free inodes"
    if needed:
        note += f", about {_fmt_bytes(needed)} ({needed:,} bytes) needed, the size of the previous checkpoint"
    return note


def _out_of_space(e: BaseException, root: Path, needed: int | None) -> bool:
    """Whether a failed write ran out of space. torch.save reports it from C++ as a RuntimeError without errno
    ('basic_ios::clear: iostream error', 'file write failed'), so the filesystem itself is asked as well."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        st = os.statvfs(root)
    except OSError:
        return False
    free = st.f_bavail * st.f_frsize
    return (st.f_files and st.f_favail == 0) or free < max(needed or 0, 1 << 20)


# --- save / load --------------------------------------------------------------------------------------


def save(engine, cfg, state: TrainerState, root: Path) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    Raises CheckpointError on every rank, having written nothing that could be resumed from, when any rank's weights
    or optimizer state hold a NaN/inf, when the filesystem lacks the space the previous checkpoint took, or when a
    write fails (disk full, any OSError); the temp directory is removed and the previous checkpoint stays latest."""
    import torch.distributed as dist

    rank = dist.get_rank()
    tag = tag_for(state.step)
    tmp_tag = f".tmp-{tag}"
    tmp = root / tmp_tag
    final = root / tag
    previous = latest_checkpoint(root)
    needed, short = None, False
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        # The next checkpoint is as large as the previous one (same model, layout and files).
        needed = dir_bytes(previous) if previous is not None else None
        short = needed is not None and shutil.disk_usage(root).free < needed
    bad = nonfinite_state(engine)
    # Also the barrier that keeps the other ranks from writing before rank 0 has cleared the temp directory.
    any_bad, any_short = _any_rank(bad is not None, short)
    keep = f"nothing was written; the latest complete checkpoint stays {previous.name if previous else '(none)'}"
    if any_bad:
        raise CheckpointError(
            f"{root}: not saving {tag}: non-finite values in the training state ({_per_rank(bad)}); {keep}. The run "
            "diverged: lower train.lr or check the data, and resume with --resume auto"
        )
    if any_short:
        raise CheckpointError(
            f"{root}: not saving {tag}: No space left on device ({_space_note(root, needed)}); {keep}. Free space "
            "there or set checkpoint.dir to a larger filesystem, then resume with --resume auto"
        )
    state.saved_at = time.time()
    failed: BaseException | None = None
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"trainer_state": asdict(state)}, save_latest=False)
    except Exception as e:  # OSError, or torch's C++ writer's RuntimeError
        failed = e
        # DeepSpeed's writes come after its own collectives, before its closing barrier: meet the others there.
        dist.barrier()
    if failed is None:
        try:
            (tmp / "rng").mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")
        except Exception as e:
            failed = e
    _give_up_if_failed(failed, root, tmp, tag, previous, needed)
    committed = False
    if rank == 0:
        try:
            write_atomic(tmp / "run_config.yaml", cfg.to_yaml())
            write_atomic(tmp / "trainer_state.json", json.dumps(asdict(state), indent=2))
            write_atomic(tmp / "COMPLETE", f"{tag}\n")
            _fault_injection_pause(state.step)
            if final.exists():  # re-saving the same step (e.g. end of a run that just saved): swap atomically
                old = root / f".old-{tag}"
                os.replace(final, old)
                try:
                    os.replace(tmp, final)
                except OSError:
                    os.replace(old, final)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            committed = True
            write_atomic(root / "latest", f"{tag}\n")
        except Exception as e:
            if not committed:
                failed = e
            else:  # `latest` is informational (resume scans for COMPLETE): the checkpoint itself is in place
                print(f"[pretrain] warning: {final} is complete but {root / 'latest'} was not updated: {e}", flush=True)
        if committed:
            try:
                prune(root, cfg.checkpoint.keep_last)
            except OSError as e:  # only rank 0 is here: it must still reach the collective below
                print(f"[pretrain] warning: could not prune old checkpoints in {root}: {e}", flush=True)
    _give_up_if_failed(failed, root, tmp, tag, previous, needed)  # also the barrier after the commit
    return final


def _give_up_if_failed(failed: BaseException | None, root: Path, tmp: Path, tag: str, previous: Path | None,
                       needed: int | None) -> None:
    """Collective: if a write failed on any rank, remove the temp directory and raise CheckpointError everywhere."""
    import torch.distributed as dist

    if not _any_rank(failed is not None)[0]:
        return
    note = None
    if failed is not None:
        full = _out_of_space(failed, root, needed)
        note = (f"No space left on device ({_space_note(root, needed)})" if full
                else f"{type(failed).__name__}: {str(failed).strip().splitlines()[-1] if str(failed).strip() else ''}")
    where = _per_rank(note)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    fix = ("Free space on that filesystem or set checkpoint.dir elsewhere" if "No space left on device" in where
           else "Fix that, or set checkpoint.dir elsewhere")
    raise CheckpointError(
        f"{tmp}: could not write checkpoint {tag} ({where}); removed it, the latest complete checkpoint stays "
        f"{previous.name if previous else '(none)'}. {fix}, then resume with --resume auto"
    )


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
    """Collective. Restores model, optimizer, scheduler, this rank's RNG and returns the trainer state (of the
    checkpoint actually loaded: see `load_finite`)."""
    return load_finite(engine, path, cfg, dp_size)[0]


def load_finite(engine, path: Path, cfg, dp_size: int) -> tuple[TrainerState, Path]:
    """Collective. Loads `path`, then every rank checks the state it now holds for NaN/inf (one all-reduce), which
    catches checkpoints written before saves were checked and ones corrupted since, at no extra read.

    A non-finite checkpoint is moved aside to `<tag>.nonfinite` (so neither `--resume auto` nor keep_last counts it
    again). Under `--resume auto` (or a checkpoint root) the previous complete checkpoint is loaded instead, with a
    message; a checkpoint named explicitly is refused. Returns (trainer state, checkpoint loaded)."""
    import torch.distributed as dist

    explicit = is_complete(Path(cfg.checkpoint.resume))
    while True:
        state = _load_one(engine, path, cfg, dp_size)
        bad = nonfinite_state(engine)
        if not _any_rank(bad is not None)[0]:
            return state, path
        where = _per_rank(bad)
        earlier = [p for p in complete_checkpoints(path.parent) if _step_of(p) < _step_of(path)]
        if explicit:
            hint = f"resume from {earlier[-1]} (or --resume auto)" if earlier else "start from scratch (--resume none)"
            raise CheckpointError(f"{path}: non-finite values in this checkpoint's training state ({where}); it cannot "
                                  f"be resumed from: {hint}")
        moved = [None]
        if dist.get_rank() == 0:
            moved[0] = _move_aside(path)
            if earlier:
                write_atomic(path.parent / "latest", f"{earlier[-1].name}\n")
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(moved, src=0)
        if not earlier:
            raise CheckpointError(f"{path}: non-finite values in this checkpoint's training state ({where}); moved it "
                                  f"to {moved[0]}, and {path.parent} has no earlier complete checkpoint: run again "
                                  "to start from scratch")
        if dist.get_rank() == 0:
            print(f"[pretrain] {path}: non-finite values in the loaded training state ({where}); not resuming from "
                  f"it: moved it to {moved[0]}, loading {earlier[-1].name} instead", flush=True)
        path = earlier[-1]


def _step_of(path: Path) -> int:
    return int(TAG_RE.match(path.name).group(1))


def _move_aside(path: Path) -> Path:
    """Rank 0: rename a refused checkpoint out of the step_* namespace (kept for inspection, never resumed from)."""
    target, n = path.with_name(f"{path.name}.nonfinite"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.nonfinite-{n}")
    os.replace(path, target)
    return target


def _load_one(engine, path: Path, cfg, dp_size: int) -> TrainerState:
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
