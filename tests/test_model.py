"""The Keras ConvNeXt itself: timm's names and layer kinds, exact numerics, free input size,
headless outputs, stochastic depth, dtype policy and `.keras` round trips. Small rows only."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.support.archs import SMALL, SMALL_V1
from zoo.core.model import DropPath, LayerScale, PointwiseDense, build_model, drop_path_rates, stage_names


@pytest.fixture(params=["linear_mlp", "conv_mlp"])
def small_arch(request):
    """The ConvNeXt-V1 layout with both MLP kinds; other variants have tests of their own below."""
    return SMALL[request.param]


def perturb(model: keras.Model, seed: int = 0, scale: float = 0.2) -> keras.Model:
    """Move every weight off its initial value (constant inits like LayerScale's 1e-6 included),
    so that a comparison of outputs sees every weight."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = keras.ops.convert_to_numpy(variable)
        variable.assign((value + rng.normal(0.0, scale, value.shape)).astype(value.dtype))
    return model


def images(n: int, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, h, w, 3)).astype("float32")


def gelu_erf(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# --- names and layer kinds -------------------------------------------------------------------


def test_layer_names_are_timm_module_paths(small_arch):
    model = build_model(small_arch, num_classes=10)
    names = {layer.name for layer in model.layers}
    expected = {"stem.0", "stem.1", "head.norm", "head.fc"}
    for i, depth in enumerate(small_arch.depths):
        if i > 0:
            expected |= {f"stages.{i}.downsample.0", f"stages.{i}.downsample.1"}
        for j in range(depth):
            path = f"stages.{i}.blocks.{j}"
            expected |= {
                path,
                f"{path}.conv_dw",
                f"{path}.norm",
                f"{path}.mlp.fc1",
                f"{path}.mlp.fc2",
                f"{path}.gamma",
            }  # mlp.act (no weights) is fused into fc1
    assert expected <= names, sorted(expected - names)
    assert "stages.2.blocks.1.conv_dw" in names and "stages.0.downsample.0" not in names
    # the blocks' outputs carry the block path: the parity probe finds stages by these names
    for name in stage_names(small_arch):
        model.get_layer(name)


def test_layer_kinds(small_arch):
    model = build_model(small_arch, num_classes=10)
    stem = model.get_layer("stem.0")
    assert type(stem) is keras.layers.Conv2D
    assert stem.kernel_size == (4, 4) and stem.strides == (4, 4) and stem.filters == small_arch.dims[0]
    for i in (1, 2, 3):
        down = model.get_layer(f"stages.{i}.downsample.1")
        assert type(down) is keras.layers.Conv2D
        assert down.kernel_size == (2, 2) and down.strides == (2, 2) and down.filters == small_arch.dims[i]
        assert isinstance(model.get_layer(f"stages.{i}.downsample.0"), keras.layers.LayerNormalization)
    conv_dw = model.get_layer("stages.2.blocks.1.conv_dw")
    # a true depthwise conv (not a grouped Conv2D): the mapping table relies on the type
    assert type(conv_dw) is keras.layers.DepthwiseConv2D
    assert conv_dw.kernel_size == (7, 7) and conv_dw.padding == "same"
    assert tuple(conv_dw.kernel.shape) == (7, 7, small_arch.dims[2], 1)
    fc1 = model.get_layer("stages.2.blocks.1.mlp.fc1")
    fc2 = model.get_layer("stages.2.blocks.1.mlp.fc2")
    if small_arch.conv_mlp:
        assert type(fc1) is keras.layers.Conv2D and fc1.kernel_size == (1, 1)
        assert type(fc2) is keras.layers.Conv2D and fc2.kernel_size == (1, 1)
    else:
        # Dense computed as one 2-D matmul (oneDNN fuses it with the bias and the GELU)
        assert type(fc1) is PointwiseDense and type(fc2) is PointwiseDense
    assert fc1.kernel.shape[-1] == 4 * small_arch.dims[2] and fc2.kernel.shape[-1] == small_arch.dims[2]
    gamma = model.get_layer("stages.2.blocks.1.gamma")
    assert isinstance(gamma, LayerScale) and tuple(gamma.gamma.shape) == (small_arch.dims[2],)
    head = model.get_layer("head.fc")
    assert type(head) is keras.layers.Dense and head.units == 10
    assert model.output_shape == (None, 10)


def test_every_layer_norm_uses_the_architecture_eps(small_arch):
    model = build_model(small_arch, num_classes=10)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.LayerNormalization)]
    # stem + 3 downsamples + one per block + head
    assert len(norms) == 1 + 3 + sum(small_arch.depths) + 1
    assert small_arch.norm_eps == 1e-6
    assert {layer.epsilon for layer in norms} == {small_arch.norm_eps}


