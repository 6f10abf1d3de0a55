"""Issue 18: the numerical guard and safe checkpoints, on the real trainer (DeepSpeed, megatron-core; CPU, gloo).

- A step with a non-finite grad-norm changes nothing (weights, optimizer state, LR schedule) at ZeRO-0 (the trainer's
  own skip) and ZeRO >= 1 (DeepSpeed's); its batch is consumed and the next step trains normally.
- `--train.lr 1e3`, the issue's run: each skipped step is reported, max_nonfinite_steps in a row end the run with one
  line (exit 2, no traceback), and every checkpoint written is finite. `nonfinite_action: stop` ends it at the first.
- A loss spike is reported (console and metrics.jsonl, which wandb gets too).
- A save from a non-finite state is refused; a non-finite checkpoint is refused on load and, under `--resume auto`,
  the previous complete one is loaded instead.
- Disk full, on a real tmpfs (skipped where none can be mounted): a save is refused up front when the previous
  checkpoint would not fit, and abandoned cleanly at whichever write runs out (every point, by running out of inodes),
  the previous checkpoint staying the latest; through the CLI it is one line with "No space left on device".
- Two ranks (torchrun; this file is also the worker): ZeRO 1/2/3 partitions, with the bad value on one rank only.
"""

import contextlib
import copy
import errno
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mesh_megatron.config import ConfigError  # what the CLI prints as one line (exit 2)
from conftest import fresh_job_env, run_torchrun
from pretrain_data import VOCAB, make_dataset

HERE = Path(__file__).parent


def run_config(data_prefix: str, run_dir: Path, **overrides) -> dict:
    from pretrain.config import apply_overrides

    d = {
        "model": {"name": "guards", "arch": "mesh", "prelude_layers": 1, "core_layers": 1, "num_loops": 2, "coda_layers": 1,
                  "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32, "vocab_size": VOCAB,
                  "make_vocab_size_divisible_by": 64},
        "data": {"paths": [data_prefix], "split": "90,8,2"},
        "train": {"train_iters": 12, "micro_batch_size": 2, "global_batch_size": 4, "lr": 3e-3, "eval_interval": 0,
                  "eval_iters": 2, "log_interval": 1},
        "parallel": {"zero_stage": 0},
        "checkpoint": {"save_interval": 0, "keep_last": 0, "save_at_end": False},
        "logging": {"dir": str(run_dir), "wandb": {"mode": "disabled"}},
    }
    return apply_overrides(d, {k: json.dumps(v) for k, v in overrides.items()})


@contextlib.contextmanager
def trainer(d: dict):
    """A Trainer through restore() and open_logs(), stepped by hand (train_step / log_step / save)."""
    from pretrain.config import build_run_config
    from pretrain.train import Trainer

    t = Trainer(build_run_config(d, source="guards"))
    try:
        t.setup()
        t.build()
        t.restore()
        t.load_data()
        t.open_logs()
        yield t
    finally:
        if hasattr(t, "metrics"):
            t.metrics.close()
        if hasattr(t, "engine"):
            t.engine.destroy()
        if getattr(t, "run_lock", None) is not None:
            t.run_lock.release()


def _flatten(obj, prefix: str, out: dict) -> None:
    if torch.is_tensor(obj):
        out[prefix] = obj.detach().clone()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}", out)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        out[prefix] = obj


def snapshot(engine) -> dict:
    """This rank's weights (its ZeRO-3 partition), the optimizer's state dict as DeepSpeed saves it, the LR step."""
    out = {}
    for name, p in engine.module.named_parameters():
        out[f"weight {name}"] = (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone()
    _flatten(engine.optimizer.state_dict(), "optimizer", out)
    out["lr_scheduler.last_epoch"] = engine.lr_scheduler.last_epoch
    # DeepSpeed's record of its last skip, not training state
    return {k: v for k, v in out.items() if "overflow" not in k}


def differences(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]


def set_first(t: torch.Tensor, value: float):
    """Put `value` into t's first element in place; returns the function that puts the old value back."""
    flat = t.data.view(-1)
    old = flat[0].item()
    flat[0] = value
    return lambda: flat.__setitem__(0, old)


def final_ln(engine) -> torch.Tensor:
    """The final LayerNorm's weight as the forward reads it: ZeRO-3 keeps small parameters whole on every rank
    (persistent), others it gathers from the ranks' partitions."""
    p = engine.module.final_ln.weight
    return p.ds_tensor if hasattr(p, "ds_tensor") and p.data.numel() == 0 else p


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def entries(root: Path) -> list[str]:
    """What a checkpoint root holds of checkpoints: step_* (complete or set aside), temp and old dirs, `latest`."""
    return sorted(p.name for p in root.iterdir() if p.name == "latest" or p.name.startswith(("step_", ".tmp-", ".old-")))


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "synthetic")


