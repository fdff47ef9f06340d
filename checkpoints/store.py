"""The converted-checkpoint folder: written whole or not at all, read only after its sha256s check.

A folder holds `model.weights.h5` (Keras weights), `config.json` (architecture, head,
preprocessing, provenance), `parity.json` (the parity report) and `manifest.json` (sha256 and
size of every other file). It is assembled in a temporary sibling folder and renamed into place.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from zoo.errors import IntegrityError, StoreError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writes stay atomic, concurrent ones may fail
    fcntl = None

FORMAT = "convnext-zoo/1"
WEIGHTS = "model.weights.h5"
CONFIG = "config.json"
PARITY = "parity.json"
MANIFEST = "manifest.json"
CONTENT_FILES = (WEIGHTS, CONFIG, PARITY)


def store_root() -> Path:
    """The local store: `$ZOO_HOME`, else `$XDG_CACHE_HOME/convnext-zoo`, else `~/.cache/convnext-zoo`."""
    if os.environ.get("ZOO_HOME"):
        return Path(os.environ["ZOO_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "convnext-zoo"


def store_path(name: str) -> Path:
    """Where the local store keeps the converted checkpoint `name` (canonical name)."""
    return store_root() / name


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace a JSON file whole (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        _fsync_file(path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_converted_folder(path: Path) -> bool:
    """A folder this store wrote (it has a manifest of our format)."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write(out: Path, model, config: dict, parity: dict) -> Path:
    """Write a converted checkpoint folder atomically, the weights being `model`'s.

    The folder appears complete or not at all; an existing converted folder at `out` is
    replaced, anything else there is refused.

    Args:
        out: destination folder.
        model: the Keras model holding the weights.
        config: `config.json` content (without the weights digest, added here).
        parity: the passing parity report as JSON (the weights digest is added here, binding
            the report to exactly these bytes).

    Raises:
        StoreError: `out` holds something else, or it cannot be written.
    """
    with writing(out, model) as folder:
        folder.save_weights(model)
        folder.commit(config, parity)
    return folder.out


@contextlib.contextmanager
def writing(out: str | Path, model) -> Iterator["FolderWriter"]:
    """A converted folder being written in a temporary sibling of `out`, for the block.

    The weights file is written first (`save_weights`) and can be read back (`weights`)
    before the rest; `commit` finishes the folder and puts it at `out`. A block left without
    `commit`, by an error or not, removes the temporary folder: nothing appears at `out`.

    Args:
        out: destination folder (`check_destination`).
        model: the Keras model whose weights the folder takes (sizes the space check).

    Raises:
        StoreError: `out` holds something else, the disk is too full, or the temporary
            folder cannot be made.
    """
    out = check_destination(out)
    check_space(out, model)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out.parent, f".{out.name}.partial-")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the store is an ordinary folder
    except OSError as e:
        raise StoreError(f"cannot write to {out.parent}: {_reason(e, out.parent)}") from None
    folder = FolderWriter(out, tmp)
    try:
        yield folder
    finally:
        if not folder.committed:
            shutil.rmtree(tmp, ignore_errors=True)


class FolderWriter:
    """A folder under construction (see `writing`)."""

    def __init__(self, out: Path, tmp: Path):
        self.out, self.tmp, self.committed = out, tmp, False

    @property
    def weights(self) -> Path:
        """The weights file, once `save_weights` has written it."""
        return self.tmp / WEIGHTS

    def save_weights(self, model, values: dict[int, Callable[[], Any]] | None = None) -> None:
        """Write the weights file: `model`'s weights, or `values` in their place.

        `values` maps `id(variable)` of every variable of `model` to a function returning its
        value (`converters.mapping.values`): the file is then written straight from them, and
        `model`'s variables are neither read nor changed (where this Keras' saving code allows
        it; otherwise they are assigned the values first).
        """
        with self._translated():
            _write_weights(self.weights, model, values)

    def commit(self, config: dict, parity: dict) -> None:
        """Write the other files, flush everything to disk, and put the folder at `out`."""
        with self._translated():
            _assemble(self.tmp, config, parity)
            _swap_into_place(self.tmp, self.out)
        self.committed = True

    @contextlib.contextmanager
    def _translated(self):
        try:
            yield
        except OSError as e:
            _release_failed_weights(self.weights, e)
            raise StoreError(f"cannot write {self.out}: {_reason(e, self.out.parent)}") from None


def _write_weights(path: Path, model, values: dict[int, Callable[[], Any]] | None = None) -> None:
    """`model.save_weights(path)`, or the same file holding `values` (see `FolderWriter.save_weights`)."""
    if values is not None and not _write_values(path, model, values):
        for variable in model.weights:  # this Keras saves otherwise: through the variables
            variable.assign(values[id(variable)]())
        values = None
    if values is None:
        model.save_weights(path)


