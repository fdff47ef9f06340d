"""Step 1 of a conversion: fetch the source checkpoint (a Hub repo, a release URL, a local file).

No torch and no tensorflow: this module also runs inside the PyTorch reference process.
Reading the file is `converters.reading`; its key layouts are `converters.layouts`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from checkpoints import hub
from checkpoints.fs import sha256_file
from checkpoints.hub import HF_SCHEME, parse_hf
from checkpoints.store import store_root
from zoo.core.errors import SourceError
from zoo.core.folder_config import SourceRecord

from .containers import (
    INDEX_SUFFIX,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    SHARD_NAME,
    files_sha256,
    is_index,
    parse_index,
    read_index,
)

log = logging.getLogger(__name__)

FALLBACK_FILENAME = "pytorch_model.bin"  # timm falls back to it when a repo has no safetensors


@dataclass(frozen=True)
class SourceWeights:
    """A source checkpoint on local disk and where it came from.

    Attributes:
        path: local file.
        sha256: hex digest of the file's bytes (None: not hashed yet; `reading.read_source`
            hashes it as it reads it).
        repo_id: Hub repo it was downloaded from (None for a local file).
        revision: Hub commit it was downloaded at (None for a local file).
        filename: file name inside the repo (or the local file name).
        url: the release URL it was downloaded from (None otherwise).
        layout: its key layout (`timm`, `fb`, `transformers`, `torchvision`), once read.
        state_key: the entry of a training checkpoint its weights were read from
            (`state_dict_ema`, ...; None: the file is the state dict), once read.
        prefix: the wrapper prefix every key carried (`module.`), removed when read.
        left: how many keys of another model its layout declares (`Layout.foreign`) were left out when read.
        files: a sharded checkpoint's files, its index (`path`) and every shard it lists, by name,
            each with its sha256; `sha256` is then theirs together (`files_sha256`). None: one file.
    """

    path: Path
    sha256: str | None
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    url: str | None = None
    layout: str | None = None
    state_key: str | None = None
    prefix: str = ""
    left: int = 0
    files: dict[str, str] | None = None

    def record(self, kind: str, **extra) -> SourceRecord:
        """What a converted folder records of these weights (`kind`: hub, url or file)."""
        return SourceRecord(
            kind,
            self.sha256,
            **{
                "repo_id": self.repo_id,
                "revision": self.revision,
                "filename": self.filename or self.path.name,
                "url": self.url,
                "layout": self.layout,
                "state_key": self.state_key,
                "prefix": self.prefix or None,
                "files": dict(self.files) if self.files else None,
                **extra,
            },
        )


def fetch(repo_id: str, filename: str = "model.safetensors", revision: str | None = None) -> SourceWeights:
    """Download (or find in the Hub cache) a source checkpoint.

    Uses huggingface_hub, so `HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_TOKEN`
    apply. Falls back as transformers does: `filename`, its sharded index, `pytorch_model.bin`,
    its sharded index; a sharded checkpoint is its index and every shard it lists, all at the
    index's commit. The Hub client does not check content, so each file is compared with the
    content address the cache stores it under (the Hub's ETag); a file that does not match is evicted.

    Raises:
        SourceError: the file cannot be had, or its bytes do not match their address.
    """
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    errors, offline = [], None
    for name in _hub_candidates(filename):
        try:
            local, digest = _download(repo_id, name, revision)
        except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: test it first
            offline = hub.offline_reason(e)
            continue
        except EntryNotFoundError:
            errors.append(f"{name} is not in the repo")
            continue
        commit = local.parent.name if re.fullmatch(r"[0-9a-f]{40}", local.parent.name) else revision
        if is_index(local):
            return _fetch_shards(repo_id, local, digest, commit)
        return SourceWeights(local, digest, repo_id, commit, name)
    if offline:
        raise SourceError(
            f"{repo_id}/{filename} is not in the local Hub cache and the Hub cannot be reached "
            f"({offline}); {hub.OFFLINE_REMEDY}"
        )
    raise SourceError(f"no weights in {repo_id}: " + "; ".join(errors))


def _hub_candidates(filename: str) -> list[str]:
    """The files `fetch` tries in turn, in transformers' order of preference."""
    names = [filename] if is_index(Path(filename)) else [filename, filename + INDEX_SUFFIX]
    return list(dict.fromkeys([*names, FALLBACK_FILENAME, FALLBACK_FILENAME + INDEX_SUFFIX]))


def _download(repo_id: str, name: str, revision: str | None) -> tuple[Path, str]:
    """One file of a Hub repo in the Hub cache, checked against its content address; and its sha256.

    Raises:
        EntryNotFoundError, LocalEntryNotFoundError: as huggingface_hub raises them (not in the
            repo; offline and not cached), for the caller to word.
        SourceError: any other download failure, or bytes that do not match their address.
    """
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        local = Path(hub.hf_download(repo_id, name, revision=revision))
    except EntryNotFoundError:  # and LocalEntryNotFoundError, its subclass
        raise
    except (HfHubHTTPError, *hub.http_errors()) as e:  # (a body cut short is no OSError)
        why = hub.not_found(repo_id, revision, e) or str(e).splitlines()[0]
        raise SourceError(f"cannot download {repo_id}/{name}: {why}") from None
    digest = sha256_file(local)
    if not hub.matches_cache_name(local, digest):
        hub.evict(local)
        raise SourceError(
            f"{repo_id}/{name} as downloaded does not match the id the Hub gave it "
            "(corrupted in transit or in the cache); it was discarded, retry"
        )
    return local, digest


def _fetch_shards(repo_id: str, index_path: Path, index_sha256: str, commit: str | None) -> SourceWeights:
    """A sharded checkpoint on the Hub: every shard its downloaded index lists, at the index's commit,
    into the same snapshot folder (so that each lies beside the index)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    index = parse_index(index_path, index_sha256)
    files = {index_path.name: index_sha256}
    for shard in index.shards:
        try:
            files[shard] = _download(repo_id, shard, commit)[1]
        except LocalEntryNotFoundError as e:
            raise SourceError(
                f"{repo_id}/{shard}, a shard {index_path.name} lists, is not in the local Hub cache and the Hub "
                f"cannot be reached ({hub.offline_reason(e)}); {hub.OFFLINE_REMEDY}"
            ) from None
        except EntryNotFoundError:
            raise SourceError(
                f"{repo_id}: {index_path.name} lists shard {shard}, which is not in the repo at "
                f"{commit or 'that revision'}; the repo's owner must upload every shard"
            ) from None
    return SourceWeights(index_path, files_sha256(files), repo_id, commit, index_path.name, files=files)


CONFIG_FILES = ("config.json", "preprocessor_config.json")  # read beside the weights (converters.metadata)


def fetch_repo(repo_id: str, revision: str | None = None, filename: str = "model.safetensors") -> SourceWeights:
    """A Hub repo's weights (`model.safetensors`, else `pytorch_model.bin`) with its config files
    beside them in the Hub cache, all at one commit.

    Raises:
        SourceError: as `fetch`; config files the repo does not have are skipped.
    """
    weights = fetch(repo_id, filename, revision=revision)
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    for name in CONFIG_FILES:
        try:
            hub.hf_download(repo_id, name, revision=weights.revision)
        except LocalEntryNotFoundError:  # offline and not cached: the conversion says what it used
            continue
        except EntryNotFoundError:
            continue
        except (HfHubHTTPError, *hub.http_errors()) as e:
            raise SourceError(f"cannot download {repo_id}/{name}: {str(e).splitlines()[0]}") from None
    return weights


def open_checkpoint(spec: str | Path, revision: str | None = None) -> SourceWeights:
    """A source given by the user: `hf://ORG/REPO[@REVISION]`, a folder, or a checkpoint file.

    Local files are hashed as they are read (`reading.read_source`); a sharded checkpoint's files
    also before, each (`local`).

    Raises:
        HubError: a malformed `hf://` path, or one naming another revision than `revision`.
        SourceError: as `fetch_repo` and `local`; a `revision` for a local file.
    """
    text = str(spec)
    if text.startswith(HF_SCHEME):
        return fetch_repo(*parse_hf(text, revision))
    if revision:
        raise SourceError("--revision goes with a Hub source (hf://ORG/REPO), not a local checkpoint")
    return local(spec, hashed=False)


def fetch_url(url: str, expected_sha256: str | None = None, timeout: float = 60.0) -> SourceWeights:
    """Download an original release file (FB's `.pth`/`.pt`) into the local store's source cache.

    The download goes to a temporary file, its length and (when known) sha256 are checked, and
    only then is it renamed into place; a cached copy is re-hashed before use.
    `HF_HUB_OFFLINE=1` allows the cache only.

    Raises:
        SourceError: offline and not cached, HTTP or network errors, short or corrupt download.
    """
    name = url.rsplit("/", 1)[-1]
    if not name.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise SourceError(f"{url}: not a checkpoint file URL")
    folder = store_root() / "sources" / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = folder / name
    if dest.is_file():
        digest = sha256_file(dest)
        if expected_sha256 in (None, digest):
            return SourceWeights(dest, digest, filename=name, url=url)
        log.warning("cached %s has sha256 %s, expected %s: downloading again", dest, digest, expected_sha256)
        dest.unlink()
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise SourceError(
            f"{url} is not in the source cache ({folder}) and HF_HUB_OFFLINE is set; pass --checkpoint PATH"
        )
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    digest, received = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
        if total is not None and received != total:
            raise SourceError(f"{url}: download ended after {received} of {total} bytes")
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise SourceError(f"{url}: sha256 {digest.hexdigest()} differs from the expected {expected_sha256}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise SourceError(f"cannot download {url}: {getattr(e, 'reason', None) or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return SourceWeights(dest, digest.hexdigest(), filename=name, url=url)


def local(path: str | Path, *, hashed: bool = True) -> SourceWeights:
    """A source checkpoint given as a local file or folder (`--checkpoint PATH`).

    A folder is a `save_pretrained` folder (transformers) or a timm Hub repo's files: its
    weights are `model.safetensors`, else its sharded index, else `pytorch_model.bin`, else its
    sharded index (transformers' order), else its only sharded index or checkpoint file; its
    `config.json` is read beside them (`converters.metadata`). A sharded checkpoint's index or any
    of its shards names the whole checkpoint (`checkpoint_in`).
    `hashed=False` leaves a file's sha256 to `reading.read_source`, which hashes the bytes as it
    reads them; a sharded checkpoint's files are hashed here either way (the record lists each).

    Raises:
        SourceError: no such file, no checkpoint in the folder, a type no reader takes, or a
            sharded checkpoint whose index is malformed or names a shard that is not beside it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise SourceError(f"checkpoint file not found: {path}")
    path = checkpoint_in(path)
    if is_index(path):
        # the folder resolved, not the index: a Hub snapshot's files are links to blobs elsewhere
        return sharded(path.parent.resolve() / path.name)
    if not path.name.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise SourceError(
            f"{path.name}: unsupported checkpoint type; expected .safetensors, .pth, .pt, .bin, .pth.tar, "
            ".ckpt or a sharded checkpoint's index (model.safetensors.index.json)"
        )
    return SourceWeights(path.resolve(), sha256_file(path) if hashed else None, filename=path.name)


# save_pretrained's and timm's files, sharded or not, in transformers' order of preference
WEIGHTS_FILENAMES = (
    "model.safetensors",
    "model.safetensors" + INDEX_SUFFIX,
    FALLBACK_FILENAME,
    FALLBACK_FILENAME + INDEX_SUFFIX,
)


def checkpoint_in(path: Path) -> Path:
    """The checkpoint file `path` names: a folder's weights file or sharded index (see `local`),
    the index of a shard (`model-00001-of-00003.safetensors`: `model.safetensors.index.json`), or `path`.

    Raises:
        SourceError: a folder with no or several candidates; a shard without its index beside it.
    """
    path = Path(path)
    if path.is_dir():
        return _weights_in(path)
    shard = SHARD_NAME.fullmatch(path.name)
    if shard is None or int(shard["count"]) < 2:
        return path
    index = path.with_name(shard["stem"] + shard["suffix"] + INDEX_SUFFIX)
    if not index.is_file():
        raise SourceError(
            f"{path.name} is one of {int(shard['count'])} shards of a checkpoint, whose index {index.name} is not "
            f"beside it; pass the folder holding the index and every shard"
        )
    if path.name not in parse_index(index).weight_map.values():
        raise SourceError(f"{path.name} is not one of the shards {index.name} beside it lists; pass that index")
    return index


def _weights_in(folder: Path) -> Path:
    for name in WEIGHTS_FILENAMES:
        if (folder / name).is_file():
            return folder / name
    indexes = sorted(p for p in folder.iterdir() if p.is_file() and is_index(p))
    if len(indexes) == 1:
        return indexes[0]
    if indexes:
        raise SourceError(
            f"{folder} holds {len(indexes)} sharded checkpoints' indexes ({', '.join(p.name for p in indexes[:5])}); "
            "pass the one to convert"
        )
    suffixes = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))
    if len(found) == 1:
        return found[0]
    if not found:
        raise SourceError(f"{folder} holds no checkpoint file (model.safetensors, pytorch_model.bin, .pth, ...)")
    if all(SHARD_NAME.fullmatch(p.name) for p in found):
        raise SourceError(
            f"{folder} holds {len(found)} shards of a checkpoint ({', '.join(p.name for p in found[:3])}, ...) "
            f"but not their index (model.safetensors{INDEX_SUFFIX}); copy it beside them"
        )
    raise SourceError(
        f"{folder} holds {len(found)} checkpoint files ({', '.join(p.name for p in found[:5])}); "
        "pass the one to convert"
    )


def sharded(path: Path) -> SourceWeights:
    """A sharded checkpoint at its index file, every file of it hashed (`SourceWeights.files`).

    Raises:
        SourceError: as `read_index`.
    """
    index = read_index(path)
    files = {path.name: index.sha256, **{name: sha256_file(index.shard(name)) for name in index.shards}}
    return SourceWeights(path, files_sha256(files), filename=path.name, files=files)


def source_sha256(path: Path) -> str:
    """The sha256 a source at `path` is recorded with: its bytes', or a sharded checkpoint's
    (`files_sha256`) at its index."""
    return sharded(path).sha256 if is_index(path) else sha256_file(path)
