"""Config inheritance (`base:` in any config YAML, resolved by mesh_megatron.config.read_yaml) and the configs/ tree
built on it.

tests/data/resolved_configs.json is the snapshot of every configs/*.yaml as it resolved before the tree was split into
bases (`load_run_config(path).to_dict()`, the dict the trainer writes to run_config.yaml), generated from the committed
files of that time (`git show HEAD:configs/<name>`). Each of those configs must still resolve to exactly that dict,
except the differences stated below (EXPECTED_CHANGES); the new `*-vanilla-pythia` configs must resolve to the old
`*-vanilla` dict (Pythia's init) but for their name and run directory. Values are compared as their JSON text, so
1 vs 1.0 vs true is a difference too; paths (data.paths, logging.dir, ...) are plain strings in a run config, not
resolved against anything, and are compared as written.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import yaml

from mesh_megatron.config import ConfigError, ModelConfig, merge_config, read_yaml
from pretrain.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = json.loads((ROOT / "tests" / "data" / "resolved_configs.json").read_text())
PYTHIA_SIZES = ("160m", "410m", "1b", "1.4b", "2.8b", "6.9b")
VANILLAS = [f"pythia-{s}-vanilla" for s in PYTHIA_SIZES] + ["tiny-vanilla"]

# The only intended changes to configs that existed before the split: every vanilla now uses the paper's init, as the
# recursive / anchor / MeSH arms of its size do (Pythia's init moved to <name>-pythia.yaml).
PAPER_INIT = {"model.scale_embeddings": True, "model.output_layer_init": "scaled"}
EXPECTED_CHANGES = {f"{v}.yaml": PAPER_INIT for v in VANILLAS}


def flat(d: dict, prefix: str = "") -> dict[str, str]:
    """{'model.hidden_size': '2048', ...}: every leaf of a nested dict as its JSON text."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def resolved(path: str | Path) -> dict[str, str]:
    return flat(load_run_config(path).to_dict())


def assert_matches(path: str | Path, expected: dict, changes: dict) -> None:
    """`path` resolves to `expected` with `changes` applied. Every key of the snapshot must be there with the same
    value; a key the snapshot lacks can only be a field added to the config dataclasses since (not a config change)."""
    want = flat(expected)
    assert set(changes) <= set(want), f"stated change of a key the snapshot does not have: {set(changes) - set(want)}"
    for key, value in changes.items():
        assert want[key] != json.dumps(value), f"{key}: a stated change that changes nothing"
        want[key] = json.dumps(value)
    got = resolved(path)
    missing = sorted(set(want) - set(got))
    drift = {k: (want[k], got[k]) for k in want if k in got and got[k] != want[k]}
    assert not missing and not drift, f"{path}: missing {missing}; changed (snapshot, now): {drift}"


# --- the shipped tree ----------------------------------------------------------------------------------------------


def test_snapshot_covers_every_old_config():
    assert len(SNAPSHOT) == 32 and all(n.endswith(".yaml") for n in SNAPSHOT)
    assert set(EXPECTED_CHANGES) <= set(SNAPSHOT)


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_old_configs_resolve_as_before(name):
    assert (ROOT / "configs" / name).is_file(), f"configs/{name} is named by jobs, docs and users: keep the path"
    assert_matches(ROOT / "configs" / name, SNAPSHOT[name], EXPECTED_CHANGES.get(name, {}))


@pytest.mark.parametrize("vanilla", VANILLAS)
def test_vanilla_pythia_is_the_old_vanilla(vanilla):
    new = f"{vanilla}-pythia"
    assert_matches(ROOT / "configs" / f"{new}.yaml", SNAPSHOT[f"{vanilla}.yaml"],
                   {"model.name": new, "logging.dir": f"runs/{new}"})  # its own run directory: no shared checkpoints


def test_vanilla_pythia_configs_exist_for_every_size():
    names = {Path(p).stem for p in glob.glob(str(ROOT / "configs" / "*-vanilla-pythia.yaml"))}
    assert names == {f"{v}-pythia" for v in VANILLAS}


def _bases_of(path: Path) -> list[Path]:
    raw = yaml.safe_load(path.read_text())
    bases = raw.get("base", []) if isinstance(raw, dict) else []
    return [(path.parent / b).resolve() for b in ([bases] if isinstance(bases, str) else bases)]


