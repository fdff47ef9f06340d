"""Converted folders written straight from a Keras model, without a conversion: the store's writer
(`checkpoints.store.writing`) as a conversion drives it, with the model's own weights."""

from __future__ import annotations

from pathlib import Path

from checkpoints import store
from zoo.core.folder_config import FolderConfig


def write_converted(out: str | Path, model, config: FolderConfig, parity: dict) -> Path:
    """Write a converted checkpoint folder atomically, the weights being `model`'s.

    The folder appears complete or not at all; an existing converted folder at `out` is
    replaced (its own files only), anything else there is refused (`store.check_destination`).

    Args:
        out: destination folder.
        model: the Keras model holding the weights.
        config: the folder's record (the weights digest is added).
        parity: the parity report as JSON (the weights digest is added).

    Raises:
        StoreError: `out` holds something else, or it cannot be written.
    """
    with store.writing(out, model) as folder:
        folder.save_model(model, config.name)
        folder.commit(config, parity)
    return folder.out
