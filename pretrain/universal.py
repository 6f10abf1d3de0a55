"""Resume across layouts (tensor-parallel size, data-parallel size, ZeRO stage) with DeepSpeed Universal Checkpointing.

A DeepSpeed checkpoint is written in the training layout: each TP rank's weights, and under ZeRO each DP rank's flat
partition of the fp32 master weights and Adam moments. DeepSpeed's Universal Checkpointing (arXiv 2406.18820)
converts it into one file per parameter and state (`zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`, full unsharded
tensors, each with the dim it was split on) and loads that into any layout (`checkpoint.load_universal` in the
DeepSpeed config): every rank takes its TP slice and its ZeRO partition of each tensor. docs/checkpoints.md says why
this mechanism and not torch DCP or megatron-core dist-checkpointing.

What this module adds around DeepSpeed's:
- `universal_checkpoint_info`: how each of our parameters is split over TP (from mesh_megatron.tp_shards), saved in
  every checkpoint so DeepSpeed's converter can merge the TP slices; `mark_tp_layout` tells the ZeRO-3 loader the
  same at load time (it slices TP only for parameters that carry this metadata).
- `convert`: DeepSpeed's converter run once per checkpoint, by rank 0, into `<step>/universal/` (temp dir + rename,
  so a kill leaves no half-converted directory that looks usable). Checkpoints written before this info was saved
  get it from their parameter names; fp32 ZeRO-0 checkpoints (no optimizer partitions: DeepSpeed's converter reads
  only ZeRO files) are converted here from the full per-TP-rank optimizer state in their model-states files.
- `load_plain`: loading into fp32 ZeRO-0, the one target DeepSpeed's universal loader does not cover (its plain
  torch optimizer has no partition mapping).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from mesh_megatron.config import ConfigError
from mesh_megatron.tp_shards import merge_tp_state_dicts, tp_partition_dim
from pretrain import manifest

UNIVERSAL_DIR = "universal"  # inside a step_* checkpoint; pruned with it
_TMP = ".tmp-universal"
_OLD = ".old-universal"  # a damaged universal/ being deleted
_LOCK = ".universal.lock"  # exists while a conversion runs (or after one was killed)
_MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


def universal_checkpoint_info(names) -> dict:
    """DeepSpeed's per-model conversion info: which parameters are replicated over TP, which are split on dim 1
    (row-parallel); the rest are split on dim 0. Exact-name patterns: every pattern matches exactly one parameter."""
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    names = [n for n in names if not n.endswith("_extra_state")]
    return {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        TP_REPLICATED_PARAMETER_PATTERNS: [re.escape(n) + "$" for n in names if tp_partition_dim(n) is None],
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [re.escape(n) + "$" for n in names if tp_partition_dim(n) == 1],
    }


def attach_info(model: torch.nn.Module) -> None:
    """Store the conversion info on the module: DeepSpeed writes it into every model-states file it saves."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    setattr(model, UNIVERSAL_CHECKPOINT_INFO, universal_checkpoint_info([n for n, _ in model.named_parameters()]))


