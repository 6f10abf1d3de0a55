"""mesh-plan: arithmetic, refusals, the shipped job layouts, and the memory estimate against tensors measured on CPU."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

from mesh_megatron.config import ModelConfig
from mesh_megatron.params import count_parameters
from mesh_tools.plan import (
    Layout,
    activation_bytes,
    estimate,
    layer_activation_elems,
    load_job,
    main,
    mesh_buffer_bytes,
    params_per_tp_rank,
    plan_job,
    time_to_train,
)

JOBS = sorted(glob.glob("slurm/jobs/*.yaml"))
# Stated tolerance of the activation estimate vs the tensors autograd actually saves (measured on CPU, fp32).
ACT_TOLERANCE = 0.10


def test_every_pythia_scale_has_vanilla_and_mesh_jobs():
    names = {Path(p).stem for p in JOBS}
    for size in ("160m", "410m", "1b", "1.4b", "2.8b", "6.9b"):
        assert {f"pythia-{size}-vanilla", f"pythia-{size}-mesh"} <= names


@pytest.mark.parametrize("path", JOBS)
def test_shipped_jobs_divide_and_fit_80gb_at_pythia_batch(path):
    job = load_job(path)
    plan = plan_job(job)
    assert plan.fits, plan.problems
    assert plan.layout.global_batch == 1024 and plan.cfg.seq_length == 2048
    assert plan.tokens_per_step == 1024 * 2048
    L = plan.layout
    assert L.micro_batch * plan.grad_accum * L.dp == 1024
    assert plan.total < 0.9 * 80e9


def test_refuses_heads_not_divisible_by_tp(capsys):
    rc = main(["--config", "configs/pythia-1b-mesh.yaml", "--nodes", "1", "--gpus-per-node", "8", "--tp", "16"])
    out = capsys.readouterr().out
    assert rc == 2 and "REFUSED" in out and "8 heads are not divisible by tensor parallel size 16" in out


def test_refuses_global_batch_not_divisible(capsys):
    rc = main(["--config", "configs/pythia-160m-vanilla.yaml", "--nodes", "3", "--gpus-per-node", "8", "--micro-batch", "8",
               "--global-batch", "1024"])
    out = capsys.readouterr().out
    assert rc == 2 and "1024 is not divisible by micro_batch_size x data-parallel size = 8 x 24 = 192" in out


def test_a_batch_that_does_not_divide_names_the_node_counts_that_work(capsys):
    # what a resubmission on another node count meets: the global batch stays (it is the data position)
    rc = main(["--config", "configs/pythia-160m-vanilla.yaml", "--nodes", "3", "--gpus-per-node", "8", "--micro-batch", "8",
               "--global-batch", "1024"])
    out = capsys.readouterr().out
    assert rc == 2 and "the global batch must be a multiple of micro_batch_size x DP" in out, out
    assert "with micro_batch_size 8, 8 ranks per node and TP 1: --nodes 1, 2, 4, 8, 16 work" in out, out
    assert "at 3 nodes (DP 24) no micro_batch_size divides it" in out, out
    rc = main(["--config", "configs/pythia-160m-vanilla.yaml", "--nodes", "6", "--gpus-per-node", "8", "--tp", "2",
               "--micro-batch", "8", "--global-batch", "96"])
    out = capsys.readouterr().out
    assert rc == 2 and "96 is not divisible by micro_batch_size x data-parallel size = 8 x 24 = 192" in out, out
    assert "TP 2: --nodes 1, 3 work; or at 6 nodes a micro_batch_size of 1, 2, 4" in out, out  # DP 4 or 12


def write_checkpoint_metadata(config: str, overrides: dict[str, str], **state) -> Path:
    """The metadata of a complete checkpoint as the trainer writes it (run_config.yaml from its own RunConfig,
    trainer_state.json, COMPLETE) in the run's checkpoint directory: what mesh-plan / mesh-submit read of one."""
    import dataclasses
    import json

    from pretrain.checkpoint import TrainerState, tag_for
    from pretrain.config import load_run_config

    run_cfg = load_run_config(config, overrides)
    st = TrainerState(global_batch_size=run_cfg.train.global_batch_size, **state)
    path = run_cfg.checkpoint_dir / tag_for(st.step)
    path.mkdir(parents=True)
    (path / "run_config.yaml").write_text(run_cfg.to_yaml())
    (path / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(st)))
    (path / "COMPLETE").write_text(f"{path.name}\n")
    return path


