"""The PyTorch side of checks on a converted folder (exports, evaluation): timm on its source weights.

Runs timm in its own process (as the parity gate does) on the recorded source weights,
fetched again and checked against the sha256 recorded at conversion.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from checkpoints.store import work_dir
from zoo.architectures import Architecture

from .parity import reference_classify, reference_outputs
from .pipeline import recorded_source


@contextmanager
def _reference(config: dict, checkpoint: str | Path | None):
    """(common arguments of the reference calls, work folder) for a converted folder's config."""
    arch = Architecture.from_config(config["architecture"])
    with work_dir("zoo-reference-") as work:
        src = recorded_source(config, work, checkpoint)
        yield dict(arch=arch, num_classes=config["num_classes"], source=src.path, workdir=work,
                   head_norm_affine=config.get("head_norm_affine", True))


def pytorch_logits(config: dict, inputs: np.ndarray, *, checkpoint: str | Path | None = None) -> np.ndarray:
    """timm's logits on `inputs` (normalised NHWC) for a converted folder's source weights.

    Args:
        config: the folder's `config.json` content.
        inputs: the batch to classify.
        checkpoint: compare against this local source file instead of fetching the recorded one
            (it must still have the recorded sha256).

    Raises:
        SourceError: the source cannot be fetched (offline, no access).
        IntegrityError: the source is not the file the folder was converted from.
        ReferenceRunError: torch/timm missing or the reference process failed.
    """
    with _reference(config, checkpoint) as args:
        return reference_outputs(inputs=inputs, **args)["logits"]


def pytorch_classify(config: dict, files: list[Path], *, checkpoint: str | Path | None = None) -> np.ndarray:
    """timm's logits for image files, each prepared by timm's own eval transform.

    Raises:
        as `pytorch_logits`.
    """
    with _reference(config, checkpoint) as args:
        return reference_classify(files=files, pretrained_cfg=config["pretrained_cfg"], **args)
