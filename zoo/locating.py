"""Where a converted model's folder is: a path, a published repo (`hf://ORG/NAME`), or a
catalogue name looked up in the local store, then on the Hub, then converted. Nothing here
imports Keras, so preprocessing for a published repo stays free of TensorFlow (`zoo.preprocessing`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from checkpoints import hub, store
from checkpoints.converted import ConvertedFolder, open_folder

from .core.catalogue import resolve
from .core.errors import HubError, StoreError, ZooError
from .core.runtime import installed

log = logging.getLogger(__name__)


def locate(
    name_or_path: str | Path, *, revision: str | None = None, hub_org: str | None = None, convert: bool = True
) -> ConvertedFolder:
    """The verified converted folder `load` would build from (same lookup, same errors)."""
    if str(name_or_path).startswith(hub.HF_SCHEME):
        return hub.download(*hub.parse_hf(str(name_or_path), revision))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return open_folder(path)
    if path.suffix == ".keras" and path.is_file():
        raise StoreError(
            f"{name_or_path} is a whole saved Keras model, not a converted folder: "
            "`import zoo` (it registers the layers), then keras.saving.load_model(path)"
        )
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

        log.warning("%s: not in the store nor on the Hub; converting from %s", ckpt.name, ckpt.hf_hub_id or ckpt.url)
        try:
            path, _ = run(ckpt.name, out=where)
            return open_folder(path)
        except ZooError as e:
            tried.append(f"conversion: {str(e).splitlines()[0]}")
    else:
        tried.append(
            "conversion: "
            + ("disabled" if not convert else "needs torch and timm (pip install 'convnext-zoo[convert]')")
        )
    raise StoreError(
        f"cannot load {ckpt.name}: "
        + "; ".join(tried)
        + f". Run `zoo convert {ckpt.name}` where the source weights are reachable."
    )


__all__ = ["locate"]
