"""Hostile inputs: nothing in a checkpoint file is ever executed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from converters.source import read_state_dict
from zoo.errors import SourceError


class Gadget:
    """Unpickling this calls `open(marker, "w")`: the marker file appears if code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def gadget(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "convnext_tiny_1k_224_ema.pth"
    torch.save({"model": {"stem.0.weight": torch.zeros(1), "payload": Gadget(marker)}}, path)
    return path, marker


def test_the_gadget_is_real(gadget):
    path, marker = gadget
    torch.load(path, weights_only=False)  # what an unsafe loader does
    assert marker.exists()


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_pickle_gadget_is_refused_and_never_runs(gadget, force_unsafe, monkeypatch):
    path, marker = gadget
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SourceError, match="cannot be loaded safely"):
        read_state_dict(path)
    assert not marker.exists()


def test_cli_refuses_the_gadget_and_writes_nothing(gadget, tmp_path):
    path, marker = gadget
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    out = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "convert", "convnext_tiny_1k", "--checkpoint", str(path),
                           "--out", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "cannot be loaded safely" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not out.exists()
