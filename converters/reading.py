"""Step 2 of a conversion: read a source checkpoint file as numpy, keys renamed to timm's.

Numpy and safetensors only: torch is imported solely to read `.pth/.pt/.bin` files, and
tensorflow never (this module also runs inside the PyTorch reference process).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from zoo.core.errors import SourceError

from .layouts import recognise, to_timm
from .source import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, SourceWeights


def read_source(
    src: SourceWeights, *, use_ema: bool = True, hint: str | None = None
) -> tuple[dict[str, np.ndarray], SourceWeights]:
    """Read a source checkpoint in any known layout, renamed to timm's keys, hashing the file's
    bytes as they are read (one pass over the file).

    Args:
        src: the source file.
        use_ema: take the EMA weights of a training checkpoint when it holds them (as timm's
            `load_checkpoint` does); else its plain weights.
        hint: the layout a config file beside the weights names; the keys must agree.

    Returns:
        The timm-keyed state dict (MLP weights as stored: `layouts.fit_mlp` shapes them; keys its
        layout declares another model's left out), and `src` with the sha256 of exactly the
        bytes it holds, its layout, the container entry read and the wrapper prefix removed.

    Raises:
        SourceError: unreadable file, no known layout, or bytes that differ from the sha256
            `src` carries (the file changed after it was checked).
    """
    digest = hashlib.sha256()
    raw, key = read_checkpoint(src.path, digest, use_ema=use_ema)
    found = recognise(raw, hint)
    state = to_timm(found.state, found.layout)
    if src.sha256 is not None and digest.hexdigest() != src.sha256:
        raise SourceError(
            f"{src.path} changed after it was checked (sha256 {digest.hexdigest()}, "
            f"expected {src.sha256}); fetch it again"
        )
    return state, replace(
        src, sha256=digest.hexdigest(), layout=found.layout.name, state_key=key, prefix=found.prefix, left=found.left
    )


def read_state_dict(path: Path, digest=None, *, use_ema: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint file as float32 numpy, keys as stored (see `read_checkpoint`)."""
    return read_checkpoint(path, digest, use_ema=use_ema)[0]


def read_checkpoint(path: Path, digest=None, *, use_ema: bool = True) -> tuple[dict[str, np.ndarray], str | None]:
    """Read every tensor of a checkpoint file as float32 numpy, keys as stored.

    `.safetensors` is read without torch. The pickle containers (`.pth/.pt/.bin/.pth.tar/.ckpt`)
    go through `torch.load(weights_only=True)`, which refuses pickled code, with only
    `argparse.Namespace` allowed besides (timm's training checkpoints carry one). A dict that
    holds its weights under a key is opened as timm's `load_checkpoint` opens it: `state_dict_ema`
    or `model_ema` first (unless not `use_ema`), then `state_dict`, then `model`.

    Args:
        path: the checkpoint file.
        digest: a `hashlib` object fed every byte of the file, as it is read.
        use_ema: prefer the EMA weights of a training checkpoint.

    Returns:
        The tensors, and the container key they were under (None: the file is the state dict).

    Raises:
        SourceError: unreadable file, or a non-float tensor where weights are expected.
    """
    path = Path(path)
    key = None
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        raw = _read_safetensors(path, digest)
    elif path.name.endswith(PICKLE_SUFFIXES):
        if digest is not None:
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
        raw, key = _read_torch(path, use_ema)
    else:
        raise SourceError(f"{path.name}: unsupported checkpoint type")
    return {k: _as_float32(k, value) for k, value in raw.items()}, key


# safetensors dtype -> numpy (little-endian, as the format stores them); BF16 is widened by hand
_NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


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
            _check_size(key, meta["shape"])
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


# Where checkpoints keep their weights, in the order timm's `load_checkpoint` looks (EMA first).
EMA_KEYS = ("state_dict_ema", "model_ema")
PLAIN_KEYS = ("state_dict", "model")


def _read_torch(path: Path, use_ema: bool = True) -> tuple[dict[str, np.ndarray], str | None]:
    try:
        import argparse

        import torch
    except ImportError:
        raise SourceError(
            f"{path.name}: reading .pth/.pt/.bin needs torch (pip install 'convnext-zoo[convert]'), "
            "or convert the file to .safetensors"
        ) from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{path.name} cannot be loaded safely (weights_only=True): {first}") from None
    key = None
    if isinstance(obj, dict):
        order = (EMA_KEYS if use_ema else ()) + PLAIN_KEYS
        key = next((k for k in order if isinstance(obj.get(k), dict)), None)
        if key is not None:
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        held = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise SourceError(
            f"{path.name} does not hold a state dict of tensors (it holds {held}); weights are "
            f"read from the file itself or from its {', '.join(EMA_KEYS + PLAIN_KEYS)} entry"
        )
    return {
        k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()
    }, key


def _as_float32(key: str, value: np.ndarray) -> np.ndarray:
    # with ml_dtypes loaded (tensorflow loads it) numpy reads bfloat16 itself; not np.floating
    if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
        raise SourceError(f"tensor {key!r} has dtype {value.dtype}; ConvNeXt weights are floats")
    _check_size(key, value.shape)
    out = np.ascontiguousarray(value, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int(out.size - np.isfinite(out).sum())
        raise SourceError(
            f"tensor {key!r} has {bad} non-finite values (NaN/Inf) out of {out.size}: the checkpoint is damaged"
        )
    return out


def _check_size(key: str, shape) -> None:
    """A tensor with a zero in its shape holds no values: no ConvNeXt weight is empty."""
    if 0 in shape:
        raise SourceError(
            f"tensor {key!r} has shape {list(shape)}, no values: ConvNeXt weights are never empty; "
            "the checkpoint is damaged"
        )
