"""Shared fixtures: small architectures, perturbed random weights, an isolated store and Hub cache.

torch and timm are imported before anything imports tensorflow: the other order crashes the
timm forward pass in one process. The product keeps the frameworks in separate processes; the
tests use timm in-process only for facts (key sets, parameter counts, random weights).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TF_ONEDNN_ASSUME_FROZEN_WEIGHTS is left as the user's environment has it: the product must give
# the same numbers either way (tests/test_frozen_weights.py runs each value in a process of its
# own). Tests that train or change weights after a first call take the `live_weights` fixture.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402,F401
import torch  # noqa: E402,F401  (first: see module docstring)
from safetensors.numpy import save_file  # noqa: E402

from converters.reference import random_state_dict  # noqa: E402
from tests.support.archs import SMALL, SMALL_V1  # noqa: E402
from zoo.core.architectures import ARCHITECTURES  # noqa: E402
from zoo.core.runtime import usable_cpus  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each holds TensorFlow, torch and timm, and starts
    reference processes of its own)."""
    return max(1, min(4, usable_cpus()))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config, items):
    """Tests that share what a module-scoped fixture made once (a conversion) run on one worker
    (`--dist loadgroup`), so that it is made once; the others are spread one by one."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if item.get_closest_marker("heavy"):
            # the largest conversions peak at 8 GB and more: two at once, beside the other worker's
            # tests, would not fit a 24 GB machine. One worker takes them all, one after another.
            item.add_marker(pytest.mark.xdist_group("heavy"))
            _in_group(item, "heavy")
        elif info is not None and any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
            _in_group(item, item.module.__name__)


def _in_group(item, group: str) -> None:
    """What xdist does for an `xdist_group` mark, done so that pytest 9 sees it too: the group
    joins the test's id (`...::test@group`), which the scheduler reads. xdist 3.8 sets `_nodeid`,
    which pytest 9 no longer reads (its ids are structured): the groups were then ignored, and a
    module's conversion was made again on every worker that ran one of its tests."""
    if not getattr(item.config.option, "loadgroup", False) or item.nodeid.endswith(f"@{group}"):
        return  # not an xdist worker of a loadgroup run, or xdist did it
    if hasattr(item, "_id"):
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(f"{item.nodeid}@{group}")


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


@pytest.fixture
def live_weights():
    """For a test that trains, or changes weights after a model has run: with
    TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1 (read once per process) oneDNN keeps the weights of each
    kernel's first run, and the model refuses to train. The variable cannot be changed in this
    process any more, so such a test fails here, saying so, rather than testing stale weights."""
    from zoo.core.runtime import FROZEN_VAR, frozen_weights

    if frozen_weights():
        pytest.fail(
            f"{FROZEN_VAR}=1 in this process: this test trains or changes weights after a first call; "
            f"run it without the variable (tests/test_frozen_weights.py covers it)"
        )