# --- the step ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero", [0, 1])
def test_nonfinite_step_changes_nothing_and_the_next_one_trains(data_prefix, tmp_path, zero, capsys):
    run_dir = tmp_path / "run"
    with trainer(run_config(data_prefix, run_dir, **{"parallel.zero_stage": zero})) as t:
        t.log_step(t.train_step())
        before, micro = snapshot(t.engine), t.engine.micro_steps
        heal = set_first(final_ln(t.engine), float("nan"))  # every logit NaN: NaN loss and gradients
        bad = t.train_step()
        heal()
        assert not math.isfinite(bad.grad_norm) and bad.update_skipped
        assert differences(before, snapshot(t.engine)) == []
        assert t.state.step == 2 and t.state.consumed_samples == 2 * 4  # the bad batch is consumed, not retried
        assert t.engine.micro_steps == micro + 2  # accumulation 2: the next step starts on a fresh window
        t.log_step(bad)  # reported at once: the guard decides on a non-finite step before the next one runs
        assert math.isnan(t.losses[-1]) and not t.unreported
        after = snapshot(t.engine)
        good = t.train_step()
        assert math.isfinite(good.grad_norm) and t.engine.was_step_applied()
        assert good.lr == bad.lr  # the LR schedule was held for the skipped step
        assert any(k.startswith("weight ") for k in differences(after, snapshot(t.engine)))
        t.log_step(good)
        t.flush_steps()
        assert math.isfinite(t.losses[-1])
    events = [r for r in records(run_dir) if r.get("event") == "nonfinite"]
    assert [(e["step"], e["update_skipped"], e["nonfinite_in_a_row"]) for e in events] == [(2, True, 1)]
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3]
    assert "[pretrain] step 2: loss nan, grad-norm " in capsys.readouterr().out


def test_stop_action_ends_the_run_at_the_first_nonfinite_step(data_prefix, tmp_path):
    d = run_config(data_prefix, tmp_path / "run", **{"train.nonfinite_action": "stop"})
    with trainer(d) as t:
        t.log_step(t.train_step())
        set_first(final_ln(t.engine), float("inf"))
        with pytest.raises(ConfigError, match=r"^train.nonfinite_action stop: step 2 has loss nan .*update was "
                           r"skipped, no checkpoint written\); lower train.lr \(peak 0.003\)") as e:
            t.log_step(t.train_step())
    assert "\n" not in str(e.value)


def test_huge_lr_skips_then_stops_in_one_line_and_saves_only_finite_checkpoints(data_prefix, tmp_path):
    """The issue's run: `--train.lr 1e3` (ZeRO-0, fp32). Step 1's update throws the weights far out, step 2's
    gradients are NaN. Before: step_2 saved NaN, marked COMPLETE and latest, then a FloatingPointError traceback."""
    run_dir = tmp_path / "run"
    cfg = tmp_path / "lr.yaml"
    cfg.write_text(json.dumps(run_config(data_prefix, run_dir, **{"checkpoint.save_interval": 1})))
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(cfg), "--train.lr", "1e3",
                           "--train.max_nonfinite_steps", "3"], env=fresh_job_env(), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mesh-pretrain: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "mesh-pretrain: error: train.max_nonfinite_steps: steps 2-4 all had a non-finite loss or grad-norm (3 in a row;")
    assert "stopping at step 4" in errors[0] and "lower train.lr (peak 1000)" in errors[0]
    events = [r for r in records(run_dir) if r.get("event") == "nonfinite"]
    assert [(e["step"], e["update_skipped"]) for e in events] == [(2, True), (3, True), (4, True)]
    root = run_dir / "checkpoints"
    assert entries(root) == ["latest", "step_00000001", "step_00000002", "step_00000003"]
    states = [torch.load(root / f"step_0000000{s}" / "mp_rank_00_model_states.pt", weights_only=False) for s in (1, 2, 3)]
    tensors = [{}, {}, {}]
    for st, flat in zip(states, tensors):
        _flatten({"module": st["module"], "optimizer": st["optimizer"]}, "", flat)
        assert all(torch.isfinite(v).all() for v in flat.values() if torch.is_tensor(v) and v.is_floating_point())
    # steps 2 and 3 were skipped: their checkpoints hold step 1's weights and optimizer state exactly
    assert differences(tensors[0], tensors[1]) == [] and differences(tensors[0], tensors[2]) == []


