"""Filesystem faults on demand: a disk that fills up mid-write, a tmpfs, a read-only mount.

The injected faults hit the steps the store's writer (`checkpoints.store.writing`) takes to
assemble a folder, so each step's clean-up can be checked on its own; the mounts give the real
errors where the tests run as root (elsewhere they skip).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

from checkpoints import converted, fs, store, weights

WRITE_STEPS = ("weights", "keras config", "record", "parity", "manifest", "fsync")


def fail_nth_write(n: int, setattr_=setattr, err: int = errno.ENOSPC) -> list[str]:
    """Make write step `n` (0-based, see WRITE_STEPS) of a folder's writing fail with OSError(err).

    A failing file write first writes its file, then cuts it in half, as a disk filling up
    mid-file does. Returns the list of steps run, filled in as they run.
    """
    steps: list[str] = []

    def wrap(fn, target):
        def faulty(*args, **kwargs):
            steps.append(fn.__name__)
            if len(steps) - 1 != n:
                return fn(*args, **kwargs)
            path = target(args)
            if path is not None:
                fn(*args, **kwargs)
                with open(path, "r+b") as f:
                    f.truncate(os.fstat(f.fileno()).st_size // 2)
            raise OSError(err, os.strerror(err), str(path or ""))

        return faulty

    setattr_(store, "write_weights", wrap(weights.write_weights, lambda a: a[0]))
    setattr_(store, "write_keras_files", wrap(weights.write_keras_files, lambda a: a[0] / "config.json"))
    setattr_(converted, "write_json", wrap(fs.write_json, lambda a: a[0]))
    setattr_(converted, "fsync_tree", wrap(fs.fsync_tree, lambda a: None))
    return steps


@contextlib.contextmanager
def mounted(where: Path, *options: str, source: str = "tmpfs", kind: str | None = "tmpfs"):
    """`mount` for the duration of the block; skips the test where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    command = ["mount", *(["-t", kind] if kind else []), *options, source, str(where)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@contextlib.contextmanager
def read_only_view(folder: Path, where: Path):
    """`folder` seen read-only at `where` (a bind mount: even root cannot write through it)."""
    with mounted(where, "--bind", source=str(folder), kind=None):
        proc = subprocess.run(["mount", "-o", "remount,bind,ro", str(where)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount read-only here ({proc.stderr.strip()})")
        yield where


def fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of `folder` until only about `leave` bytes are free."""
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def dead_pid() -> int:
    """The id of a process that has ended (and was reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
