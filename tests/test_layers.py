"""The layers run one way: `zoo.core` <- `checkpoints` <- `converters` <- the user layer (zoo's top).

`lint-imports` checks the contracts in pyproject.toml (imports inside functions count); these
tests run it, show that it catches a violation, and that every module sits in a layer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo", "converters", "checkpoints")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages under `root`, with the contracts of its pyproject.toml."""
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "importlinter.cli"]
    env = {**os.environ, "PYTHONPATH": str(root)}  # the packages there, not an installed copy
    return subprocess.run([*command, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_import_contracts_are_kept():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("checkpoints/fs.py", "def _late():\n    from converters import pipeline\n", "Layers"),  # upward, in a function
        ("zoo/core/model.py", "def _late():\n    from zoo import loading\n", "Layers"),  # ground -> user layer
        ("checkpoints/hub.py", "import zoo\n", "facade"),  # below the facade, importing it
        ("zoo/core/catalogue.py", "from . import preprocessing\n", "cycles"),  # catalogue <-> preprocessing
    ],
)
def test_a_broken_contract_fails_the_check(tmp_path, module, line, broken):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / module, "a") as f:
        f.write("\n\n" + line)
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:]
    broken_contracts = proc.stdout.split("Broken contracts")[-1]
    assert broken in broken_contracts and Path(module).stem in broken_contracts, proc.stdout[-3000:]


def test_every_module_is_in_a_layer():
    """A new module or sub-package must be placed: the layers contract names each but the facade."""
    layers = next(c for c in contracts() if c["type"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    for package in PACKAGES:
        if package in named:
            continue  # the whole package is one layer
        for path in sorted((ROOT / package).iterdir()):
            module = f"{package}.{path.stem}"
            placed = path.suffix == ".py" and path.stem != "__init__" or (path / "__init__.py").is_file()
            if placed:
                assert module in named, f"{module} is in no layer of pyproject.toml's layers contract"
