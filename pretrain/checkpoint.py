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
        COMPLETE                  written last, before the rename: the manifest (size + hash of every file,
                                  pretrain/manifest.py), verified on resume (resolve_verified)
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mesh_megatron.config import ConfigError
from pretrain import manifest

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
    grad_accum_dtype: str = ""  # "" in checkpoints written before it was recorded: bf16 runs accumulated in bf16
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


def resolve_verified(resume: str, root: Path) -> Path | None:
    """Collective: `resolve_resume`, then the checkpoint's files checked against the manifest in its COMPLETE marker
    (existence, size, hash; each rank a share), before anything expensive is built.

    Under `--resume auto` (or a checkpoint root) a damaged checkpoint (a file corrupted, truncated or missing) is
    moved aside to `<tag>.corrupt` with a one-line message naming the file, and the previous complete checkpoint is
    verified and used; with none left, CheckpointError. A checkpoint named explicitly is refused with a
    CheckpointError naming the bad file and the newest earlier checkpoint that verifies. A checkpoint without a
    manifest (written before integrity checks) is used as it is, with a note."""
    import torch.distributed as dist

    path = resolve_resume(resume, root)
    explicit = path is not None and is_complete(Path(resume))
    rank = dist.get_rank() if dist.is_initialized() else 0
    while path is not None:
        verdict = manifest.verify(path)
        if not verdict.manifest:
            if rank == 0:
                print(f"[pretrain] {path}: no manifest (written before integrity checks); not verified", flush=True)
            return path
        if verdict.ok:
            if rank == 0:
                print(f"[pretrain] verified {verdict.files} files ({_fmt_bytes(verdict.bytes)}) of {path.name} in "
                      f"{verdict.seconds:.1f} s", flush=True)
            return path
        bad = _damage(path, verdict)
        earlier = [p for p in complete_checkpoints(path.parent) if _step_of(p) < _step_of(path)]
        if explicit:
            good = next((p for p in reversed(earlier) if manifest.verify(p).ok), None)
            hint = (f"resume from {good} (the newest earlier checkpoint that verifies) or with --resume auto" if good
                    else "start from scratch with --resume none")
            raise CheckpointError(f"{bad}; checkpoint {path.name} is damaged and cannot be resumed from: {hint}")
        moved = [None]
        if rank == 0:
            try:
                moved[0] = _move_aside(path, "corrupt")
                if earlier:
                    write_atomic(path.parent / "latest", f"{earlier[-1].name}\n")
            except OSError as e:  # the other ranks wait below: they must learn of it, not hang
                moved[0] = f"could not move it aside ({e.strerror or e})"
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(moved, src=0)
        if isinstance(moved[0], str):
            raise CheckpointError(f"{bad}; checkpoint {path.name} is damaged and {moved[0]}: move or delete it, then "
                                  "resume with --resume auto")
        if not earlier:
            raise CheckpointError(f"{bad}; moved {path.name} aside to {moved[0]}, and {path.parent} has no earlier "
                                  "complete checkpoint: start from scratch with --resume none")
        if rank == 0:
            print(f"[pretrain] {bad}; not resuming from {path.name}: moved it to {moved[0]}, using the previous "
                  f"checkpoint {earlier[-1].name} instead", flush=True)
        path = earlier[-1]
    return None


def _damage(path: Path, verdict: manifest.Verdict) -> str:
    """'<file>: <why>' for the first file of a checkpoint that failed verification (and how many more did)."""
    rel, why = verdict.problems[0]
    more = f" (and {len(verdict.problems) - 1} more damaged files)" if len(verdict.problems) > 1 else ""
    return f"{path / rel}: {why}{more}"


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
    """This rank's generators: Python, NumPy, torch's (CPU, CUDA) and the dropout streams of the model's RNG tracker
    (mesh_megatron.rng; on the device the run uses, so they are only restored on that kind of device)."""
    from mesh_megatron import rng

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    st["rng_streams"] = {"device": rng.device_type(), "states": rng.tracker().get_states()}
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    from mesh_megatron import rng

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if torch.cuda.is_available() and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"])
    streams = st.get("rng_streams")
    if streams is None and "cuda_tracker" in st:  # written before the tracker ran on the CPU too: CUDA streams
        streams = {"device": "cuda", "states": st["cuda_tracker"]}
    # Streams of another device type cannot be set (different generator states); those of set_seed stay then.
    if streams is not None and streams["device"] == rng.device_type():
        rng.tracker().set_states(dict(streams["states"]))


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


