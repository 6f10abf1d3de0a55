"""Training-step throughput per architecture: tokens/s, step time, MFU, peak memory, beside megatron-core's GPTModel.

    python bench/train_throughput.py --preset gpu-1.4b --compile both    # on a GPU (bench/gpu_check.sh runs this)
    python bench/train_throughput.py --configs configs/pythia-160m-{vanilla,mesh}.yaml --micro-batch 4
    python bench/train_throughput.py --preset cpu-small                  # CPU: a small shape, fp32, relative costs
    python bench/train_throughput.py --report a.json b.json              # re-print / merge saved runs, with targets

One step = forward + backward + AdamW (fused on CUDA) at TP=1; on CUDA bf16 autocast over fp32 weights, for every
row alike. Timing: warm-up steps (compilation happens there), then the median of `--steps` timed steps
(CUDA-synchronised). On CPU the models take turns step by step (round-robin, so drift in machine load hits all
alike); on CUDA they run one after another, each freed before the next (five 1.4B models with AdamW state do not fit
together), and the JSON is rewritten after every row, so a run cut short by a time limit keeps what it measured.

Rows: each config, eager and/or compiled (`--compile off|on|both`: our model with `model.compile: true`), and with
`--reference` (on in the presets) megatron-core's own `GPTModel` with the local (non-Transformer-Engine) layer spec,
built from the shape of the first vanilla config: same width, depth, FFN, vocabulary, rotary fraction, untied
embeddings, biases, LayerNorm and GELU; its residual is sequential where GPT-NeoX's is parallel (same FLOPs), and
its core attention is megatron-core's unfused DotProductAttention (s x s scores; TE's flash attention is not on
the GPU machine). Compiled, it is `torch.compile(GPTModel)`. Its forward is CUDA-only (the rotary table and the
attention score buffer are allocated on the current CUDA device), so on CPU it is built (proving the construction
and the parameter count) and its step is reported as skipped.

MFU = achieved model FLOP/s / peak, with model FLOPs per token from `mesh_megatron.params.flops_per_token`
(effective depth: the core counted once per loop, LM head included, + 12 x L_eff x d x seq for attention) and the
datasheet dense bf16 peak (`--peak-tflops`, default 989 TFLOP/s for H100 / H200 SXM). The datasheet peak is the
denominator; a plain 8192^3 bf16 matmul measured ~790 TFLOP/s on random data on this workplace's H200, so 50% MFU
against 989 is ~63% of what the chip sustains on a plain matmul. No MFU on CPU.

Targets (issue 14; benchmark targets, not tests), printed as met / not met / n/a:
  - MeSH step time <= 2% over the recursive base of the same shape (per mode: eager, compiled)
  - vanilla tokens/s >= megatron-core GPTModel tokens/s (per mode)
  - MFU >= 50% at 1.4B (each architecture, best mode)

JSON goes to bench/results/train_throughput_<cuda|cpu>.json (or --out), with the device named.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh_megatron.config import ModelConfig  # noqa: E402
from mesh_megatron.params import count_parameters, flops_per_token  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASHEET_PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16 (datasheet)
MEASURED_MATMUL_TFLOPS = 790.0  # 8192^3 bf16 matmul on random data, this workplace's H200 (device KINDS notes)
REFERENCE = "megatron-core-GPTModel"
TARGET_MESH_OVERHEAD = 0.02
TARGET_MFU = 0.50

PRESETS = {
    # d=256, 8 effective layers, seq 256: big enough that matmuls dominate on a CPU, small enough to run in a minute.
    "cpu-small": dict(
        shape=dict(hidden_size=256, num_attention_heads=4, seq_length=256, vocab_size=8192, make_vocab_size_divisible_by=64),
        variants={
            "vanilla": dict(arch="vanilla", num_layers=8),
            "recursive": dict(arch="recursive", prelude_layers=2, core_layers=2, num_loops=2, coda_layers=2, scale_embeddings=True),
            "anchor": dict(arch="recursive", connection="anchor", prelude_layers=2, core_layers=2, num_loops=2, coda_layers=2, scale_embeddings=True),
            "mesh": dict(arch="mesh", prelude_layers=2, core_layers=2, num_loops=2, coda_layers=2, scale_embeddings=True),
            "mesh+recompute": dict(arch="mesh", prelude_layers=2, core_layers=2, num_loops=2, coda_layers=2, scale_embeddings=True, recompute="loop"),
        },
        micro_batch=4,
    ),
    # d=64, seq 64: only proves the code paths (eager + compiled + the reference's construction) in seconds.
    "cpu-tiny": dict(
        shape=dict(hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=512, make_vocab_size_divisible_by=64),
        variants={
            "vanilla": dict(arch="vanilla", num_layers=4),
            "recursive": dict(arch="recursive", prelude_layers=1, core_layers=1, num_loops=2, coda_layers=1, scale_embeddings=True),
            "mesh": dict(arch="mesh", prelude_layers=1, core_layers=1, num_loops=2, coda_layers=1, scale_embeddings=True),
        },
        micro_batch=2,
    ),
    # Pythia-1.4B shapes (d 2048, 16 heads, 24 effective layers, seq 2048). Micro-batch 4: ~50 GB with the
    # reference's unfused s x s attention scores (the largest row), well inside an 80 GB H100 too.
    "gpu-1.4b": dict(
        # in order of the targets, so a run cut short by its time limit loses the least: recursive + MeSH, vanilla +
        # the reference (inserted after vanilla), then anchor
        configs=[f"configs/pythia-1.4b-{a}.yaml" for a in ("recursive", "mesh", "vanilla", "anchor")],
        micro_batch=4,
    ),
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def has_compile_option() -> bool:
    """Whether ModelConfig has the `compile` field (model.compile: torch.compile of the layer stacks)."""
    return any(f.name == "compile" for f in dataclasses.fields(ModelConfig))


def megatron_reference(cfg: ModelConfig, on_cuda: bool):
    """megatron-core's GPTModel (local layer spec) of the vanilla config's shape, fp32 weights like ours."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    mcfg = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_size, add_bias_linear=True, activation_func=F.gelu, normalization="LayerNorm",
        layernorm_epsilon=cfg.layernorm_epsilon, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, use_cpu_initialization=not on_cuda,
        # the fused variants of these need Apex / Transformer Engine kernels, which the GPU machine does not have
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    return GPTModel(
        config=mcfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.seq_length, position_embedding_type="rope", rotary_percent=cfg.rotary_pct,
        rotary_base=cfg.rotary_base, share_embeddings_and_output_weights=False,
    )


