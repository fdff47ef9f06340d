"""Step 1 of a conversion: fetch the source checkpoint and read it as a timm-keyed numpy dict.

Numpy and safetensors only: torch is imported solely to read `.pth/.pt/.bin` files, and
tensorflow never (this module also runs inside the PyTorch reference process).
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from checkpoints import hub
from checkpoints.store import sha256_file
from zoo.errors import SourceError

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
FALLBACK_FILENAME = "pytorch_model.bin"  # timm falls back to it when a repo has no safetensors


@dataclass(frozen=True)
class SourceFile:
    """A source checkpoint on local disk and where it came from.

    Attributes:
        path: local file.
        sha256: hex digest of the file's bytes (None: not hashed yet; `read_source` hashes it
            as it reads it).
        repo_id: Hub repo it was downloaded from (None for a local file).
        revision: Hub commit it was downloaded at (None for a local file).
        filename: file name inside the repo (or the local file name).
        url: the release URL it was downloaded from (None otherwise).
    """

    path: Path
    sha256: str | None
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    url: str | None = None

    def to_json(self) -> dict:
        out = {"repo_id": self.repo_id, "revision": self.revision,
               "filename": self.filename or self.path.name, "sha256": self.sha256}
        return {**out, "url": self.url} if self.url else out


def fetch(repo_id: str, filename: str = "model.safetensors", revision: str | None = None) -> SourceFile:
    """Download (or find in the Hub cache) a source checkpoint.

    Uses huggingface_hub, so `HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_TOKEN`
    apply. Falls back to `pytorch_model.bin` as timm does. The Hub client does not check
    content, so the file is compared with the content address the cache stores it under (the
    Hub's ETag); a file that does not match is evicted.

    Raises:
        SourceError: the file cannot be had, or its bytes do not match their address.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    candidates = [filename] + ([FALLBACK_FILENAME] if filename != FALLBACK_FILENAME else [])
    errors, offline = [], False
    for name in candidates:
        try:
            local = Path(hf_hub_download(repo_id, name, revision=revision))
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
            offline = True
            continue
        except EntryNotFoundError:
            errors.append(f"{name} is not in the repo")
            continue
        except (HfHubHTTPError, *hub.http_errors()) as e:  # (a body cut short is no OSError)
            why = hub.not_found(repo_id, revision, e) or str(e).splitlines()[0]
            raise SourceError(f"cannot download {repo_id}/{name}: {why}") from None
        digest = sha256_file(local)
        if not hub.matches_cache_name(local, digest):
            hub.evict(local)
            raise SourceError(f"{repo_id}/{name} as downloaded does not match the id the Hub gave it "
                              "(corrupted in transit or in the cache); it was discarded, retry")
        commit = local.parent.name if re.fullmatch(r"[0-9a-f]{40}", local.parent.name) else revision
        return SourceFile(local, digest, repo_id, commit, name)
    if offline:
        raise SourceError(
            f"{repo_id}/{filename} is not in the local Hub cache and the Hub cannot be reached "
            "(offline); run once with network access, or pass --checkpoint PATH"
        )
    raise SourceError(f"no weights in {repo_id}: " + "; ".join(errors))


def fetch_url(url: str, expected_sha256: str | None = None, timeout: float = 60.0) -> SourceFile:
    """Download an original release file (FB's `.pth`/`.pt`) into the local store's source cache.

    The download goes to a temporary file, its length and (when known) sha256 are checked, and
    only then is it renamed into place; a cached copy is re-hashed before use.
    `HF_HUB_OFFLINE=1` allows the cache only.

    Raises:
        SourceError: offline and not cached, HTTP or network errors, short or corrupt download.
    """
    import http.client
    import os
    import tempfile
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    from checkpoints.store import store_root

    name = url.rsplit("/", 1)[-1]
    if not name.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise SourceError(f"{url}: not a checkpoint file URL")
    folder = store_root() / "sources" / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = folder / name
    if dest.is_file():
        digest = sha256_file(dest)
        if expected_sha256 in (None, digest):
            return SourceFile(dest, digest, filename=name, url=url)
        log.warning("cached %s has sha256 %s, expected %s: downloading again", dest, digest, expected_sha256)
        dest.unlink()
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise SourceError(f"{url} is not in the source cache ({folder}) and HF_HUB_OFFLINE is set; "
                          "pass --checkpoint PATH")
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
    return SourceFile(dest, digest.hexdigest(), filename=name, url=url)


def local(path: str | Path, *, hashed: bool = True) -> SourceFile:
    """A source checkpoint given as a local file (`--checkpoint PATH`).

    `hashed=False` leaves its sha256 to `read_source`, which hashes the bytes as it reads them.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceError(f"checkpoint file not found: {path}")
    if not path.name.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise SourceError(
            f"{path.name}: unsupported checkpoint type; expected .safetensors, .pth, .pt or .bin"
        )
    return SourceFile(path.resolve(), sha256_file(path) if hashed else None, filename=path.name)


def read_source(src: SourceFile, conv_mlp: bool = False) -> tuple[dict[str, np.ndarray], SourceFile]:
    """`load_source`, hashing the file's bytes as they are read (one pass over the file).

    Returns:
        The timm-keyed state dict, and `src` with the sha256 of exactly the bytes it holds.

    Raises:
        SourceError: unreadable file, or one whose bytes differ from the sha256 `src` carries
            (the file changed after it was checked).
    """
    digest = hashlib.sha256()
    state = normalise_keys(read_state_dict(src.path, digest), conv_mlp=conv_mlp)
    if src.sha256 is not None and digest.hexdigest() != src.sha256:
        raise SourceError(f"{src.path} changed after it was checked (sha256 {digest.hexdigest()}, "
                          f"expected {src.sha256}); fetch it again")
    return state, replace(src, sha256=digest.hexdigest())


def read_state_dict(path: Path, digest=None) -> dict[str, np.ndarray]:
    """Read every tensor of a checkpoint file as float32 numpy, keys as stored.

    `.safetensors` is read without torch. `.pth/.pt/.bin` go through
    `torch.load(weights_only=True)`, which refuses pickled code.

    Args:
        path: the checkpoint file.
        digest: a `hashlib` object fed every byte of the file, as it is read.

    Raises:
        SourceError: unreadable file, or a non-float tensor where weights are expected.
    """
    path = Path(path)
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        raw = _read_safetensors(path, digest)
    elif path.name.endswith(PICKLE_SUFFIXES):
        if digest is not None:
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
        raw = _read_torch(path)
    else:
        raise SourceError(f"{path.name}: unsupported checkpoint type")
    return {key: _as_float32(key, value) for key, value in raw.items()}


# safetensors dtype -> numpy (little-endian, as the format stores them); BF16 is widened by hand
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                 "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def _read_safetensors(path: Path, digest=None) -> dict[str, np.ndarray]:
    """Read a safetensors file tensor by tensor, with plain reads, in file order.

    safetensors validates the header first (offsets, sizes, file length). The data is then
    read into arrays one tensor at a time: `safetensors.numpy.load_file` holds the whole file
    as bytes beside the arrays, and reading through its memory map counts the mapped file in
    the process's memory as well, either way twice the checkpoint at the peak. numpy has no
    bfloat16: those tensors are widened to float32 exactly (bfloat16 is the top half of a float32).
    `digest` is fed each tensor's bytes on another thread while the next one is read.
    """
    import json
    import struct
    from concurrent.futures import ThreadPoolExecutor

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise SourceError(f"{path.name} is not a readable safetensors file: {e}") from None
    out = {}
    with open(path, "rb") as f, ThreadPoolExecutor(1) as hasher:
        feed = (lambda data: hasher.submit(digest.update, data)) if digest is not None else (lambda data: None)
        prefix = f.read(8)
        (size,) = struct.unpack("<Q", prefix)
        raw_header = f.read(size)
        feed(prefix + raw_header)
        header = json.loads(raw_header)
        header.pop("__metadata__", None)
        for key, meta in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
            start, end = meta["data_offsets"]
            kind = meta["dtype"]
            if kind != "BF16" and kind not in _NUMPY_DTYPES:
                raise SourceError(f"tensor {key!r} has dtype {kind}; ConvNeXt weights are floats")
            array = np.empty(meta["shape"], dtype="<u2" if kind == "BF16" else _NUMPY_DTYPES[kind])
            if f.tell() != 8 + size + start:
                raise SourceError(f"{path.name}: tensor {key!r} does not follow the one before it")
            if f.readinto(memoryview(array).cast("B")) != end - start:
                raise SourceError(f"{path.name} changed while it was read (tensor {key!r} is short)")
            feed(array)
            out[key] = (array.astype(np.uint32) << 16).view(np.float32) if kind == "BF16" else array
        while rest := f.read(1 << 20):  # safetensors allows nothing after the data; hash what is there
            feed(rest)
    return out


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise SourceError(
            f"{path.name}: reading .pth/.pt/.bin needs torch (pip install 'convnext-zoo[convert]'), "
            "or convert the file to .safetensors"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise SourceError(f"{path.name} cannot be loaded safely (weights_only=True): {e}") from None
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"{path.name} does not hold a state dict of tensors")
    return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
            for k, v in obj.items()}


def _as_float32(key: str, value: np.ndarray) -> np.ndarray:
    # with ml_dtypes loaded (tensorflow loads it) numpy reads bfloat16 itself; not np.floating
    if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
        raise SourceError(f"tensor {key!r} has dtype {value.dtype}; ConvNeXt weights are floats")
    out = np.ascontiguousarray(value, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int(out.size - np.isfinite(out).sum())
        raise SourceError(f"tensor {key!r} has {bad} non-finite values (NaN/Inf) out of {out.size}: "
                          "the checkpoint is damaged")
    return out


_FB_RULES = [  # official FB layout -> timm's module paths (order matters)
    (re.compile(r"^downsample_layers\.0\."), "stem."),
    (re.compile(r"^downsample_layers\.(\d+)\."), r"stages.\1.downsample."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"\.dwconv\."), ".conv_dw."),
    (re.compile(r"\.pwconv(\d)\."), r".mlp.fc\1."),
    (re.compile(r"\.grn\.gamma$"), ".mlp.grn.weight"),
    (re.compile(r"\.grn\.beta$"), ".mlp.grn.bias"),
    (re.compile(r"^norm\."), "head.norm."),
    (re.compile(r"^head\.(weight|bias)$"), r"head.fc.\1"),
]


def is_fb_layout(state_dict: dict) -> bool:
    """True for the official FB key layout (`downsample_layers.*`, `stages.i.j.*`)."""
    return any(k.startswith("downsample_layers.") for k in state_dict)


def normalise_keys(state_dict: dict[str, np.ndarray], conv_mlp: bool = False) -> dict[str, np.ndarray]:
    """Rename an official FB state dict to timm's keys, by name (never by position).

    timm-layout input is returned unchanged. GRN parameters, stored by FB as `(1, 1, 1, C)`,
    are flattened to timm's `(C,)`; with `conv_mlp` (timm holds the MLP as 1x1 convs) FB's
    linear MLP weights `(out, in)` become `(out, in, 1, 1)`.
    """
    if not is_fb_layout(state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _FB_RULES:
            new = pattern.sub(repl, new)
        if ".mlp.grn." in new:
            if value.ndim == 0 or value.size != value.shape[-1]:
                raise SourceError(f"{key}: a GRN parameter of shape {value.shape}; expected (C,) or (1, 1, 1, C)")
            value = value.reshape(value.shape[-1])
        elif conv_mlp and re.search(r"\.mlp\.fc\d\.weight$", new) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        if new in out:
            raise SourceError(f"two FB keys map to {new!r}")
        out[new] = value
    return out


def load_source(path: Path, conv_mlp: bool = False) -> dict[str, np.ndarray]:
    """Read a checkpoint and return it with timm's keys: the converter's input."""
    return normalise_keys(read_state_dict(path), conv_mlp=conv_mlp)
