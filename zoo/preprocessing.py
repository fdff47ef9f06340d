"""Preprocessing as users call it: `zoo.preprocess` takes a published repo (`hf://ORG/NAME`) too.

The rest is the ground's `zoo.core.preprocessing` (timm's eval transform, the `Preprocessing` record,
`with_preprocessing`, the `Preprocess` layer), re-exported under the name the README has used.
Importing it imports neither Keras nor TensorFlow (the layer's class is made on first use).
"""

from __future__ import annotations

import numpy as np

from checkpoints.hub import HF_SCHEME

from .core import preprocessing as _ground
from .core.preprocessing import (  # noqa: F401  (re-exported)
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    as_preprocessing,
    center_crop,
    pictures,
    with_preprocessing,
)
from .locating import locate


def preprocess(images, name) -> np.ndarray:
    """Images -> the normalised float32 NHWC batch a model expects (timm's eval transform).

    Args:
        images: one or a list of file paths, PIL images or uint8 HWC arrays (any sizes), or a
            uint8 NHWC batch.
        name: a checkpoint name or alias, a `CatalogueEntry`, a `Preprocessing`, a converted
            folder, or a published repo `hf://ORG/NAME[@REVISION]` (its folder is fetched into
            the Hub cache and checked, as by `load`; TensorFlow is not imported).

    Returns:
        float32 array `(N, H, W, C)` equal to timm's `create_transform` output (NCHW there): C = 3
        (RGB), or 1 for a grey model (images decoded as grey, as timm's loader does then).

    Raises:
        ImageError: unreadable file, or an array of the wrong shape or dtype; or a model of
            another channel count (its inputs are arrays: call the model on them).
        UnknownModelError: `name` is not a catalogue name.
        HubError: the published repo cannot be fetched.
    """
    if isinstance(name, str) and name.startswith(HF_SCHEME):
        name = locate(name).config
    return _ground.preprocess(images, name)


def __getattr__(name: str):
    if name == "Preprocess":
        return _ground.Preprocess  # the Keras layer: made, and Keras imported, only now
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_ground.__all__]
