"""Run the README's flows exactly as written: every fenced block after a `<!-- flow: NAME -->` line.

    python scripts/readme_flows.py [NAME]      # default: offline

The blocks run in README order in one working folder, a copy of this checkout's tracked files
(so `pip install ".[convert]"` and `examples/...` mean what they mean to a user in a checkout):
bash blocks with `bash -e -o pipefail -x` (the first failing command ends the flow), python
blocks with the interpreter running this script. Exit status 1 names the block that failed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^<!-- flow: (?P<flow>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)^```$", re.M | re.S)


def blocks(readme: str, flow: str) -> list[tuple[str, str, int]]:
    """(language, code, line number) of every block of `flow`, in README order."""
    found = [
        (m["lang"], m["body"], readme.count("\n", 0, m.start()) + 2)
        for m in BLOCK.finditer(readme)
        if m["flow"] == flow
    ]
    for lang, _, line in found:
        if lang not in ("bash", "python"):
            raise SystemExit(f"README.md:{line}: a flow block must be bash or python, not {lang}")
    return found


def checkout_copy(dest: Path) -> None:
    """The tracked files of this checkout, as they are in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run(flow: str) -> int:
    found = blocks((ROOT / "README.md").read_text(), flow)
    if not found:
        print(f"README.md has no block of flow {flow!r}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="readme-flow-") as work:
        where = Path(work)
        checkout_copy(where)
        for lang, code, line in found:
            print(f"\n=== README.md:{line} ({lang})\n{code}", flush=True)
            command = (
                ["bash", "-e", "-o", "pipefail", "-x", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            )
            start = time.perf_counter()
            done = subprocess.run(command, cwd=where)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                print(
                    f"FAILED: the block at README.md:{line} exited {done.returncode} after {seconds:.0f} s",
                    file=sys.stderr,
                )
                return 1
            print(f"=== README.md:{line}: passed in {seconds:.0f} s", flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flow", nargs="?", default="offline")
    sys.exit(run(parser.parse_args().flow))


if __name__ == "__main__":
    main()