def test_norm_eps_follows_the_row():
    model = build_model(SMALL_V1.replace(norm_eps=1e-5), num_classes=10)
    eps = {layer.epsilon for layer in model.layers if isinstance(layer, keras.layers.LayerNormalization)}
    assert eps == {1e-5}


def test_gelu_is_exact_erf():
    model = build_model(SMALL_V1, num_classes=10)
    act = model.get_layer("stages.1.blocks.0.mlp.fc1").activation
    x = np.linspace(-4.0, 4.0, 161, dtype="float32").reshape(1, -1)
    y = keras.ops.convert_to_numpy(act(x)).astype("float64")
    exact = gelu_erf(x.astype("float64"))
    np.testing.assert_allclose(y, exact, atol=2e-6, rtol=1e-5)
    # the tanh approximation is measurably different on the same points: the check can tell
    assert np.abs(y - gelu_tanh(x.astype("float64"))).max() > 1e-4


def test_gelu_in_the_graph_is_applied_to_fc1(small_arch):
    model = perturb(build_model(small_arch, num_classes=10))
    path = "stages.0.blocks.0"
    fc1 = model.get_layer(f"{path}.mlp.fc1")
    probe = keras.Model(model.input, [model.get_layer(f"{path}.norm").output, fc1.output])
    norm, post = (keras.ops.convert_to_numpy(t).astype("float64") for t in probe(images(2, 32, 32)))
    kernel = keras.ops.convert_to_numpy(fc1.kernel).astype("float64")
    pre = norm @ kernel.reshape(-1, kernel.shape[-1]) + keras.ops.convert_to_numpy(fc1.bias)
    assert np.abs(pre).max() > 1.0  # the comparison covers the non-linear range
    np.testing.assert_allclose(post, gelu_erf(pre), atol=2e-5, rtol=1e-4)


# --- input size and headless models -----------------------------------------------------------


def test_input_size_is_free(small_arch):
    model = perturb(build_model(small_arch, num_classes=10))
    small = keras.ops.convert_to_numpy(model(images(2, 64, 64)))
    wide = keras.ops.convert_to_numpy(model(images(3, 96, 128)))
    assert small.shape == (2, 10) and wide.shape == (3, 10)
    assert np.isfinite(small).all() and np.isfinite(wide).all()


def test_fixed_input_shape_is_honoured():
    model = build_model(SMALL_V1, num_classes=10, input_shape=(64, 64, 3))
    assert model.input_shape == (None, 64, 64, 3)


def test_headless_avg_ends_at_head_norm(small_arch):
    full = perturb(build_model(small_arch, num_classes=10))
    model = build_model(small_arch, include_top=False, pooling="avg")
    names = {layer.name for layer in model.layers}
    assert "head.fc" not in names
    assert model.layers[-1].name == "head.norm"
    assert model.output_shape == (None, small_arch.dims[-1])
    # same weights (the head's fc aside) give the features the full model feeds its classifier
    model.set_weights(full.get_weights()[:-2])
    x = images(2, 64, 96)
    features = keras.ops.convert_to_numpy(model(x))
    pre_logits = keras.Model(full.input, full.get_layer("head.fc").input)
    np.testing.assert_allclose(features, keras.ops.convert_to_numpy(pre_logits(x)), rtol=1e-5, atol=1e-5)
    assert features.shape == (2, small_arch.dims[-1])


def test_headless_no_pooling_returns_last_stage_map(small_arch):
    model = build_model(small_arch, include_top=False, pooling=None)
    names = {layer.name for layer in model.layers}
    assert not names & {"head.global_pool", "head.norm", "head.fc"}
    last = f"stages.3.blocks.{small_arch.depths[3] - 1}"
    assert model.layers[-1].name == last
    out = model(images(2, 96, 128))
    assert tuple(out.shape) == (2, 3, 4, small_arch.dims[-1])


@pytest.mark.parametrize("pooling", ["max", "", "AVG", 0])
def test_bad_pooling_raises(pooling):
    with pytest.raises(ValueError, match="pooling"):
        build_model(SMALL_V1, include_top=False, pooling=pooling)


# --- stochastic depth ---------------------------------------------------------------------------