def mark_tp_layout(model: torch.nn.Module, tp_size: int) -> None:
    """Per-parameter TP metadata for DeepSpeed's universal loader: the ZeRO-3 loader slices a full tensor to this
    rank's TP shard only for parameters that carry it (stage 1/2 and the bf16 optimizer read it too)."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META

    for name, p in model.named_parameters():
        dim = tp_partition_dim(name)
        if dim is None or tp_size == 1:
            meta = {"replicated": True}
        else:
            full = list(p.shape)
            full[dim] *= tp_size
            meta = {"partition_dim": dim, "logical_shape": tuple(full)}
        setattr(p, DS_AUTOTP_UC_META, meta)


# --- conversion -------------------------------------------------------------------------------------------------


def universal_path(ckpt: Path) -> Path:
    return ckpt / UNIVERSAL_DIR


def is_converted(ckpt: Path) -> bool:
    """Whether `<ckpt>/universal/` is there with its manifest (it may still fail `damage`)."""
    return (universal_path(ckpt) / manifest.MARKER).exists()


def damage(ckpt: Path, collective: bool = True) -> str | None:
    """Collective unless collective=False. None when `<ckpt>/universal/` matches the manifest its conversion wrote
    (every file's size and xxh3-128, as pretrain.manifest checks a checkpoint); else '<file>: <why>'. The universal
    form is derived data, so the rule is: used only if it verifies, otherwise made again from the checkpoint."""
    uni = universal_path(ckpt)
    verdict = manifest.verify(uni, collective)  # rank 0 reads the manifest: the ranks agree even if it is missing
    if verdict.ok:
        return None
    if not (uni / manifest.MARKER).exists():
        return f"{uni}: no manifest (made before universal forms were verified)"
    rel, why = verdict.problems[0]
    more = f" (and {len(verdict.problems) - 1} more damaged files)" if len(verdict.problems) > 1 else ""
    return f"{uni / rel}: {why}{more}"


def _discard(ckpt: Path) -> None:
    """Remove `<ckpt>/universal/`: renamed out of the way first, so a kill mid-delete leaves nothing that is used."""
    doomed = ckpt / _OLD
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(universal_path(ckpt), doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def convert(ckpt: Path, workers: int = 1, checked: tuple[str | None] | None = None) -> Path:
    """Rank 0 / one process: `<ckpt>/universal/` made from the DeepSpeed files of `ckpt` (kept unchanged), unless it
    exists already and verifies against its manifest (`damage`; `checked` = (its result) when the caller ran it
    collectively); a damaged one is made again. Atomic: built in `<ckpt>/.tmp-universal/` with its manifest, and
    renamed into place. One conversion of a checkpoint at a time (`_conversion_lock`): another job resuming the same
    checkpoint meanwhile waits, then uses what this one made."""
    with _conversion_lock(ckpt) as waited:
        return _convert_locked(ckpt, workers, None if waited else checked)


@contextlib.contextmanager
def _conversion_lock(ckpt: Path):
    """Exclusive flock on `<ckpt>/.universal.lock` (as pretrain.run_lock: the kernel releases it when the holder dies,
    kill -9 included). The holder deletes the file when done; a waiter that then gets the lock of a deleted file
    takes the lock again on the current one. Yields whether it had to wait for another holder. Where the filesystem
    refuses flock, conversions go unlocked, with a warning."""
    import errno
    import fcntl

    path, waited = ckpt / _LOCK, False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                print(f"[pretrain] {ckpt}: another process is converting it to its universal form; waiting for it",
                      flush=True)
            waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"[pretrain] warning: cannot lock {path} ({e.strerror}): converting unlocked; do not resume this "
                  "checkpoint in another layout from two jobs at once", flush=True)
            yield waited
            return
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder deleted this file on its way out
    try:
        yield waited
    finally:
        path.unlink(missing_ok=True)  # before the release: a waiter then finds it gone and locks a new file
        os.close(fd)


def _convert_locked(ckpt: Path, workers: int, checked: tuple[str | None] | None) -> Path:
    out = universal_path(ckpt)
    if out.exists():
        why = checked[0] if checked is not None else damage(ckpt, collective=False)
        if why is None:
            return out
        print(f"[pretrain] {why}; making {out} again from the checkpoint", flush=True)
        _discard(ckpt)
    tmp = ckpt / _TMP
    for stale in [tmp, ckpt / _OLD, *ckpt.glob(".universal-input-*")]:  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(dir=ckpt, prefix=".universal-input-") as scratch:
            model_files = _stage_input(ckpt, Path(scratch))
            if any(ckpt.glob("*_optim_states.pt")):
                _run_deepspeed_converter(Path(scratch), tmp, workers)
            else:
                _convert_plain(model_files, tmp)
        (ckpt / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's converter drops it beside its output
        _complete_optimizer_state(tmp / "zero")
        _link_model_state_names(tmp)
        _fault_injection_pause()
        manifest.write_complete(tmp, UNIVERSAL_DIR, {})  # last: what `damage` checks on every later use
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        (ckpt / "latest_universal").unlink(missing_ok=True)
        if isinstance(e, Exception) and _out_of_space(e, ckpt):
            raise ConfigError(_no_space(ckpt)) from e
        raise
    return out


def _fault_injection_pause() -> None:
    """Tests only: MESH_PRETRAIN_PAUSE_IN_CONVERSION=SECONDS sleeps with every converted file written and neither the
    manifest nor the rename done (the worst moment for a kill -9)."""
    import time

    time.sleep(float(os.environ.get("MESH_PRETRAIN_PAUSE_IN_CONVERSION", "0")))


def _out_of_space(e: BaseException, ckpt: Path) -> bool:
    from pretrain.checkpoint import _out_of_space as full

    if isinstance(e, ConfigError):  # ours: only the converter's wrapped failure can be a full disk
        e = e.__cause__
        if e is None:
            return False
    return full(e, ckpt, _source_bytes(ckpt))


def _source_bytes(ckpt: Path) -> int:
    """About what the universal form takes: the checkpoint's own DeepSpeed files (fp32 weights and moments)."""
    return sum(f.stat().st_size for f in ckpt.glob("*_states.pt"))


def _no_space(ckpt: Path) -> str:
    from pretrain.checkpoint import _space_note

    return (f"{ckpt}: No space left on device for its universal form ({_space_note(ckpt, None)}; it needs about "
            f"{_source_bytes(ckpt):,} bytes, the size of the checkpoint's DeepSpeed files); removed the partial "
            f"{_TMP}. Free space on that filesystem, or resume with the layout it was saved with")


def _stage_input(ckpt: Path, scratch: Path) -> list[Path]:
    """Links to the checkpoint's DeepSpeed files in a scratch directory (DeepSpeed's converter globs its input
    directory); a model-states file without the conversion info (written before it was saved) is copied with it."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    model_files = []
    for f in sorted(ckpt.iterdir()):
        if not f.name.endswith("_states.pt"):
            continue
        target = scratch / f.name
        if f.name.endswith("_model_states.pt"):
            sd = torch.load(f, map_location="cpu", weights_only=False)
            module = sd.get("module") or {}
            # megatron-core's linears add `_extra_state` entries (None) that the converter would try to save as weights
            extra = [k for k, v in module.items() if not torch.is_tensor(v)]
            if UNIVERSAL_CHECKPOINT_INFO not in sd or extra:
                names = list(module) or [n for group in sd.get("param_shapes", []) for n in group]
                sd.setdefault(UNIVERSAL_CHECKPOINT_INFO, universal_checkpoint_info(names))
                for k in extra:
                    del module[k]
                torch.save(sd, target)
                model_files.append(target)
                continue
            model_files.append(target)
        os.symlink(f.resolve(), target)
    if not model_files:
        raise ConfigError(f"{ckpt}: no DeepSpeed model-states files; it is not a checkpoint of this trainer")
    return model_files


def _run_deepspeed_converter(src: Path, out: Path, workers: int) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ds_to_universal(args)
    except Exception as e:
        raise ConfigError(f"{src.parent}: DeepSpeed's universal-checkpoint conversion failed ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); resume with the layout it "
                          "was saved with") from e
    (src.parent / "latest_universal").unlink(missing_ok=True)


def _convert_plain(model_files: list[Path], out: Path) -> None:
    """fp32 ZeRO-0: every TP rank's model-states file holds its full weights and its torch AdamW state (param
    groups in the order the trainer built them: see pretrain.train.param_groups). Written in DeepSpeed's universal
    layout, with the TP slices merged as mesh_megatron.tp_shards merges them."""
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM, PARAM_GROUPS

    states = [torch.load(f, map_location="cpu", weights_only=False) for f in sorted(model_files)]
    per_rank = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
    steps = {}
    for sd in states:
        weights = {k: v for k, v in sd["module"].items() if not k.endswith("_extra_state")}
        opt = sd["optimizer"]
        names = _names_in_group_order(weights, opt[PARAM_GROUPS])
        per_rank["fp32"].append({k: v.float() for k, v in weights.items()})
        state = {names[i]: s for i, s in opt["state"].items()}
        for key in ("exp_avg", "exp_avg_sq"):
            # no state yet (a checkpoint saved before the first step, e.g. an imported model): AdamW's own start
            per_rank[key].append({n: state[n][key] if n in state else torch.zeros_like(w, dtype=torch.float32)
                                  for n, w in weights.items()})
        steps.update({n: state[n]["step"] if n in state else torch.tensor(0.0) for n in weights})
    zero = out / "zero"
    for key, shards in per_rank.items():
        for name, full in merge_tp_state_dicts(shards).items():
            (zero / name).mkdir(parents=True, exist_ok=True)
            torch.save({PARAM: full.contiguous(), CAT_DIM: tp_partition_dim(name) or 0}, zero / name / f"{key}.pt")
            if key == "fp32" and name in steps:
                torch.save(steps[name], zero / name / "step.pt")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in states[0]["optimizer"][PARAM_GROUPS]]
    torch.save({PARAM_GROUPS: groups}, zero / "optimizer_state.pt")
    for f in model_files:
        shutil.copyfile(f, out / f.name)


def _complete_optimizer_state(zero: Path) -> None:
    """The converter writes `zero/optimizer_state.pt` in the shape the source's ZeRO stage reads back; DeepSpeed's
    stage 1/2 loader wants `ds_version` and the param groups at the top, its stage 3 loader the param groups and the
    step under `optimizer_state_dict`. Give it both, so any source stage loads into any target stage."""
    import deepspeed
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    path = zero / "optimizer_state.pt"
    sd = torch.load(path, map_location="cpu", weights_only=False)
    inner = sd.get(OPTIMIZER_STATE_DICT) or {}
    groups = sd.get(PARAM_GROUPS) or inner.get(PARAM_GROUPS)
    step_file = next(zero.glob("*/step.pt"), None)
    step = torch.load(step_file, weights_only=False) if step_file is not None else None
    sd[PARAM_GROUPS] = groups
    sd.setdefault("ds_version", deepspeed.__version__)
    inner.setdefault(PARAM_GROUPS, groups)
    if not inner.get("state") and step is not None:
        inner["state"] = {0: {"step": step}}
    sd[OPTIMIZER_STATE_DICT] = inner
    torch.save(sd, path)


def _names_in_group_order(weights: dict, param_groups: list[dict]) -> dict[int, str]:
    """torch optimizer state ids -> parameter names. The trainer's groups are [2-D+ params, 1-D params], each in
    named_parameters() order (pretrain.train.param_groups), so the ids follow that order."""
    ordered = [n for n, w in weights.items() if w.ndim >= 2] + [n for n, w in weights.items() if w.ndim < 2]
    ids = [i for g in param_groups for i in g["params"]]
    if len(ids) != len(ordered):
        raise ConfigError(f"optimizer state has {len(ids)} parameters, the model {len(ordered)}")
    return dict(zip(ids, ordered))


def _link_model_state_names(out: Path) -> None:
    """DeepSpeed reads the non-weight state (LR scheduler, step counters) from `mp_rank_XX_model_states.pt` when the
    target runs ZeRO 0-2 and from `zero_pp_rank_0_mp_rank_XX_model_states.pt` under ZeRO-3: provide both names
    (hard links, no copy)."""
    for f in list(out.iterdir()):
        m = _MODEL_FILE.match(f.name)
        if not m:
            continue
        dp, tp = m.group(1), m.group(2)
        if dp is None:
            other = out / f"zero_pp_rank_0_mp_rank_{tp}_model_states.pt"
        elif dp == "0":
            other = out / f"mp_rank_{tp}_model_states.pt"
        else:
            continue
        if not other.exists():
            os.link(f, other)


# --- loading into fp32 ZeRO-0 -----------------------------------------------------------------------------------


def _tp_slice(full: torch.Tensor, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    dim = tp_partition_dim(name)
    if dim is None or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=dim)[tp_rank]


def load_plain(engine, universal: Path, tp_rank: int, tp_size: int) -> None:
    """Load a universal checkpoint into an engine whose optimizer is DeepSpeed's plain torch AdamW (fp32, ZeRO-0):
    this rank's TP slice of every weight and both Adam moments, the step count, the LR schedule and DeepSpeed's
    step counters."""
    from deepspeed.checkpoint.constants import PARAM

    zero = universal / "zero"
    opt = engine.optimizer
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            d = zero / name
            if not (d / "fp32.pt").exists():
                raise ConfigError(f"{universal}: no state for parameter '{name}'; the checkpoint is of another model")
            p.copy_(_tp_slice(torch.load(d / "fp32.pt", weights_only=False)[PARAM], name, tp_rank, tp_size))
            st = {"step": torch.as_tensor(torch.load(d / "step.pt", weights_only=False), dtype=torch.float32)}
            for key in ("exp_avg", "exp_avg_sq"):
                st[key] = _tp_slice(torch.load(d / f"{key}.pt", weights_only=False)[PARAM], name, tp_rank,
                                    tp_size).to(p.device, p.dtype).clone()
            opt.state[p] = st
    model_file = sorted(universal.glob("mp_rank_*_model_states.pt"))[0]
    sd = torch.load(model_file, map_location="cpu", weights_only=False)
    if engine.lr_scheduler is not None and sd.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(sd["lr_scheduler"])
        # a torch scheduler writes the LR into the param groups only when it steps: the next step's LR is its last
        for group, lr in zip(opt.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in sd:
            setattr(engine, key, sd[key])


# --- the resume path ------------------------------------------------------------------------------------------


def _wait_group():
    """A gloo group for waiting on rank 0's conversion: it can take minutes for a large model, longer than the
    training collectives' timeout (parallel.timeout_s) should be."""
    import datetime

    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))


