"""Run configuration: one YAML per run (model + data + train + parallel + checkpoint + logging + eval).

`load_run_config(path, overrides)` reads the YAML, applies dotted command-line overrides (`--train.lr 3e-4`),
validates every section and returns a `RunConfig`. Unknown or mistyped keys are a `ConfigError` naming the key and
the closest valid one, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mesh_megatron.config import ConfigError, ModelConfig, closest
from mesh_megatron.config import read_yaml as _read_yaml


@dataclass
class DataConfig:
    # Dataset prefixes (PREFIX.bin / PREFIX.idx, as written by data_tools). Several = a weighted blend.
    paths: list[str] = field(default_factory=list)
    weights: list[float] | None = None  # blend weights (normalised); null = proportional to size
    split: str = "969,30,1"  # train,valid,test weights over the documents of `paths` (Megatron convention)
    # Optional separate validation / test sets; when given, `paths` is used entirely for training.
    valid_paths: list[str] | None = None
    test_paths: list[str] | None = None
    cache_dir: str | None = None  # where megatron-core caches its sample/shuffle indices; default <run dir>/data_cache
    eod_id: int | None = None  # end-of-document token; default: from PREFIX.meta.json, else 0

    def validate(self) -> None:
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ConfigError(f"data.weights: {len(self.weights)} weights for {len(self.paths)} paths; give one weight per path")
        if self.weights is not None and any(w <= 0 for w in self.weights):
            raise ConfigError("data.weights: blend weights must be > 0")
        parts = self.split.split(",")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"data.split: '{self.split}' must be comma-separated numbers like '969,30,1'") from None
        if len(vals) != 3 or any(v < 0 for v in vals) or vals[0] <= 0:
            raise ConfigError(f"data.split: '{self.split}' needs 3 non-negative weights (train,valid,test) with train > 0")


@dataclass
class TrainConfig:
    seed: int = 1234
    train_iters: int = 1000  # optimizer steps
    micro_batch_size: int = 4  # sequences per forward on one data-parallel rank
    global_batch_size: int = 16  # sequences per optimizer step (= micro x grad-accum x data-parallel size)
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr (Pythia / paper: 10%)
    warmup_fraction: float = 0.01  # linear warmup over this fraction of train_iters (paper: 1%)
    warmup_iters: int | None = None  # overrides warmup_fraction
    weight_decay: float = 0.01  # paper 0.01 (Pythia 0.1)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU | bf16 | fp32
    eval_interval: int = 200  # steps between validation runs (0 = only at the end)
    eval_iters: int = 10  # global batches per validation run (the same samples at every evaluation)
    eval_num_loops: list[int] = field(default_factory=list)  # also validate with these loop counts K (recursive/mesh)
    # Loop count K per training step (recursive / mesh): fixed (model.num_loops) | uniform:A-B | poisson:MEAN |
    # lognormal-poisson:MEAN[:SIGMA]; drawn from (seed, step), so exact resume holds. pretrain/loop_sampler.py
    num_loops_train: str = "fixed"
    num_loops_max: int | None = None  # cap on a drawn K; default: B of uniform:A-B, else 4 x MEAN
    backprop_loops: int = 0  # truncated backprop: gradients through the last N core iterations only (0 = all)
    log_interval: int = 10  # steps between console lines
    check_replicated_interval: int = 0  # >0: assert TP-replicated params are identical every N steps (debug)
    exit_at_step: int | None = None  # save a checkpoint and stop after this step, as if preempted (chunked runs, tests)
    # Numerical guard: a step whose loss or grad-norm is NaN/inf. skip: no update (weights, optimizer state and LR
    # schedule unchanged; its batch is consumed, not retried) | stop: end the run at the first one (exit 2).
    nonfinite_action: str = "skip"
    max_nonfinite_steps: int = 5  # this many non-finite steps in a row end the run (exit 2), whatever the action
    loss_spike_factor: float = 2.0  # warn (console, metrics.jsonl, wandb) when a loss exceeds this x the running mean; 0 = off
    loss_spike_window: int = 100  # steps in that running mean (finite losses only)

    def validate(self) -> None:
        for f in ("train_iters", "micro_batch_size", "global_batch_size", "eval_iters", "log_interval"):
            if getattr(self, f) < 1:
                raise ConfigError(f"train.{f}: must be >= 1, got {getattr(self, f)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"train.warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision: '{self.precision}' not in (auto, bf16, fp32){closest(self.precision, ['auto', 'bf16', 'fp32'])}")
        if self.nonfinite_action not in ("skip", "stop"):
            raise ConfigError(f"train.nonfinite_action: '{self.nonfinite_action}' not in (skip, stop){closest(self.nonfinite_action, ['skip', 'stop'])}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"train.max_nonfinite_steps: must be >= 1, got {self.max_nonfinite_steps}")
        if self.loss_spike_factor != 0 and self.loss_spike_factor <= 1:
            raise ConfigError(f"train.loss_spike_factor: must be > 1 (or 0 = off), got {self.loss_spike_factor}")
        if self.loss_spike_window < 1:
            raise ConfigError(f"train.loss_spike_window: must be >= 1, got {self.loss_spike_window}")
        if any(k < 1 for k in self.eval_num_loops):
            raise ConfigError(f"train.eval_num_loops: loop counts must be >= 1, got {self.eval_num_loops}")
        from pretrain.loop_sampler import parse

        parse(self.num_loops_train)
        if self.num_loops_max is not None and self.num_loops_max < 1:
            raise ConfigError(f"train.num_loops_max: must be >= 1, got {self.num_loops_max}")
        if self.backprop_loops < 0:
            raise ConfigError(f"train.backprop_loops: must be >= 0 (0 = all iterations), got {self.backprop_loops}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )

    @property
    def warmup_steps(self) -> int:
        return self.warmup_iters if self.warmup_iters is not None else int(round(self.warmup_fraction * self.train_iters))


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    zero_stage: int = 1  # DeepSpeed ZeRO 0/1/2/3 (Pythia: 1; the paper: 0)
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU
    timeout_s: int = 1800
    # bf16 runs: accumulate and reduce gradients in fp32 (Megatron's default). DeepSpeed does this with ZeRO >= 1
    # only; ZeRO-0 + bf16 accumulates in bf16 (a note at start). docs/configs.md, "Gradient precision and ZeRO".
    grad_accum_dtype: str = "fp32"  # fp32 | bf16
    # ZeRO communication (stage >= 1). Defaults sized for 80 GB GPUs: buckets of 5e8 elements (2 GB of fp32
    # gradients each), overlapped with the backward pass; Pythia-6.9B used 1.26e9 on 40 GB A100s.
    overlap_comm: bool | None = None  # None: on with a GPU, off on CPU (no streams to overlap on)
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000

    def accum_dtype(self, precision: str) -> str:
        """The dtype gradients are accumulated and data-parallel reduced in: fp32 for fp32 runs; for bf16 runs fp32
        when asked and DeepSpeed can (ZeRO-1 runs its bf16 optimizer with fp32 gradients, ZeRO-2/3 accumulate and
        reduce-scatter in fp32), else bf16 (ZeRO-0: DeepSpeed has no fp32 accumulation without a ZeRO optimizer)."""
        if precision != "bf16":
            return "fp32"
        return "fp32" if self.grad_accum_dtype == "fp32" and self.zero_stage >= 1 else "bf16"

    def validate(self) -> None:
        if self.grad_accum_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"parallel.grad_accum_dtype: '{self.grad_accum_dtype}' not in (fp32, bf16)")
        for k in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"parallel.{k}: must be >= 1 (elements), got {getattr(self, k)}")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"parallel.tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"parallel.backend: '{self.backend}' not in (auto, gloo, nccl)")


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default <logging.dir>/checkpoints
    save_interval: int = 1000  # steps between saves (0 = only at the end)
    keep_last: int = 3  # keep the K newest checkpoints (0 = keep all)
    save_at_end: bool = True
    resume: str = "none"  # none | auto (latest complete checkpoint in dir, if any) | path of a checkpoint
    max_minutes: float | None = None  # save and stop cleanly after this much wall time (Slurm time limits)
    async_save: bool = False  # write periodic saves in a background thread (docs/checkpoints.md, Asynchronous save)

    def validate(self) -> None:
        if self.save_interval < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.save_interval / keep_last: must be >= 0")


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (default: no network needed) | online | disabled
    project: str = "mesh-megatron"
    entity: str | None = None
    name: str | None = None  # default: the run name
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logging.wandb.mode: '{self.mode}' not in (offline, online, disabled){closest(self.mode, ['offline', 'online', 'disabled'])}")


@dataclass
class LoggingConfig:
    dir: str | None = None  # run directory; default runs/<model.name>
    jsonl: bool = True  # <dir>/metrics.jsonl
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_tflops: float | None = None  # per-device dense peak for MFU; default from a GPU table, none on CPU

    def validate(self) -> None:
        self.wandb.validate()


@dataclass
class EvalConfig:
    """lm-evaluation-harness tasks on each new checkpoint during training, in a background `mesh-eval` process started
    by rank 0 (pretrain/eval_launcher.py; docs/eval.md, "During training"). Off while `tasks` is empty."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task / group names
    include_path: str | None = None  # a directory of extra lm-eval task YAMLs (local tasks)
    num_loops: list[int] = field(default_factory=list)  # loop counts K to evaluate at; empty = as trained
    limit: float | None = None  # documents per task (a count, or a fraction below 1)
    num_fewshot: int | None = None  # default: each task's own
    tokenizer: str | None = None  # default: the one named by the training data's PREFIX.meta.json
    interval: int = 0  # 0: every checkpoint; N: the checkpoints at multiples of N steps (and the last one)
    device: str = "cpu"  # cpu | cuda | cuda:N; on GPU the evaluation shares the device with training
    batch_size: int = 8
    threads: int = 4  # CPU threads of the evaluation process (it also runs at a lower CPU priority)
    final_wait_minutes: float = 30.0  # at the end of training, wait this long for the last evaluations

    def validate(self) -> None:
        if any(not isinstance(t, str) or not t.strip() for t in self.tasks):
            raise ConfigError(f"eval.tasks: task names must be non-empty strings, got {self.tasks}")
        if any(k < 1 for k in self.num_loops):
            raise ConfigError(f"eval.num_loops: loop counts must be >= 1, got {self.num_loops}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval.limit: must be > 0 (a count of documents, or a fraction below 1), got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"eval.num_fewshot: must be >= 0, got {self.num_fewshot}")
        for f in ("batch_size", "threads"):
            if getattr(self, f) < 1:
                raise ConfigError(f"eval.{f}: must be >= 1, got {getattr(self, f)}")
        if self.interval < 0 or self.final_wait_minutes < 0:
            raise ConfigError("eval.interval / eval.final_wait_minutes: must be >= 0")
        dev = self.device
        if not (dev in ("cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"eval.device: '{dev}' not in (cpu, cuda, cuda:N){closest(dev, ['cpu', 'cuda'])}")

    def check_run(self, cfg: RunConfig) -> None:
        """What depends on other sections: evaluations need checkpoints to read."""
        if not self.tasks:
            return
        ck = cfg.checkpoint
        if not ck.save_interval and not ck.save_at_end:
            raise ConfigError("eval.tasks: this run writes no checkpoint to evaluate (checkpoint.save_interval 0 and "
                              "save_at_end false); set checkpoint.save_interval")
        if self.interval and ck.save_interval and self.interval % ck.save_interval:
            raise ConfigError(f"eval.interval: {self.interval} is not a multiple of checkpoint.save_interval "
                              f"{ck.save_interval} (evaluations read checkpoints); use a multiple, or 0 for every checkpoint")
        if self.num_loops and cfg.model.arch == "vanilla":
            raise ConfigError("eval.num_loops: a vanilla model has no loop count; remove eval.num_loops")


SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "eval": EvalConfig,
}


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.dir or f"runs/{self.model.name or 'run'}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict()}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- parsing -------------------------------------------------------------------------------------------


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce: int -> float) a YAML value against a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                pass
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        out = []
        for item in value:
            ok, v = _type_ok(item, arg)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    return True, value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build_section(cls: type, d: Any, prefix: str, source: str) -> Any:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: '{prefix}' must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}.{key}'{closest(str(key), names)}; valid keys: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build_section(tp, value, f"{prefix}.{key}", source)
            continue
        ok, v = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{source}: '{prefix}.{key}' must be {_type_name(tp)}, got {value!r}")
        kwargs[key] = v
    return cls(**kwargs)


