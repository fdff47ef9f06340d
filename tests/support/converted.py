"""Converted folders of small architectures, made by the real pipeline (random weights, parity gate)."""
from __future__ import annotations

from pathlib import Path

import pytest

from zoo.architectures import ARCHITECTURES, Architecture


def convert_small(out: Path, arch: Architecture, *, seed: int = 0, name: str = "convnext_tiny.fb_in1k") -> Path:
    """Convert catalogue entry `name` with its architecture row replaced by `arch` (a small one).

    The folder records the seed of its random source, so the PyTorch side can be rebuilt from it.
    """
    from converters.pipeline import convert

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ARCHITECTURES, name.split(".")[0], arch)
        path, _ = convert(name, out=out, random_seed=seed)
    return path
