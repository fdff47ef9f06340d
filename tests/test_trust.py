"""Hostile inputs: nothing in a checkpoint file is ever executed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from checkpoints import converted
from converters.reading import read_state_dict
from tests.support.cli import zoo_cli
from zoo.core.errors import SourceError


class Gadget:
    """Unpickling this calls `open(marker, "w")`: the marker file appears if code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def gadget(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "convnext_tiny_1k_224_ema.pth"
    torch.save({"model": {"stem.0.weight": torch.zeros(1), "payload": Gadget(marker)}}, path)
    return path, marker


def test_the_gadget_is_real(gadget):
    path, marker = gadget
    torch.load(path, weights_only=False)  # what an unsafe loader does
    assert marker.exists()


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_pickle_gadget_is_refused_and_never_runs(gadget, force_unsafe, monkeypatch):
    path, marker = gadget
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SourceError, match="cannot be loaded safely"):
        read_state_dict(path)
    assert not marker.exists()


def test_cli_refuses_the_gadget_and_writes_nothing(gadget, tmp_path):
    path, marker = gadget
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    out = tmp_path / "converted"
    proc = zoo_cli("convert", "convnext_tiny_1k", "--checkpoint", path, "--out", out, env=env)
    assert proc.returncode == 1 and "cannot be loaded safely" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not out.exists()


SAVE_A_STATE_DICT = "torch.save(model.state_dict(), PATH) or safetensors.torch.save_file(model.state_dict(), PATH)"


def test_a_pickled_module_is_named_and_never_unpickled(tmp_path):
    """`torch.save(model)` pickles the whole module, code and all: refused unread, in one line naming
    its class and how to save a state dict instead; `zoo convert` writes nothing."""
    from tests.support.archs import SMALL
    from tests.support.cli import one_line_error, zoo_inline
    from tests.support.sources import timm_model

    model = timm_model(SMALL["conv_mlp"], 3)
    whole = tmp_path / "whole.pth"
    torch.save(model, whole)
    out = tmp_path / "converted"
    line = one_line_error(zoo_inline("convert", "--checkpoint", whole, "--out", out))
    assert line == (
        "error: whole.pth holds a pickled module (timm.models.convnext.ConvNeXt), not a state dict: it is "
        f"not unpickled (that runs code from the file); save its weights with {SAVE_A_STATE_DICT} and convert "
        "that file"
    )
    assert not out.exists()
    marker = tmp_path / "executed"  # inside a training checkpoint, beside code that would run if unpickled
    torch.save({"model": model, "payload": Gadget(marker)}, tmp_path / "wrapped.pth")
    with pytest.raises(SourceError, match=r"holds a pickled module \(timm.models.convnext.ConvNeXt\), not a state"):
        read_state_dict(tmp_path / "wrapped.pth")
    assert not marker.exists()
    torch.save({"model": {"stem.0.weight": torch.zeros(1)}, "payload": Gadget(marker)}, tmp_path / "gadget.pth")
    with pytest.raises(SourceError) as refused:  # no module: torch's reason, without its advice to unpickle
        read_state_dict(tmp_path / "gadget.pth")
    assert str(refused.value).startswith("gadget.pth cannot be loaded safely (weights_only=True): it needs ")
    assert SAVE_A_STATE_DICT in str(refused.value) and "\n" not in str(refused.value) and not marker.exists()


# --- bad files: clear errors, before anything is written; fuzzed readers ------------------------

import struct  # noqa: E402

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.numpy import save as save_bytes  # noqa: E402

from tests.support.sources import normalise_keys  # noqa: E402
from zoo.core.errors import ZooError  # noqa: E402

