"""File-system helpers of the store and the exports: hashes, atomic writes and swaps, staging
folders, locks, temporary work folders and the checks run before writing anything.

Everything here is written whole or not at all: new content is assembled in a staging sibling
of its destination (named with the writer's process id, so that the next writer removes what a
killed one left) and renamed into place under a lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

from zoo.core.errors import StoreError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writes stay atomic, concurrent ones may fail
    fcntl = None

log = logging.getLogger(__name__)

NO_SPACE_REMEDY = "free some space or choose another --out"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: dict, *, indent: int = 2, fsync: bool = False) -> None:
    """Write a JSON file (indented, newline-terminated), flushed to disk with `fsync`."""
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=indent) + "\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())


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


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_file(path)
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def ordinary(path: Path) -> None:
    """Give a file the permissions `open()` would have (0666 less the umask): some writers (safetensors)
    make theirs owner-only."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def nearest(path: Path) -> Path:
    """`path`, or the nearest existing folder above it."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(nearest(path)).free
    except OSError:
        return None


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def reason(error: OSError, where: Path, remedy: str = NO_SPACE_REMEDY) -> str:
    """One line saying why a write under `where` failed (h5py's messages span lines)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(where)
        return (
            f"no space left on the disk holding {nearest(where)}"
            + (f" ({megabytes(free)} free)" if free is not None else "")
            + f"; {remedy}"
        )
    text = error.strerror or str(error) or type(error).__name__
    return text.strip().splitlines()[0]


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
        existing = nearest(folder)
        if not existing.is_dir():
            raise StoreError(f"cannot write to {folder}: {existing} is a file, not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=f".zoo-probe-{os.getpid()}-", dir=existing))
    except OSError as e:
        raise StoreError(f"cannot write to {folder}: {reason(e, folder)}") from None


def check_space(out: str | Path, needed: int) -> None:
    """Refuse to start writing `needed` bytes at `out` where its disk has too little room.

    Raises:
        StoreError: with the space needed and free, in one line.
    """
    out = Path(out).expanduser().absolute()
    free = free_bytes(out.parent)
    if free is not None and free < needed:
        raise StoreError(
            f"cannot write {out}: no space left on the disk holding {nearest(out.parent)} "
            f"(about {megabytes(needed)} needed, {megabytes(free)} free); {NO_SPACE_REMEDY}"
        )


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A new empty folder `.<name>.partial-<pid>-*` beside `out`, removed when the block ends.

    What the block builds there is put at `out` by `swap_into_place` (the folder itself) or by
    renames out of it; whatever is left is removed. Staging folders of writers that were killed
    are removed first.

    Raises:
        StoreError: the folder cannot be made, in one line.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out.parent, f".{out.name}.partial-")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the store is an ordinary folder
    except OSError as e:
        raise StoreError(f"cannot write to {out.parent}: {reason(e, out.parent)}") from None
    try:
        yield tmp
    finally:
        remove(tmp)


@contextlib.contextmanager
def locked(out: Path):
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


def swap_into_place(new: Path, out: Path, owned: Collection[str] | None = None) -> None:
    """Put the finished folder `new` at `out`, replacing a previous one; call under `locked(out)`.

    Readers see the previous folder or the new one, never neither: the two are exchanged in
    one step where the system allows (else the old one moves aside just before).

    Args:
        new: the finished folder, a sibling of `out`.
        out: the destination: nothing, or a folder to replace.
        owned: the names of the previous folder's entries that may be deleted (the caller
            checked, under the lock, that there is nothing else); whatever else turns up there
            is kept (`_discard`). None: the previous folder is removed whole.
    """
    if not os.path.lexists(out):
        os.replace(new, out)
    elif _exchange(new, out):
        _discard(new, out, owned)  # `new` is now the previous folder
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "previous")
        os.replace(new, out)
        _discard(old / "previous", out, owned)
        remove(old)


def _discard(previous: Path, out: Path, owned: Collection[str] | None) -> None:
    """Delete the folder that was at `out`, but only its `owned` entries (all of it for None).

    What else is found there (put in by another program between the check and the swap) is
    never deleted: the folder is kept beside `out`, as `<name>.kept-*`, and a warning names it.
    """
    if owned is None or previous.is_symlink():  # a link goes, never what it points to
        remove(previous)
        return
    try:
        for name in owned:
            entry = previous / name
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
        os.rmdir(previous)
    except OSError:
        kept = Path(tempfile.mkdtemp(prefix=f"{out.name}.kept-", dir=out.parent))
        os.replace(previous, kept)  # onto the empty folder just made: a name nobody else holds
        log.warning("%s held entries that were not its own when it was replaced; they are kept in %s", out, kept)


def remove(path: Path) -> None:
    """Remove `path`, whatever it is: a folder and its content, a file, or a link (never what the
    link points to). What cannot be removed is left for a later run (`remove_stale`)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def work_dir(prefix: str):
    """A temporary folder `<prefix><pid>-<random>` in $TMPDIR, removed when the block ends.

    SIGKILL runs no clean-up, so the owner's process id is in the name: each new one removes
    the folders of `prefix` whose process is gone, and never a live process's.

    Raises:
        StoreError: the folder cannot be created (full or read-only $TMPDIR), in one line.
    """
    parent = Path(tempfile.gettempdir()).absolute()
    remove_stale(parent, prefix)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    except OSError as e:
        why = reason(e, parent, remedy="free some space there or set TMPDIR to another folder")
        raise StoreError(f"cannot create a temporary folder in {parent} ($TMPDIR): {why}") from None
    try:
        yield path
    finally:
        remove(path)


def remove_stale(parent: Path, prefix: str) -> None:
    """Remove `<prefix><pid>-*` entries of `parent` whose process is gone (killed mid-way).

    Names without a process id (older versions, other tools) are left alone: nobody can
    tell whether their owner still runs. An entry that is a link is removed as a link, never
    what it points to (a writer killed just after swapping out a destination that was a link
    leaves the link under its staging name).
    """
    for path in parent.glob(f"{glob.escape(prefix)}*"):
        pid, sep, _ = path.name[len(prefix) :].partition("-")
        if sep and pid.isdigit() and not _alive(int(pid)):
            remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
