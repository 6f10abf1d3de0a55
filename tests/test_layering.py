"""The layout's contracts: packages depend one way (model <- trainer / data tools <- tools, checked by import-linter's
`lint-imports` with the contracts in pyproject.toml), the standalone model code that exports ship needs nothing of
the training stack, and nothing tracked outside tests/ refers to material beside the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mesh_megatron", "pretrain", "mesh_tools", "data_tools")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# Files that exist only in ../shared (the dev box's notes): citing them by name is pointing outside the repository too.
SHARED_ONLY = ("mesh_spec.md", "anchors.md", "slurm_local.md", "cpu_notes.md")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    # The packages are found on PYTHONPATH=cwd first (before the editable install), so a copy can be checked.
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(cwd), "HOME": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout


@pytest.fixture()
def tree_copy(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(
    "module, line, contract",
    [
        # the model reaching up into the trainer (what mesh_megatron/hf/export.py did lazily before)
        ("mesh_megatron/params.py", "def _f():\n    from pretrain.checkpoint import load_full_model_state\n", "layers"),
        # the trainer reaching up into a tool
        ("pretrain/checkpoint.py", "from mesh_tools.plan import estimate\n", "layers"),
        # the trainer and the data tools are independent of each other
        ("data_tools/merge.py", "import pretrain.data\n", "layers"),
        # the shipped model code importing megatron-core, or the rest of the model package
        ("mesh_megatron/standalone/mesh.py", "import megatron.core\n", "standalone"),
        ("mesh_megatron/standalone/connections.py", "from mesh_megatron.config import ModelConfig\n", "standalone"),
    ],
)
def test_a_wrong_way_import_breaks_a_contract(tree_copy, module, line, contract):
    path = tree_copy / module
    path.write_text(path.read_text() + "\n" + line)
    res = _lint(tree_copy)
    assert res.returncode != 0, res.stdout[-3000:]
    assert "1 broken" in res.stdout, res.stdout[-3000:]
    name = "layers: model <- trainer" if contract == "layers" else "standalone model code"
    broken = [ln for ln in res.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith(name), res.stdout[-3000:]


def test_standalone_files_import_each_other_only_relatively():
    """Each shipped file imports its siblings with `from .x import` (absolute imports break in an export dir), and
    otherwise only torch (MeSH, the connections: the training model runs them) or transformers (the HF wrapper)."""
    import ast

    from mesh_megatron import standalone

    here = Path(standalone.__file__).parent
    siblings = {Path(f).stem for f in standalone.SHIPPED_FILES}
    assert {p.name for p in here.glob("*.py")} - {"__init__.py"} == set(standalone.SHIPPED_FILES)
    for name in standalone.SHIPPED_FILES:
        allowed = {"__future__", "dataclasses", "math", "torch"}
        if name.endswith("_mesh_gpt.py"):
            allowed.add("transformers")
        tree = ast.parse((here / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, (name, node.module)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 and node.module in siblings, (name, node.module)
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in allowed for a in node.names), name


def test_standalone_contract_forbids_every_other_model_module():
    """The forbidden contract lists mesh_megatron's modules by name: a new module must be added to it."""
    import pkgutil
    import tomllib

    import mesh_megatron

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (standalone,) = [c for c in contracts if c.get("source_modules") == ["mesh_megatron.standalone"]]
    modules = {f"mesh_megatron.{m.name}" for m in pkgutil.iter_modules(mesh_megatron.__path__)} - {"mesh_megatron.standalone"}
    assert modules <= set(standalone["forbidden_modules"]), modules - set(standalone["forbidden_modules"])


def test_commands_live_in_the_layer_that_owns_them():
    """Only the trainer's and the data tools' own commands live below the tools layer; the model has no CLI."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    below_tools = {name: target for name, target in scripts.items() if not target.startswith("mesh_tools.")}
    assert below_tools == {"mesh-pretrain": "pretrain.cli:main", "mesh-data": "data_tools.cli:main"}, below_tools
    for path in (ROOT / "mesh_megatron").rglob("*.py"):
        text = path.read_text()
        assert "import argparse" not in text and "__main__" not in text, f"{path.relative_to(ROOT)}: a command in the model package"


def _tracked_files() -> list[Path]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_nothing_outside_tests_refers_to_material_beside_the_repository():
    """A user's clone has only the repository: code, configs and docs must not point at ../shared."""
    offenders = []
    for path in _tracked_files():
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "tests" or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary (figures, tokenizer models)
        for i, line in enumerate(text.splitlines(), 1):
            if "../shared" in line or "..\\shared" in line or any(f in line for f in SHARED_ONLY):
                offenders.append(f"{rel}:{i}: {line.strip()[:120]}")
    assert not offenders, "refers to ../shared (write what it needs into docs/ instead):\n" + "\n".join(offenders)
