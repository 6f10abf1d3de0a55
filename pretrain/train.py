"""The training loop: MeshGPTModel under DeepSpeed (ZeRO 0-3) on megatron-core TP groups.

`train(cfg)` is the whole run and is collective (every rank calls it). It returns a summary dict (losses per step,
validation results, last checkpoint) so tests and scripts can drive it from Python as well as from `mesh-pretrain`.

Preemption: SIGTERM / SIGUSR1 set a flag; the current step finishes, all ranks agree (a MAX all-reduce, so a signal
that reached one process stops all), a checkpoint is saved and `train` returns normally (the CLI exits 0).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mesh_megatron.config import ConfigError
from pretrain import checkpoint as ckpt
from pretrain import distributed as pd
from pretrain import eval_launcher, run_lock, universal
from pretrain.config import RunConfig
from pretrain.data import BatchPrefetcher, build_datasets, eval_micro_batches
from pretrain.data_checks import check_data
from pretrain.loop_sampler import LoopSampler
from pretrain.metrics import Metrics, device_peak_tflops, fmt_eta, memory_gib
from pretrain.schedule import build_scheduler


class _StopFlag:
    """Set from a signal handler; read between steps."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no preemption handling
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signal = signal.Signals(signum).name
        ckpt.note_signal()

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def resolve_precision(cfg: RunConfig) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return p


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """GPT-NeoX convention: no weight decay on biases and LayerNorm parameters (all 1-D tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: RunConfig, dp_size: int, precision: str) -> dict:
    t = cfg.train
    per_step = t.micro_batch_size * dp_size
    if t.global_batch_size % per_step:
        from mesh_megatron.config import ConfigError

        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by micro_batch_size x data-parallel size "
            f"= {t.micro_batch_size} x {dp_size}; choose a global batch that is a multiple of {per_step}"
        )
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps, "weight_decay": t.weight_decay,
                "torch_adam": True,  # plain torch AdamW: no fused CUDA op to build, identical on CPU and GPU
            },
        },
        "zero_optimization": zero_config(cfg.parallel),
        "bf16": {"enabled": precision == "bf16"},
        **gradient_dtypes(cfg.parallel, precision),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Fail"},
    }


def zero_config(par) -> dict:
    """DeepSpeed's zero_optimization section: the stage, and for ZeRO >= 1 the communication knobs."""
    if par.zero_stage == 0:
        return {"stage": 0}
    overlap = torch.cuda.is_available() if par.overlap_comm is None else par.overlap_comm
    return {"stage": par.zero_stage, "overlap_comm": overlap, "contiguous_gradients": par.contiguous_gradients,
            "reduce_bucket_size": par.reduce_bucket_size, "allgather_bucket_size": par.allgather_bucket_size}


def gradient_dtypes(par, precision: str) -> dict:
    """fp32 gradient accumulation and reduction for bf16 runs (see ParallelConfig.accum_dtype)."""
    if precision != "bf16" or par.accum_dtype(precision) != "fp32":
        return {}
    return {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}


def _quiet_libraries() -> None:
    for name in ("DeepSpeed", "deepspeed", "megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _dp_means(totals: list[torch.Tensor], counts: list[int]) -> list[float]:
    """For several steps at once: the mean of each step's per-micro-batch values (their float64 sum, on the device,
    and their number) across this rank's micro-batches and all data-parallel ranks -- one all-reduce and one host
    sync for all of them."""
    from megatron.core import parallel_state as ps

    t = torch.stack([torch.stack([x.double() for x in totals]),
                     torch.tensor(counts, dtype=torch.float64, device=totals[0].device)])
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    return (t[0] / t[1]).tolist()


@dataclass
class StepDone:
    """An optimizer step whose loss is still on the device: `Trainer.log_step` reads it, with its neighbours', at the
    next flush (one host sync per log interval, not per step)."""

    loss_sum: torch.Tensor  # float64 sum of this rank's micro-batch losses
    micro_batches: int
    grad_norm_reported: bool
    update_skipped: bool
    record: dict[str, Any]  # the step's metrics record (step, lr, grad_norm, ...), all but the loss
    eta_s: float

    @property
    def step(self) -> int:
        return self.record["step"]

    @property
    def lr(self) -> float:
        return self.record["lr"]

    @property
    def grad_norm(self) -> float:
        """nan when the optimizer did not report one"""
        return self.record["grad_norm"]


def evaluate(engine, dataset, cfg: RunConfig, dp_rank: int, dp_size: int, num_loops: int | None = None) -> dict[str, float] | None:
    """Token-weighted mean loss and perplexity over a fixed slice of a split (identical every call)."""
    from megatron.core import parallel_state as ps

    if dataset is None or len(dataset) == 0:
        return None
    batches = eval_micro_batches(dataset, cfg, dp_rank, dp_size)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    with torch.no_grad():
        for b in batches:
            loss_tok = engine(input_ids=b["tokens"].to(engine.device), labels=b["labels"].to(engine.device), num_loops=num_loops)
            mask = b["loss_mask"].to(engine.device)
            total[0] += (loss_tok.float() * mask).sum().double()
            total[1] += mask.sum().double()
    engine.train()
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    if total[1] == 0:
        return None
    loss = (total[0] / total[1]).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(total[1].item())}