VALID = save_bytes(
    {"stem.0.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "stem.0.bias": np.ones(2, np.float16)}
)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_by_name(tmp_path, bad):
    weights = np.ones((4, 3), np.float32)
    weights[1, 2] = bad
    path = tmp_path / "model.safetensors"
    path.write_bytes(save_bytes({"head.fc.weight": weights}))
    with pytest.raises(SourceError, match=r"'head.fc.weight' has 1 non-finite"):
        read_state_dict(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_empty_tensors_are_refused_by_name(tmp_path, suffix):
    """A tensor with a 0 in its shape holds no values (safetensors' reader crashed on one)."""
    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save({"stem.0.weight": torch.ones(2, 3, 4, 4), "head.fc.weight": torch.zeros(0, 320)}, path)
    else:
        path.write_bytes(
            save_bytes(
                {"stem.0.weight": np.ones((2, 3, 4, 4), np.float32), "head.fc.weight": np.zeros((0, 320), np.float32)}
            )
        )
    with pytest.raises(SourceError, match=r"tensor 'head.fc.weight' has shape \[0, 320\], no values"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "key, shape",
    [
        ("stages.0.blocks.0.conv_dw.weight", ()),
        ("stages.2.blocks.0.conv_dw.weight", (8,)),
        ("stages.0.blocks.0.mlp.fc1.weight", ()),
        ("head.fc.weight", (3,)),
        ("stem.0.weight", (8, 3)),
    ],
)
def test_tensors_of_the_wrong_rank_are_one_error_naming_them(key, shape):
    """Inference reads shapes: a tensor with too few dimensions is an error naming it, not an IndexError."""
    from converters.inference import infer
    from converters.reference import random_state_dict
    from tests.support.archs import SMALL_V1

    state = {**random_state_dict(SMALL_V1, 3, seed=0), key: np.ones(shape, np.float32)}
    with pytest.raises(SourceError, match=key.replace(".", r"\.")):
        infer(state)


def _read_bytes(tmp_path_factory, data: bytes, suffix: str):
    path = tmp_path_factory.mktemp("fuzz") / f"model{suffix}"
    path.write_bytes(data)
    try:
        state = read_state_dict(path)
    except ZooError:
        return None
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state.values())
    return state


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_safetensors_reader(tmp_path_factory, data):
    """Truncations, flipped bytes, forged header lengths and random bytes: a state dict or a
    SourceError, never another exception."""
    kind = data.draw(st.sampled_from(["truncate", "flip", "header_len", "random", "header_json"]))
    blob = bytearray(VALID)
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif kind == "header_len":
        blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    elif kind == "header_json":
        header = data.draw(st.text(max_size=200)).encode()
        blob = bytearray(struct.pack("<Q", len(header)) + header + bytes(data.draw(st.binary(max_size=64))))
    else:
        blob = bytearray(data.draw(st.binary(max_size=512)))
    _read_bytes(tmp_path_factory, bytes(blob), ".safetensors")


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about unknown pickle protocols
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=512))
def test_fuzz_pickle_reader(tmp_path_factory, blob):
    _read_bytes(tmp_path_factory, blob, ".pth")


_KEY_PARTS = st.sampled_from(
    [
        "downsample_layers",
        "stages",
        "0",
        "1",
        "3",
        "dwconv",
        "pwconv1",
        "pwconv2",
        "grn",
        "gamma",
        "beta",
        "norm",
        "head",
        "weight",
        "bias",
        "stem",
        "blocks",
        "mlp",
    ]
)
_ARRAYS = st.lists(st.integers(1, 4), min_size=0, max_size=4).map(lambda s: np.zeros(s, np.float32))


@settings(max_examples=2000, deadline=None)
@given(st.dictionaries(st.lists(_KEY_PARTS, min_size=1, max_size=5).map(".".join), _ARRAYS, max_size=8), st.booleans())
def test_fuzz_key_normaliser(state, conv_mlp):
    try:
        out = normalise_keys(state, conv_mlp=conv_mlp)
    except ZooError:
        return
    assert len(out) == len(state)


# --- crash safety: SIGKILL at random moments ---------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_nothing_partial(tmp_path):
    """`zoo convert` killed at 24 random moments: the folder is absent or whole, and the next run
    succeeds without clean-up (`python -m pytest -m slow -k sigkill`)."""
    import random
    import shutil
    import signal
    import time

    out = tmp_path / "converted"
    run = [sys.executable, "-m", "zoo.cli", "convert", "convnext_atto", "--random-weights", "--out", str(out)]
    for _ in range(2):  # the second run's time: warm caches, as in the runs below
        start = time.perf_counter()
        subprocess.run(run, check=True, capture_output=True, env=dict(os.environ))
        full = time.perf_counter() - start
    converted.open_folder(out)
    shutil.rmtree(out)
    rng = random.Random(0)
    mid_way, killed = 0, []
    for i in range(24):
        if i % 4 == 0 and out.exists():
            shutil.rmtree(out)  # some runs write a new folder, the others replace a whole one
        proc = subprocess.Popen(
            run + (["--seed", "1"] if i % 2 else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ),
        )
        time.sleep(rng.uniform(0.0, full * 1.1))
        proc.send_signal(signal.SIGKILL)
        mid_way += proc.wait() == -signal.SIGKILL  # (0: it had finished)
        if out.exists():
            folder = converted.open_folder(out)  # raises if partial or damaged
            assert folder.parity["passed"]
        partials = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
        assert all(p.split(".partial-")[1].split("-")[0].isdigit() for p in partials)
        killed.append(proc.pid)
    time.sleep(1.0)
    assert _children_of(killed) == []  # the PyTorch reference processes died with their parents
    subprocess.run(run, check=True, capture_output=True, env=dict(os.environ))
    converted.open_folder(out)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # the last run cleared them
    assert mid_way >= 8, mid_way  # the kills did land mid-way (~20 expected)


def _children_of(pids: list[int]) -> list[int]:
    """Live processes started by the reference runner of any of `pids` (Linux /proc)."""
    wanted = {f"ZOO_PARENT_PID={pid}".encode() for pid in pids}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if wanted.intersection(env):
                found.append(int(entry))
    return found