@dataclasses.dataclass
class Spec:
    """One row to measure: our model from `cfg`, or (reference=True) megatron-core's GPTModel of cfg's shape."""

    cfg: ModelConfig
    compiled: bool = False
    reference: bool = False

    @property
    def name(self) -> str:
        return REFERENCE if self.reference else self.cfg.name

    @property
    def mode(self) -> str:
        return "compiled" if self.compiled else "eager"


class Runner:
    """One model + optimiser + fixed batch; `step()` runs and times one training step."""

    def __init__(self, spec: Spec, micro_batch: int):
        from pretrain.distributed import set_seed

        self.spec, self.cfg, self.micro_batch = spec, spec.cfg, micro_batch
        cfg = spec.cfg
        self.cuda = torch.cuda.is_available()
        dev = torch.device("cuda" if self.cuda else "cpu")
        set_seed(0)
        # On the GPU the weights are created (and initialised) there, as the trainer does: no host-side build
        build_here = torch.device(dev) if self.cuda else contextlib.nullcontext()
        if spec.reference:
            with build_here:
                model = megatron_reference(cfg, self.cuda).to(dev)
            self.params = sum(p.numel() for p in model.parameters())
            if spec.compiled:
                # the same dynamo polyfill our compiled layers get (else a graph break in every parallel linear)
                from mesh_megatron import compilation

                getattr(compilation, "_register_tp_group_polyfill", lambda: None)()
            self.model = torch.compile(model) if spec.compiled else model
            pos = torch.arange(cfg.seq_length, device=dev).unsqueeze(0).expand(micro_batch, -1)
            self.forward = lambda x, y: self.model(x, pos, None, labels=y)
        else:
            from mesh_megatron.model import MeshGPTModel

            if spec.compiled:
                cfg = cfg.replace(compile=True)
            with build_here:
                self.model = MeshGPTModel(cfg).to(dev)
            self.params = count_parameters(cfg)["total"]
            self.forward = lambda x, y: self.model(x, y)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.cuda)
        ids = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_length + 1), device=dev)
        self.x, self.y = ids[:, :-1], ids[:, 1:]
        self.times: list[float] = []
        self.peak = 0.0
        self.loss = float("nan")

    def step(self, timed: bool) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            loss = self.forward(self.x, self.y).float().mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() / 2**30)
        if timed:
            self.times.append(time.perf_counter() - t0)
        self.loss = loss.item()

    def result(self, peak_tflops: float) -> dict:
        cfg = self.cfg
        step = statistics.median(self.times)
        tokens = self.micro_batch * cfg.seq_length
        achieved = flops_per_token(cfg) * tokens / step / 1e12
        row = base_row(self.spec, self.micro_batch)
        row.update({
            "params": self.params,
            "step_time_s": step,
            "step_time_min_max_s": (min(self.times), max(self.times)),
            "tokens_per_s": tokens / step,
            "model_tflops_per_s": achieved,
            "mfu": achieved / peak_tflops if self.cuda else None,
            "peak_memory_gib": self.peak if self.cuda else None,
            "final_loss": self.loss,
        })
        return row