class TrainingDiverged(ConfigError):
    """The numerical guard stopped the run (one line from the CLI, exit 2); no checkpoint is written for it."""


class NumericsGuard:
    """The numerical guard's bookkeeping, on host floats every rank already holds identically (the DP-mean loss and
    the global grad-norm), so all ranks reach the same verdict without a collective or an extra device sync."""

    def __init__(self, t) -> None:
        self.t = t
        self.in_a_row = 0  # non-finite steps in a row
        self.first_bad = 0  # the first step of that run of bad steps
        self.recent: deque[float] = deque(maxlen=t.loss_spike_window)  # finite losses, for the spike detector

    def observe(self, step: int, loss: float, grad_norm: float | None) -> tuple[bool, float | None]:
        """(non-finite step?, running mean the loss spiked above or None). grad_norm None: not reported."""
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            self.in_a_row += 1
            if self.in_a_row == 1:
                self.first_bad = step
            return True, None
        self.in_a_row = 0
        spiked = None
        if self.t.loss_spike_factor and self.recent:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.t.loss_spike_factor * mean:
                spiked = mean
        self.recent.append(loss)  # spikes too: a lasting new level must stop warning after a while
        return False, spiked

    def verdict(self, step: int, loss: float, grad_norm: float, lr: float, update_skipped: bool) -> str | None:
        """The one-line reason to stop the run after this (non-finite) step, or None."""
        t = self.t
        fix = (f"lower train.lr (peak {t.lr:g}) or check the data, then resume from the latest checkpoint with "
               "--resume auto")
        if t.nonfinite_action == "stop":
            return (f"train.nonfinite_action stop: step {step} has loss {loss:.6g} and grad-norm {grad_norm:.6g} (lr "
                    f"{lr:.3e}); stopping at step {step} (its update {'was skipped' if update_skipped else 'was applied'}"
                    f", no checkpoint written); {fix}")
        if self.in_a_row >= t.max_nonfinite_steps:
            return (f"train.max_nonfinite_steps: steps {self.first_bad}-{step} all had a non-finite loss or grad-norm "
                    f"({self.in_a_row} in a row; step {step}: loss {loss:.6g}, grad-norm {grad_norm:.6g}, lr {lr:.3e}); "
                    f"stopping at step {step} (no checkpoint written); {fix}")
        return None


