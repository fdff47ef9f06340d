"""Converted folders of small architectures, made by the real pipeline (random weights, parity gate)."""

from __future__ import annotations

from pathlib import Path

from zoo.core.architectures import Architecture
from zoo.core.catalogue import resolve


def convert_small(out: Path, arch: Architecture, *, seed: int = 0, name: str = "convnext_tiny.fb_in1k") -> Path:
    """Convert catalogue entry `name` built on `arch` (a small row) instead of its own architecture.

    The folder records the seed of its random source, so the PyTorch side can be rebuilt from it.
    """
    from converters.pipeline import convert

    path, _ = convert(resolve(name).with_architecture(arch), out=out, random_seed=seed)
    return path
