"""The last step: a converted folder (or a name in the local store) back into a Keras model."""
from __future__ import annotations

from pathlib import Path

import keras

from checkpoints import store
from .architectures import ARCHITECTURES, Architecture
from .catalogue import resolve
from .errors import StoreError, UnknownModelError
from .model import build_model, features_layer, pre_logits


def build(name: str | Architecture, *, num_classes: int | None = None, include_top: bool = True,
          pooling: str | None = "avg", drop_path_rate: float = 0.0,
          input_shape: tuple = (None, None, 3)) -> keras.Model:
    """An uninitialised model for a checkpoint name, alias, architecture name or row.

    `num_classes` defaults to the checkpoint's head (1000 for a bare architecture row).
    """
    if isinstance(name, Architecture):
        arch, classes = name, 1000
    else:
        ckpt = resolve(name)
        arch, classes = ckpt.arch, ckpt.num_classes
    return build_model(arch, num_classes=num_classes or classes, include_top=include_top,
                       pooling=pooling, drop_path_rate=drop_path_rate, input_shape=input_shape)


def load(name_or_path: str | Path, *, include_top: bool = True, pooling: str | None = "avg") -> keras.Model:
    """A converted ConvNeXt with its weights.

    Args:
        name_or_path: a converted folder, or a checkpoint name / alias / architecture name,
            looked up in the local store (`zoo convert NAME` puts it there).
        include_top: keep the classifier. Without it the model returns the trained pooled
            features (pool + the trained head norm) for `pooling="avg"`, or the last stage's
            feature map for `pooling=None`.
        pooling: see `include_top`.

    Raises:
        StoreError: the checkpoint is not converted yet, or the folder is incomplete.
        IntegrityError: a file does not match its manifest sha256.
        UnknownModelError: the name is not in the catalogue.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        folder = store.open_folder(path)
    else:
        if path.suffix in (".h5", ".keras") or "/" in str(name_or_path):
            raise StoreError(f"{name_or_path}: no such converted checkpoint folder")
        try:
            ckpt = resolve(str(name_or_path))
        except UnknownModelError as e:
            raise UnknownModelError(f"{e} (and there is no folder {str(name_or_path)!r})") from None
        where = store.store_path(ckpt.name)
        if not where.is_dir():
            raise StoreError(f"{ckpt.name} is not in the local store ({where}); "
                             f"run `zoo convert {name_or_path}` first")
        folder = store.open_folder(where)
    return from_folder(folder, include_top=include_top, pooling=pooling)


def from_folder(folder: store.ConvertedCheckpoint, *, include_top: bool = True,
                pooling: str | None = "avg") -> keras.Model:
    """Build the folder's architecture and load its (already verified) weights."""
    if pooling not in ("avg", None):
        raise ValueError(f"pooling must be 'avg' or None, got {pooling!r}")
    config = folder.config
    arch = Architecture.from_config(config["architecture"])
    model = build_model(arch, num_classes=config["num_classes"], name=config["name"],
                        head_norm_affine=config.get("head_norm_affine", True))
    model.load_weights(folder.weights)
    if include_top:
        return model
    features = pre_logits(model) if pooling == "avg" else model.get_layer(features_layer(arch)).output
    return keras.Model(model.input, features, name=f"{model.name}_features")


__all__ = ["build", "load", "from_folder", "ARCHITECTURES"]
