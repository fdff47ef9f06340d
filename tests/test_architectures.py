"""Every architecture row builds timm's exact network: parameter count and key set."""
from __future__ import annotations

import math

import pytest
import timm

from converters.mapping import expected_keys
from zoo.architectures import ARCHITECTURES
from zoo.model import build_model

# Parameter counts published for ConvNeXt (1000 classes); timm must agree, and so must we.
PUBLISHED = {
    "convnext_atto": 3_695_520, "convnext_femto": 5_217_784, "convnext_pico": 9_045_672,
    "convnext_nano": 15_593_560, "convnext_tiny": 28_589_128, "convnext_small": 50_223_688,
    "convnext_base": 88_591_464, "convnext_large": 197_767_336, "convnext_xlarge": 350_196_968,
}


def timm_shapes(name: str, num_classes: int) -> dict[str, tuple]:
    model = timm.create_model(name, num_classes=num_classes, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("num_classes", [1000, 21841])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_same_network_as_timm(name, num_classes):
    arch = ARCHITECTURES[name]
    model = build_model(arch, num_classes=num_classes)
    reference = timm_shapes(name, num_classes)
    assert model.count_params() == sum(math.prod(s) for s in reference.values())
    # the Keras weight set is exactly the mapped timm key set, shapes included
    assert expected_keys(model) == reference
    if num_classes == 1000:
        assert model.count_params() == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_row_matches_timm_entrypoint(name):
    """The row agrees with timm's own entrypoint on what shapes cannot show: eps, MLP kind, gamma."""
    arch = ARCHITECTURES[name]
    plain = timm.create_model(name, device="meta")
    block = plain.stages[0].blocks[0]
    assert {m.eps for m in plain.modules() if hasattr(m, "eps")} == {arch.norm_eps}
    assert block.use_conv_mlp == arch.conv_mlp
    assert (block.gamma is not None) == arch.layer_scale
    assert block.conv_dw.kernel_size == (arch.kernel_size, arch.kernel_size)
    explicit = timm.create_model(name, device="meta", **arch.timm_kwargs())
    assert {k: tuple(v.shape) for k, v in explicit.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in plain.state_dict().items()}


def test_every_layer_with_weights_is_named_after_a_timm_module():
    arch = ARCHITECTURES["convnext_tiny"]
    model = build_model(arch)
    timm_modules = {k.rsplit(".", 1)[0] for k in timm_shapes("convnext_tiny", 1000)}
    for layer in model.layers:
        if layer.weights:
            assert layer.name in timm_modules or layer.name.endswith(".gamma"), layer.name
