"""The local store of converted folders, and how a converted folder is written: whole or not at all.

A folder is assembled in a staging sibling of its destination (`fs.staging`) and swapped into
place under a lock; its format is `checkpoints.converted`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from zoo.core.errors import StoreError
from zoo.core.folder_config import MANIFEST, WEIGHTS, FolderConfig, check_name

from . import fs
from .converted import assemble, is_converted_folder, own_entries, unlisted_entries
from .weights import Values, load_keras_folder, release_failed, size_estimate, write_keras_files, write_weights


def store_root() -> Path:
    """The local store: `$ZOO_HOME`, else `$XDG_CACHE_HOME/convnext-zoo`, else `~/.cache/convnext-zoo`."""
    if os.environ.get("ZOO_HOME"):
        return Path(os.environ["ZOO_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "convnext-zoo"


def store_path(name: str) -> Path:
    """Where the local store keeps the converted checkpoint `name` (canonical name).

    Raises:
        InvalidNameError: `name` is not one folder name (`zoo.core.folder_config.check_name`).
    """
    return store_root() / check_name(name)


@contextlib.contextmanager
def writing(out: str | Path, model) -> Iterator[FolderWriter]:
    """A converted folder being written in a staging sibling of `out`, for the block.

    The Keras files are written first (`save_model`) and can be loaded back (`load_model`)
    before the rest; `commit` finishes the folder and puts it at `out`. A block left without
    `commit`, by an error or not, removes the staging folder: nothing appears at `out`.

    Args:
        out: destination folder (`check_destination`).
        model: the Keras model whose weights the folder takes (sizes the space check; the
            previous folder, if any, stays until the new one is whole, so it frees nothing).

    Raises:
        StoreError: `out` holds something else, the disk is too full, or the staging
            folder cannot be made.
    """
    out = check_destination(out)
    fs.check_space(out, size_estimate(model))
    del model  # not held while the folder is written: the caller may let go of it once it is saved
    with fs.staging(out) as tmp:
        yield FolderWriter(out, tmp)


class FolderWriter:
    """A folder under construction (see `writing`)."""

    def __init__(self, out: Path, tmp: Path):
        self.out, self.tmp = out, tmp

    @property
    def weights(self) -> Path:
        """The weights file, once `save_model` has written it."""
        return self.tmp / WEIGHTS

    def save_model(self, model, name: str, values: Values | None = None) -> None:
        """Write the Keras model folder: the weights file (`model`'s weights, or `values` in their
        place, see `checkpoints.weights.write_weights`) and Keras' `config.json` and
        `metadata.json` for `model` named `name`."""
        with self._translated():
            write_weights(self.weights, model, values)
            write_keras_files(self.tmp, model, name)

    def load_model(self):
        """The model as `keras.saving.load_model` reads it from the files written (safe mode)."""
        return load_keras_folder(self.tmp)

    def commit(self, config: FolderConfig, parity: dict) -> None:
        """Write the other files, flush everything to disk, and put the folder at `out`."""
        with self._translated():
            assemble(self.tmp, config, parity)
            with fs.locked(self.out):
                owned = replaceable(self.out)  # again: another program may have changed it since
                fs.swap_into_place(self.tmp, self.out, owned)

    @contextlib.contextmanager
    def _translated(self):
        try:
            yield
        except OSError as e:
            release_failed(self.weights, e)
            raise StoreError(f"cannot write {self.out}: {fs.reason(e, self.out.parent)}") from None


def check_destination(out: str | Path) -> Path:
    """Refuse, before any slow work, a destination `writing` would refuse or fail to write.

    `out` must be free, an empty folder or a converted folder holding its own files only
    (`replaceable`), not inside a converted folder, and the folder it goes in must take new
    entries. A link at `out` is followed: the folder is written where it points, and the link
    stays. Returns `out` as an absolute path (where the link points, for a link).

    Raises:
        StoreError: naming the path and the reason, in one line.
    """
    out = _followed(Path(out).expanduser().absolute())
    replaceable(out)
    if is_converted_folder(out.parent):
        raise StoreError(
            f"{out} would be inside the converted folder {out.parent}, which holds the files its "
            f"{MANIFEST} lists only; choose another --out"
        )
    fs.check_writable(out.parent)
    return out


def _followed(out: Path) -> Path:
    """`out`, or where it points if it is a link (a dangling one too: the folder goes there)."""
    if not out.is_symlink():
        return out
    try:
        return out.resolve()
    except (OSError, RuntimeError) as e:  # a loop of links (RuntimeError before Python 3.13)
        raise StoreError(f"cannot write {out}: it is a link that leads nowhere ({e}); choose another --out") from None


def replaceable(out: Path) -> frozenset[str]:
    """The names of the entries a new folder at `out` may delete: none where `out` is free or an
    empty folder; a converted folder's own files (its manifest and the files it lists) where it
    is one that holds nothing else.

    Raises:
        StoreError: anything else is at `out` (refused, never deleted), in one line.
    """
    try:
        if not os.path.lexists(out):
            return frozenset()
        folder = out.is_dir() and not out.is_symlink()
        if folder and not any(out.iterdir()):
            return frozenset()
        if folder and is_converted_folder(out):
            extra = unlisted_entries(out)
            if extra:
                raise StoreError(
                    f"{out} is a converted folder but also holds {', '.join(map(repr, extra))}, which "
                    f"its {MANIFEST} does not list; nothing was changed: move them out of it or choose "
                    "another --out"
                )
            return own_entries(out)
    except OSError as e:
        raise StoreError(f"cannot write {out}: {fs.reason(e, out.parent)}") from None
    except ValueError:  # its manifest changed since it was read: what is there now is no converted folder
        pass
    raise StoreError(f"{out} exists and is not a converted checkpoint folder; choose another --out")
