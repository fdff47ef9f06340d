"""The PyTorch side of checks on a converted folder (exports, evaluation): its source framework on its
source weights.

Runs the source framework in its own process (as the parity gate does) on the recorded source weights,
fetched again and checked against the sha256 recorded at conversion.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from checkpoints.fs import work_dir
from zoo.folder_config import FolderConfig

from .pipeline import recorded_reference
from .reference_process import Network, reference_classify, reference_outputs


def pytorch_logits(config: FolderConfig, inputs: np.ndarray, *, checkpoint: str | Path | None = None) -> np.ndarray:
    """timm's logits on `inputs` (normalised NHWC) for a converted folder's source weights.

    Args:
        config: the folder's config.
        inputs: the batch to classify.
        checkpoint: compare against this local source file instead of fetching the recorded one
            (it must still have the recorded sha256).

    Raises:
        SourceError: the source cannot be fetched (offline, no access).
        IntegrityError: the source is not the file the folder was converted from.
        ReferenceRunError: torch/timm missing or the reference process failed.
    """
    with work_dir("zoo-source-") as work, recorded_reference(config, work, checkpoint) as (src, seed):
        return reference_outputs(Network.of_folder(config), src.path, inputs, random_seed=seed)["logits"]


def pytorch_classify(config: FolderConfig, files: list[Path], *, checkpoint: str | Path | None = None) -> np.ndarray:
    """timm's logits for image files, each prepared by timm's own eval transform.

    Raises:
        as `pytorch_logits`.
    """
    with work_dir("zoo-source-") as work, recorded_reference(config, work, checkpoint) as (src, seed):
        return reference_classify(Network.of_folder(config), src.path, files, config.pretrained_cfg, random_seed=seed)