def base_row(spec: Spec, micro_batch: int) -> dict:
    cfg = spec.cfg
    return {
        "config": spec.name,
        "arch": "megatron-core" if spec.reference else cfg.arch + (f"/{cfg.connection}" if cfg.arch == "recursive" else ""),
        "mode": spec.mode,
        "layout": cfg.layout,
        "recompute": cfg.recompute,
        "micro_batch": micro_batch,
        "seq_length": cfg.seq_length,
    }


def skipped_row(spec: Spec, micro_batch: int, why: str) -> dict:
    return {**base_row(spec, micro_batch), "skipped": why}


def precheck(spec: Spec, micro_batch: int) -> dict | None:
    """A row that cannot run here, reported as skipped (with the reason) instead of measured; None if it can."""
    if spec.compiled and not spec.reference and not has_compile_option():
        return skipped_row(spec, micro_batch, "ModelConfig has no 'compile' option in this checkout")
    if spec.reference and not torch.cuda.is_available():
        try:
            from pretrain.distributed import set_seed

            set_seed(0)
            params = sum(p.numel() for p in megatron_reference(spec.cfg, on_cuda=False).parameters())
        except Exception as e:  # noqa: BLE001 - reported in the row
            return skipped_row(spec, micro_batch, f"GPTModel construction failed on CPU: {type(e).__name__}: {e}")
        return {**skipped_row(spec, micro_batch, "GPTModel built on CPU; its forward is CUDA-only (rotary table and "
                                                 "attention score buffer on the CUDA device)"), "params": params}
    return None


def measure_round_robin(specs: list[Spec], micro_batch: int, steps: int, warmup: int, peak: float, save) -> list[dict]:
    """CPU: one step of each model per round, so drift in machine load hits all of them alike."""
    slots: list[dict | Runner] = []  # in spec order: a row that cannot run, or the runner that will measure one
    for s in specs:
        row = precheck(s, micro_batch)
        if row is None:
            try:
                row = Runner(s, micro_batch)
            except Exception as e:  # noqa: BLE001 - recorded, the others run
                traceback.print_exc()
                row = {**base_row(s, micro_batch), "error": f"{type(e).__name__}: {e}"}
        slots.append(row)
    runners = [r for r in slots if isinstance(r, Runner)]
    for i in range(warmup + steps):
        for r in runners:
            r.step(timed=i >= warmup)
        print(f"  round {i + 1}/{warmup + steps}", file=sys.stderr, flush=True)
    rows = [r.result(peak) if isinstance(r, Runner) else r for r in slots]
    save(rows)
    return rows


def measure_sequential(specs: list[Spec], micro_batch: int, steps: int, warmup: int, peak: float, save) -> list[dict]:
    """CUDA: each model built, warmed up, timed and freed before the next; the JSON saved after every row. A row
    that fails (out of memory, a compile error) is recorded with its error and the next one runs."""
    rows: list[dict] = []
    for s in specs:
        row = precheck(s, micro_batch)
        if row is None:
            t0 = time.perf_counter()
            runner = None
            try:
                runner = Runner(s, micro_batch)
                build_s = time.perf_counter() - t0
                for i in range(warmup + steps):
                    runner.step(timed=i >= warmup)
                row = runner.result(peak)
                row["build_s"], row["total_s"] = build_s, time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - recorded, the next row runs
                traceback.print_exc()
                row = {**base_row(s, micro_batch), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            finally:
                del runner
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {s.name} ({s.mode}): {row.get('tokens_per_s', row.get('skipped') or row.get('error'))}",
              file=sys.stderr, flush=True)
        save(rows)
    return rows


# --- report ---------------------------------------------------------------------------------------


def measured(r: dict) -> bool:
    return "step_time_s" in r


def add_ratios(rows: list[dict]) -> None:
    """vs_recursive_base: step time over the recursive base's of the same shape and mode (no recompute)."""
    base = {(r["layout"], r["seq_length"], r["mode"]): r for r in rows
            if measured(r) and r["arch"] == "recursive/base" and r["recompute"] == "none"}
    for r in rows:
        b = base.get((r["layout"], r["seq_length"], r["mode"]))
        r["vs_recursive_base"] = r["step_time_s"] / b["step_time_s"] - 1 if b and measured(r) else None