class Trainer:
    """One run, as the steps `train` calls in order. Every method is collective (all ranks call it, and make the same
    all-reduces and barriers in the same order) unless its docstring says otherwise."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.t = cfg, cfg.train
        self.run_dir, self.root = cfg.run_dir, cfg.checkpoint_dir
        self.phases: dict[str, float] = {}  # setup wall time by phase, for the banner
        self.losses: list[float] = []
        self.unreported: list[StepDone] = []  # steps run but not yet reported (log_step / flush_steps)
        self.evals: list[dict] = []
        self.step_times: list[float] = []
        self.last_ckpt: Path | None = None
        self.stopped_by: str | None = None
        self.signalled = False  # a signal (to any rank) stopped the run: keep our handler afterwards
        self.stop = _StopFlag()
        self.guard = NumericsGuard(cfg.train)
        self.run_lock: run_lock.RunLock | None = None  # rank 0's, from setup() to release()
        self.saver = None  # pretrain.async_save.AsyncSaver, from the first checkpoint.async_save save to the loop's end
        self.save_written = False  # should_stop's verdict: every rank has written the pending async save
        self.eval_launcher = None  # rank 0's pretrain.eval_launcher.EvalLauncher when eval.tasks is set

    def setup(self) -> None:
        """Data checked, process groups joined, the run directory locked and prepared, and the checkpoint to resume
        from resolved and checked: all before anything expensive is built."""
        cfg = self.cfg
        t_phase = time.time()
        check_data(cfg)  # first: bad or missing data fails in seconds, the same way on every rank (no groups yet)
        eval_launcher.check_paths(cfg)
        self.phases["data_check"] = time.time() - t_phase
        t_phase = time.time()
        if not torch.cuda.is_available():
            from pretrain.cpu_malloc import keep_heap_on_cpu

            keep_heap_on_cpu()  # glibc would otherwise unmap and page-fault the activations in again every step
        pd.setup_groups(cfg.parallel.tensor_parallel_size, cfg.parallel.backend, cfg.parallel.timeout_s, announce=True)
        self.phases["distributed"] = time.time() - t_phase
        self.rank, self.world = pd.rank(), pd.world_size()
        self.is_main = self.rank == 0
        self._lock_run_dirs()
        self._import_libraries()
        self.dp_rank, self.dp_size, self.tp_size = pd.dp_rank(), pd.dp_size(), pd.tp_size()
        self.precision = resolve_precision(cfg)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_atomic(self.run_dir / "run_config.yaml", cfg.to_yaml())
            print(f"[pretrain] resolved config ({cfg.source}):\n{cfg.to_yaml()}", flush=True)
            stale = ckpt.clean_stale_temps(self.root)
            if stale:
                print(f"[pretrain] removed unfinished checkpoint saves: {', '.join(p.name for p in stale)}", flush=True)
        pd.barrier()
        # Refuse a damaged or incompatible checkpoint before paying for the model build.
        self.resume_from = ckpt.resolve_verified(cfg.checkpoint.resume, self.root)
        if self.resume_from is not None:
            _, notes = ckpt.check_compatible(self.resume_from, cfg, self.dp_size)
            if notes and self.is_main:
                print(f"[pretrain] note: resuming {self.resume_from.name} with changed runtime settings (they do not "
                      f"change the model's function): {', '.join(notes)}", flush=True)

    def _lock_run_dirs(self) -> None:
        """One run per directory, decided before anything is built or written. Rank 0 takes the lock (the process
        groups exist, so it can tell the others); every rank learns the outcome from one all-reduce and stops with
        the same error, so none is left waiting in a collective."""
        refused = None
        if self.is_main:
            try:
                self.run_lock = run_lock.lock_dirs([self.run_dir, self.root])
            except ConfigError as e:
                refused = e
        if pd.any_rank(refused is not None):
            raise refused or run_lock.RunDirLocked(f"{self.run_dir}: rank 0 could not lock the run directory (its "
                                                   "message says why)")

    def _import_libraries(self) -> None:
        """DeepSpeed (its comm layer registered on our groups) and the model: lazy for start-up time, announced because
        a slow filesystem can make this the longest phase. build() and open_logs() take their names from here."""
        t_phase = time.time()
        if self.is_main:
            print("[pretrain] setup: importing DeepSpeed and megatron-core ...", flush=True)
        pd.setup_deepspeed()
        import mesh_megatron.model  # noqa: F401
        import mesh_megatron.params  # noqa: F401

        self.phases["imports"] = time.time() - t_phase
        _quiet_libraries()

    def build(self) -> None:
        """The model and the DeepSpeed engine (AdamW, LR schedule, ZeRO partitioning)."""
        import deepspeed
        from mesh_megatron.model import MeshGPTModel
        from mesh_megatron.weight_init import build_device

        cfg, t = self.cfg, self.t
        # Same seed everywhere: every rank draws the same model (mesh_megatron/weight_init.py) and keeps its TP shards,
        # allocated and drawn on its GPU where there is one (nothing of the model built on the host).
        pd.set_seed(t.seed)
        t_phase = time.time()
        with build_device():
            model = MeshGPTModel(cfg.model)
        # How each parameter is split over TP, saved with every checkpoint and used to load one into another layout.
        universal.attach_info(model)
        universal.mark_tp_layout(model, self.tp_size)
        self.phases["model"] = time.time() - t_phase
        t_phase = time.time()
        ds_config = deepspeed_config(cfg, self.dp_size, self.precision)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, t.weight_decay),
            config=ds_config,
            mpu=pd.MegatronMPU(),
            lr_scheduler=lambda opt: build_scheduler(opt, t.train_iters, t.warmup_steps, t.min_lr_ratio),
        )
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self.tokens_per_step = t.global_batch_size * cfg.model.seq_length
        self.phases["deepspeed"] = time.time() - t_phase

    def restore(self) -> None:
        """The trainer state: loaded with the weights, optimizer and RNG from the checkpoint to resume from, or new."""
        cfg, t, resume_from = self.cfg, self.t, self.resume_from
        self.state = ckpt.TrainerState(
            tensor_parallel_size=self.tp_size, data_parallel_size=self.dp_size, zero_stage=cfg.parallel.zero_stage,
            global_batch_size=t.global_batch_size, train_iters=t.train_iters, precision=self.precision,
            grad_accum_dtype=cfg.parallel.accum_dtype(self.precision),
        )
        if resume_from is not None:
            # a non-finite checkpoint is set aside and (under --resume auto) the previous one loaded instead
            self.state, resume_from = ckpt.load_finite(self.engine, resume_from, cfg, self.dp_size)
            if self.state.train_iters != t.train_iters and self.is_main:
                print(f"[pretrain] note: train_iters changed {self.state.train_iters} -> {t.train_iters}; the LR "
                      "schedule and the sample order are those of the new value from here on", flush=True)
            self.state.train_iters = t.train_iters
            # the checkpoints this run writes are in this run's layout (the loaded one may have been another)
            self.state.tensor_parallel_size, self.state.data_parallel_size = self.tp_size, self.dp_size
            self.state.zero_stage, self.state.precision = cfg.parallel.zero_stage, self.precision
            self.state.grad_accum_dtype = cfg.parallel.accum_dtype(self.precision)
            if self.is_main:
                print(f"[pretrain] resumed from {resume_from} at step {self.state.step} "
                      f"({self.state.tokens_seen:,} tokens seen)", flush=True)
        elif cfg.checkpoint.resume not in ("none", "auto") and self.is_main:
            print("[pretrain] no checkpoint to resume from; starting from scratch", flush=True)
        self.last_ckpt = resume_from

    def load_data(self) -> None:
        """The train, valid and test datasets (valid / test are None when the split leaves them nothing)."""
        t_phase = time.time()
        self.train_ds, self.valid_ds, self.test_ds = build_datasets(self.cfg, self.dp_size)
        self.prefetcher = BatchPrefetcher(self.train_ds, self.cfg, self.dp_rank, self.dp_size)
        self.phases["data"] = time.time() - t_phase

    def open_logs(self) -> None:
        """The metrics sinks (continuing the resumed run's wandb run) and the constants for throughput and MFU."""
        t_phase = time.time()
        self.metrics = Metrics(self.cfg, self.rank, self.run_dir, resume_wandb_id=self.state.wandb_id)
        self.phases["logging"] = time.time() - t_phase
        if self.is_main:
            self.state.wandb_id = self.metrics.wandb_id
            if self.cfg.eval.tasks:
                self.eval_launcher = eval_launcher.EvalLauncher(self.cfg, self.run_dir, self.metrics.log)
                if self.last_ckpt is not None:
                    self.eval_launcher.resumed(self.state.step, self.last_ckpt)
        self.peak = device_peak_tflops(self.cfg.logging.peak_tflops)
        t, model = self.t, self.cfg.model
        self.loops = None if model.arch == "vanilla" else LoopSampler(t.num_loops_train, t.seed, model.num_loops,
                                                                      t.num_loops_max)
        self.step_flops: list[float] = []  # training FLOPs per token of each step: K (and truncation) vary

    def announce(self) -> None:
        """Rank 0 only: what is trained on what layout and batch, and where the setup time went."""
        if not self.is_main:
            return
        from mesh_megatron.params import count_parameters

        cfg, t, dp_size = self.cfg, self.t, self.dp_size
        n = count_parameters(cfg.model)
        print(
            f"[pretrain] {cfg.model.name or cfg.model.arch} layout {cfg.model.layout}: {n['total']:,} params "
            f"({n['non_embedding']:,} non-embedding) | world {self.world} = TP {self.tp_size} x DP {dp_size} | "
            f"ZeRO-{cfg.parallel.zero_stage} | {self.precision} | micro {t.micro_batch_size} x accum {self.grad_accum} "
            f"x DP {dp_size} = {t.global_batch_size} seqs = {self.tokens_per_step:,} tokens/step | "
            f"{len(self.train_ds):,} train samples | checkpoints -> {self.root}",
            flush=True,
        )
        print("[pretrain] setup " + ", ".join(f"{k} {v:.1f}s" for k, v in self.phases.items()), flush=True)
        if self.precision == "bf16" and cfg.parallel.accum_dtype(self.precision) == "bf16":
            why = ("parallel.grad_accum_dtype is bf16" if cfg.parallel.grad_accum_dtype == "bf16" else
                   "DeepSpeed accumulates in fp32 for bf16 runs only with a ZeRO optimizer; set parallel.zero_stage 1")
            print(f"[pretrain] note: gradients are accumulated and all-reduced in bf16 ({why})", flush=True)

    def loop(self) -> None:
        """Steps until train_iters or a stop; then, unless stopped, the final evaluations and checkpoint."""
        t, save_interval = self.t, self.cfg.checkpoint.save_interval
        finished = False
        self.stop.install()
        self.started = time.time()
        try:
            while self.state.step < t.train_iters:
                self.log_step(self.train_step())
                if self.eval_launcher is not None:  # rank 0, non-blocking: results of a finished evaluation
                    self.eval_launcher.poll(self.state.step)
                if t.eval_interval and self.state.step % t.eval_interval == 0 and self.state.step < t.train_iters:
                    self.run_evals("valid", self.valid_ds)
                if self.should_stop():
                    self.flush_steps()
                    self.stop_run()
                    break
                if self.save_written:
                    self.commit_save()
                if save_interval and self.state.step % save_interval == 0:
                    self.save(background=self.cfg.checkpoint.async_save)
            if self.stopped_by is None:
                self.finish()
            finished = True
        finally:
            self.prefetcher.close()
            if self.eval_launcher is not None:
                # a finished run waits (bounded) for its last evaluations; a stop or a failure does not
                self.eval_launcher.close(wait=finished and self.stopped_by is None)
            if self.saver is not None:
                # Normally nothing is pending here; after an exception the pending save is not committed (its
                # .tmp-* directory is removed at the next start) and the writer stops before its next file.
                self.saver.close(abandon=True)
                self.saver = None
            # Loggers close after the last checkpoint and still under our handler, so a SIGTERM meanwhile (preemption
            # at the very end) cannot kill a run whose work is saved; close() never raises (wandb is best effort).
            self.metrics.close()
            # After a signal-triggered stop (on any rank) keep our handler: the signal may still be on its way to this
            # rank, or be repeated by the launcher (srun, torchrun), and the default action would turn a clean,
            # checkpointed stop into a kill. (The CLI then ignores these signals for the rest of its exit.)
            if not self.signalled:
                self.stop.restore()

    def train_step(self) -> StepDone:
        """One optimizer step over this rank's micro-batches; its loss stays on the device (see StepDone).

        A non-finite grad-norm skips the update (see NumericsGuard); the step still counts and its batch is consumed,
        so a bad batch is never retried. log_step reports the step and stops the run when the guard says so."""
        engine, t, state = self.engine, self.t, self.state
        t0 = time.time()
        lr = self.optimizer.param_groups[0]["lr"]
        # the micro-batch losses stay on the device: summed there, read with other steps' at the next flush
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        grad_norm = None
        skipped_here = False
        batches = self.prefetcher.batches(state.step)
        # K of this step (the same on every rank: a function of seed and step); None = model.num_loops
        k = None if self.loops is None or self.loops.fixed else self.loops.k(state.step)
        grad_loops = t.backprop_loops or None
        self.step_k = k
        self.step_flops.append(self.flops_per_token(k if k is not None else self.cfg.model.num_loops or None))
        for i, b in enumerate(batches):
            loss_tok = engine(input_ids=b["tokens"].to(engine.device, non_blocking=True),
                              labels=b["labels"].to(engine.device, non_blocking=True), num_loops=k,
                              grad_loops=grad_loops)
            mask = b["loss_mask"].to(engine.device, non_blocking=True)
            loss = (loss_tok.float() * mask).sum() / mask.sum().clamp_min(1.0)
            engine.backward(loss)
            last = i == len(batches) - 1
            if last and self.cfg.parallel.zero_stage == 0:
                grad_norm = pd.grad_norm(engine.module)  # pre-clip; ZeRO-0 does not report it
            if last and grad_norm is not None and not math.isfinite(grad_norm) and self._optimizer_applies_nonfinite():
                self._skip_update()
                skipped_here = True
            else:
                engine.step()
            loss_sum += loss.detach().double()
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()  # a host float: DeepSpeed's step synced for it already
        reported = grad_norm is not None
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        state.step += 1
        state.consumed_samples += t.global_batch_size
        state.tokens_seen += self.tokens_per_step
        dt = time.time() - t0
        self.step_times.append(dt)
        skipped = skipped_here or not engine.was_step_applied()
        if t.check_replicated_interval and state.step % t.check_replicated_interval == 0:
            pd.assert_replicated_in_sync(engine.module)
        record, eta = self._step_record(lr, grad_norm, dt)
        return StepDone(loss_sum, len(batches), reported, skipped, record, eta)

    def _optimizer_applies_nonfinite(self) -> bool:
        """Whether DeepSpeed would apply an update with non-finite gradients. Its ZeRO 1-3 and bf16 optimizers detect
        a non-finite grad-norm themselves and skip (zeroed gradients, no optimizer or LR-schedule step, and
        get_global_grad_norm() = inf); only ZeRO-0 in fp32 steps the plain torch optimizer, which has no `overflow`."""
        return not hasattr(self.engine.optimizer, "overflow")

    def _skip_update(self) -> None:
        """End the accumulation window without an update, with the bookkeeping of DeepSpeed's own skip: gradients
        dropped, no clipping, optimizer or LR-schedule step, the step counted in global_steps and skipped_steps."""
        engine = self.engine
        engine.zero_grad()
        # Not a boundary: step() only closes the micro-batch, keeping the micro-step count (the next boundary) right.
        engine.set_gradient_accumulation_boundary(False)
        try:
            engine.step()
        finally:
            engine.set_gradient_accumulation_boundary(None)
        engine.global_steps += 1
        engine.global_samples += engine.train_batch_size()
        engine.skipped_steps += 1

    def flops_per_token(self, k: int | None) -> float:
        """Training FLOPs per token of a step that ran K = k loops: with truncated backprop, the core iterations
        without a graph cost their forward pass only (a third of forward + backward)."""
        from mesh_megatron.params import flops_per_token

        full = flops_per_token(self.cfg.model, num_loops=k)
        n = self.t.backprop_loops
        if k is None or not n or n >= k:
            return full
        return full - 2.0 / 3.0 * (full - flops_per_token(self.cfg.model, num_loops=n))

    def _step_record(self, lr: float, grad_norm: float, dt: float) -> tuple[dict[str, Any], float]:
        """The metrics record of the step just run (its loss filled in at the flush) and the run's ETA in seconds."""
        t, step = self.t, self.state.step
        recent = self.step_times[-10:]
        tps = self.tokens_per_step / (sum(recent) / len(recent))
        flops = sum(self.step_flops[-10:]) * self.tokens_per_step / sum(recent)  # of the steps actually run
        mfu = flops / (self.world * self.peak * 1e12) if self.peak else None
        record = {
            "step": step, "loss": None, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
            "tokens_seen": self.state.tokens_seen, "step_time_s": dt, "memory_gib": memory_gib(),
        }
        if self.loops is not None and not self.loops.fixed:
            record["num_loops"] = self.step_k
        if mfu is not None:
            record["mfu"] = mfu
        return record, (t.train_iters - step) * (sum(recent) / len(recent))

    def log_step(self, done: StepDone) -> None:
        """Queue the step for reporting; flush the queue when a report is due (see flush_steps)."""
        self.unreported.append(done)
        t, step, save_interval = self.t, done.step, self.cfg.checkpoint.save_interval
        if (self._console_due(step)
                or not math.isfinite(done.grad_norm)  # the guard's decision is due now (also when not reported)
                or (t.eval_interval and step % t.eval_interval == 0) or (save_interval and step % save_interval == 0)):
            self.flush_steps()

    def _console_due(self, step: int) -> bool:
        """A console line for this step: every log_interval steps, and the first and last."""
        return step % self.t.log_interval == 0 or step == 1 or step == self.t.train_iters

    def flush_steps(self) -> None:
        """Report the queued steps (collective): their DP-mean losses in one all-reduce and one host sync, then, step by
        step, the guard's bookkeeping, the metrics record, a console line every log_interval steps and at the first
        and last step, the guard's events (non-finite step, loss spike), and TrainingDiverged if the guard stops the
        run. Due at every log interval, evaluation, checkpoint and stop, and at once after a step whose grad-norm is
        not finite (or not reported): the guard decides on such a step before the next one runs."""
        if not self.unreported:
            return
        done_steps, self.unreported = self.unreported, []
        losses = _dp_means([d.loss_sum for d in done_steps], [d.micro_batches for d in done_steps])
        for done, loss in zip(done_steps, losses):
            self._report_step(done, loss)

    def _report_step(self, done: StepDone, loss: float) -> None:
        t, step, lr, grad_norm = self.t, done.step, done.lr, done.grad_norm
        self.losses.append(loss)
        nonfinite, spike = self.guard.observe(step, loss, grad_norm if done.grad_norm_reported else None)
        record = {**done.record, "loss": loss}
        console = None
        if self._console_due(step):
            mfu = record.get("mfu")
            console = (
                f"step {step:>6}/{t.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad-norm {grad_norm:.3f} | "
                f"{record['tokens_per_s']:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"mem {record['memory_gib']:.2f} GiB | ETA {fmt_eta(done.eta_s)}"
            )
        self.metrics.log(record, console=console)
        if spike is not None:
            self.metrics.log(
                {"event": "loss_spike", "step": step, "spike/loss": loss, "spike/mean": spike,
                 "spike/ratio": loss / spike},
                console=f"[pretrain] loss spike at step {step}: loss {loss:.4g} is {loss / spike:.3g} x the running mean "
                f"{spike:.4g} (train.loss_spike_factor {t.loss_spike_factor:g}, window {t.loss_spike_window} steps)",
            )
        if nonfinite:
            self._log_nonfinite(step, loss, grad_norm, lr, done.update_skipped)

    def _log_nonfinite(self, step: int, loss: float, grad_norm: float, lr: float, skipped: bool) -> None:
        """Report a non-finite step (console, metrics.jsonl, wandb) and raise TrainingDiverged if the run must stop."""
        guard = self.guard
        self.metrics.log(
            {"event": "nonfinite", "step": step, "update_skipped": skipped, "nonfinite_in_a_row": guard.in_a_row},
            console=f"[pretrain] step {step}: loss {loss:.6g}, grad-norm {grad_norm:.6g} (non-finite): "
            + ("update skipped (weights, optimizer state and LR schedule unchanged; the batch is not retried)"
               if skipped else "update applied (its gradients were finite)")
            + ("" if self.t.nonfinite_action == "stop"
               else f"; {guard.in_a_row} in a row, the run stops at {self.t.max_nonfinite_steps}"),
        )
        reason = guard.verdict(step, loss, grad_norm, lr, skipped)
        if reason is not None:
            self.metrics.log({"event": "stop", "step": step, "reason": "non-finite"})
            raise TrainingDiverged(reason)

    def run_evals(self, split: str, ds) -> None:
        """Loss on `split`; for recursive / MeSH models also on the same samples at the other loop counts asked for."""
        step = self.state.step
        res = evaluate(self.engine, ds, self.cfg, self.dp_rank, self.dp_size)
        if res is None:
            return
        self.evals.append({"step": step, "split": split, **res})
        self.metrics.log(
            {"event": "eval", "step": step, f"{split}/loss": res["loss"], f"{split}/ppl": res["ppl"]},
            console=f"[pretrain] {split:5s} step {step}: loss {res['loss']:.4f} | ppl {res['ppl']:.2f} | "
            f"{res['tokens']:,} tokens",
        )
        if self.cfg.model.arch == "vanilla":
            return
        for k in self.t.eval_num_loops:
            rk = evaluate(self.engine, ds, self.cfg, self.dp_rank, self.dp_size, num_loops=k)
            self.evals.append({"step": step, "split": f"{split}@K{k}", "num_loops": k, **rk})
            self.metrics.log(
                {"event": "eval", "step": step, f"{split}/loss@K{k}": rk["loss"], f"{split}/ppl@K{k}": rk["ppl"]},
                console=f"[pretrain] {split:5s} step {step}: K={k}: loss {rk['loss']:.4f} | ppl {rk['ppl']:.2f}",
            )

    def should_stop(self) -> bool:
        """True on every rank if any rank was signalled, ran out of time or reached exit_at_step (an all-reduce).
        While an async save is pending the same all-reduce also tells whether any rank is still writing it
        (`save_written` then says every rank is done, so the loop commits it)."""
        t, max_minutes = self.t, self.cfg.checkpoint.max_minutes
        out_of_time = max_minutes is not None and (time.time() - self.started) > 60 * max_minutes
        exit_now = t.exit_at_step is not None and self.state.step >= t.exit_at_step
        stop_here = self.stop.signal is not None or out_of_time or exit_now
        pending = self.saver.pending if self.saver is not None else None
        if pending is None:
            stop, self.save_written = pd.any_rank(stop_here), False
        else:
            stop, still_writing = pd.any_rank_each(stop_here, not pending.written_here())
            self.save_written = not still_writing
        if not stop:
            return False
        # Launchers deliver a signal to each rank separately (srun via every node's slurmstepd), so another rank may
        # have stopped us before ours arrives: it is still on its way, and must not kill us.
        self.signalled = self.stop.signal is not None or not (out_of_time or exit_now)
        self.stopped_by = self.stop.signal or ("time limit" if out_of_time else f"exit_at_step {t.exit_at_step}"
                                               if exit_now else "a signal to another rank")
        return True

    def stop_run(self) -> None:
        """Checkpoint now, and record why the run stops early."""
        if self.eval_launcher is not None:
            self.eval_launcher.stopping = True  # no evaluation started just to be terminated
        self.save()
        if self.is_main:
            self.metrics.log({"event": "stop", "step": self.state.step, "reason": self.stopped_by},
                             console=f"[pretrain] stopping on {self.stopped_by} after step {self.state.step}; "
                             "checkpoint saved, exiting 0")

    def finish(self) -> None:
        """End of training: validation and test, and a last checkpoint unless this step already has one."""
        self.flush_steps()
        self.run_evals("valid", self.valid_ds)
        self.run_evals("test", self.test_ds)
        self.commit_save()  # a background save still being written: the run waits for it and commits it
        last = self.last_ckpt
        if self.cfg.checkpoint.save_at_end and (last is None or last.name != ckpt.tag_for(self.state.step)):
            self.save()

    def save(self, background: bool = False) -> None:
        """A checkpoint of this step (collective: every rank writes its shards). A save refused or failed on any rank
        (non-finite state, disk full) raises CheckpointError on every rank, after an event in the metrics.

        An async save still pending is committed first (at most one in flight). `background`: only copy the state
        now; the files are written by a background thread and the loop commits them once every rank is done."""
        self.commit_save()
        if background:
            if self.saver is None:
                from pretrain.async_save import AsyncSaver

                self.saver = AsyncSaver(self.engine)
            try:
                self.saver.start(self.cfg, self.state, self.root)
            except ckpt.CheckpointError as e:
                self.metrics.log({"event": "checkpoint_failed", "step": self.state.step, "reason": str(e)})
                raise
            return
        try:
            self.last_ckpt = ckpt.save(self.engine, self.cfg, self.state, self.root)
        except ckpt.CheckpointError as e:
            self.metrics.log({"event": "checkpoint_failed", "step": self.state.step, "reason": str(e)})
            raise
        if self.is_main:
            self.metrics.log({"event": "checkpoint", "step": self.state.step, "path": str(self.last_ckpt)},
                             console=f"[pretrain] saved checkpoint {self.last_ckpt}")
            if self.eval_launcher is not None:
                self.eval_launcher.checkpoint_saved(self.state.step, self.last_ckpt)

    def commit_save(self) -> None:
        """Collective: commit the pending async save, if any, waiting for this rank's writes first. A write that
        failed on any rank raises CheckpointError on every rank, as a synchronous save does."""
        if self.saver is None or self.saver.pending is None:
            return
        pending = self.saver.pending
        step, batch = pending.state.step, pending.batch
        try:
            self.last_ckpt = self.saver.commit()
        except ckpt.CheckpointError as e:
            self.metrics.log({"event": "checkpoint_failed", "step": step, "reason": str(e)})
            raise
        finally:
            self.save_written = False
        if self.is_main:
            self.metrics.log({"event": "checkpoint", "step": step, "path": str(self.last_ckpt), "async": True,
                              "committed_after_step": self.state.step, "snapshot_s": batch.snapshot_s},
                             console=f"[pretrain] saved checkpoint {self.last_ckpt} (written in the background; "
                             f"committed after step {self.state.step})")
            if self.eval_launcher is not None:
                self.eval_launcher.checkpoint_saved(step, self.last_ckpt)

    def release(self) -> None:
        """Let go of the run-directory lock (rank 0), so the next run in this process or another can take it."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def summary(self) -> dict[str, Any]:
        """What `train` returns."""
        return {
            "losses": self.losses,
            "evals": self.evals,
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "stopped_by": self.stopped_by,
            "run_dir": str(self.run_dir),
            "wall_s": time.time() - self.started,
            "engine": self.engine,
        }


    def run(self) -> dict[str, Any]:
        """The whole run, step by step; returns the summary. The run-directory lock is released however it ends."""
        try:
            self.setup()
            self.build()
            self.restore()
            self.load_data()
            self.open_logs()
            self.announce()
            self.loop()
            return self.summary()
        finally:
            self.release()


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) training as configured. Collective over all ranks."""
    return Trainer(cfg).run()


__all__ = ["train", "evaluate", "deepspeed_config", "param_groups"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `mesh-pretrain` or `python -m pretrain`")