def convert_collective(ckpt: Path, workers: int) -> Path:
    """Collective: rank 0 converts (if not done yet), the others wait; a failure is raised on every rank."""
    import torch.distributed as dist

    # An existing universal form is verified first, each rank a share of its files (full fp32 weights and moments).
    present = [universal_path(ckpt).exists()]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(present, src=0)
    checked = (damage(ckpt),) if present[0] else None
    err = [None]
    if dist.get_rank() == 0:
        try:
            convert(ckpt, workers, checked)
        except ConfigError as e:
            err[0] = str(e)
        except OSError as e:  # e.g. a checkpoint on a read-only filesystem, or another user's
            err[0] = (f"{ckpt}: cannot write its universal form inside it ({e.filename or ckpt}: {e.strerror or e}); "
                      "copy the checkpoint to a writable place and resume from the copy, or resume with the layout "
                      "it was saved with")
        except Exception as e:  # noqa: BLE001 - any failure must reach every rank as one line
            err[0] = f"{ckpt}: universal-checkpoint conversion failed ({type(e).__name__}: {e})"
    if dist.get_world_size() > 1:
        group = _wait_group()
        dist.broadcast_object_list(err, src=0, group=group)
        dist.destroy_process_group(group)
    if err[0]:
        raise ConfigError(err[0])
    return universal_path(ckpt)


