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
import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
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
    """Write a converted checkpoint folder atomically.

    The folder appears complete or not at all; an existing converted folder at `out` is
    replaced, anything else there is refused.

    Args:
        out: destination folder.
        model: the Keras model holding the ported weights.
        config: `config.json` content (without the weights digest, added here).
        parity: the passing parity report as JSON (the weights digest is added here, binding
            the report to exactly these bytes).

    Raises:
        StoreError: `out` holds something else, or it cannot be written.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not (out.is_dir() and (is_converted_folder(out) or not any(out.iterdir()))):
        raise StoreError(f"{out} exists and is not a converted checkpoint folder; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the store is an ordinary folder
    except OSError as e:
        raise StoreError(f"cannot write to {out.parent}: {e.strerror or e}") from None
    try:
        model.save_weights(tmp / WEIGHTS)
        weights_sha = sha256_file(tmp / WEIGHTS)
        _write_json(tmp / CONFIG, {**config, "format": FORMAT, "weights": {"file": WEIGHTS, "sha256": weights_sha}})
        _write_json(tmp / PARITY, {**parity, "weights_sha256": weights_sha})
        files = {name: {"sha256": sha256_file(tmp / name), "size": (tmp / name).stat().st_size}
                 for name in CONTENT_FILES}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "files": files})
        _fsync_tree(tmp)
        _swap_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise StoreError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    return out


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


def _remove_stale_partials(out: Path) -> None:
    """Remove what writers of `out` killed mid-way left behind (their process is gone)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = path.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
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

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS


def open_folder(path: str | Path) -> ConvertedCheckpoint:
    """Open a converted folder after checking every file against the manifest.

    Raises:
        StoreError: not a converted folder, or files missing.
        IntegrityError: a file's sha256 or size differs from the manifest.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise StoreError(f"{path} is not a folder")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} has no {MANIFEST}: not a converted checkpoint folder") from None
    except ValueError as e:
        raise IntegrityError(f"{path / MANIFEST} is not valid JSON: {e}") from None
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
    return ConvertedCheckpoint(path, config, parity)