def test_drop_path_rates_rise_linearly_per_block():
    rates = drop_path_rates(0.3, (1, 1, 2, 1))
    assert [len(r) for r in rates] == [1, 1, 2, 1]
    flat = [r for stage in rates for r in stage]
    np.testing.assert_allclose(flat, np.linspace(0.0, 0.3, 5))
    np.testing.assert_allclose(flat, [0.0, 0.075, 0.15, 0.225, 0.3])
    assert drop_path_rates(0.0, (3, 3, 9, 3)) == [[0.0] * 3, [0.0] * 3, [0.0] * 9, [0.0] * 3]


def test_drop_path_layers_carry_the_linear_rates(small_arch):
    model = build_model(small_arch, num_classes=10, drop_path_rate=0.3)
    rates = drop_path_rates(0.3, small_arch.depths)
    found = {layer.name: layer.rate for layer in model.layers if isinstance(layer, DropPath)}
    expected = {
        f"stages.{i}.blocks.{j}.drop_path": rate
        for i, stage in enumerate(rates)
        for j, rate in enumerate(stage)
        if rate > 0
    }
    assert found.keys() == expected.keys()
    assert "stages.0.blocks.0.drop_path" not in found  # the first block's rate is 0
    for name, rate in expected.items():
        assert found[name] == pytest.approx(rate)


def test_no_drop_path_layers_at_rate_zero(small_arch):
    model = build_model(small_arch, num_classes=10, drop_path_rate=0.0)
    assert not [layer for layer in model.layers if isinstance(layer, DropPath)]
    assert not [layer for layer in model.layers if "drop_path" in layer.name]


def test_drop_path_only_in_training(small_arch, live_weights):
    model = perturb(build_model(small_arch, num_classes=10, drop_path_rate=0.5))
    for layer in model.layers:  # full-strength residual branches: dropping one shows
        if isinstance(layer, LayerScale):
            layer.gamma.assign(np.ones(layer.gamma.shape, "float32"))
    x = images(8, 32, 32)
    infer_a = keras.ops.convert_to_numpy(model(x, training=False))
    infer_b = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_array_equal(infer_a, infer_b)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), infer_a)  # default: inference
    train_a = keras.ops.convert_to_numpy(model(x, training=True))
    train_b = keras.ops.convert_to_numpy(model(x, training=True))
    assert np.abs(train_a - train_b).max() > 1e-3
    assert np.abs(train_a - infer_a).max() > 1e-3
    # inference is the plain network: the same weights without DropPath give the same output
    plain = build_model(small_arch, num_classes=10, drop_path_rate=0.0)
    plain.set_weights(model.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain(x)), infer_a, rtol=1e-6, atol=1e-6)


def test_drop_path_layer_drops_whole_samples_and_rescales():
    layer = DropPath(0.5, seed=1)
    x = np.ones((2000, 2, 2, 3), "float32")
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    per_sample = y.reshape(len(y), -1)
    # each sample is wholly kept (scaled by 1/keep) or wholly dropped
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert (per_sample.min(axis=1) == per_sample.max(axis=1)).all()
    kept = (per_sample[:, 0] == 2.0).mean()
    assert 0.4 < kept < 0.6
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_drop_path_rejects_bad_rates(rate):
    with pytest.raises(ValueError):
        DropPath(rate)


# --- dtype policy ---------------------------------------------------------------------------------


def test_layer_scale_follows_mixed_precision_policy():
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        layer = LayerScale(init_value=0.5)
        y = layer(np.full((2, 3, 3, 4), 3.0, "float32"))
        assert layer.gamma.dtype == "float32"
        assert keras.backend.standardize_dtype(y.dtype) == "float16"
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(y), np.full((2, 3, 3, 4), 1.5, "float16"))
        # inside the whole network too
        model = build_model(SMALL_V1, num_classes=10)
        scales = [layer for layer in model.layers if isinstance(layer, LayerScale)]
        assert len(scales) == sum(SMALL_V1.depths)
        for scale in scales:
            assert scale.gamma.dtype == "float32"
            assert keras.backend.standardize_dtype(scale.output.dtype) == "float16"
        out = model(images(1, 32, 32))
        assert np.isfinite(keras.ops.convert_to_numpy(out).astype("float32")).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_layer_scale_multiplies_per_channel():
    layer = LayerScale(init_value=1.0)
    layer.build((None, 3))
    layer.gamma.assign(np.array([1.0, 2.0, -3.0], "float32"))
    y = keras.ops.convert_to_numpy(layer(np.ones((2, 3), "float32")))
    np.testing.assert_array_equal(y, [[1.0, 2.0, -3.0]] * 2)