def _write_values(path: Path, model, values: dict[int, Callable[[], Any]]) -> bool:
    """Write `values` in the layout `model.save_weights` gives, by Keras' own saving code.

    Keras walks the model and hands each variable to its weights store, which converts it to
    numpy and writes it; a store that writes the variable's value from `values` instead gives
    the same file without the copies into and out of the variables (for convnext_large
    0.9 s of assignments and 0.5 s of read-back). False, with `path` removed, where this
    Keras' saving code is not shaped so (a store that is never handed a variable).
    """
    try:
        from keras.src.saving import saving_lib

        save_state, base = saving_lib._save_state, saving_lib.H5IOStore
    except (ImportError, AttributeError):
        return False
    pending = dict(values)

    class ValueStore(base):
        def __setitem__(self, key, variable):
            value = pending.pop(id(variable), None)  # other state (none in ConvNeXt) is saved as is
            super().__setitem__(key, variable if value is None else value())

    store = ValueStore(path, mode="w")
    try:
        save_state(model, store, None, "", set())
    finally:
        store.close()
    if pending:
        path.unlink()
        return False
    return True


def _assemble(tmp: Path, config: dict, parity: dict) -> None:
    """Write the folder's other files beside its weights and flush them all to disk."""
    with ThreadPoolExecutor(1) as pool:
        flushed = pool.submit(_fsync_file, tmp / WEIGHTS)  # the disk writes while the weights are hashed
        weights_sha = sha256_file(tmp / WEIGHTS)
        flushed.result()
    _write_json(tmp / CONFIG, {**config, "format": FORMAT, "weights": {"file": WEIGHTS, "sha256": weights_sha}})
    _write_json(tmp / PARITY, {**parity, "weights_sha256": weights_sha})
    files = {name: {"sha256": weights_sha if name == WEIGHTS else sha256_file(tmp / name),
                    "size": (tmp / name).stat().st_size}
             for name in CONTENT_FILES}  # the weights are hashed once (0.6 s for convnext_large)
    _write_json(tmp / MANIFEST, {"format": FORMAT, "files": files})
    _fsync_tree(tmp)


def check_destination(out: str | Path) -> Path:
    """Refuse, before any slow work, a destination `write` would refuse or fail to write.

    `out` must be free, an empty folder or a converted folder, and the folder it goes in must
    take new entries. Returns `out` as an absolute path.

    Raises:
        StoreError: naming the path and the reason, in one line.
    """
    out = Path(out).expanduser().absolute()
    try:
        taken = out.exists() and not (out.is_dir() and (is_converted_folder(out) or not any(out.iterdir())))
    except OSError as e:
        raise StoreError(f"cannot write {out}: {_reason(e, out.parent)}") from None
    if taken:
        raise StoreError(f"{out} exists and is not a converted checkpoint folder; choose another --out")
    check_writable(out.parent)
    return out


