"""The `zoo` command line as the tests drive it: in a child process, as users run it, or in this
process (click's CliRunner) where only the handling of the arguments is under test."""

from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner, Result


def blocking(*names: str) -> str:
    """Code that makes importing `names` (and their submodules) raise ModuleNotFoundError, as where they
    are not installed. An import hook, not `sys.modules[name] = None`: libraries that look for a module
    in `sys.modules` (scipy's array API support looks for torch there) would find that None and fail
    where a user without the package never would."""
    return (
        "import importlib.abc, sys\n"
        "class _NotInstalled(importlib.abc.MetaPathFinder):\n"
        f"    names = {tuple(names)!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NotInstalled())\n"
    )


# Prepended to a child's code: importing torch or timm there raises, as where the `convert`
# extra is not installed.
BLOCK_TORCH = blocking("torch", "timm")


def zoo_cli(*args, env: dict | None = None, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`zoo ARGS` in a child process with this test's environment (or `env`)."""
    return subprocess.run(
        [sys.executable, "-m", "zoo.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ if env is None else env),
        cwd=cwd,
        timeout=timeout,
    )


def zoo_inline(*args) -> Result:
    """`zoo ARGS` in this process; an exception escaping the command is a traceback for a user."""
    from zoo.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    return result


def exit_code(result: subprocess.CompletedProcess | Result) -> int:
    return result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code


def assert_no_traceback(result: subprocess.CompletedProcess | Result) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_line_error(result: subprocess.CompletedProcess | Result) -> str:
    """The CLI failed as users should see it: exit 1, no traceback, one `error:` line last."""
    assert exit_code(result) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    return last


def verify_then_export_keras(folder, out) -> tuple[str, dict]:
    """`zoo verify FOLDER` (its stderr) and `zoo export FOLDER --format keras --out OUT/model.keras`,
    both passing: (verify's stderr, the export's parity report)."""
    import json

    result = zoo_inline("verify", folder)
    assert result.exit_code == 0, result.stderr[-3000:]
    verified = result.stderr
    result = zoo_inline("export", folder, "--format", "keras", "--out", out / "model.keras")
    assert result.exit_code == 0, result.stderr[-3000:]
    return verified, json.loads((out / "model.keras.parity.json").read_text())
