"""Every architecture row builds timm's exact network: parameter count and key set."""

from __future__ import annotations

import math

import pytest
import timm

from tests.support.porting import expected_keys
from zoo.core.architectures import ARCHITECTURES
from zoo.core.model import build_model

# Parameter counts published for ConvNeXt (1000 classes); timm must agree, and so must we.
PUBLISHED = {
    "convnext_atto": 3_695_520,
    "convnext_femto": 5_217_784,
    "convnext_pico": 9_045_672,
    "convnext_nano": 15_593_560,
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "convnext_large": 197_767_336,
    "convnext_xlarge": 350_196_968,
    "convnextv2_atto": 3_708_400,
    "convnextv2_tiny": 28_635_496,
    "convnextv2_base": 88_717_800,
    "convnextv2_huge": 660_289_640,
}
# Hundreds of millions of parameters: minutes and gigabytes to build twice; run with -m slow.
HUGE = {"convnext_xxlarge", "convnextv2_huge"}
# every row with the 1000-class head; other heads (21841, 11821, none) on the rows that have them
HEADS = [(n, 1000) for n in sorted(ARCHITECTURES)] + [
    *[(n, 21841) for n in ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge")],
    ("convnext_nano", 11821),
    ("convnext_tiny_hnf", 0),
    ("convnext_large_mlp", 0),
    ("convnext_zepto_rms", 0),
    ("convnextv2_atto", 0),
    ("convnext_base", 0),
]
# convnext_large stands for the rows of its size in the default run: these have its stem, stages and
# head shapes at 200 to 350M parameters (10-15 s to build each here); -m slow checks them too.
LARGE = {"convnext_xlarge", "convnextv2_large", "convnext_large_mlp"}
# a head only changes the last layer: the 21841-class head and no head on the small rows by default
HEAD_ONLY = {("convnext_small", 21841), ("convnext_base", 21841), ("convnext_large", 21841), ("convnext_base", 0)}
CASES = [
    pytest.param(n, c, marks=[pytest.mark.slow, pytest.mark.heavy])
    if n in HUGE or (n in LARGE and c)
    else pytest.param(n, c, marks=pytest.mark.slow)
    if (n, c) in HEAD_ONLY
    else (n, c)
    for n, c in HEADS
]
NAMES = [
    pytest.param(n, marks=[pytest.mark.slow, pytest.mark.heavy]) if n in HUGE else n for n in sorted(ARCHITECTURES)
]


def timm_shapes(name: str, num_classes: int) -> dict[str, tuple]:
    model = timm.create_model(name, num_classes=num_classes, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, num_classes", CASES)
def test_same_network_as_timm(name, num_classes):
    arch = ARCHITECTURES[name]
    model = build_model(arch, num_classes=num_classes, initialize=False)  # shapes only: no random init
    reference = timm_shapes(name, num_classes)
    assert model.count_params() == sum(math.prod(s) for s in reference.values())
    # the Keras weight set is exactly the mapped timm key set, shapes included
    assert expected_keys(model) == reference
    if num_classes == 1000 and name in PUBLISHED:
        assert model.count_params() == PUBLISHED[name]


def test_every_pretrained_architecture_has_a_row():
    assert {n.split(".")[0] for n in timm.list_pretrained("convnext*")} == set(ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_row_matches_timm_entrypoint(name):
    """The row agrees with timm's own entrypoint on what shapes cannot show: eps, MLP kind, gamma."""
    arch = ARCHITECTURES[name]
    plain = timm.create_model(name, device="meta")
    block = plain.stages[0].blocks[0]
    norms = [
        m
        for m in plain.modules()
        if hasattr(m, "eps") and "Norm" in type(m).__name__ and "Response" not in type(m).__name__
    ]
    assert {m.eps for m in norms} == {arch.norm_eps}
    assert {type(m).__name__.lower().removesuffix("2d") for m in norms} == {arch.norm}
    assert block.use_conv_mlp == arch.conv_mlp
    assert (block.gamma is not None) == arch.layer_scale
    assert hasattr(block.mlp, "grn") == arch.use_grn
    assert (type(plain.norm_pre).__name__ != "Identity") == arch.head_norm_first
    assert block.conv_dw.kernel_size == (arch.kernel_size, arch.kernel_size)
    explicit = timm.create_model(name, device="meta", **arch.timm_kwargs())
    assert {k: tuple(v.shape) for k, v in explicit.state_dict().items()} == {
        k: tuple(v.shape) for k, v in plain.state_dict().items()
    }


@pytest.mark.parametrize(
    "name",
    [
        "convnext_tiny",
        "convnext_atto_ols",
        "convnext_zepto_rms_ols",
        "convnext_tiny_hnf",
        "convnext_large_mlp",
        "convnextv2_atto",
    ],
)
def test_every_layer_with_weights_is_named_after_a_timm_module(name):
    model = build_model(ARCHITECTURES[name], initialize=False)
    timm_modules = {k.rsplit(".", 1)[0] for k in timm_shapes(name, 1000)}
    for layer in model.layers:
        if layer.weights:
            assert layer.name in timm_modules or layer.name.endswith(".gamma"), layer.name
