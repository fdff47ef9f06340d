"""convnext-zoo: the official PyTorch ConvNeXt checkpoints as Keras 3 models, proven equal.

`import zoo` is cheap: tensorflow is imported on the first call that builds a model, and torch
never (only the converter's separate reference process uses it). Importing zoo before
tensorflow also turns on oneDNN's fused CPU kernels (see `zoo.runtime`).
"""
from __future__ import annotations

from . import runtime as _runtime

_runtime.prefer_onednn()  # before anything imports tensorflow

__version__ = "0.1.0"

from .architectures import ARCHITECTURES, Architecture, get_architecture
from .catalogue import Checkpoint, catalogue, resolve, search
from .errors import (HubError, ImageError, IntegrityError, MappingError, ParityError, ReferenceRunError,
                     SourceError, StoreError, UnknownModelError, ZooError)


def load(name_or_path, **kwargs):
    """A converted ConvNeXt as a `keras.Model`: local store, then the Hub, then conversion.

    See `zoo.loading.load` for the arguments.
    """
    from .loading import load as _load

    return _load(name_or_path, **kwargs)


def preprocess(images, name):
    """Images -> the normalised NHWC batch checkpoint `name` expects, equal to timm's eval transform.

    See `zoo.preprocessing.preprocess` for the arguments.
    """
    from .preprocessing import preprocess as _preprocess

    return _preprocess(images, name)


def freeze_stages(model, num_stages):
    """Freeze the stem and the first `num_stages` stages for fine-tuning (see `zoo.model.freeze_stages`)."""
    from .model import freeze_stages as _freeze

    return _freeze(model, num_stages)


def build(name, **kwargs):
    """An uninitialised ConvNeXt for a checkpoint or architecture name (see `zoo.loading.build`)."""
    from .loading import build as _build

    return _build(name, **kwargs)


__all__ = [
    "ARCHITECTURES", "Architecture", "Checkpoint", "HubError", "ImageError", "IntegrityError", "MappingError",
    "ParityError", "ReferenceRunError", "SourceError", "StoreError", "UnknownModelError", "ZooError", "build",
    "catalogue", "freeze_stages", "get_architecture", "load", "preprocess", "resolve", "search",
]
