"""Step 2 of a conversion: read a source checkpoint file as numpy, keys renamed to timm's.

Numpy and safetensors only: torch is imported solely to read `.pth/.pt/.bin` files, and
tensorflow never (this module also runs inside the PyTorch reference process).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from zoo.core.errors import SourceError

from .containers import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, files_manifest, is_index, read_index
from .layouts import recognise, to_timm
from .source import SourceWeights, checkpoint_in


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
    raw, key = read_raw(src.path, digest, use_ema=use_ema)
    found = recognise(raw, hint)  # by the keys alone: another model's tensors (int64 BatchNorm counters) left out
    state = to_timm({k: _as_float32(k, value) for k, value in found.state.items()}, found.layout)
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
    """Every tensor of a checkpoint file as float32 numpy, keys as stored (`read_raw`), each checked to be
    float weights: finite, not empty.

    Raises:
        SourceError: unreadable file, or a non-float tensor where weights are expected.
    """
    raw, key = read_raw(path, digest, use_ema=use_ema)
    return {k: _as_float32(k, value) for k, value in raw.items()}, key


def read_raw(path: Path, digest=None, *, use_ema: bool = True) -> tuple[dict[str, np.ndarray], str | None]:
    """Read every tensor of a checkpoint file as numpy, keys as stored, in its own dtype (bfloat16 widened
    to float32), unchecked: a model beside the ConvNeXt may hold integer tensors (BatchNorm counters).

    `.safetensors` is read without torch. The pickle containers (`.pth/.pt/.bin/.pth.tar/.ckpt`)
    go through `torch.load(weights_only=True)`, which refuses pickled code, with only
    `argparse.Namespace` allowed besides (timm's training checkpoints carry one). A dict that
    holds its weights under a key is opened as timm's `load_checkpoint` opens it: `state_dict_ema`
    or `model_ema` first (unless not `use_ema`), then `state_dict`, then `model`. A sharded
    checkpoint (its index, a shard, or their folder: `source.checkpoint_in`) is read as one
    (`_read_sharded`).

    Args:
        path: the checkpoint file (or sharded checkpoint).
        digest: a `hashlib` object fed every byte of the file, as it is read (a sharded
            checkpoint's: its files' `containers.files_manifest`).
        use_ema: prefer the EMA weights of a training checkpoint.

    Returns:
        The tensors, and the container key they were under (None: the file is the state dict).

    Raises:
        SourceError: unreadable file; a sharded checkpoint whose shards disagree with its index.
    """
    path = checkpoint_in(Path(path))
    key = None
    if is_index(path):
        raw = _read_sharded(path, digest)
    elif path.name.endswith(SAFETENSORS_SUFFIXES):
        raw = _read_safetensors(path, digest)
    elif path.name.endswith(PICKLE_SUFFIXES):
        _hash_file(path, digest)
        raw, key = _read_torch(path, use_ema)
    else:
        raise SourceError(f"{path.name}: unsupported checkpoint type")
    return raw, key


def _hash_file(path: Path, digest=None) -> None:
    """Feed `digest` every byte of the file (a pickle container is hashed before torch reads it)."""
    if digest is not None:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)


def _read_sharded(path: Path, digest=None) -> dict[str, np.ndarray]:
    """Every tensor of a sharded checkpoint at its index file, keys as stored.

    The shards are read one after another, each as a file of its container is (its arrays held,
    never its bytes beside them): at the peak, the tensors of every shard read so far, as for one
    file. Every tensor must be in the shard the index puts it in, once, and every tensor the
    index lists must be there. `digest` is fed the checkpoint's `containers.files_manifest` (each
    file's sha256, taken as it is read), the bytes `containers.files_sha256` hashes.

    Raises:
        SourceError: a malformed index, a missing shard, or shards that disagree with the index;
            one line naming the index, the shard and the tensor.
    """
    index = read_index(path)
    files = {path.name: index.sha256}
    out: dict[str, np.ndarray] = {}
    held: dict[str, str] = {}  # tensor -> the shard it was read from
    for name in index.shards:
        shard, hashed = index.shard(name), hashlib.sha256()
        if name.endswith(SAFETENSORS_SUFFIXES):
            tensors = _read_safetensors(shard, hashed)
        else:
            _hash_file(shard, hashed)
            tensors, entry = _read_torch(shard)
            if entry is not None:
                raise SourceError(f"{path.name}: shard {name} keeps its tensors under {entry!r}, not at its top")
        for key in tensors:
            listed = index.weight_map.get(key)
            if key in held:
                problem = f"tensor {key!r} is in two shards, {held[key]} and {name}"
            elif listed is None:
                problem = f"shard {name} holds tensor {key!r}, which the index does not list"
            elif listed != name:
                problem = f"shard {name} holds tensor {key!r}, which the index puts in {listed}"
            else:
                held[key] = name
                continue
            raise SourceError(f"{path.name}: {problem}; save the checkpoint again")
        out.update(tensors)
        files[name] = hashed.hexdigest()
    missing = [key for key in index.weight_map if key not in held]
    if missing:
        raise SourceError(
            f"{path.name} puts tensor {missing[0]!r} in shard {index.weight_map[missing[0]]}, which does not hold it"
            + (f" ({len(missing)} tensors missing)" if len(missing) > 1 else "")
            + "; save the checkpoint again"
        )
    if digest is not None:
        digest.update(files_manifest(files))
    return out


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
        raise _refused(path, e) from None
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


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")  # the first global torch would import
_SAVE_WEIGHTS = "torch.save(model.state_dict(), PATH) or safetensors.torch.save_file(model.state_dict(), PATH)"


def _refused(path: Path, error: Exception) -> SourceError:
    """Why `torch.load(weights_only=True)` refused `path`, in one line. A whole module saved with
    `torch.save(model)` is said to be one, naming its class, with how to save its state dict: its
    pickle names `torch.nn.modules` classes (read from its opcodes: nothing in it runs)."""
    import torch

    text = str(error)
    named = _REFUSED_GLOBAL.search(text)
    if named:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # a static read of the pickle
        except Exception:  # not torch's zip format (a legacy save), or damaged
            needed = []
        if any(name.startswith("torch.nn.modules.") for name in [named[1], *needed]):
            return SourceError(
                f"{path.name} holds a pickled module ({named[1]}), not a state dict: it is not unpickled (that "
                f"runs code from the file); save its weights with {_SAVE_WEIGHTS} and convert that file"
            )
        return SourceError(
            f"{path.name} cannot be loaded safely (weights_only=True): it needs {named[1]}, which only "
            f"unpickling (running code from the file) could load; save the weights alone with {_SAVE_WEIGHTS}"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # torch's reason follows its advice on unsafe loading, which does not apply here
    reasons = [line.split(":", 1)[1].strip() for line in lines if line.startswith("WeightsUnpickler error:")]
    reason = (reasons or lines or [type(error).__name__])[0]
    return SourceError(f"{path.name} cannot be loaded safely (weights_only=True): {reason}")


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
