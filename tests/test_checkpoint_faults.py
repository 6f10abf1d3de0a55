"""Fault injection around a resume in another layout (pretrain/universal.py, pretrain/checkpoint.py): real trainer,
DeepSpeed, real files, CPU, one process. The layout change is ZeRO-1 -> ZeRO-0/2, which goes through the same
universal conversion as a TP or DP change.

- A damaged `<step>/universal/` (a byte range flipped in a converted fp32.pt) or one without its manifest (made before
  universal forms had one) is made again from the checkpoint: the resume gets the saved weights.
- `--resume auto`: the newest checkpoint is non-finite and the one before it damaged: both are set aside
  (`.nonfinite`, `.corrupt`) and the oldest is converted and loaded.
- Disk full during the conversion (a real tmpfs): one line naming the space, nothing left behind, the checkpoint
  still resumes in its own layout.
- The first save after such a resume: its free-space check does not count the universal form as part of the size
  of a checkpoint.
- kill -9 with every converted file written but not yet renamed into place: the next resume converts again.
- Two processes converting one checkpoint at once (two jobs resuming it in other layouts, or mesh-checkpoint convert
  beside a job): the second waits for the first and uses its universal form.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import fresh_job_env
from mesh_megatron.config import ConfigError
from pretrain_data import make_dataset
from test_checkpoint_integrity import flip_4k, truncate
from test_pretrain_guards import run_config, tmpfs, trainer  # noqa: F401 - tmpfs is a fixture
from test_pretrain_resume import cli, wait_for


def full_fp32(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master weights, whatever the ZeRO stage (ZeRO-0 fp32: the module weights)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p if full is None else full).detach().float().cpu().clone()
    return out


def same_weights(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name == "latest" or p.name.startswith(("step_", ".tmp-", ".old-")))


def hidden(ckpt: Path) -> list[str]:
    """What a conversion may leave inside a checkpoint besides `universal/` (temp dirs, its lock file, DeepSpeed's
    tag file)."""
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".") or p.name == "latest_universal")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """ZeRO-1 checkpoints of steps 1-3 and the full fp32 weights each was saved with."""
    tmp = tmp_path_factory.mktemp("faults")
    data = make_dataset(tmp / "data" / "synthetic", n_docs=60)
    weights = {}
    with trainer(run_config(data, tmp / "run", **{"parallel.zero_stage": 1})) as t:
        for _ in range(3):
            t.train_step()
            t.save()
            weights[t.state.step] = full_fp32(t.engine)
    return data, tmp / "run" / "checkpoints", weights


@pytest.fixture
def run(saved, tmp_path):
    """(data prefix, run dir, checkpoint root, weights): a fresh copy of the saved checkpoints."""
    data, src, weights = saved
    shutil.copytree(src, tmp_path / "run" / "checkpoints")
    return data, tmp_path / "run", tmp_path / "run" / "checkpoints", weights


def resume(data: str, run_dir: Path, zero: int, **overrides) -> dict:
    return run_config(data, run_dir, **{"parallel.zero_stage": zero, "checkpoint.resume": "auto", **overrides})


def test_damaged_universal_form_is_made_again(run, capsys):
    data, run_dir, root, weights = run
    step3 = root / "step_00000003"
    uni = step3 / "universal"
    with trainer(resume(data, run_dir, 0)) as t:
        assert t.state.step == 3
    victim = max(uni.glob("zero/*/fp32.pt"), key=lambda p: p.stat().st_size)
    flip_4k(victim)
    capsys.readouterr()
    with trainer(resume(data, run_dir, 2)) as t:
        assert t.state.step == 3 and same_weights(full_fp32(t.engine), weights[3])
    assert (f"[pretrain] {victim}: content differs from the manifest (hash mismatch: corrupted); making {uni} again "
            "from the checkpoint") in capsys.readouterr().out
    # a universal form without a manifest (made before they had one) is not trusted either
    (uni / "COMPLETE").unlink()
    with trainer(resume(data, run_dir, 0)) as t:
        assert t.state.step == 3 and same_weights(full_fp32(t.engine), weights[3])
    assert f"[pretrain] {uni}: no manifest" in capsys.readouterr().out
    assert entries(root) == ["latest", "step_00000001", "step_00000002", "step_00000003"]
    assert hidden(step3) == [] and (uni / "COMPLETE").exists()  # the conversion's own manifest


def test_nonfinite_fallback_in_another_layout_verifies_the_earlier_checkpoint(run):
    """The checkpoint load_finite falls back to is checked against its manifest like the first choice was."""
    from pretrain import manifest

    data, run_dir, root, weights = run
    opt = root / "step_00000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = torch.load(opt, weights_only=False)
    sd["optimizer_state_dict"]["single_partition_of_fp32_groups"][0].data[5] = float("nan")
    torch.save(sd, opt)
    manifest.write_complete(opt.parent, opt.parent.name, {})  # saved non-finite: its files verify
    truncate(root / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with trainer(resume(data, run_dir, 0)) as t:
        assert t.state.step == 1 and same_weights(full_fp32(t.engine), weights[1])
    assert entries(root) == ["latest", "step_00000001", "step_00000002.corrupt", "step_00000003.nonfinite"]
    assert (root / "latest").read_text() == "step_00000001\n"


def test_disk_full_during_conversion_is_one_line_and_leaves_nothing(run, tmpfs):  # noqa: F811
    data, run_dir, root, weights = run
    step3 = root / "step_00000003"
    size = sum(f.stat().st_size for f in step3.rglob("*") if f.is_file())
    ckpts = tmpfs(size=f"{size // 1024 + 256}k") / "checkpoints"
    ckpts.mkdir()
    shutil.copytree(step3, ckpts / step3.name)
    before = sorted(p.name for p in (ckpts / step3.name).iterdir())
    with pytest.raises(ConfigError) as e:
        with trainer(resume(data, run_dir, 0, **{"checkpoint.dir": str(ckpts)})):
            pass
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{ckpts / step3.name}: No space left on device for its universal form ("), msg
    assert msg.endswith("Free space on that filesystem, or resume with the layout it was saved with"), msg
    assert sorted(p.name for p in (ckpts / step3.name).iterdir()) == before
    with trainer(resume(data, run_dir, 1, **{"checkpoint.dir": str(ckpts)})) as t:  # its own layout: no conversion
        assert t.state.step == 3 and same_weights(full_fp32(t.engine), weights[3])


def test_first_save_after_a_conversion_does_not_count_the_universal_form(run, tmpfs):  # noqa: F811
    """The free-space check of a save asks for the size of the previous checkpoint: its own files, not the universal
    form a resume in another layout added to it (as large again)."""
    from pretrain import universal

    data, run_dir, root, _ = run
    step3 = root / "step_00000003"
    saved_bytes = sum(f.stat().st_size for f in step3.rglob("*") if f.is_file())
    universal.convert(step3)
    mnt = tmpfs(size="32m")
    ckpts = mnt / "checkpoints"
    shutil.copytree(step3, ckpts / step3.name)
    used = shutil.disk_usage(mnt).used
    # room for another checkpoint (with half its size to spare), not for the checkpoint and its universal form again
    r = subprocess.run(["mount", "-o", f"remount,size={(used + saved_bytes * 3 // 2) // 1024}k", str(mnt)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with trainer(resume(data, run_dir, 0, **{"checkpoint.dir": str(ckpts)})) as t:
        t.train_step()
        t.save()
    assert entries(ckpts) == ["latest", "step_00000003", "step_00000004"]


def test_kill_during_conversion_then_resume(run, tmp_path):
    data, run_dir, root, weights = run
    step3 = root / "step_00000003"
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(yaml.safe_dump(resume(data, run_dir, 0)))
    p = cli(cfg, MESH_PRETRAIN_PAUSE_IN_CONVERSION="600")
    tmp = step3 / ".tmp-universal"
    wait_for(lambda: all((tmp / f).exists() for f in ("mp_rank_00_model_states.pt",
                                                      "zero_pp_rank_0_mp_rank_00_model_states.pt")), p)
    p.kill()
    p.communicate(timeout=60)
    assert not (step3 / "universal").exists() and tmp.is_dir()
    with trainer(resume(data, run_dir, 0)) as t:
        assert t.state.step == 3 and same_weights(full_fp32(t.engine), weights[3])
    assert hidden(step3) == [] and (step3 / "universal" / "COMPLETE").exists()


def test_two_processes_converting_one_checkpoint_at_once(run):
    from pretrain import universal

    _, _, root, _ = run
    step3 = root / "step_00000003"

    def convert(pause: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "mesh_tools.checkpoint_cli", "convert", str(step3)],
                                env=fresh_job_env(MESH_PRETRAIN_PAUSE_IN_CONVERSION=pause), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    first = convert("4")
    tmp = step3 / ".tmp-universal"
    wait_for(lambda: (tmp / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists(), first)
    second = convert("0")  # would clear the first one's temp directory as a dead conversion's
    out = {name: p.communicate(timeout=300)[0] for name, p in (("first", first), ("second", second))}
    assert first.returncode == 0 and second.returncode == 0, out
    assert "another process is converting it to its universal form; waiting for it" in out["second"], out["second"]
    assert universal.damage(step3, collective=False) is None and hidden(step3) == []