def targets(rows: list[dict]) -> list[dict]:
    """The issue's benchmark targets, each {target, mode, value, met (True/False/None = not measurable here)}."""
    out = []
    ok = [r for r in rows if measured(r)]
    for mode in ("eager", "compiled"):
        m = [r for r in ok if r["mode"] == mode]
        mesh = [r for r in m if r["arch"] == "mesh" and r["recompute"] == "none" and r["vs_recursive_base"] is not None]
        for r in mesh:
            out.append({"target": f"MeSH step <= {TARGET_MESH_OVERHEAD:.0%} over recursive ({r['layout']})", "mode": mode,
                        "value": f"{r['vs_recursive_base'] * 100:+.1f}%",
                        "met": r["vs_recursive_base"] <= TARGET_MESH_OVERHEAD})
        van = [r for r in m if r["arch"] == "vanilla" and r["recompute"] == "none"]
        ref = [r for r in m if r["arch"] == "megatron-core"]
        if any(r["arch"] == "megatron-core" and r["mode"] == mode for r in rows):
            if van and ref:
                v, g = van[0]["tokens_per_s"], ref[0]["tokens_per_s"]
                out.append({"target": "vanilla tokens/s >= megatron-core GPTModel", "mode": mode,
                            "value": f"{v:.0f} vs {g:.0f} ({v / g - 1:+.1%})", "met": v >= g})
            else:
                out.append({"target": "vanilla tokens/s >= megatron-core GPTModel", "mode": mode,
                            "value": "not measured (see skipped / error rows)", "met": None})
    best: dict[str, dict] = {}
    for r in ok:
        if r["arch"] != "megatron-core" and r["recompute"] == "none":
            if r["arch"] not in best or (r["mfu"] or 0) > (best[r["arch"]]["mfu"] or 0):
                best[r["arch"]] = r
    for arch, r in best.items():
        big = r["params"] > 1e9 or r["seq_length"] >= 2048  # "at 1.4B": only the GPU shapes count
        if r["mfu"] is None or not big:
            out.append({"target": f"MFU >= {TARGET_MFU:.0%} at 1.4B ({arch})", "mode": r["mode"],
                        "value": "n/a (CPU or small shape)", "met": None})
        else:
            out.append({"target": f"MFU >= {TARGET_MFU:.0%} at 1.4B ({arch})", "mode": r["mode"],
                        "value": f"{r['mfu']:.1%} of {r.get('peak_tflops', DATASHEET_PEAK_TFLOPS):.0f} TFLOP/s",
                        "met": r["mfu"] >= TARGET_MFU})
    return out


