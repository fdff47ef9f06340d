"""Classifying prepared images with a loaded model: batching, softmax and the top classes (`zoo predict`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BATCH_SIZE = 16


@dataclass(frozen=True)
class Prediction:
    """One of an image's top classes."""

    index: int
    label: str | None
    probability: float

    def to_json(self) -> dict:
        return asdict(self)


def probabilities(model, batch: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """The softmax of `model`'s logits on a prepared NHWC batch, run `batch_size` images at a time
    through its serving path (`zoo.serving.runner`; float64, each row summing to 1)."""
    from .serving import runner

    run = runner(model)
    logits = np.concatenate([np.asarray(run(batch[i:i + batch_size]))
                             for i in range(0, len(batch), batch_size)]).astype(np.float64)
    out = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return out / out.sum(axis=-1, keepdims=True)


def top_classes(probs: np.ndarray, k: int, names: list[str] | None = None) -> list[list[Prediction]]:
    """Each row's `k` most probable classes, most probable first (ties: the lower index first)."""
    rows = []
    for p in probs:
        best = np.argsort(-p, kind="stable")[:k]
        rows.append([Prediction(int(i), names[i] if names else None, float(p[i])) for i in best])
    return rows


def predict(model, batch: np.ndarray, *, top: int = 5, names: list[str] | None = None,
            batch_size: int = BATCH_SIZE) -> list[list[Prediction]]:
    """The `top` classes of every image of a prepared batch (see `zoo.preprocess`).

    Args:
        model: a classifier (`zoo.load`).
        batch: normalised float32 NHWC images.
        top: classes per image.
        names: class names by index (`zoo.labels.label_names`), or None for indices only.
        batch_size: images per forward pass.
    """
    return top_classes(probabilities(model, batch, batch_size), top, names)


__all__ = ["BATCH_SIZE", "Prediction", "predict", "probabilities", "top_classes"]
