"""A layout declares the keys of another model that its checkpoints hold beside the ConvNeXt (a
segmentation model's decode and auxiliary heads): the converter and the PyTorch reference both leave
them, remove the prefix the ConvNeXt's keys then share (`backbone.`), and every other key maps;
undeclared, the same keys are refused.

The checkpoint here is FB's layout under `backbone.` beside two heads, as a segmentation model holds
a classifier's weights; the undeclared case takes the declaration off the FB row for one test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from converters import reading
from converters.layouts import LAYOUTS, detect, fit_mlp, recognise
from converters.reference import create, forward, random_state_dict, reference
from converters.source import SourceWeights
from tests.support.archs import SMALL
from tests.support.fb_layout import to_fb_layout
from tests.support.porting import port
from zoo.core.errors import SourceError
from zoo.core.model import build_model

CLASSES = 10
FB = LAYOUTS["fb"]
HEADS = {
    "decode_head.conv_seg.weight": np.ones((19, 32, 1, 1), np.float32),
    "decode_head.conv_seg.bias": np.ones(19, np.float32),
    "auxiliary_head.conv_seg.weight": np.ones((19, 16, 1, 1), np.float32),
}


@pytest.fixture(params=["linear_mlp", "v2_grn"])
def checkpoint(request, tmp_path):
    """(architecture, its timm state dict, a segmentation checkpoint holding it under `backbone.`)."""
    arch = SMALL[request.param]
    state = random_state_dict(arch, CLASSES, seed=3)
    path = tmp_path / "segmentation.safetensors"
    save_file({**{f"backbone.{k}": v for k, v in to_fb_layout(state).items()}, **HEADS}, str(path))
    return arch, state, path


def test_declared_keys_of_another_model_are_left_and_the_rest_maps(checkpoint):
    arch, state, path = checkpoint
    found = recognise(reading.read_state_dict(path))
    assert found.layout is FB and found.left == len(HEADS) and not set(HEADS) & set(found.state)
    assert found.prefix == "backbone." and not any(k.startswith("backbone.") for k in found.state)
    read, src = reading.read_source(SourceWeights(path, None))
    assert src.layout == FB.name and read.keys() == state.keys() and src.left == len(HEADS)
    read = fit_mlp(read, arch.conv_mlp)
    assert all(np.array_equal(read[k], v) for k, v in state.items())
    model = build_model(arch, num_classes=CLASSES)
    assert port(read, model) == model.count_params()


def test_the_reference_leaves_them_too(checkpoint):
    """The reference's framework (timm) loads the backbone alone and runs it as the timm network."""
    arch, state, path = checkpoint
    ref = reference(arch, CLASSES, path)
    assert ref.layout == FB.name and ref.adapter.name == "timm"
    timm_model = create(arch, CLASSES)
    timm_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    inputs = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ours, theirs = forward(ref, inputs), forward(timm_model, inputs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def test_undeclared_they_are_refused(checkpoint, monkeypatch):
    _, _, path = checkpoint
    for name, layout in LAYOUTS.items():  # no layout declares them
        monkeypatch.setitem(LAYOUTS, name, dataclasses.replace(layout, foreign=()))
    with pytest.raises(
        SourceError, match=f"{len(HEADS)} of .* keys have no place in a ConvNeXt of the {FB.name} layout"
    ) as refused:
        reading.read_source(SourceWeights(path, None))
    assert all(key in str(refused.value) for key in HEADS)
    with pytest.raises(SourceError, match="no place"):
        detect(reading.read_state_dict(path))
