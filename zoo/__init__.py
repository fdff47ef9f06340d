"""convnext-zoo: the official PyTorch ConvNeXt checkpoints as Keras 3 models, proven equal.

`import zoo` is cheap: the names that need Keras (load, build, freeze_stages) or PIL
(preprocess) are resolved on first use, tensorflow is imported on the first call that builds a
model, and torch never (only the converter's separate reference process uses it). Once Keras
is imported (before or after zoo), the project's layers are registered with its serialization,
so `keras.saving.load_model(folder or "hf://ORG/NAME")` reads converted folders. Importing
zoo before tensorflow also turns on oneDNN's fused CPU kernels (see `zoo.core.runtime`). This
facade is the top of the user layer: modules below it import the modules they need
(`zoo.core.errors`, `zoo.core.catalogue`, ...), never `zoo` itself.
"""

from __future__ import annotations

import importlib

from .core import runtime as _runtime
from .core.version import __version__

_runtime.prefer_onednn()  # before anything imports tensorflow


def _register_layers() -> None:
    """Register the project's Keras model class and layers (`convnext_zoo>ConvNeXt`, ...) by importing
    their module, and on TensorFlow the `Preprocess` layer (TensorFlow ops) of saved models with
    preprocessing."""
    importlib.import_module(".core.model", __name__)
    import keras

    if keras.backend.backend() == "tensorflow":
        importlib.import_module(".core.preprocessing", __name__).Preprocess  # noqa: B018  (defines and registers it)


_runtime.after_import("keras", _register_layers)

from .core.architectures import ARCHITECTURES, Architecture, get_architecture  # noqa: E402  (ground: cheap)
from .core.catalogue import CatalogueEntry, catalogue, resolve, search  # noqa: E402
from .core.errors import (  # noqa: E402
    HubError,
    ImageError,
    IntegrityError,
    MappingError,
    ParityError,
    ReferenceRunError,
    SourceError,
    StoreError,
    UnknownModelError,
    ZooError,
)
from .core.folder_config import FolderConfig  # noqa: E402

# Resolved on first use: these import Keras (so TensorFlow), PIL, or the layers above.
_LAZY = {  # public name -> (module, attribute in it)
    "preprocess": ("preprocessing", "preprocess"),
    "freeze_stages": ("core.model", "freeze_stages"),
    "load": ("loading", "load"),
    "build": ("loading", "build_untrained"),
    "classify": ("prediction", "classify"),
}


def __getattr__(name: str):
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "CatalogueEntry",
    "FolderConfig",
    "HubError",
    "ImageError",
    "IntegrityError",
    "MappingError",
    "ParityError",
    "ReferenceRunError",
    "SourceError",
    "StoreError",
    "UnknownModelError",
    "ZooError",
    "__version__",
    "build",
    "catalogue",
    "classify",
    "freeze_stages",
    "get_architecture",
    "load",
    "preprocess",
    "resolve",
    "search",
]