def build_run_config(d: dict[str, Any], source: str = "config") -> RunConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a run config must be a mapping with sections model, {', '.join(SECTIONS)}")
    valid = ["model", *SECTIONS]
    for key in d:
        if key not in valid:
            raise ConfigError(f"{source}: unknown section '{key}'{closest(str(key), valid)}; valid sections: {', '.join(valid)}")
    if "model" not in d:
        raise ConfigError(f"{source}: missing the 'model:' section")
    model = ModelConfig.from_dict(d["model"], source=source)
    sections = {name: _build_section(cls, d.get(name), name, source) for name, cls in SECTIONS.items()}
    cfg = RunConfig(model=model, source=source, **sections)
    for name in SECTIONS:
        try:
            getattr(cfg, name).validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    looped = cfg.train.num_loops_train != "fixed" or cfg.train.backprop_loops
    if looped and model.arch == "vanilla":
        raise ConfigError(f"{source}: train.num_loops_train / train.backprop_loops: a vanilla model has no loop; "
                          "remove them or use arch recursive / mesh")
    if model.sequence_parallel and cfg.parallel.tensor_parallel_size > 1 and cfg.parallel.zero_stage == 3:
        # The TP sum of the replicated parameters' gradients runs on the parameters as the forward pass sees them,
        # which ZeRO-3 keeps partitioned and gathers behind module hooks (mesh_megatron/sequence_parallel.py).
        raise ConfigError(f"{source}: model.sequence_parallel: not supported with parallel.zero_stage 3; use ZeRO-1 or "
                          "-2 (the optimizer states are partitioned either way) or turn sequence parallelism off")
    try:
        model.validate_parallel(cfg.parallel.tensor_parallel_size)
        cfg.eval.check_run(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _valid_keys() -> list[str]:
    keys = [f"model.{f.name}" for f in fields(ModelConfig)]
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                keys += [f"{name}.{f.name}.{g.name}" for g in fields(tp)]
            else:
                keys.append(f"{name}.{f.name}")
    return keys


def describe_keys() -> list[tuple[str, str, Any]]:
    """(dotted key, type, default) for every run-config key (for `mesh-pretrain --list-options`)."""
    out = []
    for f in fields(ModelConfig):
        default = "(required)" if f.default is dataclasses.MISSING else f.default
        out.append((f"model.{f.name}", _type_name(typing.get_type_hints(ModelConfig)[f.name]), default))
    for name, cls in SECTIONS.items():
        inst = cls()
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                sub = getattr(inst, f.name)
                sub_hints = typing.get_type_hints(type(sub))
                for g in fields(sub):
                    out.append((f"{name}.{f.name}.{g.name}", _type_name(sub_hints[g.name]), getattr(sub, g.name)))
            else:
                out.append((f"{name}.{f.name}", _type_name(hints[f.name]), getattr(inst, f.name)))
    return out


def apply_overrides(d: dict[str, Any], overrides: dict[str, str], source: str = "command line") -> dict[str, Any]:
    """Set dotted keys (`train.lr` -> d['train']['lr']); values are parsed as YAML ('3e-4', 'true', '[a, b]')."""
    valid = _valid_keys()
    for key, raw in overrides.items():
        if key not in valid:
            raise ConfigError(f"{source}: unknown option '--{key}'{closest(key, valid)}")
        try:
            value = yaml.safe_load(raw) if isinstance(raw, str) else raw
        except yaml.YAMLError:
            value = raw
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return d


def read_yaml(path: str | Path) -> dict[str, Any]:
    return _read_yaml(path) or {}


def load_run_config(path: str | Path, overrides: dict[str, str] | None = None) -> RunConfig:
    d = read_yaml(path)
    if overrides:
        apply_overrides(d, overrides)
    return build_run_config(d, source=str(path))


__all__ = ["RunConfig", "DataConfig", "TrainConfig", "ParallelConfig", "CheckpointConfig", "LoggingConfig",
           "EvalConfig", "build_run_config", "load_run_config", "apply_overrides", "read_yaml", "ConfigError"]
