"""Shared fixtures: small architectures, perturbed random weights, an isolated store and Hub cache.

torch and timm are imported before anything imports tensorflow: the other order crashes the
timm forward pass in one process. The product keeps the frameworks in separate processes; the
tests use timm in-process only for facts (key sets, parameter counts, random weights).
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import torch  # noqa: E402,F401  (first: see module docstring)
import timm  # noqa: E402,F401

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from converters.reference import random_state_dict  # noqa: E402
from zoo.architectures import ARCHITECTURES  # noqa: E402

# Small rows of real architectures: every code path of the full network, a fraction of the cost.
SMALL_V1 = ARCHITECTURES["convnext_tiny"].replace(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
SMALL_CONV_MLP = ARCHITECTURES["convnext_atto"].replace(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
_SHAPE = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
SMALL = {
    "linear_mlp": SMALL_V1,
    "conv_mlp": SMALL_CONV_MLP,
    "v2_grn": ARCHITECTURES["convnextv2_tiny"].replace(**_SHAPE),
    "v2_grn_conv_mlp": ARCHITECTURES["convnextv2_atto"].replace(**_SHAPE),
    "simplenorm_overlap_act": ARCHITECTURES["convnext_zepto_rms_ols"].replace(**_SHAPE),
    "overlap_tiered": ARCHITECTURES["convnext_atto_ols"].replace(**_SHAPE),
    "overlap": ARCHITECTURES["convnext_nano_ols"].replace(**_SHAPE),
    "head_norm_first": ARCHITECTURES["convnext_tiny_hnf"].replace(**_SHAPE),
    "head_mlp": ARCHITECTURES["convnext_large_mlp"].replace(**_SHAPE, head_hidden_size=40),
    "eps_1e-5": ARCHITECTURES["convnext_xxlarge"].replace(**_SHAPE),
}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own empty local store and Hub cache, and no network.

    Child processes read the environment; huggingface_hub in this process read it once at
    import, so its constants are patched too.
    """
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("ZOO_HOME", str(home / "store"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


@pytest.fixture(params=sorted(SMALL), ids=sorted(SMALL))
def small_arch(request):
    return SMALL[request.param]


def write_safetensors(path, state: dict[str, np.ndarray]):
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return path


@pytest.fixture
def small_tiny(monkeypatch):
    """Make the catalogue's `convnext_tiny` rows use SMALL_V1: the whole pipeline, quickly."""
    monkeypatch.setitem(ARCHITECTURES, "convnext_tiny", SMALL_V1)
    return SMALL_V1


@pytest.fixture
def small_weights(tmp_path):
    """Factory: perturbed random weights for an architecture, written as safetensors."""
    def make(arch, num_classes=1000, seed=0, name="weights.safetensors"):
        state = random_state_dict(arch, num_classes, seed)
        return write_safetensors(tmp_path / name, state), state
    return make