def test_every_base_file_is_used_and_no_config_repeats_the_run_section():
    tops = sorted((ROOT / "configs").glob("*.yaml"))
    seen, todo = set(), list(tops)
    while todo:
        p = todo.pop()
        for b in _bases_of(p):
            if b not in seen:
                seen.add(b)
                todo.append(b)
    unused = {p.relative_to(ROOT) for p in (ROOT / "configs" / "base").glob("*.yaml")} - {p.relative_to(ROOT) for p in seen}
    assert not unused, f"base files no config inherits: {unused}"
    for p in tops:
        raw = yaml.safe_load(p.read_text())
        if p.name.startswith("pythia-"):
            assert "base" in raw and set(raw) <= {"base", "model", "logging"}, f"{p.name}: the run setup belongs in configs/base/"


def test_configs_cite_docs_not_files_outside_the_repo():
    for p in [*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "slurm" / "jobs").glob("*.yaml")]:
        text = p.read_text()
        for bad in ("../shared", "mesh_spec.md", "anchors.md"):
            assert bad not in text, f"{p.relative_to(ROOT)} mentions {bad}"


# --- the rules -----------------------------------------------------------------------------------------------------


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_nested_mappings_merge_and_lists_replace(tmp_path):
    write(tmp_path, "base.yaml", "train: {lr: 0.1, seed: 7, eval_num_loops: [1, 2, 3]}\n"
                                 "data: {paths: [a, b], split: '1,1,1'}\nlogging: {wandb: {mode: offline, tags: [x, y]}}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ntrain: {lr: 0.2, eval_num_loops: [4]}\n"
                                          "data: {paths: [c]}\nlogging: {wandb: {tags: []}}\n")
    d = read_yaml(child)
    assert "base" not in d
    assert d["train"] == {"lr": 0.2, "seed": 7, "eval_num_loops": [4]}  # merged key by key; the list replaced
    assert d["data"] == {"paths": ["c"], "split": "1,1,1"}  # [c], not [a, b, c]
    assert d["logging"] == {"wandb": {"mode": "offline", "tags": []}}  # two levels deep


def test_null_and_scalars_replace_a_mapping_or_list():
    assert merge_config({"a": {"b": 1}, "c": [1]}, {"a": None, "c": 2}) == {"a": None, "c": 2}
    base = {"a": {"b": [1]}}
    merge_config(base, {"a": {"b": [2], "c": 3}})
    assert base == {"a": {"b": [1]}}  # inputs are not modified


def test_list_of_bases_applies_left_to_right_and_paths_are_relative_to_the_file(tmp_path):
    write(tmp_path, "shared/root.yaml", "train: {lr: 1.0, seed: 1, log_interval: 5}\n")
    write(tmp_path, "shared/one.yaml", "base: root.yaml\ntrain: {lr: 2.0, seed: 2}\n")
    write(tmp_path, "other/two.yaml", "base: ../shared/root.yaml\ntrain: {lr: 3.0}\n")  # diamond over root: fine
    child = write(tmp_path, "runs/child.yaml", "base: [../shared/one.yaml, ../other/two.yaml]\ntrain: {log_interval: 9}\n")
    # Each base is resolved on its own first, then merged in order: two.yaml brings root's seed back over one's.
    assert read_yaml(child) == {"train": {"lr": 3.0, "seed": 1, "log_interval": 9}}
    write(tmp_path, "runs/child2.yaml", "base: [../other/two.yaml, ../shared/one.yaml]\n")
    assert read_yaml(tmp_path / "runs/child2.yaml") == {"train": {"lr": 2.0, "seed": 2, "log_interval": 5}}


def _one_line_error(path: Path, *needles: str) -> str:
    with pytest.raises(ConfigError) as e:
        read_yaml(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_cycle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.yaml", "base: b.yaml\ntrain: {lr: 1.0}\n")
    write(tmp_path, "b.yaml", "base: a.yaml\ntrain: {seed: 1}\n")
    msg = _one_line_error(Path("a.yaml"), "base cycle a.yaml -> b.yaml -> a.yaml")
    assert msg.startswith("b.yaml: ")  # the file whose base closes the cycle
    write(tmp_path, "self.yaml", "base: ./self.yaml\n")
    _one_line_error(Path("self.yaml"), "self.yaml: base cycle self.yaml -> self.yaml")


def test_missing_base_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "configs/x.yaml", "base: missing.yaml\nmodel: {}\n")
    _one_line_error(Path("configs/x.yaml"),
                    f"configs/x.yaml: base 'missing.yaml' not found (looked for {tmp_path.resolve() / 'configs' / 'missing.yaml'})")
    write(tmp_path, "configs/y.yaml", "base: x.yaml\n")  # reported for the file that names it
    _one_line_error(Path("configs/y.yaml"), "configs/x.yaml: base 'missing.yaml' not found")


