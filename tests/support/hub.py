"""Start the local Hub server (tests/support/hub_server.py) for a test, over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

SERVER = Path(__file__).with_name("hub_server.py")


@contextmanager
def local_hub(root: Path, lfs_threshold: int | None = None, token: str | None = None):
    """Yield the base URL of a fresh server on 127.0.0.1 storing under `root`.

    `lfs_threshold`: files of at least this many bytes go through LFS (default 1 MiB);
    `token`: writes then need `Authorization: Bearer <token>`.
    """
    env = dict(os.environ)
    if lfs_threshold is not None:
        env["MINIHUB_LFS_THRESHOLD"] = str(lfs_threshold)
    args = ["--host", "127.0.0.1", "--port", "0", "--root", str(root)] + (["--token", token] if token else [])
    proc = subprocess.Popen([sys.executable, str(SERVER), *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"hub server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def client_in_process(monkeypatch, url: str, token: str, org: str = "testorg") -> None:
    """Point this process's Hub client at the server at `url`, online, without Xet, with `token` in
    HF_TOKEN and `org` as the default organisation (undone with `monkeypatch`)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("ZOO_HUB_ORG", org)


def set_faults(url: str, faults: dict) -> dict:
    """Replace the server's fault set (see hub_server.py's docstring); `{}` clears it."""
    request = urllib.request.Request(
        f"{url}/__faults", data=json.dumps(faults).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def faults(url: str) -> dict:
    """The server's fault set as it is now: counts left and each `fail` rule's hits."""
    with urllib.request.urlopen(f"{url}/__faults") as response:
        return json.loads(response.read())