# --- serialisation ----------------------------------------------------------------------------------


def test_keras_file_round_trip_in_safe_mode(small_arch, tmp_path):
    model = perturb(build_model(small_arch, num_classes=10, drop_path_rate=0.2), seed=3)
    x = images(2, 64, 64)
    expected = keras.ops.convert_to_numpy(model(x))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), expected)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    assert type(loaded.get_layer("stages.0.blocks.0.gamma")) is LayerScale
    dropped = loaded.get_layer("stages.3.blocks.0.drop_path")
    assert type(dropped) is DropPath and dropped.rate == pytest.approx(0.2)
    assert {layer.epsilon for layer in loaded.layers if isinstance(layer, keras.layers.LayerNormalization)} == {
        small_arch.norm_eps
    }
    # the round trip is not vacuous: a fresh model of the same row computes something else
    fresh = build_model(small_arch, num_classes=10)
    assert np.abs(keras.ops.convert_to_numpy(fresh(x)) - expected).max() > 1e-3


# --- every variant: V2/GRN, SimpleNorm, overlapping stems, head norm first, head MLP ----------
@pytest.mark.parametrize("variant", sorted(SMALL))
def test_every_variant_round_trips_through_a_keras_file(variant, tmp_path):
    model = perturb(build_model(SMALL[variant], num_classes=10), seed=5)
    x = images(2, 64, 96)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)))


def test_overlapping_stems_pad_like_torch():
    """torch pads 1 on every side; Keras' 'same' would pad bottom/right only at stride 2."""
    model = build_model(SMALL["overlap"], num_classes=10)
    assert model.get_layer("stem.0.pad").padding == ((1, 1), (1, 1))
    assert model.get_layer("stem.0").padding == "valid" and model.get_layer("stem.0").strides == (2, 2)
    assert model.get_layer("stem.2").name == "stem.2"  # the norm after two convs
    tiered = build_model(SMALL["overlap_tiered"], num_classes=10)
    assert tiered.get_layer("stem.0").filters == 8  # timm's make_divisible(dims[0] // 2)


def test_grn_matches_its_formula():
    from zoo.core.model import GlobalResponseNorm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 4)).astype("float32")
    layer = GlobalResponseNorm()
    layer.build(x.shape)
    weight, bias = rng.normal(size=4).astype("float32"), rng.normal(size=4).astype("float32")
    layer.weight.assign(weight)
    layer.bias.assign(bias)
    gx = np.sqrt((x.astype(np.float64) ** 2).sum(axis=(1, 2), keepdims=True))
    nx = gx / (gx.mean(axis=-1, keepdims=True) + 1e-6)
    expected = x + bias + weight * (x * nx)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_simple_norm_uses_the_unbiased_variance_and_does_not_centre():
    from zoo.core.model import SimpleNorm

    x = np.random.default_rng(1).normal(2.0, 3.0, size=(3, 8)).astype("float32")
    layer = SimpleNorm(1e-6)
    out = keras.ops.convert_to_numpy(layer(x))
    expected = x / np.sqrt(x.var(axis=-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert layer.weight is not None and SimpleNorm(1e-6, scale=False)(x) is not None


def test_head_variants_end_where_timm_does():
    hnf = build_model(SMALL["head_norm_first"], num_classes=10)
    names = [layer.name for layer in hnf.layers]
    assert names.index("norm_pre") < names.index("head.global_pool") and "head.norm" not in names
    mlp = build_model(SMALL["head_mlp"], num_classes=10)
    assert mlp.get_layer("head.pre_logits.fc").units == 40
    assert build_model(SMALL["head_mlp"], include_top=False).output_shape == (None, 40)
    backbone = build_model(SMALL_V1, num_classes=0)
    assert "head.fc" not in [layer.name for layer in backbone.layers]
    assert backbone.output_shape == (None, 32)
    untrained_norm = build_model(SMALL_V1, num_classes=0, head_norm_affine=False).get_layer("head.norm")
    assert untrained_norm.weights == []


@pytest.mark.parametrize("user_choice", [None, pytest.param("0", marks=pytest.mark.slow)])  # "0": -m slow
def test_import_zoo_turns_on_onednn_unless_the_user_chose(user_choice):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if user_choice is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = user_choice
    code = (
        "import os, zoo, tensorflow; from zoo.core.runtime import onednn_enabled; "
        "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], onednn_enabled())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == (["1", "True"] if user_choice is None else ["0", "False"])
