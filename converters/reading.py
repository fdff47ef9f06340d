"""Step 2 of a conversion: read a source checkpoint file as numpy, keys renamed to timm's.

Numpy and safetensors only: torch is imported solely to read `.pth/.pt/.bin` files, and
tensorflow never (this module also runs inside the PyTorch reference process).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from zoo.errors import SourceError

from .layouts import normalise_keys
from .source import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, SourceWeights


def read_source(src: SourceWeights, conv_mlp: bool = False) -> tuple[dict[str, np.ndarray], SourceWeights]:
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


def load_source(path: Path, conv_mlp: bool = False) -> dict[str, np.ndarray]:
    """Read a checkpoint and return it with timm's keys: the converter's input."""
    return normalise_keys(read_state_dict(path), conv_mlp=conv_mlp)
