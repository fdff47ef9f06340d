"""Where a converted model's folder is: a path, a published repo (`hf://ORG/NAME`), or a
catalogue name looked up in the local store, then on the Hub, then converted. Nothing here
imports Keras, so preprocessing for a published repo stays free of TensorFlow.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from checkpoints import hub, store
from checkpoints.converted import ConvertedFolder, open_folder

from . import preprocessing
from .catalogue import resolve
from .errors import HubError, StoreError, ZooError
from .runtime import installed

log = logging.getLogger(__name__)

HF_PREFIX = "hf://"


def locate(name_or_path: str | Path, *, revision: str | None = None, hub_org: str | None = None,
           convert: bool = True) -> ConvertedFolder:
    """The verified converted folder `load` would build from (same lookup, same errors)."""
    if str(name_or_path).startswith(HF_PREFIX):
        repo_id, revision = parse_hub_path(str(name_or_path), revision)
        return hub.download(repo_id, revision=revision)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return open_folder(path)
    if path.suffix == ".keras" and path.is_file():
        raise StoreError(f"{name_or_path} is a whole saved Keras model, not a converted folder: "
                         "`import zoo` (it registers the layers), then keras.saving.load_model(path)")
    if path.suffix in (".h5", ".keras") or "/" in str(name_or_path):
        raise StoreError(f"{name_or_path}: no such converted checkpoint folder")
    ckpt = resolve(str(name_or_path), or_folder=True)
    return _find(ckpt, revision, hub_org, convert)


def _find(ckpt, revision, hub_org, convert) -> ConvertedFolder:
    tried = []
    where = store.store_path(ckpt.name)
    if where.is_dir():
        return open_folder(where)  # a damaged store copy is an error, not a fallback
    tried.append(f"local store: no {where}")
    repo_id = hub.repo_id_for(ckpt.name, hub_org)
    try:
        return hub.download(repo_id, revision=revision)
    except HubError as e:
        tried.append(f"Hub: {e}")
    if convert and installed("torch") and installed("timm"):
        from converters.pipeline import convert as run

        log.warning("%s: not in the store nor on the Hub; converting from %s", ckpt.name,
                    ckpt.hf_hub_id or ckpt.url)
        try:
            path, _ = run(ckpt.name, out=where)
            return open_folder(path)
        except ZooError as e:
            tried.append(f"conversion: {str(e).splitlines()[0]}")
    else:
        tried.append("conversion: " + ("disabled" if not convert else
                                       "needs torch and timm (pip install 'convnext-zoo[convert]')"))
    raise StoreError(f"cannot load {ckpt.name}: " + "; ".join(tried) +
                     f". Run `zoo convert {ckpt.name}` where the source weights are reachable.")


def parse_hub_path(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """(repo id, revision) of `hf://ORG/NAME[@REVISION]`; `revision` is the one asked for otherwise.

    Raises:
        HubError: not of that form, or two different revisions asked for.
    """
    repo_id, _, pinned = spec[len(HF_PREFIX):].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"{spec}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
    if pinned and revision and pinned != revision:
        raise HubError(f"{spec} names revision {pinned!r}, but revision={revision!r} was given")
    return repo_id, pinned or revision


def preprocess(images, name) -> np.ndarray:
    """Images -> the normalised float32 NHWC batch a model expects (timm's eval transform).

    Args:
        images: one or a list of file paths, PIL images or uint8 HWC arrays (any sizes), or a
            uint8 NHWC batch.
        name: a checkpoint name or alias, a `CatalogueEntry`, a `Preprocessing`, a converted
            folder, or a published repo `hf://ORG/NAME[@REVISION]` (its folder is fetched into
            the Hub cache and checked, as by `load`; TensorFlow is not imported).

    Returns:
        float32 array `(N, H, W, 3)` equal to timm's `create_transform` output (NCHW there).

    Raises:
        ImageError: unreadable file, or an array of the wrong shape or dtype.
        UnknownModelError: `name` is not a catalogue name.
        HubError: the published repo cannot be fetched.
    """
    if isinstance(name, str) and name.startswith(HF_PREFIX):
        name = locate(name).config
    return preprocessing.preprocess(images, name)


__all__ = ["locate", "parse_hub_path", "preprocess"]