@pytest.mark.parametrize("text, needle", [
    ("base: 3\n", "'base' must be a file path or a list of file paths"),
    ("base: []\n", "'base' must be a file path or a list of file paths"),
    ("base: list.yaml\n", "list.yaml: a base file must be a mapping, got list (base of bad.yaml)"),
    ("base: broken.yaml\n", "broken.yaml: not valid YAML"),
])
def test_bad_bases_are_one_line_errors(tmp_path, monkeypatch, text, needle):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "list.yaml", "- 1\n- 2\n")
    write(tmp_path, "broken.yaml", "train: {lr: [1,\n  seed: 2\n")
    _one_line_error(write(tmp_path, "bad.yaml", text).relative_to(tmp_path), needle)


# --- every reader goes through it -------------------------------------------------------------------------------


def test_model_config_and_plan_readers_resolve_bases():
    from mesh_tools.plan import load_run_dict

    path = ROOT / "configs" / "pythia-1.4b-mesh.yaml"
    cfg = load_run_config(path)
    assert ModelConfig.from_yaml(path) == cfg.model
    run = load_run_dict(path, {"train.micro_batch_size": 2})
    assert "base" not in run and run["train"]["global_batch_size"] == 1024 and run["train"]["micro_batch_size"] == 2
    assert ModelConfig.from_dict(run["model"]) == cfg.model


def test_print_config_is_the_resolved_dict(capsys):
    from pretrain.cli import main

    for name in ("pythia-1.4b-mesh.yaml", "pythia-6.9b-vanilla-pythia.yaml", "demo.yaml"):
        assert main(["--config", f"configs/{name}", "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert "base" not in printed
        assert printed == load_run_config(f"configs/{name}").to_dict()
    # every snapshot value is printed unchanged (keys added to the trainer since the snapshot come with defaults)
    snap = flat(SNAPSHOT["demo.yaml"])
    assert {k: v for k, v in flat(printed).items() if k in snap} == snap


def test_clis_print_a_bad_base_as_one_line_and_exit_2(tmp_path, capsys):
    from mesh_tools.params_cli import params_main
    from pretrain.cli import main

    bad = write(tmp_path, "bad.yaml", "base: missing.yaml\nmodel: {name: x}\n")
    assert main(["--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: base 'missing.yaml' not found" in err
    assert params_main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: base 'missing.yaml' not found" in err
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    assert main(["--config", str(tmp_path / "a.yaml"), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "base cycle" in err


def test_mesh_params_and_mesh_plan_on_inherited_configs(capsys):
    from mesh_tools.params_cli import params_main
    from mesh_tools.plan import main as plan_main

    assert params_main(["configs/pythia-1.4b-mesh.yaml", "configs/pythia-1.4b-vanilla-pythia.yaml"]) == 0
    out = capsys.readouterr().out
    assert "pythia-1.4b-mesh" in out and "805,797,918" in out and "1,414,647,808" in out
    assert plan_main(["--job", "slurm/jobs/pythia-1.4b-mesh.yaml"]) == 0
    out = capsys.readouterr().out
    assert "pythia-1.4b-mesh" in out and "layout=4+8R2+4" in out and "OK: the layout divides and fits." in out


def test_job_files_may_inherit_too(tmp_path):
    from mesh_tools.plan import load_job

    write(tmp_path, "cluster.yaml", "nodes: 8\ngpus_per_node: 8\ngpu_memory_gb: 80\noverrides: {train.micro_batch_size: 16}\n")
    job = load_job(write(tmp_path, "job.yaml", f"base: cluster.yaml\nconfig: {ROOT / 'configs' / 'pythia-1.4b-mesh.yaml'}\n"))
    assert (job["nodes"], job["gpus_per_node"], job["overrides"]) == (8, 8, {"train.micro_batch_size": 16})
    assert "base" not in job