def print_report(rows: list[dict], device: str, peak: float) -> list[dict]:
    add_ratios(rows)
    print(f"\ndevice: {device}; MFU against the datasheet dense bf16 peak {peak:.0f} TFLOP/s "
          f"(a plain bf16 matmul measured ~{MEASURED_MATMUL_TFLOPS:.0f} on this workplace's H200)")
    head = (f"{'config':<26} {'mode':<8} {'layout':<9} {'recomp':<6} {'tok/s':>10} {'ms/step':>9} {'TFLOP/s':>8} "
            f"{'MFU':>6} {'mem GiB':>8} {'vs base':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lead = f"{r['config']:<26} {r['mode']:<8} {r['layout']:<9} {r['recompute']:<6}"
        if not measured(r):
            print(f"{lead} {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r.get('error', '?')}"[:220])
            continue
        mfu = f"{r['mfu'] * 100:5.1f}%" if r["mfu"] is not None else "   n/a"
        mem = f"{r['peak_memory_gib']:8.2f}" if r["peak_memory_gib"] is not None else "     n/a"
        vs = f"{r['vs_recursive_base'] * 100:+7.1f}%" if r["vs_recursive_base"] is not None else "       -"
        print(f"{lead} {r['tokens_per_s']:>10.0f} {r['step_time_s'] * 1e3:>9.1f} {r['model_tflops_per_s']:>8.3f} "
              f"{mfu:>6} {mem} {vs}")
    tg = targets(rows)
    if tg:
        print("\ntargets (issue 14; benchmark, not tests):")
        for t in tg:
            verdict = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
            print(f"  {verdict:<8} {t['target']:<52} {t['mode']:<8} {t['value']}")
    return tg


def write_json(out: Path, payload: dict) -> None:
    """Atomic write. Rows that were not measured (skipped, failed) go under "not_measured": "rows" holds only
    measured ones, each with tokens_per_s (mesh-plan --throughput-json reads the first row of a config's name)."""
    rows = payload.pop("rows")
    payload = {**payload, "rows": [r for r in rows if measured(r)], "not_measured": [r for r in rows if not measured(r)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)


def report_files(paths: list[str]) -> int:
    """--report: merge saved runs (rows in file order) and print the table and the targets."""
    rows, devices, peak = [], [], DATASHEET_PEAK_TFLOPS
    for p in paths:
        try:
            d = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            print(f"{p}: unreadable ({e}); skipped")
            continue
        rows += d.get("rows", []) + d.get("not_measured", [])
        devices.append(d.get("device", "?"))
        peak = d.get("peak_tflops", peak)
    if not rows:
        print("no rows in " + ", ".join(paths))
        return 1
    print_report(rows, " / ".join(sorted(set(devices))), peak)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=[], help="model / run YAML files to measure")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a built-in set of shapes (cpu-small, cpu-tiny, gpu-1.4b)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: preset's, else 4)")
    ap.add_argument("--seq", type=int, default=None, help="override the configs' sequence length")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (compilation happens here)")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off",
                    help="eager rows, compiled rows (model.compile / torch.compile), or both (eager first)")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                    help="add megatron-core's GPTModel of the first vanilla config's shape (default: on for presets)")
    ap.add_argument("--only", nargs="*", default=None, help="keep only these row names (config names or 'reference')")
    ap.add_argument("--peak-tflops", type=float, default=DATASHEET_PEAK_TFLOPS,
                    help="device peak for MFU (H100 / H200 SXM dense bf16 datasheet: 989)")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/train_throughput_<cuda|cpu>.json)")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="only print the table and targets of saved runs")
    args = ap.parse_args(argv)
    if args.report:
        return report_files(args.report)

    from pretrain.cpu_malloc import keep_heap_on_cpu
    from pretrain.distributed import initialize_parallel

    cuda = torch.cuda.is_available()
    if not cuda:
        keep_heap_on_cpu()  # else glibc page-faults activations in every step and dominates the timings
    initialize_parallel(1)
    cfgs: list[ModelConfig] = []
    micro = args.micro_batch or 4
    if args.preset:
        p = PRESETS[args.preset]
        micro = args.micro_batch or p["micro_batch"]
        cfgs += [ModelConfig.from_dict({**p["shape"], **v, "name": f"{args.preset}-{n}"})
                 for n, v in p.get("variants", {}).items()]
        cfgs += [ModelConfig.from_yaml(REPO / c) for c in p.get("configs", [])]
    for path in args.configs:
        cfgs.append(ModelConfig.from_yaml(path))
    if args.seq:
        cfgs = [c.replace(seq_length=args.seq) for c in cfgs]
    if not cfgs:
        ap.error("give --configs and/or --preset (or --report JSON...)")

    reference = bool(args.preset) if args.reference is None else args.reference
    vanilla = next((c for c in cfgs if c.arch == "vanilla"), None)
    if reference and vanilla is None:
        ap.error("--reference needs a vanilla config (the reference takes its shape)")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    specs = []
    for compiled in modes:
        specs += [Spec(c, compiled) for c in cfgs]
        if reference:
            # right after the vanilla row: the pair one target compares, measured back to back
            i = next(i for i, s in enumerate(specs) if s.cfg is vanilla and s.compiled == compiled)
            specs.insert(i + 1, Spec(vanilla, compiled, reference=True))
    if args.only is not None:
        keep = set(args.only)
        specs = [s for s in specs if s.name in keep or (s.reference and "reference" in keep)]

    dev = device_name()
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"train_throughput_{'cuda' if cuda else 'cpu'}.json"
    try:
        import megatron.core

        mcore = getattr(megatron.core, "__version__", "?")
    except ImportError:
        mcore = None
    meta = {"device": dev, "torch": torch.__version__, "megatron_core": mcore, "steps": args.steps,
            "warmup": args.warmup, "peak_tflops": args.peak_tflops, "peak_note": (
                f"datasheet dense bf16; a plain bf16 matmul measured ~{MEASURED_MATMUL_TFLOPS:.0f} TFLOP/s on an H200 here"
            )}

    def save(rows: list[dict]) -> None:
        write_json(out, {**meta, "rows": rows})

    measure = measure_sequential if cuda else measure_round_robin
    rows = measure(specs, micro, args.steps, args.warmup, args.peak_tflops, save)
    for r in rows:
        r["peak_tflops"] = args.peak_tflops
    tg = print_report(rows, dev, args.peak_tflops)
    write_json(out, {**meta, "rows": rows, "targets": tg})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