def check_writable(folder: str | Path) -> None:
    """Check that `folder` (existing, or to be created) can take new entries.

    Probed by creating and removing an empty folder in the nearest existing folder on the
    way: permission bits do not stop root, and read-only mounts, quotas or ACLs only show
    when tried.

    Raises:
        StoreError: naming the folder and the reason, in one line.
    """
    folder = Path(folder).expanduser().absolute()
    try:
        existing = _nearest(folder)
        if not existing.is_dir():
            raise StoreError(f"cannot write to {folder}: {existing} is a file, not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=f".zoo-probe-{os.getpid()}-", dir=existing))
    except OSError as e:
        raise StoreError(f"cannot write to {folder}: {_reason(e, folder)}") from None


def check_space(out: str | Path, model) -> None:
    """Refuse to start writing `model`'s folder at `out` where its disk has too little room.

    The weights file is about the size of the weights plus HDF5's per-array overhead; the
    previous folder, if any, stays until the new one is whole, so it frees nothing.

    Raises:
        StoreError: with the space needed and free, in one line.
    """
    out = Path(out).expanduser().absolute()
    needed = sum(_nbytes(v) + 4096 for v in model.weights) + (1 << 20)
    free = _free_bytes(out.parent)
    if free is not None and free < needed:
        raise StoreError(f"cannot write {out}: no space left on the disk holding {_nearest(out.parent)} "
                         f"(about {_mb(needed)} needed, {_mb(free)} free); free some space or choose another --out")


def _nbytes(variable) -> int:
    import numpy as np

    return int(np.prod(variable.shape)) * np.dtype(variable.dtype).itemsize


def _nearest(path: Path) -> Path:
    """`path`, or the nearest existing folder above it."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(_nearest(path)).free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _reason(error: OSError, where: Path, remedy: str = "free some space or choose another --out") -> str:
    """One line saying why a write under `where` failed (h5py's messages span lines)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(where)
        return (f"no space left on the disk holding {_nearest(where)}"
                + (f" ({_mb(free)} free)" if free is not None else "") + f"; {remedy}")
    text = error.strerror or str(error) or type(error).__name__
    return text.strip().splitlines()[0]


def _release_failed_weights(path: Path, error: OSError) -> None:
    """Let go of a weights file whose writing failed, so that the process can still exit cleanly.

    HDF5 keeps a file it could not write open and flushes it again at exit, where a full
    disk makes the interpreter crash (SIGSEGV) after the error was reported. Its descriptor
    is pointed at /dev/null, so that last flush goes nowhere (Linux); the exception's frames
    are released with the unraisable-exception reports they cause silenced (the same error,
    already reported).
    """
    fds = Path("/proc/self/fd")
    if fds.is_dir():
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd in fds.iterdir():
                with contextlib.suppress(OSError, ValueError):
                    if os.readlink(fd) == str(path):
                        os.dup2(null, int(fd.name))
        finally:
            os.close(null)
    hook, sys.unraisablehook = sys.unraisablehook, lambda *_: None
    try:
        error.__traceback__ = None
        gc.collect()
    finally:
        sys.unraisablehook = hook


@contextlib.contextmanager
def _locked(out: Path):
    """Serialise the final step of writers in one folder across processes.

    The lock is the parent directory itself: no lock file is left behind, and the step it
    guards (renames) takes microseconds.
    """
    if fcntl is None:
        yield
        return
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing a previous one.

    Readers see the previous folder or the new one, never neither: the two are exchanged in
    one step where the system allows (else the old one moves aside just before).
    """
    with _locked(out):
        if not out.exists():
            os.replace(tmp, out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def work_dir(prefix: str):
    """A temporary folder `<prefix><pid>-<random>` in $TMPDIR, removed when the block ends.

    SIGKILL runs no clean-up, so the owner's process id is in the name: each new one removes
    the folders of `prefix` whose process is gone, and never a live process's.

    Raises:
        StoreError: the folder cannot be created (full or read-only $TMPDIR), in one line.
    """
    parent = Path(tempfile.gettempdir()).absolute()
    _remove_stale(parent, prefix)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    except OSError as e:
        reason = _reason(e, parent, remedy="free some space there or set TMPDIR to another folder")
        raise StoreError(f"cannot create a temporary folder in {parent} ($TMPDIR): {reason}") from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale(parent: Path, prefix: str) -> None:
    """Remove `<prefix><pid>-*` entries of `parent` whose process is gone (killed mid-way).

    Names without a process id (older versions, other tools) are left alone: nobody can
    tell whether their owner still runs.
    """
    for path in parent.glob(f"{glob.escape(prefix)}*"):
        pid, sep, _ = path.name[len(prefix):].partition("-")
        if sep and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """A converted folder whose files matched their manifest when opened."""

    path: Path
    config: dict
    parity: dict
    manifest: bytes  # the manifest the files were checked against, as read

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def files(self) -> dict:
        """The manifest's {file name: {"sha256", "size"}}."""
        return json.loads(self.manifest)["files"]


_READ_ATTEMPTS = 5


def open_folder(path: str | Path) -> ConvertedCheckpoint:
    """Open a converted folder after checking every file against the manifest.

    A writer may swap a new version in while the files are read, so that the manifest is the
    old one's and a file the new one's; a check that fails while the folder at `path` changed
    is therefore made again on what is there now, rather than reported.

    Raises:
        StoreError: not a converted folder, or files missing.
        IntegrityError: a file's sha256 or size differs from the manifest.
    """
    path = Path(path).expanduser()
    for _ in range(_READ_ATTEMPTS - 1):
        before = _identity(path)
        try:
            return _open_once(path)
        except (StoreError, IntegrityError, OSError):
            if _identity(path) == before:
                raise
    return _open_once(path)


def _identity(path: Path) -> tuple | None:
    """What tells one version of a folder from the next: a swapped-in folder is another inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _open_once(path: Path) -> ConvertedCheckpoint:
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
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path / MANIFEST} is not a manifest (a JSON object)")
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    listed = manifest.get("files", {})
    if sorted(listed) != sorted(CONTENT_FILES):
        raise IntegrityError(f"{path / MANIFEST} lists {sorted(listed)}, expected {sorted(CONTENT_FILES)}")
    for name, meta in listed.items():
        file = path / name
        if not file.is_file():
            raise StoreError(f"{path} is incomplete: {name} is missing")
        if file.stat().st_size != meta["size"] or sha256_file(file) != meta["sha256"]:
            raise IntegrityError(f"{file} does not match its manifest sha256: the file was modified "
                                 f"or corrupted; convert again")
    config = json.loads((path / CONFIG).read_text())
    parity = json.loads((path / PARITY).read_text())
    if config.get("weights", {}).get("sha256") != listed[WEIGHTS]["sha256"]:
        raise IntegrityError(f"{path / CONFIG} names other weights than {WEIGHTS}")
    return ConvertedCheckpoint(path, config, parity, raw)
