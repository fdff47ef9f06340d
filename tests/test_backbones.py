"""Using converted models: stage features as timm's `features_only`, and fine-tuning."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import zoo
from checkpoints.converted import open_folder
from converters.images import parity_batch
from converters.recorded import recorded_reference
from converters.reference_process import Network, reference_outputs
from tests.support.archs import SMALL
from tests.support.converted import convert_small
from zoo.core.reports import DEFAULT_STAGE_RTOL, Comparison


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> converted folder of a small architecture (converted once per module)."""
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = convert_small(tmp_path_factory.mktemp(kind) / "converted", SMALL[kind], seed=3)
        return made[kind]

    return get


@pytest.mark.parametrize(
    "kind, out_indices",
    [("overlap_tiered", (0, 1, 2, 3)), pytest.param("head_norm_first", (1, 3), marks=pytest.mark.slow)],
)
def test_features_only_equals_timms_features_only(converted, kind, out_indices, tmp_path):
    folder = open_folder(converted(kind))
    arch = folder.config.architecture
    backbone = zoo.load(folder.path, features_only=True, out_indices=out_indices)

    # any size divisible by 32, not square: strides 4, 8, 16, 32 exactly
    x = parity_batch(224, folder.config.mean, folder.config.std, natural=2, noise=1, seed=5)[:, :96, :160]
    ours = [np.asarray(t) for t in backbone(x)]
    with recorded_reference(folder.config, tmp_path) as (source, seed):  # timm writes the random weights
        theirs = reference_outputs(
            Network.of_folder(folder.config), source.path, x, out_indices=out_indices, random_seed=seed
        )
    assert len(ours) == len(out_indices) == len(theirs)
    for i, feature in zip(out_indices, ours, strict=False):
        stride = 2 ** (i + 2)
        assert feature.shape == (3, 96 // stride, 160 // stride, arch.dims[i])
        c = Comparison.of(f"features.{i}", feature, theirs[f"features.{i}"])
        assert c.finite and c.rel <= DEFAULT_STAGE_RTOL, c


def test_features_only_rejects_bad_indices(converted):
    with pytest.raises(ValueError, match="out_indices"):
        zoo.load(converted("overlap_tiered"), features_only=True, out_indices=(0, 4))


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")


def _synthetic(num_classes=3, n=24, size=64, seed=0):
    """Images whose class is which colour channel is brightest: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    x = rng.normal(0, 0.5, (n, size, size, 3)).astype("float32")
    x[np.arange(n), :, :, labels] += 1.0
    return x, labels


# float32 by default; the mixed policies with -m slow (a conversion under mixed_bfloat16 runs by
# default: test_conversion_and_verify_run_in_float32_under_a_mixed_policy)
@pytest.mark.parametrize(
    "policy",
    [
        "float32",
        pytest.param("mixed_float16", marks=pytest.mark.slow),
        pytest.param("mixed_bfloat16", marks=pytest.mark.slow),
    ],
    indirect=True,
)
def test_fine_tune_new_head_frozen_stages_save_reload(converted, policy, tmp_path, live_weights):
    model = zoo.load(converted("linear_mlp"), num_classes=3, drop_path_rate=0.2)
    assert model.output.shape[-1] == 3
    assert keras.backend.standardize_dtype(model.output.dtype) == "float32"  # logits stay float32
    assert any(layer.name.endswith("drop_path") for layer in model.layers)
    zoo.freeze_stages(model, 2)
    frozen = {w.path: np.array(w) for layer in model.layers if not layer.trainable for w in layer.weights}
    assert frozen and all(not n.startswith(("stages.2", "stages.3", "head")) for n in frozen)
    learned = {w.path: np.array(w) for w in model.get_layer("stages.3.blocks.0.mlp.fc1").weights}

    x, y = _synthetic()
    model.compile(
        optimizer=keras.optimizers.AdamW(3e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=8, epochs=6, verbose=0, shuffle=False)
    after = model.evaluate(x, y, verbose=0)
    assert np.isfinite(after) and after < 0.7 * before, (before, after)
    for layer in model.layers:
        for w in layer.weights:
            if w.path in frozen:
                np.testing.assert_array_equal(np.array(w), frozen[w.path], err_msg=w.path)
    assert any(
        not np.array_equal(np.array(w), learned[w.path]) for w in model.get_layer("stages.3.blocks.0.mlp.fc1").weights
    )

    path = tmp_path / "fine-tuned.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(np.asarray(reloaded.predict(x, verbose=0)), np.asarray(model.predict(x, verbose=0)))
    assert reloaded.get_layer("stages.0.blocks.0.conv_dw").dtype_policy.name == policy


@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
def test_conversion_and_verify_run_in_float32_under_a_mixed_policy(converted, policy):
    from converters.pipeline import empty_model
    from converters.verify import verify

    model = empty_model(Network(SMALL["linear_mlp"], 10, True, 224, (0.5,) * 3, (0.5,) * 3))
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert verify(converted("linear_mlp")).passed
    assert keras.config.dtype_policy().name == policy  # the user's policy is back


@pytest.mark.parametrize("dtype, bound", [("bfloat16", 0.03), ("float16", 0.005)])
def test_reduced_precision_tracks_float32(converted, dtype, bound):
    folder = open_folder(converted("v2_grn"))
    config = folder.config
    x = np.concatenate(
        [
            parity_batch(64, config.mean, config.std),
            parity_batch(64, config.mean, config.std, natural=24, noise=0, seed=9),
        ]
    )
    exact = np.asarray(zoo.load(folder.path, dtype="float32")(x))
    model = zoo.load(folder.path, dtype=dtype)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is untouched
    assert model.get_layer("stages.0.blocks.0.mlp.fc1").compute_dtype == dtype
    low = model(x)
    assert keras.backend.standardize_dtype(low.dtype) == "float32"  # logits in float32
    diff = np.abs(np.asarray(low) - exact).max()
    # the reduced precision is really used (the difference is not zero) and stays small:
    # measured 1.2% (bfloat16) and 0.16% (float16) of the largest logit
    assert 0 < diff <= bound * np.abs(exact).max(), diff
    agree = np.mean(np.asarray(low).argmax(-1) == exact.argmax(-1))
    assert agree >= 0.99, agree


def test_unknown_precision_is_refused_before_any_lookup():
    with pytest.raises(ValueError, match="dtype must be one of"):
        zoo.load("no-such-model", dtype="int8")
