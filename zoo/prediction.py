"""Classifying images with a checkpoint: which classifier a name means, its class names, batching,
softmax and the top classes (`zoo predict`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from checkpoints.converted import ConvertedFolder
from checkpoints.hub import HF_SCHEME

from .core.catalogue import resolve
from .core.errors import BackboneError, ZooError
from .core.labels import label_names
from .core.preprocessing import Preprocessing, preprocess
from .core.reports import top_k
from .core.text import printable
from .locating import locate

BATCH_SIZE = 16
DEFAULT_MODEL = "convnext_tiny.fb_in1k"  # `zoo predict`'s and `zoo eval`'s


@dataclass(frozen=True)
class Prediction:
    """One of an image's top classes."""

    index: int
    label: str | None
    probability: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Classifier:
    """A classifier checkpoint found, its model not loaded yet (`classifier`).

    Attributes:
        name: the checkpoint's name.
        num_classes: its classifier width.
        preprocessing: how its images are prepared.
        labels: a name per class (its own, else the ImageNet names of a 1000-, 11821- or
            21841-class head), or None for a head without names.
        folder: the converted folder found (a path or a published repo), or None for a catalogue
            name, which `load` looks up as `zoo.load` does.
    """

    name: str
    num_classes: int
    preprocessing: Preprocessing
    labels: tuple[str, ...] | None
    folder: ConvertedFolder | None = None

    def load(self, dtype: str | None = None):
        """The Keras model, in `dtype` (see `zoo.load`); imports Keras, so TensorFlow."""
        from .loading import from_folder, load

        return load(self.name, dtype=dtype) if self.folder is None else from_folder(self.folder, dtype=dtype)


def classifier(model: str | Path, *, labels: Sequence[str] | None = None) -> Classifier:
    """The classifier `model` names, found as `zoo.load` finds it, loading nothing: a published repo
    (`hf://ORG/NAME[@REVISION]`) is fetched and checked, a converted folder checked, a catalogue
    name or alias resolved (its folder is looked up when the model is loaded).

    Args:
        model: a converted folder, a published repo, or a checkpoint name or alias.
        labels: a name per class, in place of the checkpoint's.

    Raises:
        UnknownModelError: neither a folder nor a catalogue name.
        HubError, StoreError, IntegrityError: the folder or the repo cannot be used.
        ZooError: a feature checkpoint (no classifier head), or `labels` not one name per class.
    """
    text = str(model)
    if text.startswith(HF_SCHEME) or Path(text).expanduser().is_dir():
        folder = locate(text)
        config = folder.config
        if config.is_backbone:
            raise BackboneError(
                f"{printable(config.name)} is a dense-prediction backbone: it has no classes to predict; "
                f"zoo.load({text!r}) gives the feature maps of stages {list(config.features)}"
            )
        name, num_classes, own = config.name, config.num_classes, config.labels
        preprocessing = Preprocessing.from_pretrained_cfg(config.pretrained_cfg)
    else:
        ckpt = resolve(text, or_folder=True)
        name, num_classes, own, folder = ckpt.name, ckpt.num_classes, None, None
        preprocessing = Preprocessing.from_checkpoint(ckpt)
    if num_classes == 0:
        raise ZooError(
            f"{printable(name)} is a feature checkpoint without a classifier head: it has no classes to "
            f"predict. Use a classifier (e.g. --model {DEFAULT_MODEL}; `zoo list` shows the classes), "
            f"or zoo.load({name!r}, include_top=False) for features"
        )
    found = Classifier(name, num_classes, preprocessing, None, folder)
    return _named(found, labels if labels is not None else own or label_names(num_classes))


def _named(found: Classifier, labels: Sequence[str] | None) -> Classifier:
    """`found` with these class names (None: without names).

    Raises:
        ZooError: not one name (a string) per class.
    """
    if labels is None:
        return found
    if len(labels) != found.num_classes or not all(isinstance(n, str) for n in labels):
        raise ZooError(
            f"{len(labels)} class names for the {found.num_classes} classes of {printable(found.name)}; "
            "give one name (a string) per class, in class index order"
        )
    return replace(found, labels=tuple(labels))


def probabilities(model, batch: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """The softmax of `model`'s logits on a prepared NHWC batch, run `batch_size` images at a time
    through its serving path (`zoo.core.serving.runner`; float64, each row summing to 1)."""
    from .core.serving import runner

    run = runner(model)
    logits = np.concatenate(
        [np.asarray(run(batch[i : i + batch_size])) for i in range(0, len(batch), batch_size)]
    ).astype(np.float64)
    out = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return out / out.sum(axis=-1, keepdims=True)


def top_classes(probs: np.ndarray, k: int, names: Sequence[str] | None = None) -> list[list[Prediction]]:
    """Each row's `k` most probable classes, most probable first (ties: the lower index first)."""
    return [
        [Prediction(int(i), names[i] if names else None, float(p[i])) for i in best]
        for p, best in zip(probs, top_k(probs, k), strict=True)
    ]


def predict(
    model, batch: np.ndarray, *, top: int = 5, names: Sequence[str] | None = None, batch_size: int = BATCH_SIZE
) -> list[list[Prediction]]:
    """The `top` classes of every image of a prepared batch (see `zoo.preprocess`).

    Args:
        model: a classifier (`zoo.load`).
        batch: normalised float32 NHWC images.
        top: classes per image.
        names: class names by index (`zoo.core.labels.label_names`), or None for indices only.
        batch_size: images per forward pass.
    """
    return top_classes(probabilities(model, batch, batch_size), top, names)


def classify(
    model: str | Path | Classifier,
    images,
    *,
    top: int = 5,
    labels: Sequence[str] | None = None,
    dtype: str | None = None,
    batch_size: int = BATCH_SIZE,
) -> list[list[Prediction]]:
    """The `top` classes of each image, as `zoo predict` finds them: the images prepared as the
    checkpoint's source evaluates them, the classes named (see `Classifier.labels`).

    Args:
        model: a converted folder, a published repo `hf://ORG/NAME[@REVISION]`, a checkpoint name
            or alias (found as `zoo.load` finds them), or a `Classifier`.
        images: one or a list of file paths, PIL images or uint8 HWC arrays, or a uint8 NHWC batch.
        top: classes per image.
        labels: a name per class, in place of the checkpoint's.
        dtype: compute precision (see `zoo.load`).
        batch_size: images per forward pass.

    Raises:
        ImageError: an image cannot be read (before the model is loaded).
        ZooError: as `classifier`, or the model cannot be loaded.
    """
    if not isinstance(model, Classifier):
        model = classifier(model, labels=labels)
    elif labels is not None:
        model = _named(model, labels)
    where = model.name if model.folder is None else str(model.folder.path)  # (a published repo's: its folder)
    model.preprocessing.check_images(printable(model.name), f"zoo.load({where!r})")  # arrays only: before any image
    batch = preprocess(images, model.preprocessing)  # unreadable images fail before the model loads
    return predict(model.load(dtype), batch, top=top, names=model.labels, batch_size=batch_size)


__all__ = [
    "BATCH_SIZE",
    "DEFAULT_MODEL",
    "Classifier",
    "Prediction",
    "classifier",
    "classify",
    "predict",
    "probabilities",
    "top_classes",
]
