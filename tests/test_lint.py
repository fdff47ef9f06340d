"""The code is formatted and linted as pyproject.toml says (`ruff`, pinned in the dev extra)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("zoo", "converters", "checkpoints", "tests", "benchmarks", "scripts", "examples")


def ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("ruff")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ruff"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "check", [("check", "--no-cache"), ("format", "--check", "--no-cache")], ids=["lint", "format"]
)
def test_the_tree_is_clean(check):
    proc = ruff(*check, *TREES)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.parametrize(
    "check, line",
    [
        (("check", "--no-cache"), "import os\n"),  # unused
        (("format", "--check", "--no-cache"), "x = {'a':1}\n"),  # not as the formatter writes it
    ],
)
def test_a_file_that_breaks_the_rules_fails(tmp_path, check, line):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "bad.py").write_text('"""A module."""\n' + line)
    proc = ruff(*check, "zoo", cwd=tmp_path)
    assert proc.returncode != 0 and "bad.py" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
