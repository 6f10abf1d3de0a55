"""mesh-plan: will this run fit, and how long will it take? Per-GPU memory and time-to-train from the config alone.

    mesh-plan --job slurm/jobs/pythia-6.9b-mesh.yaml
    mesh-plan --config configs/pythia-1.4b-mesh.yaml --nodes 4 --gpus-per-node 8 --gpu-memory-gb 80 \
        --tp 1 --zero 1 --micro-batch 8 --global-batch 1024 --tokens-per-sec 21000

Memory per GPU (bytes; Psi = parameters held by one TP rank, N_d = data-parallel size):

  model states      precision bf16 (GPU): weights 2 Psi, grads 2 Psi, optimizer 12 Psi (fp32 master + Adam m, v)
                    precision fp32 (CPU): weights 4 Psi, grads 4 Psi, optimizer 8 Psi (Adam m, v), + 4 Psi fp32
                    partition copy that DeepSpeed keeps under ZeRO >= 1. ZeRO-1 divides the optimizer by N_d,
                    ZeRO-2 also the grads, ZeRO-3 also the weights (ZeRO paper accounting).
  activations       saved for backward, per micro-batch of b sequences of s tokens, hidden h, FFN f, TP t,
                    a = bytes per activation element (2 bf16, 4 fp32); one GPT-NeoX layer as implemented in
                    mesh_megatron/layers.py (flash / memory-efficient SDPA: no s x s scores are kept):
                        a s b (3h + (7h + 2f) / t)
                    (layer input + two LayerNorm outputs; QKV output, rotated q and k, attention output and its
                    re-laid-out copy; FFN pre- and post-GELU). x effective depth without checkpointing;
                    recompute=layer keeps only each layer's input (a s b h) plus one layer being recomputed;
                    recompute=loop keeps prelude/coda layers and one input per core iteration plus one core
                    being recomputed. LM head: fp32 softmax of s b V/t kept, + the same again for its gradient.
  MeSH buffer       (K+1) buffers of B slots x s b h (one per write, kept for the reads' backward) + the K+1
                    written values, + 2 B s b h transient in the write/read.
  buffers           DeepSpeed's reduce bucket (ZeRO >= 1) and a fixed CUDA context / NCCL / allocator allowance.

The estimate is validated against tensors measured on CPU for the tiny configs (tests/test_plan.py); the GPU side
is not yet validated against torch.cuda.max_memory_allocated (no GPU was available).

Host memory per rank (bytes; the node holds gpus_per_node of them):

  process           libraries and, on a GPU, the CUDA runtime's host side: a fixed allowance (host_overhead_gib).
  model build       0 on a GPU: every rank allocates and draws only its own shards, on its GPU
                    (mesh_megatron/weight_init.py; megatron-core's CPU master-weight init once put 4 Psi + the
                    largest full weight on the host of every rank). On a CPU run (fp32) the whole per-rank estimate
                    above lives on the host instead.
  checkpoint load   DeepSpeed reads the rank's ZeRO optimizer partition (or, at ZeRO-0, the whole optimizer state)
                    into host memory before copying it to the GPU: the optimizer states above.
  async save        `checkpoint.async_save`: the rank's weights and optimizer partition are snapshotted into pinned
                    host buffers (pretrain/async_save.py).
  The load happens at start-up and a snapshot during training, so the peak is the process plus the larger of the two.
  Token files are memory-mapped: page cache shared by the node's ranks, not counted per rank.

Refuses (exit 2, with the reason and a fix) a layout whose sizes do not divide (heads, FFN or vocabulary % TP,
GPUs % TP, global batch % (micro x DP): naming the node counts that divide) or whose estimate exceeds the GPU memory
minus the headroom. When the run's checkpoint directory holds a checkpoint, the plan says which layout it was saved
in and that resuming converts it; one of another model or global batch is refused, as the trainer would.

A given throughput is checked against the GPU: tokens/s x flops_per_token (mesh_megatron/params.py) / the dense bf16
peak of the trainer's table (pretrain/metrics.py PEAK_TFLOPS; --gpu, else logging.peak_tflops, else the fastest GPU
there) = the MFU it implies. Above MFU_WARN it warns; above 100% it is impossible and refused (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from mesh_megatron.config import ConfigError, ModelConfig
from mesh_megatron.params import count_parameters, flops_per_token

GiB = 2**30
PYTHIA_TRAIN_TOKENS = 143_000 * 1024 * 2048  # Pythia: 143k steps of 1024 x 2048 tokens (~300B)
# Well-tuned dense bf16 training reaches ~40-55% MFU (PaLM 46%, Megatron-LM at scale ~50%): a "measured" rate above
# this is far more likely a cluster-wide rate, a forward-only timing or a guess than a record.
MFU_WARN = 0.60


# torch + DeepSpeed + megatron-core + the trainer imported, no CUDA: 0.39 GiB RSS measured on CPU
CPU_PROCESS_GIB = 0.5


class PlanError(ValueError):
    """The layout cannot run: sizes do not divide or it does not fit. The message says why and what to change."""


# --- job files: a config plus a cluster shape and dotted overrides ------------------------------------------------

JOB_KEYS = ("config", "nodes", "gpus_per_node", "gpu_memory_gb", "time", "partition", "overrides", "notes")


def job_from_args(ap, args) -> dict[str, Any]:
    """The job of a `--job FILE` or `--config X --nodes N --gpus-per-node G` command line (mesh-plan, mesh-submit)."""
    if bool(args.job) == bool(args.config):
        ap.error("give exactly one of --job or --config")
    if args.job:
        return load_job(args.job)
    if args.nodes is None or args.gpus_per_node is None:
        ap.error("--config needs --nodes and --gpus-per-node")
    return {"config": args.config, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "overrides": {}}


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
    node[leaf] = value


def load_job(path: str | Path) -> dict[str, Any]:
    """Read slurm/jobs/*.yaml: {config, nodes, gpus_per_node, gpu_memory_gb, time, overrides{dotted: value}}."""
    from mesh_megatron.config import read_yaml

    path = Path(path)
    job = read_yaml(path, "job file")
    if not isinstance(job, dict):
        raise ConfigError(f"{path}: a job file is a mapping with keys {JOB_KEYS}")
    from mesh_megatron.config import closest

    for k in job:
        if k not in JOB_KEYS:
            raise ConfigError(f"{path}: unknown key '{k}'{closest(k, JOB_KEYS)}; valid: {', '.join(JOB_KEYS)}")
    for k in ("config", "nodes", "gpus_per_node"):
        if k not in job:
            raise ConfigError(f"{path}: missing '{k}'")
    job.setdefault("overrides", {})
    if not isinstance(job["overrides"], dict):
        raise ConfigError(f"{path}: 'overrides' must map dotted keys to values, e.g. 'train.micro_batch_size: 4'")
    job["_path"] = str(path)
    return job


def load_run_dict(config_path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run YAML as a dict with dotted overrides applied (sections the planner does not read are kept)."""
    from mesh_megatron.config import read_yaml

    run = read_yaml(config_path) or {}
    if "model" not in run:  # a bare model YAML
        run = {"model": run}
    for k, v in (overrides or {}).items():
        set_dotted(run, k, v)
    return run


# --- the estimate -------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int  # ranks per node (1 on a CPU node)
    tp: int = 1
    zero: int = 1
    micro_batch: int = 4
    global_batch: int = 1024
    gpu_memory_gb: float = 80.0
    precision: str = "bf16"  # bf16 (GPU) | fp32 (CPU)
    recompute: str | None = None  # None: the model config's
    headroom: float = 0.10  # fraction of GPU memory left free for fragmentation / spikes
    overhead_gib: float = 3.0  # CUDA context + NCCL + allocator allowance per GPU (0 on CPU)
    # host side of one rank's process: torch / DeepSpeed / megatron-core imports measured at 0.4 GiB on CPU, plus the
    # CUDA runtime's host memory on a GPU (an allowance, not yet measured on one)
    host_overhead_gib: float = 2.0
    async_save: bool = False  # checkpoint.async_save: pinned host snapshots of the rank's state
    bucket_elems: float = 5e8  # DeepSpeed reduce_bucket_size (Pythia's value)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // self.tp


@dataclass
class Plan:
    cfg: ModelConfig
    layout: Layout
    params_total: int
    params_per_rank: int
    grad_accum: int
    states: dict[str, float]
    activations: dict[str, float]  # recompute mode -> bytes (peak incl. transients), for none/layer/loop
    mesh_buffer: float
    logits: float
    buffers: float
    total: float
    tokens_per_step: int
    host: dict[str, float] = field(default_factory=dict)  # per-rank host memory by part (see module docstring)
    problems: list[str] = field(default_factory=list)

    @property
    def host_per_rank(self) -> float:
        """Peak host bytes of one rank: the process, the build, and the larger of checkpoint load / async save."""
        h = self.host
        return h["process"] + h["model build"] + max(h["checkpoint load"], h["async save snapshot"])

    @property
    def host_per_node(self) -> float:
        return self.host_per_rank * max(self.layout.gpus_per_node, 1)

    @property
    def fits(self) -> bool:
        return not self.problems


def params_per_tp_rank(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """(split over TP, replicated) parameter counts for one rank: megatron-core splits QKV, FC1 (weights and
    biases), dense / FC2 weights and both embeddings; LayerNorms, row-parallel biases and routers are replicated."""
    c = count_parameters(cfg)
    h, f = cfg.hidden_size, cfg.ffn_size
    split_layer = 4 * h * h + 3 * h + 2 * h * f + f
    repl_layer = c["per_layer"] - split_layer
    split = cfg.unique_layers * split_layer + c["embedding"]
    repl = cfg.unique_layers * repl_layer + 2 * h + c["router"]
    assert split + repl == c["total"]
    return split // tp, repl


def layer_activation_elems(cfg: ModelConfig, s: int, b: int, tp: int) -> int:
    """Elements one NeoX layer saves for backward (see module docstring)."""
    h, f = cfg.hidden_size, cfg.ffn_size
    repl = h // tp if (cfg.sequence_parallel and tp > 1) else h
    return s * b * (3 * repl + (7 * h + 2 * f) // tp)


def activation_bytes(cfg: ModelConfig, s: int, b: int, tp: int, act_bytes: int, recompute: str) -> float:
    """Peak bytes of saved activations of the transformer layers for one micro-batch (LM head and MeSH buffer
    are separate), including the one layer / core being recomputed during backward."""
    full = layer_activation_elems(cfg, s, b, tp)
    inp = s * b * cfg.hidden_size
    depth = cfg.effective_depth()
    if recompute == "none":
        elems = depth * full
    elif recompute == "layer":
        elems = depth * inp + full
    elif recompute == "loop":
        if cfg.arch == "vanilla":
            return math.nan
        elems = (cfg.prelude_layers + cfg.coda_layers) * full + cfg.num_loops * inp + cfg.core_layers * full
    else:
        raise ConfigError(f"model.recompute: '{recompute}' not in (none, layer, loop)")
    return float(elems * act_bytes)


def mesh_buffer_bytes(cfg: ModelConfig, s: int, b: int, act_bytes: int) -> float:
    sbh = s * b * cfg.hidden_size
    k = cfg.num_loops
    if cfg.arch == "mesh":
        B = cfg.num_slots
        return float(((k + 1) * B * sbh + (k + 1) * sbh + 2 * B * sbh) * act_bytes)
    return 0.0  # fixed heuristics (anchor, residual) keep tensors the layers already save: measured ~0


def estimate(cfg: ModelConfig, layout: Layout) -> Plan:
    """Per-GPU memory and step arithmetic; `problems` lists every reason the layout cannot run (empty = OK)."""
    L, problems = layout, []
    tp = L.tp
    recompute = L.recompute or cfg.recompute
    try:
        cfg.validate_parallel(tp)
    except ConfigError as e:
        problems.append(f"{e} (pick a TP size that divides the heads, e.g. {_divisors_hint(cfg)})")
    if L.world % tp:
        problems.append(
            f"parallel.tensor_parallel_size: {L.world} GPUs ({L.nodes} nodes x {L.gpus_per_node}) are not divisible by TP={tp}"
        )
    if tp > L.gpus_per_node > 0:
        problems.append(f"parallel.tensor_parallel_size: TP={tp} spans nodes ({L.gpus_per_node} GPUs/node); keep TP within a node (NVLink)")
    dp = max(L.world // tp, 1)
    per_step = L.micro_batch * dp
    grad_accum = L.global_batch // per_step if per_step else 0
    if batch := batch_problem(L):
        problems.append(batch)
    if L.zero not in (0, 1, 2, 3):
        problems.append(f"parallel.zero_stage: must be 0..3, got {L.zero}")
    if L.precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision: '{L.precision}' not in (bf16, fp32)")

    split, repl = params_per_tp_rank(cfg, tp)
    psi = split + repl
    if L.precision == "bf16":
        wb, gb, ob, act = 2, 2, 12, 2
    else:
        wb, gb, ob, act = 4, 4, 8 + (4 if L.zero >= 1 else 0), 4
    states = {
        "weights": psi * wb / (dp if L.zero >= 3 else 1),
        "grads": psi * gb / (dp if L.zero >= 2 else 1),
        "optimizer": psi * ob / (dp if L.zero >= 1 else 1),
    }
    s, b = cfg.seq_length, L.micro_batch
    acts = {m: activation_bytes(cfg, s, b, tp, act, m) for m in ("none", "layer", "loop")}
    buf = mesh_buffer_bytes(cfg, s, b, act)
    # fp32 softmax kept by the vocab-parallel cross entropy + its gradient at the start of backward; the final
    # LayerNorm input and output.
    logits = 2 * 4 * s * b * cfg.padded_vocab_size / tp + 2 * act * s * b * cfg.hidden_size
    buffers = L.overhead_gib * GiB + (min(L.bucket_elems, psi) * gb if L.zero >= 1 and dp > 1 else 0)
    total = sum(states.values()) + acts[recompute] + buf + logits + buffers
    limit = L.gpu_memory_gb * (1 - L.headroom) * 1e9 if L.gpu_memory_gb else math.inf
    if total > limit:
        problems.append(_does_not_fit(total, limit, L, states, acts, recompute, buf, logits))
    return Plan(
        cfg=cfg, layout=L, params_total=count_parameters(cfg)["total"], params_per_rank=psi, grad_accum=grad_accum,
        states=states, activations=acts, mesh_buffer=buf, logits=logits, buffers=buffers, total=total,
        tokens_per_step=L.global_batch * cfg.seq_length, host=host_bytes(L, states, total), problems=problems,
    )


def host_bytes(L: Layout, states: dict[str, float], device_total: float) -> dict[str, float]:
    """Host memory of one rank by part (module docstring, "Host memory per rank")."""
    on_cpu = L.precision == "fp32"  # a CPU run: the device is the host
    return {
        "process": (CPU_PROCESS_GIB if on_cpu else L.host_overhead_gib) * GiB,
        "model build": device_total if on_cpu else 0.0,
        "checkpoint load": states["optimizer"],
        "async save snapshot": states["weights"] + states["optimizer"] if L.async_save else 0.0,
    }


def batch_problem(L: Layout) -> str | None:
    """Why the global batch does not split into micro-batches over this layout's data-parallel ranks (None if it
    does), with the node counts that work: a resumed run must keep its global batch (it counts the data position),
    so on another node count the micro-batch or the node count is what can change."""
    dp = max(L.world // L.tp, 1)
    per_step = L.micro_batch * dp
    if per_step and L.global_batch % per_step == 0:
        return None
    per_node = max(L.gpus_per_node, 1)
    # DP can be at most global / micro; a node count works when its ranks split into TP groups and DP divides
    most = max(L.global_batch // max(L.micro_batch, 1) * L.tp // per_node, 1)
    nodes = [n for n in range(1, most + 1)
             if (n * per_node) % L.tp == 0 and L.global_batch % (L.micro_batch * (n * per_node // L.tp)) == 0]
    works = (f"with micro_batch_size {L.micro_batch}, {per_node} rank{'s' if per_node > 1 else ''} per node and TP {L.tp}: --nodes "
             f"{', '.join(map(str, nodes))} work" if nodes else f"no node count works with micro_batch_size {L.micro_batch}")
    micros = [m for m in range(1, L.global_batch // dp + 1) if L.global_batch % (m * dp) == 0]
    here = (f"; or at {L.nodes} nodes a micro_batch_size of {', '.join(map(str, micros[-4:]))}" if micros
            else f"; at {L.nodes} nodes (DP {dp}) no micro_batch_size divides it")
    return (f"train.global_batch_size: {L.global_batch} is not divisible by micro_batch_size x data-parallel size = "
            f"{L.micro_batch} x {dp} = {per_step}; the global batch must be a multiple of micro_batch_size x DP: "
            f"{works}{here}")


def checkpoint_layout(run_cfg, root: Path, layout: Layout) -> str | None:
    """A note on resuming the latest complete checkpoint under `root` in `layout` (None without one): its layout, this
    one, and whether the trainer converts it on load (pretrain.checkpoint.layout_change decides, as on resume).
    Raises ConfigError, as the trainer would at the job's start, for a checkpoint of another model or global batch."""
    from pretrain import checkpoint as ckpt  # imports torch (~2 s): only when a checkpoint is there to compare

    latest = ckpt.latest_checkpoint(root)
    if latest is None:
        return None
    dp = max(layout.world // run_cfg.parallel.tensor_parallel_size, 1)
    state, _ = ckpt.check_compatible(latest, run_cfg, dp)
    change = ckpt.layout_change(state, run_cfg, dp, layout.precision)
    saved = f"TP {state.tensor_parallel_size} x DP {state.data_parallel_size} ZeRO-{state.zero_stage}"
    now = f"TP {run_cfg.parallel.tensor_parallel_size} x DP {dp} ZeRO-{run_cfg.parallel.zero_stage}"
    precision = f" ({state.precision} -> {layout.precision})" if state.precision != layout.precision else ""
    if change is not None:
        how = "converted on load"
    elif saved != now:
        how = "loaded as saved (fp32 ZeRO-0 keeps the whole optimizer state on every rank)"
    else:
        return f"resuming {latest.name} in {root}, saved on the same layout ({saved})"
    return f"resuming {latest.name} saved on {saved} as {now}{precision}: {how}"


def _divisors_hint(cfg: ModelConfig) -> str:
    return ", ".join(str(t) for t in (1, 2, 4, 8) if cfg.num_attention_heads % t == 0 and cfg.ffn_size % t == 0)


def _does_not_fit(total, limit, L: Layout, states, acts, recompute, buf, logits) -> str:
    parts = {**states, f"activations (recompute={recompute})": acts[recompute], "MeSH buffer": buf, "LM head/logits": logits}
    biggest = max(parts, key=parts.get)
    fixes = []
    if recompute == "none":
        fixes.append("model.recompute: layer (activation checkpointing)")
    if L.zero < 3 and sum(states.values()) > 0.3 * total:
        fixes.append(f"parallel.zero_stage: {L.zero + 1}")
    if L.micro_batch > 1:
        fixes.append(f"train.micro_batch_size: {L.micro_batch // 2} (and twice the gradient accumulation)")
    fixes.append(f"parallel.tensor_parallel_size: {L.tp * 2}")
    return (
        f"does not fit: estimated {total / 1e9:.1f} GB per GPU > {limit / 1e9:.1f} GB usable "
        f"({L.gpu_memory_gb:g} GB minus {L.headroom:.0%} headroom); largest part: {biggest} "
        f"{parts[biggest] / 1e9:.1f} GB. Try: " + "; or ".join(fixes)
    )


# --- time to train --------------------------------------------------------------------------------------------------


def throughput_from_json(path: str | Path, name: str) -> float:
    """tokens/s of config `name` from a bench/train_throughput.py result file."""
    data = json.loads(Path(path).read_text())
    for row in data.get("rows", []):
        if row.get("config") == name:
            return float(row["tokens_per_s"])
    names = [r.get("config") for r in data.get("rows", [])]
    raise ConfigError(f"{path}: no row for config '{name}' (has: {names}); run bench/train_throughput.py --configs <it>")


def gpu_peak(run: dict[str, Any], gpu: str | None) -> tuple[str, float]:
    """(where the peak comes from, dense bf16 TFLOP/s per GPU) for the MFU check: --gpu, else the config's
    logging.peak_tflops (what the trainer itself would use), else the fastest GPU of the trainer's table (then only
    impossible rates are refused)."""
    from pretrain.metrics import PEAK_TFLOPS  # the trainer's own table; imports torch, so only when a rate is given

    if gpu:
        for key, peak in PEAK_TFLOPS.items():
            if key in gpu.upper():  # substrings of device names, as the trainer matches them
                return key, peak
        raise ConfigError(f"--gpu '{gpu}': not in the peak table ({', '.join(PEAK_TFLOPS)}); "
                          "set logging.peak_tflops to its dense bf16 TFLOP/s")
    override = (run.get("logging") or {}).get("peak_tflops")
    if override:
        return "logging.peak_tflops", float(override)
    top = max(PEAK_TFLOPS.values())
    fastest = "/".join(k for k, v in PEAK_TFLOPS.items() if v == top)
    return f"{fastest}, the fastest GPU known: --gpu for yours", top


def implied_mfu(cfg: ModelConfig, tokens_per_s_per_gpu: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of one GPU at this rate, with the trainer's FLOPs per token."""
    return tokens_per_s_per_gpu * flops_per_token(cfg) / (peak_tflops * 1e12)


def check_throughput(cfg: ModelConfig, tps: float, source: str, gpu: tuple[str, float], world: int) -> str:
    """'' for a plausible rate, a warning above MFU_WARN; raises ConfigError above 100% (it cannot be right)."""
    desc, peak = gpu
    mfu = implied_mfu(cfg, tps, peak)
    what = (f"{source}: {tps:,.0f} tokens/s per GPU x {flops_per_token(cfg) / 1e9:.1f} GFLOP/token = "
            f"{mfu * peak:,.0f} TFLOP/s per GPU = {mfu:.0%} MFU ({peak:g} TFLOP/s dense bf16 peak: {desc})")
    whole = f"; if {tps:,.0f} is all {world} GPUs together, give {tps / world:,.0f}" if world > 1 else ""
    if mfu > 1:
        raise ConfigError(f"{what}: impossible; give one GPU's measured rate (bench/train_throughput.py{whole}), "
                          "or --gpu / logging.peak_tflops for a faster GPU")
    if mfu > MFU_WARN:
        return (f"{what}, above the {MFU_WARN:.0%} dense bf16 training reaches at best; check it is one GPU's measured "
                f"rate (bench/train_throughput.py{whole}): the time to train assumes it")
    return ""


def time_to_train(tokens: float, tokens_per_s_per_gpu: float, world: int, efficiency: float) -> float:
    """Seconds, assuming the measured single-GPU rate scales to `world` GPUs at `efficiency`."""
    return tokens / (tokens_per_s_per_gpu * world * efficiency)


# --- report ---------------------------------------------------------------------------------------------------------


def gb(x: float) -> str:
    return "   n/a" if math.isnan(x) else f"{x / 1e9:6.1f}"


def report(plan: Plan, tokens_per_s: float | None, train_tokens: float, efficiency: float,
           gpu: tuple[str, float] | None = None) -> str:
    cfg, L = plan.cfg, plan.layout
    rc = L.recompute or cfg.recompute
    lines = [
        f"{cfg.name or 'model'}  arch={cfg.arch} layout={cfg.layout} params={plan.params_total / 1e6:,.1f}M "
        f"(per TP rank {plan.params_per_rank / 1e6:,.1f}M)  flops/token={flops_per_token(cfg) / 1e9:.2f} GF",
        f"cluster: {L.nodes} nodes x {L.gpus_per_node} GPUs = {L.world}, {L.gpu_memory_gb:g} GB each   "
        f"TP={L.tp} DP={L.dp} ZeRO-{L.zero} {L.precision}",
        f"batch: micro {L.micro_batch} x grad-accum {plan.grad_accum} x DP {L.dp} = {L.global_batch} sequences x "
        f"{cfg.seq_length} = {plan.tokens_per_step:,} tokens/step",
        "",
        "per-GPU memory (GB)",
        f"  {'weights':40s}{gb(plan.states['weights'])}",
        f"  {'gradients':40s}{gb(plan.states['grads'])}",
        f"  {'optimizer states':40s}{gb(plan.states['optimizer'])}",
    ]
    for m in ("none", "layer", "loop"):
        if m == "loop" and cfg.arch == "vanilla":
            continue
        tag = {"none": "no checkpointing", "layer": "checkpoint every layer", "loop": "checkpoint each core loop"}[m]
        mark = "  <- used" if m == rc else ""
        lines.append(f"  {'activations, ' + tag:40s}{gb(plan.activations[m])}{mark}")
    lines += [
        f"  {'MeSH buffer':40s}{gb(plan.mesh_buffer)}",
        f"  {'LM head logits (fp32) + final LayerNorm':40s}{gb(plan.logits)}",
        f"  {'comm buckets + CUDA/NCCL allowance':40s}{gb(plan.buffers)}",
        f"  {'TOTAL (recompute=' + rc + ')':40s}{gb(plan.total)}   of {L.gpu_memory_gb:g} GB "
        f"({L.headroom:.0%} kept free)",
        "",
        "per-rank host memory (GB)",
        f"  {'process (libraries, CUDA runtime)':40s}{gb(plan.host['process'])}",
        f"  {'model build' + (' (the run itself, on CPU)' if L.precision == 'fp32' else ' (shards drawn on the GPU)'):40s}"
        f"{gb(plan.host['model build'])}",
        f"  {'checkpoint load (optimizer partition)':40s}{gb(plan.host['checkpoint load'])}",
        f"  {'async save snapshot' + ('' if L.async_save else ' (off)'):40s}"
        f"{gb(plan.host['async save snapshot'])}",
        f"  {'PEAK per rank':40s}{gb(plan.host_per_rank)}   x {max(L.gpus_per_node, 1)} ranks = "
        f"{plan.host_per_node / 1e9:.1f} GB per node",
        "",
    ]
    if tokens_per_s:
        sec = time_to_train(train_tokens, tokens_per_s, L.world, efficiency)
        mfu = f" ({implied_mfu(cfg, tokens_per_s, gpu[1]):.0%} MFU at {gpu[1]:g} TFLOP/s peak)" if gpu else ""
        lines.append(
            f"time to train {train_tokens / 1e9:,.1f}B tokens: {sec / 86400:,.1f} days ({sec / 3600 * L.world:,.0f} GPU-hours) "
            f"at {tokens_per_s:,.0f} tokens/s/GPU measured{mfu} x {L.world} GPUs x {efficiency:.0%} scaling; "
            f"{train_tokens / plan.tokens_per_step:,.0f} steps of {sec / (train_tokens / plan.tokens_per_step):.1f} s"
        )
    else:
        lines.append("time to train: give --tokens-per-sec (single-GPU, measured with bench/train_throughput.py) or --throughput-json")
    if plan.problems:
        lines += ["", "REFUSED:"] + [f"  - {p}" for p in plan.problems]
    else:
        lines.append("OK: the layout divides and fits.")
    return "\n".join(lines)


def layout_from_run(run: dict[str, Any], nodes: int, gpus_per_node: int, gpu_memory_gb: float) -> Layout:
    """Layout fields from a run dict's train / parallel sections (the trainer's defaults where absent)."""
    train, par = run.get("train", {}) or {}, run.get("parallel", {}) or {}
    ckpt = run.get("checkpoint", {}) or {}
    prec = train.get("precision", "auto")
    if prec == "auto":
        prec = "bf16" if gpus_per_node and gpu_memory_gb else "fp32"
    return Layout(
        nodes=nodes, gpus_per_node=gpus_per_node, tp=int(par.get("tensor_parallel_size", 1)),
        zero=int(par.get("zero_stage", 1)), micro_batch=int(train.get("micro_batch_size", 4)),
        global_batch=int(train.get("global_batch_size", 1024)), gpu_memory_gb=gpu_memory_gb, precision=prec,
        async_save=bool(ckpt.get("async_save", False)),
    )


def plan_job(job: dict[str, Any], root: Path | None = None) -> Plan:
    root = root or Path.cwd()
    run = load_run_dict(root / job["config"], job["overrides"])
    cfg = ModelConfig.from_dict(run["model"], source=job["config"])
    layout = layout_from_run(run, int(job["nodes"]), int(job["gpus_per_node"]), float(job.get("gpu_memory_gb", 80)))
    return estimate(cfg, layout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mesh-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("what to plan (one of)")
    src.add_argument("--job", help="a slurm/jobs/*.yaml file (config + cluster shape + overrides)")
    src.add_argument("--config", help="a run or model YAML (configs/*.yaml)")
    cl = ap.add_argument_group("cluster shape (override the job file)")
    cl.add_argument("--nodes", type=int, help="number of nodes")
    cl.add_argument("--gpus-per-node", type=int, help="GPUs (ranks) per node")
    cl.add_argument("--gpu-memory-gb", type=float, help="memory per GPU in GB (default 80)")
    lay = ap.add_argument_group("layout (override the config / job)")
    lay.add_argument("--tp", type=int, help="tensor parallel size (parallel.tensor_parallel_size)")
    lay.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (parallel.zero_stage)")
    lay.add_argument("--micro-batch", type=int, help="sequences per forward per DP rank (train.micro_batch_size)")
    lay.add_argument("--global-batch", type=int, help="sequences per optimizer step (train.global_batch_size)")
    lay.add_argument("--recompute", choices=("none", "layer", "loop"), help="activation checkpointing (model.recompute)")
    lay.add_argument("--precision", choices=("bf16", "fp32"), help="bf16 mixed precision (GPU) or fp32 (CPU)")
    lay.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory to keep free (default 0.10)")
    lay.add_argument("--overhead-gib", type=float, default=3.0, help="per-GPU CUDA context / NCCL / allocator allowance (default 3)")
    tt = ap.add_argument_group("time to train")
    tt.add_argument("--tokens-per-sec", type=float, help="measured single-GPU training throughput (tokens/s) for this config")
    tt.add_argument("--throughput-json", help="bench/train_throughput.py result file to take the throughput from")
    tt.add_argument("--train-tokens", type=float, default=None,
                    help="tokens to train (default: train.train_iters x global batch x seq of the config, else Pythia's 300B)")
    tt.add_argument("--gpu", help="GPU model for the MFU check of the throughput (H100, A100, ...: the trainer's "
                    "peak table); default: the config's logging.peak_tflops, else the fastest GPU in the table")
    tt.add_argument("--scaling-efficiency", type=float, default=0.9, help="multi-GPU scaling efficiency applied to the measured rate (default 0.9)")
    args = ap.parse_args(argv)

    try:
        job = job_from_args(ap, args)
        for flag, key in (("nodes", "nodes"), ("gpus_per_node", "gpus_per_node"), ("gpu_memory_gb", "gpu_memory_gb")):
            if getattr(args, flag) is not None:
                job[key] = getattr(args, flag)
        for flag, key in (("tp", "parallel.tensor_parallel_size"), ("zero", "parallel.zero_stage"),
                          ("micro_batch", "train.micro_batch_size"), ("global_batch", "train.global_batch_size"),
                          ("recompute", "model.recompute"), ("precision", "train.precision")):
            if getattr(args, flag) is not None:
                job["overrides"][key] = getattr(args, flag)
        run = load_run_dict(job["config"], job["overrides"])
        cfg = ModelConfig.from_dict(run["model"], source=job["config"])
        layout = layout_from_run(run, int(job["nodes"]), int(job["gpus_per_node"]), float(job.get("gpu_memory_gb", 80)))
        layout.headroom, layout.overhead_gib = args.headroom, args.overhead_gib
        plan = estimate(cfg, layout)
        tps = args.tokens_per_sec
        source = f"--tokens-per-sec {tps:g}" if tps is not None else ""
        if tps is None and args.throughput_json:
            tps = throughput_from_json(args.throughput_json, cfg.name)
            source = f"{args.throughput_json} ('{cfg.name}')"
        gpu = gpu_peak(run, args.gpu) if tps else None
        warning = check_throughput(cfg, tps, source, gpu, layout.world) if tps else ""
        resume = resume_note(run, job["config"], layout) if plan.fits else None  # a refused layout is reported as such
    except ConfigError as e:
        print(f"mesh-plan: {e}", file=sys.stderr)
        return 2
    if warning:
        print(f"mesh-plan: warning: {warning}", file=sys.stderr)
    tokens = args.train_tokens
    if tokens is None:
        iters = (run.get("train") or {}).get("train_iters")
        tokens = float(iters) * plan.tokens_per_step if iters else PYTHIA_TRAIN_TOKENS
    print(report(plan, tps, tokens, args.scaling_efficiency, gpu))
    if resume:
        print(f"checkpoint: {resume}")
    return 0 if plan.fits else 2


def resume_note(run: dict[str, Any], source: str, layout: Layout) -> str | None:
    """`checkpoint_layout` for the run's checkpoint directory (checkpoint.dir, else <logging.dir>/checkpoints, as the
    trainer resolves it, relative to the current directory)."""
    import copy

    from pretrain.config import build_run_config

    run_cfg = build_run_config(copy.deepcopy(run), source=str(source))
    return checkpoint_layout(run_cfg, run_cfg.checkpoint_dir, layout)


if __name__ == "__main__":
    sys.exit(main())
