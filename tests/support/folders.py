"""What tests write as converted folders straight through the store (no conversion): a small model
with non-trivial weights and the config `converters.pipeline` would write for it."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from tests.support.archs import SMALL_V1
from zoo.core.architectures import Architecture
from zoo.core.catalogue import resolve
from zoo.core.folder_config import FolderConfig, SourceRecord
from zoo.core.model import build_model
from zoo.core.version import __version__

NAME = "convnext_tiny.fb_in1k"
PARITY = {"passed": True, "atol": 1e-4, "rtol": 1e-5, "stage_rtol": 1e-4, "comparisons": []}


def small_model(seed: int = 0, arch: Architecture = SMALL_V1, num_classes: int = 10, **kwargs) -> keras.Model:
    """`arch` with every weight moved off its (partly constant) initial value."""
    model = build_model(arch, num_classes=num_classes, **kwargs)
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = keras.ops.convert_to_numpy(variable)
        variable.assign((value + rng.normal(0.0, 0.2, value.shape)).astype(value.dtype))
    return model


def folder_config(name: str = NAME, arch: Architecture = SMALL_V1, num_classes: int = 10, **changes) -> FolderConfig:
    """A config as `converters.pipeline` writes it, for catalogue entry `name` on a small row."""
    ckpt = resolve(name)
    config = FolderConfig(
        name=ckpt.name,
        architecture=arch,
        num_classes=num_classes,
        pretrained_cfg={**ckpt.pretrained_cfg(), "num_classes": num_classes},
        source=SourceRecord("random", "0" * 64, seed=0, note="test weights"),
        pretrained=False,
        converter={"convnext_zoo": __version__},
    )
    return dataclasses.replace(config, **changes)