def dir_bytes(path: Path, saved_only: bool = False) -> int:
    """Bytes of the files under `path`; saved_only: only what a save writes (not a checkpoint's universal form or a
    conversion's temp directories, which a resume in another layout adds beside them)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()
               and not (saved_only and _derived(f.relative_to(path).parts[0])))


def _derived(top: str) -> bool:
    return top == "universal" or top.startswith(".")


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
    return commit(start_save(engine, cfg, state, root))


@dataclass
class PendingSave:
    """A save whose files are written (or, asynchronously, being written) into `tmp`; `commit` finishes it."""

    cfg: Any
    state: TrainerState  # a copy taken at the save: the run's own state moves on while an async write goes on
    root: Path
    tag: str
    tmp: Path
    final: Path
    previous: Path | None
    needed: int | None
    failed: BaseException | None = None  # a write of the training thread that failed on this rank
    batch: Any = None  # pretrain.async_save.WriteBatch of the background writes, or None (written already)

    def written_here(self) -> bool:
        """Not collective: whether this rank's files are all written (or failed)."""
        return self.batch is None or self.batch.done.is_set()


def start_save(engine, cfg, state: TrainerState, root: Path, writer=None, batch=None) -> PendingSave:
    """Collective: the checks (non-finite state, free space; CheckpointError on every rank) and the writes of `save`,
    which `commit` finishes. With `writer` and `batch` (pretrain.async_save; its SnapshotCheckpointEngine installed as
    engine.checkpoint_engine) every file is only copied here and written by the writer's thread."""
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
        needed = dir_bytes(previous, saved_only=True) if previous is not None else None
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
            if writer is None:
                torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")
            else:
                writer.submit(batch, rng_state(), tmp / "rng" / f"rank_{rank}.pt")
        except Exception as e:
            failed = e
    if writer is not None:
        writer.seal(batch)
    return PendingSave(cfg=cfg, state=replace(state), root=root, tag=tag, tmp=tmp, final=final, previous=previous,
                       needed=needed, failed=failed, batch=batch)


def commit(pending: PendingSave) -> Path:
    """Collective: finish a save begun by `start_save`. Waits for this rank's background writes (if any), then, if
    every rank wrote its files, rank 0 writes the metadata and COMPLETE, renames the directory into place, updates
    `latest` and prunes. A write that failed on any rank raises the same CheckpointError on every rank (temp
    directory removed, the previous checkpoint stays latest). Returns the final checkpoint directory."""
    import torch.distributed as dist

    rank = dist.get_rank()
    cfg, state, root, tag, tmp, final = pending.cfg, pending.state, pending.root, pending.tag, pending.tmp, pending.final
    previous, needed, failed = pending.previous, pending.needed, pending.failed
    if pending.batch is not None:
        pending.batch.done.wait()
        failed = failed or pending.batch.error
    _give_up_if_failed(failed, root, tmp, tag, previous, needed)
    # The manifest's hashes: each rank reads its share of the files, while every rank is still here.
    hashes, failed = manifest.hash_checkpoint(tmp)
    _give_up_if_failed(failed, root, tmp, tag, previous, needed)
    committed = False
    if rank == 0:
        try:
            write_atomic(tmp / "run_config.yaml", cfg.to_yaml())
            write_atomic(tmp / "trainer_state.json", json.dumps(asdict(state), indent=2))
            manifest.write_complete(tmp, tag, hashes)
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


# Model fields that do not change the function the weights compute: they may change on resume (with a note).
RUNTIME_MODEL_FIELDS = ("name", "recompute", "sequence_parallel", "params_dtype", "hidden_dropout", "attention_dropout", "compile")


def layout_change(state: TrainerState, cfg, dp_size: int, precision: str) -> str | None:
    """How this run's layout differs from the checkpoint's in ways DeepSpeed's own loader cannot follow (its files
    are per TP rank, and under ZeRO or the bf16 optimizer per DP rank too), or None. Such a resume goes through
    DeepSpeed's universal checkpoint (pretrain/universal.py)."""
    tp, zero = cfg.parallel.tensor_parallel_size, cfg.parallel.zero_stage
    partitioned = state.zero_stage > 0 or state.precision == "bf16"  # the bf16 optimizer partitions over DP
    changes = []
    if state.tensor_parallel_size != tp:
        changes.append(f"tensor_parallel_size {state.tensor_parallel_size} -> {tp}")
    if state.zero_stage != zero:
        changes.append(f"zero_stage {state.zero_stage} -> {zero}")
    if state.data_parallel_size != dp_size and (partitioned or zero > 0 or precision == "bf16"):
        changes.append(f"data-parallel size {state.data_parallel_size} -> {dp_size}")
    if state.precision != precision:
        changes.append(f"precision {state.precision} -> {precision}")
    # bf16 with fp32 gradients is another DeepSpeed optimizer (other files) at ZeRO-1
    saved_accum = state.grad_accum_dtype or state.precision
    if precision == "bf16" and state.precision == "bf16" and saved_accum != cfg.parallel.accum_dtype(precision):
        changes.append(f"gradient accumulation {saved_accum} -> {cfg.parallel.accum_dtype(precision)}")
    return ", ".join(changes) or None


