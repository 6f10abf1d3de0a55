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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain import checkpoint as ckpt
from pretrain import distributed as pd
from pretrain.config import RunConfig
from pretrain.data import build_datasets, eval_micro_batches, train_micro_batches
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
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Fail"},
    }


def _quiet_libraries() -> None:
    for name in ("DeepSpeed", "deepspeed", "megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _dp_mean(values: list[float], device) -> float:
    """Mean of per-micro-batch values across this rank's micro-batches and all data-parallel ranks."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([sum(values), float(len(values))], dtype=torch.float64, device=device)
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    return (t[0] / t[1]).item()


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


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) training as configured. Collective over all ranks."""
    t_setup = time.time()
    phases: dict[str, float] = {}
    if not torch.cuda.is_available():
        from pretrain.cpu_malloc import keep_heap_on_cpu

        keep_heap_on_cpu()  # glibc would otherwise unmap and page-fault the activations in again every step
    pd.setup(cfg.parallel.tensor_parallel_size, cfg.parallel.backend, cfg.parallel.timeout_s)
    phases["distributed"] = time.time() - t_setup
    import deepspeed

    from mesh_megatron.model import MeshGPTModel
    from mesh_megatron.params import flops_per_token
    from pretrain.distributed import set_seed

    _quiet_libraries()
    rank, world = pd.rank(), pd.world_size()
    dp_rank, dp_size, tp_size = pd.dp_rank(), pd.dp_size(), pd.tp_size()
    is_main = rank == 0
    run_dir, root = cfg.run_dir, cfg.checkpoint_dir
    precision = resolve_precision(cfg)
    t = cfg.train

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_atomic(run_dir / "run_config.yaml", cfg.to_yaml())
        print(f"[pretrain] resolved config ({cfg.source}):\n{cfg.to_yaml()}", flush=True)
        stale = ckpt.clean_stale_temps(root)
        if stale:
            print(f"[pretrain] removed unfinished checkpoint saves: {', '.join(p.name for p in stale)}", flush=True)
    pd.barrier()

    # Refuse an incompatible checkpoint before paying for the model build.
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, root)
    if resume_from is not None:
        ckpt.check_compatible(resume_from, cfg, dp_size)

    # Same seed everywhere: full master weights are built identically on every rank, then split over TP.
    set_seed(t.seed)
    t_phase = time.time()
    model = MeshGPTModel(cfg.model)
    phases["model"] = time.time() - t_phase
    t_phase = time.time()
    ds_config = deepspeed_config(cfg, dp_size, precision)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=ds_config,
        mpu=pd.MegatronMPU(),
        lr_scheduler=lambda opt: build_scheduler(opt, t.train_iters, t.warmup_steps, t.min_lr_ratio),
    )
    grad_accum = ds_config["gradient_accumulation_steps"]
    phases["deepspeed"] = time.time() - t_phase

    state = ckpt.TrainerState(
        tensor_parallel_size=tp_size, data_parallel_size=dp_size, zero_stage=cfg.parallel.zero_stage,
        global_batch_size=t.global_batch_size, train_iters=t.train_iters, precision=precision,
    )
    if resume_from is not None:
        state = ckpt.load(engine, resume_from, cfg, dp_size)
        if state.train_iters != t.train_iters and is_main:
            print(f"[pretrain] note: train_iters changed {state.train_iters} -> {t.train_iters}; the LR schedule and the "
                  "sample order are those of the new value from here on", flush=True)
        state.train_iters = t.train_iters
        if is_main:
            print(f"[pretrain] resumed from {resume_from} at step {state.step} ({state.tokens_seen:,} tokens seen)", flush=True)
    elif cfg.checkpoint.resume not in ("none", "auto") and is_main:
        print("[pretrain] no checkpoint to resume from; starting from scratch", flush=True)

    t_phase = time.time()
    train_ds, valid_ds, test_ds = build_datasets(cfg, dp_size)
    phases["data"] = time.time() - t_phase
    t_phase = time.time()
    metrics = Metrics(cfg, rank, run_dir, resume_wandb_id=state.wandb_id)
    phases["logging"] = time.time() - t_phase
    if is_main:
        state.wandb_id = metrics.wandb_id
    peak = device_peak_tflops(cfg.logging.peak_tflops)
    fpt = flops_per_token(cfg.model)
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    if is_main:
        from mesh_megatron.params import count_parameters

        n = count_parameters(cfg.model)
        print(
            f"[pretrain] {cfg.model.name or cfg.model.arch} layout {cfg.model.layout}: {n['total']:,} params "
            f"({n['non_embedding']:,} non-embedding) | world {world} = TP {tp_size} x DP {dp_size} | ZeRO-{cfg.parallel.zero_stage} "
            f"| {precision} | micro {t.micro_batch_size} x accum {grad_accum} x DP {dp_size} = {t.global_batch_size} seqs "
            f"= {tokens_per_step:,} tokens/step | {len(train_ds):,} train samples | checkpoints -> {root}",
            flush=True,
        )
        print("[pretrain] setup " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()), flush=True)

    stop = _StopFlag()
    stop.install()
    started = time.time()
    losses: list[float] = []
    evals: list[dict] = []
    last_ckpt: Path | None = resume_from
    stopped_by: str | None = None
    signalled = False
    step_times: list[float] = []

    def do_save() -> Path:
        path = ckpt.save(engine, cfg, state, root)
        if is_main:
            metrics.log({"event": "checkpoint", "step": state.step, "path": str(path)}, console=f"[pretrain] saved checkpoint {path}")
        return path

    def do_eval(split: str, ds) -> None:
        res = evaluate(engine, ds, cfg, dp_rank, dp_size)
        if res is None:
            return
        evals.append({"step": state.step, "split": split, **res})
        metrics.log(
            {"event": "eval", "step": state.step, f"{split}/loss": res["loss"], f"{split}/ppl": res["ppl"]},
            console=f"[pretrain] {split:5s} step {state.step}: loss {res['loss']:.4f} | ppl {res['ppl']:.2f} | {res['tokens']:,} tokens",
        )
        # the same samples with more / fewer core iterations than trained (recursive / MeSH only)
        if cfg.model.arch != "vanilla":
            for k in t.eval_num_loops:
                rk = evaluate(engine, ds, cfg, dp_rank, dp_size, num_loops=k)
                evals.append({"step": state.step, "split": f"{split}@K{k}", "num_loops": k, **rk})
                metrics.log(
                    {"event": "eval", "step": state.step, f"{split}/loss@K{k}": rk["loss"], f"{split}/ppl@K{k}": rk["ppl"]},
                    console=f"[pretrain] {split:5s} step {state.step}: K={k}: loss {rk['loss']:.4f} | ppl {rk['ppl']:.2f}",
                )

    try:
        while state.step < t.train_iters:
            t0 = time.time()
            lr = optimizer.param_groups[0]["lr"]
            mb_losses = []
            grad_norm = None
            batches = train_micro_batches(train_ds, state.step, cfg, dp_rank, dp_size)
            for i, b in enumerate(batches):
                loss_tok = engine(input_ids=b["tokens"].to(engine.device), labels=b["labels"].to(engine.device))
                mask = b["loss_mask"].to(engine.device)
                loss = (loss_tok.float() * mask).sum() / mask.sum().clamp_min(1.0)
                engine.backward(loss)
                if i == len(batches) - 1 and cfg.parallel.zero_stage == 0:
                    grad_norm = pd.grad_norm(engine.module)  # pre-clip; ZeRO-0 does not report it
                engine.step()
                mb_losses.append(loss.item())
            loss = _dp_mean(mb_losses, engine.device)
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            state.step += 1
            state.consumed_samples += t.global_batch_size
            state.tokens_seen += tokens_per_step
            losses.append(loss)
            dt = time.time() - t0
            step_times.append(dt)

            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {state.step}; lower train.lr or check the data")
            if t.check_replicated_interval and state.step % t.check_replicated_interval == 0:
                pd.assert_replicated_in_sync(engine.module)

            recent = step_times[-10:]
            tps = tokens_per_step / (sum(recent) / len(recent))
            mfu = fpt * tps / (world * peak * 1e12) if peak else None
            record = {
                "step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                "tokens_seen": state.tokens_seen, "step_time_s": dt, "memory_gib": memory_gib(),
            }
            if mfu is not None:
                record["mfu"] = mfu
            console = None
            if state.step % t.log_interval == 0 or state.step == 1 or state.step == t.train_iters:
                eta = (t.train_iters - state.step) * (sum(recent) / len(recent))
                console = (
                    f"step {state.step:>6}/{t.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad-norm {grad_norm:.3f} | "
                    f"{tps:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                    f"mem {record['memory_gib']:.2f} GiB | ETA {fmt_eta(eta)}"
                )
            metrics.log(record, console=console)

            if t.eval_interval and state.step % t.eval_interval == 0 and state.step < t.train_iters:
                do_eval("valid", valid_ds)

            out_of_time = cfg.checkpoint.max_minutes is not None and (time.time() - started) > 60 * cfg.checkpoint.max_minutes
            exit_now = t.exit_at_step is not None and state.step >= t.exit_at_step
            if pd.any_rank(stop.signal is not None or out_of_time or exit_now):
                # Launchers deliver a signal to each rank separately (srun via every node's slurmstepd), so another
                # rank may have stopped us before ours arrives: it is still on its way, and must not kill us.
                signalled = stop.signal is not None or not (out_of_time or exit_now)
                stopped_by = stop.signal or ("time limit" if out_of_time else f"exit_at_step {t.exit_at_step}"
                                             if exit_now else "a signal to another rank")
                last_ckpt = do_save()
                if is_main:
                    metrics.log({"event": "stop", "step": state.step, "reason": stopped_by},
                                console=f"[pretrain] stopping on {stopped_by} after step {state.step}; checkpoint saved, exiting 0")
                break
            if cfg.checkpoint.save_interval and state.step % cfg.checkpoint.save_interval == 0:
                last_ckpt = do_save()

        if stopped_by is None:
            do_eval("valid", valid_ds)
            do_eval("test", test_ds)
            if cfg.checkpoint.save_at_end and (last_ckpt is None or last_ckpt.name != ckpt.tag_for(state.step)):
                last_ckpt = do_save()
    finally:
        # After a signal-triggered stop (on any rank) keep our handler: the signal may still be on its way to this
        # rank, or be repeated by the launcher (srun, torchrun), and the default action would turn a clean,
        # checkpointed stop into a kill. (The CLI then ignores these signals for the rest of its exit.)
        if not signalled:
            stop.restore()
        metrics.close()

    return {
        "losses": losses,
        "evals": evals,
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "stopped_by": stopped_by,
        "run_dir": str(run_dir),
        "wall_s": time.time() - started,
        "engine": engine,
    }


__all__ = ["train", "evaluate", "deepspeed_config", "param_groups"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `mesh-pretrain` or `python -m pretrain`")