def test_plan_reports_the_checkpoint_layout_it_would_resume_and_converts(tmp_path, capsys):
    config = str(Path("configs/pythia-160m-mesh.yaml").resolve())
    run_dir = tmp_path / "run"
    write_checkpoint_metadata(config, {"logging.dir": str(run_dir)}, step=500, tensor_parallel_size=2,
                              data_parallel_size=16, zero_stage=1, precision="bf16")
    job = tmp_path / "job.yaml"
    job.write_text(f"config: {config}\nnodes: 2\ngpus_per_node: 8\noverrides:\n  logging.dir: {run_dir}\n"
                   "  train.micro_batch_size: 8\n")
    # 4 nodes at TP 2 were saved; 2 nodes at TP 1 (and ZeRO-2) planned: accepted, converted on load
    rc = main(["--job", str(job), "--zero", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "OK: the layout divides and fits" in out, out
    assert ("checkpoint: resuming step_00000500 saved on TP 2 x DP 16 ZeRO-1 as TP 1 x DP 16 ZeRO-2: converted on "
            "load") in out, out
    # another global batch would be refused by the trainer at the job's start: refused here
    rc = main(["--job", str(job), "--global-batch", "512"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint used train.global_batch_size=1024, this run 512" in err, err


def test_refuses_a_layout_that_does_not_fit_and_says_what_to_change(capsys):
    rc = main(["--config", "configs/pythia-6.9b-vanilla.yaml", "--nodes", "1", "--gpus-per-node", "8", "--tp", "1",
               "--zero", "0", "--micro-batch", "16", "--global-batch", "128", "--recompute", "none"])
    out = capsys.readouterr().out
    assert rc == 2 and "does not fit" in out and "model.recompute: layer" in out and "parallel.zero_stage: 1" in out


def test_zero_stages_shard_what_they_should():
    cfg = ModelConfig.from_yaml("configs/pythia-1.4b-vanilla.yaml")
    base = dict(nodes=8, gpus_per_node=8, micro_batch=16, global_batch=1024, recompute="layer")
    s = {z: estimate(cfg, Layout(zero=z, **base)).states for z in range(4)}
    psi, dp = count_parameters(cfg)["total"], 64
    assert s[0]["weights"] == 2 * psi and s[0]["grads"] == 2 * psi and s[0]["optimizer"] == 12 * psi
    assert s[1]["optimizer"] == pytest.approx(12 * psi / dp) and s[1]["grads"] == 2 * psi
    assert s[2]["grads"] == pytest.approx(2 * psi / dp)
    assert s[3]["weights"] == pytest.approx(2 * psi / dp)


def test_tp_split_matches_the_model(single_process):
    """Which parameters megatron-core splits over TP (tensor_model_parallel) vs replicates, counted on a real model."""
    from mesh_megatron.model import MeshGPTModel

    for name in ("tiny-mesh", "tiny-vanilla"):
        cfg = ModelConfig.from_yaml(f"configs/{name}.yaml")
        m = MeshGPTModel(cfg)
        split = sum(p.numel() for p in m.parameters() if getattr(p, "tensor_model_parallel", False))
        repl = sum(p.numel() for p in m.parameters() if not getattr(p, "tensor_model_parallel", False))
        assert params_per_tp_rank(cfg, 1) == (split, repl)
        assert params_per_tp_rank(cfg, 2) == (split // 2, repl)


def _saved_activation_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward in one forward (the activations)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and t.dtype.is_floating_point:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids[:, :-1], ids[:, 1:]).mean()
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize(
    "arch, recompute",
    [("vanilla", "none"), ("vanilla", "layer"), ("mesh", "none"), ("mesh", "layer"), ("mesh", "loop")],
)
def test_activation_estimate_matches_measured_on_cpu(single_process, arch, recompute):
    """d=256 and a small vocabulary so the transformer layers (not the LM head) dominate what is measured."""
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import set_seed

    shape = dict(hidden_size=256, num_attention_heads=4, seq_length=64, vocab_size=512, make_vocab_size_divisible_by=64,
                 recompute=recompute)
    layers = dict(arch="vanilla", num_layers=4) if arch == "vanilla" else dict(
        arch="mesh", prelude_layers=1, core_layers=2, num_loops=2, coda_layers=1)
    cfg = ModelConfig(**shape, **layers)
    set_seed(0)
    model = MeshGPTModel(cfg)
    b, s = 4, cfg.seq_length
    ids = torch.randint(0, cfg.vocab_size, (b, s + 1))
    measured = _saved_activation_bytes(model, ids)

    full_layer = layer_activation_elems(cfg, s, b, 1) * 4
    recompute_transient = {"none": 0, "layer": full_layer, "loop": cfg.core_layers * full_layer}[recompute]
    mesh_transient = 2 * cfg.num_slots * s * b * cfg.hidden_size * 4 if arch == "mesh" else 0
    kept = (activation_bytes(cfg, s, b, 1, 4, recompute) - recompute_transient
            + mesh_buffer_bytes(cfg, s, b, 4) - mesh_transient
            + 4 * s * b * cfg.padded_vocab_size + 2 * 4 * s * b * cfg.hidden_size)  # softmax kept + final LN in/out
    assert measured == pytest.approx(kept, rel=ACT_TOLERANCE), f"measured {measured:,} vs estimated {kept:,}"


def test_model_states_match_a_real_adamw_step_on_cpu(single_process):
    """fp32, ZeRO-0: weights + grads + AdamW (m, v) bytes exactly as estimated."""
    from mesh_megatron.model import MeshGPTModel

    cfg = ModelConfig.from_yaml("configs/tiny-mesh.yaml")
    model = MeshGPTModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    model(ids[:, :-1], ids[:, 1:]).mean().backward()
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optim = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if t.dim() > 0)
    est = estimate(cfg, Layout(nodes=1, gpus_per_node=1, zero=0, micro_batch=2, global_batch=2, precision="fp32",
                               gpu_memory_gb=0)).states
    assert (weights, grads, optim) == (est["weights"], est["grads"], est["optimizer"])


def test_time_to_train_arithmetic(capsys):
    # 300B tokens at 10k tok/s/GPU on 100 GPUs at 100% = 3e5 s.
    assert time_to_train(3e11, 1e4, 100, 1.0) == pytest.approx(3e5)
    rc = main(["--job", "slurm/jobs/pythia-1.4b-mesh.yaml", "--tokens-per-sec", "20000", "--scaling-efficiency", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "time to train" in out and "GPU-hours" in out and "OK: the layout divides and fits" in out


def test_bad_job_file_names_the_key(tmp_path, capsys):
    bad = tmp_path / "job.yaml"
    bad.write_text("config: configs/tiny-mesh.yaml\nnodes: 1\ngpus_per_nod: 8\n")
    rc = main(["--job", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown key 'gpus_per_nod'" in err and "did you mean 'gpus_per_node'" in err


# --- the MFU a given throughput implies, against the trainer's own peak table -----------------------------------


def _mfu(config: str, tokens_per_s: float, peak_tflops: float) -> float:
    from mesh_megatron.params import flops_per_token

    return tokens_per_s * flops_per_token(ModelConfig.from_yaml(config)) / (peak_tflops * 1e12)


def test_an_impossible_throughput_is_refused_with_the_mfu_it_implies(capsys):
    from pretrain.metrics import PEAK_TFLOPS

    # 21,000 tokens/s per GPU at 6.9B is ~906 TFLOP/s per GPU: ~290% of an A100
    mfu = _mfu("configs/pythia-6.9b-mesh.yaml", 21000, PEAK_TFLOPS["A100"])
    assert mfu > 1
    rc = main(["--job", "slurm/jobs/pythia-6.9b-mesh.yaml", "--tokens-per-sec", "21000", "--gpu", "A100"])
    out, err = capsys.readouterr()
    assert rc == 2 and f"= {mfu:.0%} MFU ({PEAK_TFLOPS['A100']:g} TFLOP/s dense bf16 peak: A100): impossible" in err, err
    assert "if 21,000 is all 128 GPUs together, give 164" in err and "time to train" not in out


def test_the_config_peak_is_used_and_an_unknown_gpu_named(tmp_path, capsys):
    """Without --gpu the peak is the config's logging.peak_tflops, the trainer's own override for its MFU."""
    import yaml

    job = yaml.safe_load(Path("slurm/jobs/pythia-1.4b-mesh.yaml").read_text())
    job["overrides"]["logging.peak_tflops"] = 100.0  # below the ~180 TFLOP/s that 20,000 tokens/s at 1.4B needs
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    rc = main(["--job", str(path), "--tokens-per-sec", "20000"])
    err = capsys.readouterr().err
    mfu = _mfu("configs/pythia-1.4b-mesh.yaml", 20000, 100.0)
    assert rc == 2 and f"{mfu:.0%} MFU (100 TFLOP/s dense bf16 peak: logging.peak_tflops): impossible" in err, err
    rc = main(["--job", "slurm/jobs/pythia-1.4b-mesh.yaml", "--tokens-per-sec", "20000", "--gpu", "B9000"])
    err = capsys.readouterr().err
    assert rc == 2 and "--gpu 'B9000': not in the peak table (H200, H100, A100" in err and "logging.peak_tflops" in err


def test_a_throughput_above_the_sane_mfu_warns_and_a_plausible_one_does_not(capsys):
    from mesh_tools.plan import MFU_WARN
    from pretrain.metrics import PEAK_TFLOPS

    fastest = max(PEAK_TFLOPS.values())
    # without --gpu: checked against the fastest GPU known, 21,000 tokens/s at 6.9B is ~92% of it: possible, not sane
    mfu = _mfu("configs/pythia-6.9b-mesh.yaml", 21000, fastest)
    assert MFU_WARN < mfu < 1
    rc = main(["--job", "slurm/jobs/pythia-6.9b-mesh.yaml", "--tokens-per-sec", "21000"])
    out, err = capsys.readouterr()
    assert rc == 0 and "mesh-plan: warning: --tokens-per-sec 21000:" in err, err
    assert f"= {mfu:.0%} MFU ({fastest:g} TFLOP/s dense bf16 peak: H200/H100, the fastest GPU known" in err
    assert f"({mfu:.0%} MFU at {fastest:g} TFLOP/s peak)" in out and "time to train" in out
    # 20,000 tokens/s at 1.4B on an H100 is ~18%: said in the time-to-train line, no warning
    mfu = _mfu("configs/pythia-1.4b-mesh.yaml", 20000, PEAK_TFLOPS["H100"])
    assert mfu < MFU_WARN
    rc = main(["--job", "slurm/jobs/pythia-1.4b-mesh.yaml", "--tokens-per-sec", "20000", "--gpu", "NVIDIA H100 80GB HBM3"])
    out, err = capsys.readouterr()
    assert rc == 0 and "warning" not in err and f"({mfu:.0%} MFU at {PEAK_TFLOPS['H100']:g} TFLOP/s peak)" in out


def test_host_memory_per_rank_on_gpu_holds_no_model_build():
    cfg = ModelConfig.from_yaml("configs/pythia-6.9b-mesh.yaml")
    base = dict(nodes=2, gpus_per_node=8, tp=2, zero=1, micro_batch=4, global_batch=1024)
    plan = estimate(cfg, Layout(**base))
    h = plan.host
    # each rank draws its own shards on its GPU: nothing of the model is built on the host
    assert h["model build"] == 0.0 and h["async save snapshot"] == 0.0
    # DeepSpeed reads the rank's ZeRO optimizer partition into host memory on resume
    assert h["checkpoint load"] == plan.states["optimizer"] > 0
    assert plan.host_per_rank == h["process"] + h["checkpoint load"]
    assert plan.host_per_node == 8 * plan.host_per_rank
    # async save snapshots weights + optimizer partition to pinned host memory; load and save never overlap
    snap = estimate(cfg, Layout(**base, async_save=True))
    assert snap.host["async save snapshot"] == plan.states["weights"] + plan.states["optimizer"]
    assert snap.host_per_rank == h["process"] + snap.host["async save snapshot"]
    # ZeRO-0 keeps the whole optimizer state on every rank: it is all read on the host
    z0 = estimate(cfg, Layout(**{**base, "zero": 0}))
    assert z0.host["checkpoint load"] == pytest.approx(plan.layout.dp * plan.states["optimizer"])


def test_host_memory_of_a_cpu_run_is_the_run_itself():
    cfg = ModelConfig.from_yaml("configs/tiny-mesh.yaml")
    plan = estimate(cfg, Layout(nodes=1, gpus_per_node=1, zero=0, micro_batch=2, global_batch=2, precision="fp32",
                                gpu_memory_gb=0))
    assert plan.host["model build"] == plan.total
    assert plan.host["process"] < 1 * 2**30  # no CUDA runtime on a CPU node


def test_plan_reports_host_memory_per_rank_and_node(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("config: configs/pythia-1.4b-mesh.yaml\nnodes: 1\ngpus_per_node: 8\n"
                   "overrides:\n  checkpoint.async_save: true\n")
    assert main(["--job", str(job)]) == 0
    out = capsys.readouterr().out
    assert "per-rank host memory (GB)" in out and "shards drawn on the GPU" in out
    peak = next(line for line in out.splitlines() if "PEAK per rank" in line)
    assert "x 8 ranks =" in peak and "GB per node" in peak
    snap = next(line for line in out.splitlines() if "async save snapshot" in line)
    assert "(off)" not in snap and float(snap.split()[-1]) > 0