def check_compatible(path: Path, cfg, dp_size: int) -> tuple[TrainerState, list[str]]:
    """Refuse, with a readable reason, a checkpoint of another model (the fields that define the function the
    weights compute) or another global batch (it defines the data position). Returns the checkpoint's trainer state
    and notes on what changes and carries over (runtime knobs; the layout, which resume converts)."""
    state, saved = read_state(path)
    want = cfg.model.to_dict()
    have = saved.get("model", {})
    fields = sorted(set(want) | set(have))
    diff = [k for k in fields if k not in RUNTIME_MODEL_FIELDS and want.get(k) != have.get(k)]
    if diff:
        details = ", ".join(f"{k}: checkpoint {have.get(k)!r} vs config {want.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"{path}: checkpoint was trained with a different model architecture ({details}); resume with the checkpoint's model config")
    if state.global_batch_size != cfg.train.global_batch_size:
        raise ConfigError(
            f"{path}: checkpoint used train.global_batch_size={state.global_batch_size}, this run {cfg.train.global_batch_size}; "
            "the data position is counted in global batches, so keep it unchanged when resuming"
        )
    notes = [f"model.{k} {have.get(k)!r} -> {want.get(k)!r}" for k in fields
             if k in RUNTIME_MODEL_FIELDS and k != "name" and k in have and want.get(k) != have.get(k)]
    saved_micro = saved.get("train", {}).get("micro_batch_size")
    if saved_micro is not None and saved_micro != cfg.train.micro_batch_size:
        notes.append(f"train.micro_batch_size {saved_micro} -> {cfg.train.micro_batch_size}")
    return state, notes


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
        # verified like the first choice was (a damaged one is moved aside as .corrupt and the one before it tried)
        path = resolve_verified("auto", path.parent)


def _step_of(path: Path) -> int:
    return int(TAG_RE.match(path.name).group(1))


def _move_aside(path: Path, suffix: str = "nonfinite") -> Path:
    """Rank 0: rename a refused checkpoint out of the step_* namespace to `<tag>.<suffix>` (kept for inspection,
    never resumed from)."""
    target, n = path.with_name(f"{path.name}.{suffix}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{suffix}-{n}")
    os.replace(path, target)
    return target


def _load_one(engine, path: Path, cfg, dp_size: int) -> TrainerState:
    import torch.distributed as dist

    state, _ = check_compatible(path, cfg, dp_size)
    precision = "bf16" if engine.bfloat16_enabled() else "fp32"
    change = layout_change(state, cfg, dp_size, precision)
    if change is not None:
        from megatron.core import parallel_state as ps

        from pretrain import universal

        if dist.get_rank() == 0:
            print(f"[pretrain] {path}: layout changed ({change}); loading it through DeepSpeed's universal "
                  f"checkpoint ({path / universal.UNIVERSAL_DIR}, converted once)", flush=True)
        t0 = time.time()
        universal.load(engine, path, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
        if dist.get_rank() == 0:
            print(f"[pretrain] loaded {path.name} into the new layout in {time.time() - t0:.1f}s; RNG states are "
                  "per rank of the old layout: every rank reseeds from train.seed + step", flush=True)
        reseed(cfg.train.seed + state.step)
        return state
    load_path, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise ConfigError(f"{path}: DeepSpeed found no loadable model states in this checkpoint")
    rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def reseed(seed: int) -> None:
    """After a layout change: the same seed on every rank (as at the start of a run), so replicated computations
    agree; the data order does not depend on it (batches are a function of the step)."""
    from pretrain.distributed import set_seed

    set_seed(seed)


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
    verdict = manifest.verify(path, collective=False)  # this process reads every file (ZeRO-0: most of them anyway)
    if not verdict.ok:
        earlier = [p for p in complete_checkpoints(path.parent) if _step_of(p) < _step_of(path)]
        good = next((p for p in reversed(earlier) if manifest.verify(p, collective=False).ok), None)
        hint = f"use {good}, the newest earlier checkpoint that verifies" if good else "no earlier checkpoint verifies"
        raise ConfigError(f"{_damage(path, verdict)}; checkpoint {path.name} is damaged: {hint}")
    state, run_cfg = read_state(path)
    shards = [_fp32_from_deepspeed(path, r, state.zero_stage) for r in range(state.tensor_parallel_size)]
    full = merge_tp_state_dicts(shards)
    run_cfg = dict(run_cfg)
    run_cfg["trainer_state"] = asdict(state)
    run_cfg["checkpoint_path"] = str(path)
    return run_cfg, full