def load(engine, ckpt: Path, tp_rank: int, tp_size: int) -> None:
    """Collective: load checkpoint `ckpt` (any layout) into `engine` (this run's layout) through its universal form:
    DeepSpeed's universal loader for ZeRO 1-3 and the bf16 optimizer, `load_plain` for fp32 ZeRO-0."""
    import torch.distributed as dist

    workers = max(1, min(4, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    uni = convert_collective(ckpt, workers)
    if not engine.zero_optimization() and not engine.bfloat16_enabled():
        load_plain(engine, uni, tp_rank, tp_size)
        return
    # DeepSpeed reads this switch at load time only; it is set for this load and nowhere else, so a later resume in
    # the same layout reads the native files.
    from deepspeed.utils import groups
    from megatron.core import parallel_state as ps

    cfg = engine._config
    before = cfg.load_universal_checkpoint, groups._TENSOR_MODEL_PARALLEL_GROUP
    cfg.load_universal_checkpoint = True
    # The ZeRO-3 universal loader takes the TP group from DeepSpeed's own registry, which only DeepSpeed's AutoTP
    # fills; ours is megatron-core's (the mpu the engine was given).
    groups._TENSOR_MODEL_PARALLEL_GROUP = ps.get_tensor_model_parallel_group()
    # The ZeRO-3 universal loader copies the first param group's settings into every group: it would put weight
    # decay on the biases and LayerNorms (pretrain.train.param_groups). Keep each group's own.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    decay = [g.get("weight_decay") for g in inner.param_groups]
    try:
        load_path, _ = engine.load_checkpoint(str(ckpt), tag=UNIVERSAL_DIR, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    finally:
        cfg.load_universal_checkpoint, groups._TENSOR_MODEL_PARALLEL_GROUP = before
    for g, wd in zip(inner.param_groups, decay):
        g["weight_decay"] = wd
    # ...and it gives every group the same `step` tensor, which AdamW increments in place once per group per step.
    for st in inner.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()
    if load_path is None:
        raise ConfigError(f"{uni}: DeepSpeed found no loadable universal checkpoint here")
    if dist.is_initialized():
        dist.barrier()