def test_loss_spike_is_reported(data_prefix, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with trainer(run_config(data_prefix, run_dir, **{"train.lr": 1.0})) as t:  # default: 2 x the running mean
        for _ in range(2):
            t.log_step(t.train_step())
    spikes = [r for r in records(run_dir) if r.get("event") == "loss_spike"]
    assert [r["step"] for r in spikes] == [2] and spikes[0]["spike/ratio"] > 2
    assert spikes[0]["spike/mean"] == records(run_dir)[0]["loss"] and "loss" not in spikes[0]
    assert "[pretrain] loss spike at step 2: loss " in capsys.readouterr().out


def test_losses_are_read_once_per_log_interval(data_prefix, tmp_path, monkeypatch):
    """The step losses stay on the device and are read in one all-reduce + host sync per log interval (and at the
    first and last step), with the values a per-step read gives."""
    import pretrain.train as train_mod

    reads = []
    real = train_mod._dp_means
    monkeypatch.setattr(train_mod, "_dp_means", lambda totals, counts: reads.append(len(totals)) or real(totals, counts))
    per_step = {}
    for interval in (3, 1):
        run_dir = tmp_path / f"every{interval}"
        with trainer(run_config(data_prefix, run_dir, **{"train.log_interval": interval, "train.train_iters": 7})) as t:
            for _ in range(7):
                t.log_step(t.train_step())
                if interval == 3 and t.state.step == 5:
                    assert [d.step for d in t.unreported] == [4, 5]  # run, not yet read
            assert not t.unreported
        per_step[interval] = [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]
    assert reads == [1, 2, 3, 1] + [1] * 7
    assert per_step[3] == per_step[1] and [s for s, _ in per_step[3]] == list(range(1, 8))


# --- checkpoints ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero", [0, 1])
def test_save_refuses_a_nonfinite_state(data_prefix, tmp_path, zero):
    with trainer(run_config(data_prefix, tmp_path / "run", **{"parallel.zero_stage": zero})) as t:
        t.train_step()
        t.save()
        t.train_step()
        root, opt = t.root, t.engine.optimizer
        saved = entries(root)
        if zero == 0:
            moment, where = opt.state[t.engine.module.final_ln.weight]["exp_avg"], "optimizer exp_avg (final_ln.weight)"
            bad = [(final_ln(t.engine), "weight final_ln.weight"), (moment, where)]
        else:
            master = opt.single_partition_of_fp32_groups[1]
            bad = [(final_ln(t.engine), "weight final_ln.weight"),
                   (opt.optimizer.state[master]["exp_avg_sq"], "optimizer exp_avg_sq (param group 1 partition 0)"),
                   (master, "fp32 master weights (param group 1 partition 0)")]
        for tensor, where in bad:
            heal = set_first(tensor, float("nan"))
            with pytest.raises(ConfigError) as e:
                t.save()
            heal()
            assert str(e.value).startswith(f"{root}: not saving step_00000002: non-finite values in the training state "
                                           f"(rank 0: {where}); nothing was written; the latest complete checkpoint "
                                           "stays step_00000001.")
            assert entries(root) == saved and (root / "latest").read_text() == "step_00000001\n"
        t.save()
        assert (root / "latest").read_text() == "step_00000002\n"
    events = [r for r in records(tmp_path / "run") if r.get("event") == "checkpoint_failed"]
    assert len(events) == len(bad) and all(e["step"] == 2 for e in events)


def test_resume_refuses_a_nonfinite_checkpoint_and_uses_the_previous_one(data_prefix, tmp_path, capsys):
    """A checkpoint that is non-finite on disk (written before saves were checked, or corrupted since)."""
    from pretrain import manifest

    d = run_config(data_prefix, tmp_path / "run", **{"checkpoint.resume": "auto"})
    with trainer(d) as t:
        t.train_step()
        t.save()
        step1 = snapshot(t.engine)
        t.train_step()
        t.save()
    root = t.root

    def corrupt(ck: Path) -> None:
        f = ck / "mp_rank_00_model_states.pt"
        sd = torch.load(f, weights_only=False)
        sd["module"]["final_ln.weight"][0] = float("nan")
        torch.save(sd, f)
        manifest.write_complete(ck, ck.name, {})  # saved non-finite (before saves were checked): the files verify

    corrupt(root / "step_00000002")
    capsys.readouterr()
    with trainer(d) as t:
        assert t.state.step == 1 and differences(step1, snapshot(t.engine)) == []
        out = capsys.readouterr().out
        assert (f"[pretrain] {root / 'step_00000002'}: non-finite values in the loaded training state (rank 0: weight "
                f"final_ln.weight); not resuming from it: moved it to {root / 'step_00000002.nonfinite'}, loading "
                "step_00000001 instead") in out
        assert entries(root) == ["latest", "step_00000001", "step_00000002.nonfinite"]
        assert (root / "latest").read_text() == "step_00000001\n"
        t.train_step()
        t.save()  # training goes on from step 1; its new step 2 is saved beside the refused one
    assert entries(root) == ["latest", "step_00000001", "step_00000002", "step_00000002.nonfinite"]
    # named explicitly, a non-finite checkpoint is refused outright (and left where it is)
    corrupt(root / "step_00000002")
    d["checkpoint"]["resume"] = str(root / "step_00000002")
    with pytest.raises(ConfigError, match=r"step_00000002: non-finite values in this checkpoint's training state "
                       r"\(rank 0: weight final_ln.weight\); it cannot be resumed from: resume from .*step_00000001"):
        with trainer(d):
            pass
    assert "step_00000002" in entries(root)


# --- disk full -----------------------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(**options) -> a fresh tmpfs directory (unmounted afterwards); skips where mounting is not allowed."""
    mounted = []

    def mount(**options) -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a small tmpfs (a real full disk) needs root")
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        opts = ",".join(f"{k}={v}" for k, v in options.items())
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_inodes(where: Path) -> list[Path]:
    """Empty files until the filesystem has no inode left."""
    where.mkdir()
    made = []
    while True:
        f = where / str(len(made))
        try:
            f.touch()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            return made
        made.append(f)


def test_disk_full_at_every_write_leaves_the_previous_checkpoint_latest(data_prefix, tmp_path, tmpfs):
    from pretrain import checkpoint as ckpt

    root = tmpfs(size="64m", nr_inodes=400) / "checkpoints"
    with trainer(run_config(data_prefix, tmp_path / "run", **{"parallel.zero_stage": 1})) as t:
        t.train_step()
        ckpt.save(t.engine, t.cfg, t.state, root)
        t.train_step()
        saved = entries(root)
        filler = fill_inodes(root.parent / "filler")
        failures = []
        for free in range(30):  # the save runs out at its (free + 1)-th new file or directory
            for f in filler[:free]:
                f.unlink()
            try:
                ckpt.save(t.engine, t.cfg, t.state, root)
                break
            except ConfigError as e:
                failures.append(str(e))
            assert entries(root) == saved and (root / "latest").read_text() == "step_00000001\n", free
            for f in filler[:free]:
                f.touch()
        # committed: only `latest` (informational) may have found no inode; resume scans for the newest COMPLETE
        assert ckpt.latest_checkpoint(root).name == "step_00000002"
    # every write of the save failed once: temp dir, DeepSpeed's two files, RNG dir and file, the three metadata files
    assert len(failures) >= 8, failures
    for msg in failures:
        assert "No space left on device" in msg and "\n" not in msg, msg
        assert msg.startswith(f"{root / '.tmp-step_00000002'}: could not write checkpoint step_00000002 (rank 0: No "
                              "space left on device (") and "the latest complete checkpoint stays step_00000001" in msg


def test_disk_too_small_for_another_checkpoint_is_refused_before_writing(data_prefix, tmp_path, tmpfs):
    from pretrain import checkpoint as ckpt

    root = tmpfs(size="8m") / "checkpoints"
    with trainer(run_config(data_prefix, tmp_path / "run")) as t:
        t.train_step()
        ckpt.save(t.engine, t.cfg, t.state, root)
        t.train_step()
        size = sum(f.stat().st_size for f in (root / "step_00000001").rglob("*") if f.is_file())
        ballast = root.parent / "ballast"
        ballast.write_bytes(b"\0" * (shutil.disk_usage(root).free - size // 2))
        with pytest.raises(ConfigError, match=rf"not saving step_00000002: No space left on device \(.* free, "
                           rf"about .* \({size:,} bytes\) needed, the size of the previous checkpoint\); nothing was "
                           "written; the latest complete checkpoint stays step_00000001"):
            ckpt.save(t.engine, t.cfg, t.state, root)
        assert entries(root) == ["latest", "step_00000001"]
        ballast.unlink()
        ckpt.save(t.engine, t.cfg, t.state, root)
        assert (root / "latest").read_text() == "step_00000002\n"


def test_disk_full_through_the_cli_is_one_line(data_prefix, tmp_path, tmpfs):
    """Not even the first checkpoint fits: torch's writer fails (before: `basic_ios::clear: iostream error`)."""
    root = tmpfs(size="256k") / "checkpoints"
    cfg = tmp_path / "full.yaml"
    cfg.write_text(json.dumps(run_config(data_prefix, tmp_path / "run", **{
        "checkpoint.dir": str(root), "checkpoint.save_interval": 2, "train.train_iters": 4})))
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(cfg)], env=fresh_job_env(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mesh-pretrain: error:")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith(f"mesh-pretrain: error: {root / '.tmp-step_00000002'}: could not write checkpoint "
                                "step_00000002 (rank 0: No space left on device (")
    assert entries(root) == []


# --- two ranks -----------------------------------------------------------------------------------------------------


def test_two_ranks_zero_0_1_2_3(data_prefix, tmp_path, tmpfs):
    """One torchrun launch of 2 processes (DP 2) runs every case for ZeRO 0, 1, 2 and 3 (see `worker`); the bad value
    is on rank 1 only, so every decision must be taken together."""
    try:
        mnt = tmpfs(size="64m", nr_inodes=400)
    except pytest.skip.Exception:  # the rest still runs
        mnt = None
    spec = {"data": data_prefix, "out": str(tmp_path), "tmpfs": str(mnt) if mnt else None}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_torchrun("test_pretrain_guards.py", tmp_path / "spec.json", nproc=2)
    for zero in (0, 1, 2, 3):
        res = [json.loads((tmp_path / f"zero{zero}_rank{r}.json").read_text()) for r in (0, 1)]
        for r in res:
            assert r["reported_skipped"] and r["skipped_step_changed"] == [] and r["next_step_applied"], (zero, r)
            assert r["save_refused"] == res[0]["save_refused"], zero  # the same line on both ranks
            assert r["resumed_step"] == 1 and r["resumed_state_equal"], (zero, r)
        # ZeRO-0 steps the module's own parameters; ZeRO-3 keeps its fp32 partitions out of the param groups
        what = {0: "embed.weight", 3: "partition 0"}.get(zero, "param group 0 partition 0")
        where = f"rank 1: optimizer exp_avg ({what})"
        assert res[0]["save_refused"].startswith(
            f"{tmp_path / f'z{zero}' / 'checkpoints'}: not saving step_00000004: non-finite values in the training "
            f"state ({where}); nothing was written"), res[0]["save_refused"]
        assert res[0]["after_refusal"] == ["latest", "step_00000001", "step_00000003"]
        if zero == 0:  # both ranks load the one file
            where = f"rank 0: optimizer exp_avg ({what}); {where}"
        assert (f"step_00000003: non-finite values in the loaded training state ({where}); not resuming from "
                "it") in res[0]["resume_note"], res[0]["resume_note"]
        assert "loading step_00000001 instead" in res[0]["resume_note"]
        if mnt:
            for r in res:
                assert "could not write checkpoint step_00000005 (rank " in r["disk_full"], r["disk_full"]
                assert "No space left on device" in r["disk_full"]
            assert res[0]["after_disk_full"] == ["latest", "step_00000004"]


def worker(spec_path: str) -> None:
    """torchrun, 2 ranks. Per ZeRO stage: rank 1 alone gets a NaN in a weight (the step is skipped on both ranks),
    then in its optimizer partition (the save is refused on both), then the save runs out of inodes (both fail,
    neither hangs), then rank 1's partition on disk holds a NaN (both fall back to the checkpoint before)."""
    import torch.distributed as dist

    from pretrain import checkpoint as ckpt

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    for zero in (0, 1, 2, 3):
        out = Path(spec["out"]) / f"z{zero}"
        d = run_config(spec["data"], out, **{"parallel.zero_stage": zero, "train.global_batch_size": 8})
        res = {}
        with trainer(d) as t:
            rank = dist.get_rank()
            t.train_step()
            t.save()  # step_1
            step1 = snapshot(t.engine)
            heal = set_first(final_ln(t.engine), float("nan")) if rank == 1 else (lambda: None)
            bad = t.train_step()
            heal()
            res["skipped_step_changed"] = differences(step1, snapshot(t.engine))
            res["reported_skipped"] = not math.isfinite(bad.grad_norm) and bad.update_skipped
            t.train_step()
            res["next_step_applied"] = t.engine.was_step_applied()
            t.save()  # step_3
            t.train_step()
            moments = next(iter(t.engine.basic_optimizer.state.values()))  # of this rank's first partition
            heal = set_first(moments["exp_avg"], float("nan")) if rank == 1 else (lambda: None)
            try:
                t.save()
                res["save_refused"] = ""
            except ConfigError as e:
                res["save_refused"] = str(e)
            heal()
            res["after_refusal"] = entries(t.root)
            if spec["tmpfs"]:
                root = Path(spec["tmpfs"]) / f"z{zero}"
                ckpt.save(t.engine, t.cfg, t.state, root)  # step_4
                t.train_step()
                filler = fill_inodes(root.parent / f"filler{zero}") if rank == 0 else []
                # a different point per stage: inside DeepSpeed's writes on one rank or both, or at the RNG files
                for f in filler[:{0: 4, 1: 3, 2: 6, 3: 2}[zero]]:
                    f.unlink()
                dist.barrier()
                try:
                    ckpt.save(t.engine, t.cfg, t.state, root)
                    res["disk_full"] = ""
                except ConfigError as e:
                    res["disk_full"] = str(e)
                res["after_disk_full"] = entries(root)
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(root.parent / f"filler{zero}")
        ckpts = out / "checkpoints"
        if rank == 0:  # a NaN in (rank 1's) Adam moments in step_3, as a corrupted file would hold
            if zero == 0:  # one file, read by both ranks
                f = ckpts / "step_00000003" / "mp_rank_00_model_states.pt"
                sd = torch.load(f, weights_only=False)
                base = sd["optimizer"]
            else:
                f = next((ckpts / "step_00000003").glob("*zero_pp_rank_1_*optim_states.pt"))
                sd = torch.load(f, weights_only=False)
                osd = sd["optimizer_state_dict"]
                base = osd.get("base_optimizer_state") or osd["optimizer_state_dict"]  # ZeRO 1/2 | ZeRO-3
            base["state"][0]["exp_avg"].view(-1)[0] = float("nan")
            torch.save(sd, f)
            ckpt.manifest.write_complete(f.parent, f.parent.name, {})  # saved so: the files verify, the values do not
        dist.barrier()
        d["checkpoint"]["resume"] = "auto"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), trainer(d) as t:
            res["resumed_step"] = t.state.step
            res["resumed_state_equal"] = differences(step1, snapshot(t.engine)) == []
        res["resume_note"] = buf.getvalue()
        (Path(spec["out"]) / f"zero{zero}_rank{rank}.json").write_text(json.dumps(res))
        dist.barrier()
    from pretrain.distributed import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    worker(sys.argv[1])
