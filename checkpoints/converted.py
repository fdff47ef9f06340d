"""The converted-checkpoint folder on disk: how it is assembled, and how it is opened (every file
checked against the manifest first).

A folder is a Keras model folder: `config.json` (the serialized Keras model), `metadata.json` and
`model.weights.h5` (the weights) as Keras' own directory save writes them. Beside them:
`convnext_zoo.json` (architecture, head, preprocessing, provenance:
`zoo.core.folder_config.FolderConfig`), `parity.json` (the parity report) and `manifest.json` (sha256
and size of every other file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from zoo.core.errors import IntegrityError, StoreError
from zoo.core.folder_config import (
    CONTENT_FILES,
    FORMAT,
    MANIFEST,
    OLD_FORMATS,
    PARITY,
    RECORD,
    WEIGHTS,
    FolderConfig,
)

from .fs import fsync_file, fsync_tree, sha256_file, write_json


@dataclass(frozen=True)
class ConvertedFolder:
    """A converted folder whose files matched their manifest when opened."""

    path: Path
    config: FolderConfig
    parity: dict
    manifest: bytes  # the manifest the files were checked against, as read

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def files(self) -> dict:
        """The manifest's {file name: {"sha256", "size"}}."""
        return json.loads(self.manifest)["files"]


def listed_files(manifest, where: str | Path, remedy: str = "convert it again") -> dict:
    """The files a manifest lists, `{name: {"sha256", "size"}}`, if it is the manifest of a converted
    folder of this format: every file of one listed, each with its sha256 and size.

    Args:
        manifest: the manifest as JSON reads it.
        where: the folder (or published repo) it describes, for the messages.
        remedy: how to replace a folder of an earlier format.

    Raises:
        StoreError: of an earlier or an unknown format.
        IntegrityError: not a manifest of a converted folder's files.
    """
    at = f"{where}/{MANIFEST}"
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{at} is not a manifest (a JSON object)")
    if manifest.get("format") in OLD_FORMATS:
        raise StoreError(
            f"{where} was written by an earlier convnext-zoo (format {manifest['format']}, which "
            f"Keras cannot load by itself); {remedy}"
        )
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{where}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    listed = manifest.get("files", {})
    if not isinstance(listed, dict):
        raise IntegrityError(f"{at}: its files must be an object of file name -> sha256 and size")
    if sorted(listed) != sorted(CONTENT_FILES):
        raise IntegrityError(f"{at} lists {sorted(listed)}, expected {sorted(CONTENT_FILES)}")
    for name, meta in listed.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and _is_size(meta.get("size"))):
            raise IntegrityError(f"{at}: {name} needs its sha256 (a string) and size (a whole number)")
    return listed


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_converted_folder(path: Path) -> bool:
    """A folder of this format (it has a manifest of our format)."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def own_entries(path: Path) -> frozenset[str]:
    """The names a converted folder's own files may have: its manifest and the files it lists
    (of the names a folder of this format has; a manifest cannot claim other names).

    Raises:
        OSError, ValueError: the manifest cannot be read.
    """
    manifest = json.loads((path / MANIFEST).read_text())
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    return frozenset(name for name in CONTENT_FILES if isinstance(listed, dict) and name in listed) | {MANIFEST}


def unlisted_entries(path: Path) -> list[str]:
    """The entries of the converted folder at `path` that are not its own files: names its
    manifest does not list, and folders under a listed name (shown with a trailing `/`).

    Raises:
        OSError, ValueError: the folder or its manifest cannot be read.
    """
    return _unlisted(path, own_entries(path))


def _unlisted(path: Path, own: Collection[str]) -> list[str]:
    def folder(entry: Path) -> bool:
        return entry.is_dir() and not entry.is_symlink()

    return sorted(
        entry.name + ("/" if folder(entry) else "")
        for entry in path.iterdir()
        if entry.name not in own or folder(entry)
    )


def assemble(folder: Path, config: FolderConfig, parity: dict) -> None:
    """Write a folder's other files beside its Keras files and flush them all to disk.

    The weights' sha256 goes into the record and the parity report (binding both to exactly
    these bytes) and into the manifest, which lists every other file.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        flushed = pool.submit(fsync_file, folder / WEIGHTS)  # the disk writes while the weights are hashed
        weights_sha = sha256_file(folder / WEIGHTS)
        flushed.result()
    write_json(folder / RECORD, config.with_weights(weights_sha).to_json())
    write_json(folder / PARITY, {**parity, "weights_sha256": weights_sha})
    files = {
        name: {
            "sha256": weights_sha if name == WEIGHTS else sha256_file(folder / name),
            "size": (folder / name).stat().st_size,
        }
        for name in CONTENT_FILES
    }  # the weights are hashed once (0.6 s for convnext_large)
    write_json(folder / MANIFEST, {"format": FORMAT, "files": files})
    fsync_tree(folder)


_READ_ATTEMPTS = 5


def open_folder(path: str | Path, *, others_allowed: bool = False) -> ConvertedFolder:
    """Open a converted folder after checking every file against the manifest.

    A writer may swap a new version in while the files are read, so that the manifest is the
    old one's and a file the new one's; a check that fails while the folder at `path` changed
    is therefore made again on what is there now, rather than reported.

    Args:
        path: the folder.
        others_allowed: accept entries the manifest does not list (a Hub snapshot folder also
            holds the repo's other files: its card); a folder on disk holds its files only.

    Raises:
        StoreError: not a converted folder, or files missing.
        IntegrityError: a file's sha256 or size differs from the manifest, the folder holds
            entries its manifest does not list, or the config cannot be read.
    """
    path = Path(path).expanduser()
    for _ in range(_READ_ATTEMPTS - 1):
        before = _identity(path)
        try:
            return _open_once(path, others_allowed)
        except (StoreError, IntegrityError, OSError):
            if _identity(path) == before:
                raise
    return _open_once(path, others_allowed)


def _identity(path: Path) -> tuple | None:
    """What tells one version of a folder from the next: a swapped-in folder is another inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _open_once(path: Path, others_allowed: bool) -> ConvertedFolder:
    """One reading of the folder and its checks (see `open_folder`)."""
    if not path.is_dir():
        raise StoreError(f"{path} is not a folder")
    try:
        raw = (path / MANIFEST).read_bytes()
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise StoreError(f"{path} has no {MANIFEST}: not a converted checkpoint folder") from None
    except ValueError as e:
        raise IntegrityError(f"{path / MANIFEST} is not valid JSON: {e}") from None
    listed = listed_files(manifest, path)
    if not others_allowed and (unlisted := _unlisted(path, {*CONTENT_FILES, MANIFEST})):
        raise IntegrityError(
            f"{path} holds {', '.join(map(repr, unlisted))}, which its {MANIFEST} does not list: "
            "a converted folder holds its listed files only; move the others out of it"
        )
    for name, meta in listed.items():
        file = path / name
        if not file.is_file():
            raise StoreError(f"{path} is incomplete: {name} is missing")
        if file.stat().st_size != meta["size"] or sha256_file(file) != meta["sha256"]:
            raise IntegrityError(
                f"{file} does not match its manifest sha256: the file was modified or corrupted; convert again"
            )
    try:
        config = FolderConfig.read(path)
    except ValueError as e:
        raise IntegrityError(f"{path / RECORD} is not a converted folder's record ({e}); convert again") from None
    parity = json.loads((path / PARITY).read_text())
    if config.weights_sha256 != listed[WEIGHTS]["sha256"]:
        raise IntegrityError(f"{path / RECORD} names other weights than {WEIGHTS}")
    return ConvertedFolder(path, config, parity, raw)
