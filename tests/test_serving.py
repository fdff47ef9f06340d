"""The serving path (`zoo.core.serving`): the Keras model's outputs from one folded TensorFlow function.

Weights are perturbed to a realistic scale first: LayerScale at 1e-6 and GRN at zero would make
every block an identity and hide a wrong fold.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import zoo
from zoo.core.model import pre_logits
from zoo.core.serving import fused_norm_epsilon, plan_folds, serving_function

FUSED = fused_norm_epsilon() is not None  # this TensorFlow has oneDNN's fused LayerNorm kernel
NORM_FORMS = [False] + ([None] if FUSED else [])  # folded (TFLite, no oneDNN), and fused where it runs


def perturbed(name: str, dtype: str = "float32") -> keras.Model:
    model = zoo.build(name, dtype=dtype)
    rng = np.random.default_rng(3)
    for v in model.weights:
        value = keras.ops.convert_to_numpy(v).astype(np.float32)
        shift = 0.3 if ("gamma" in v.path and "norm" not in v.path) or ".grn/" in v.path else 0.0
        v.assign((value + shift + rng.standard_normal(v.shape).astype(np.float32) * 0.05).astype(v.dtype))
    return model


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((3, 64, 64, 3)).astype(np.float32)


@pytest.mark.parametrize("fused", NORM_FORMS, ids=lambda f: "folded-norms" if f is False else "fused-norms")
@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnext_atto_ols", "convnext_zepto_rms"])
def test_serving_equals_the_model(name, fused, images):
    """Conv-MLP blocks, GRN, the overlapping stem, SimpleNorm: the same logits up to rounding, with
    the norms folded into the next linear layer or in the fused kernel's form."""
    model = perturbed(name)
    expected = np.asarray(model.predict_on_batch(images))
    got = serving_function(model, fused_norms=fused)(images).numpy()
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert np.abs(expected).max() > 1.0  # the perturbation reached the logits


def executed_ops(function, *args) -> list[str]:
    """The kernels TensorFlow ran for one call, after its graph optimiser (from a profiler trace)."""
    import tempfile
    from pathlib import Path

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logs:
        tf.profiler.experimental.start(logs)
        function(*args)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(next(Path(logs).rglob("*.xplane.pb")).read_bytes())
    return [
        plane.event_metadata[event.metadata_id].name.split(":")[-1]
        for plane in space.planes
        for line in plane.lines
        if line.name.startswith("tf_Compute")
        for event in line.events
    ]


@pytest.mark.skipif(not FUSED, reason="this TensorFlow has no fused oneDNN LayerNorm kernel")
def test_every_layernorm_runs_as_one_fused_kernel(images):
    """The graph optimiser replaced each norm's ops with oneDNN's kernel (no SquaredDifference left):
    a form it stops recognising would pass every equality test and lose the speed silently. The
    kernel's own epsilon (1e-3) is not the model's (1e-6): the equality above shows the input scale
    makes up for it."""
    model = perturbed("convnext_atto")
    serve = serving_function(model)
    serve(images)
    ran = executed_ops(serve, images)
    norms = sum(isinstance(layer, keras.layers.LayerNormalization) for layer in model.layers)
    assert ran.count("_MklLayerNorm") == norms, sorted(set(ran))
    assert "SquaredDifference" not in ran and "Rsqrt" not in ran


def test_serving_of_a_features_view_with_variables_and_constants(images):
    model = perturbed("convnext_atto")
    features = keras.Model(model.input, pre_logits(model))
    expected = np.asarray(features.predict_on_batch(images))
    for constant in (True, False):
        got = serving_function(features, constant=constant)(images).numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_what_folds_into_what(images):
    """Every block's norm into its fc1 and its LayerScale into its fc2, each downsample norm into its
    conv, the head norm into the classifier; the stem's norm feeds a padded depthwise conv and stays.
    All-zero biases (fresh Keras initialisation) stay variables: the graph optimiser would drop a zero
    constant and, with it, oneDNN's matmul + bias + GELU fusion."""
    model = zoo.build("convnext_atto")
    serve = serving_function(model, constant=True, fused_norms=False)
    expected = np.asarray(model.predict_on_batch(images))
    np.testing.assert_allclose(serve(images).numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    kept = [v.name for t in serve.trackables if isinstance(t, tf.Module) for v in t.folded]
    assert kept and all(name.split(":")[0].endswith("/bias") for name in kept)
    norm_into, scale_into = plan_folds(model)
    blocks = [layer.name[: -len(".conv_dw")] for layer in model.layers if layer.name.endswith(".conv_dw")]
    expected = {f"{b}.mlp.fc1": f"{b}.norm" for b in blocks}
    expected.update({f"stages.{i}.downsample.1": f"stages.{i}.downsample.0" for i in (1, 2, 3)})
    expected["head.fc"] = "head.norm"
    assert {k: v.name for k, v in norm_into.items()} == expected
    assert {k: v.name for k, v in scale_into.items()} == {f"{b}.mlp.fc2": f"{b}.gamma" for b in blocks}


def test_bfloat16_serves_in_bfloat16_with_float32_logits(images):
    model = perturbed("convnext_atto", dtype="bfloat16")
    expected = np.asarray(model.predict_on_batch(images), np.float32)
    got = serving_function(model)(images).numpy()
    assert got.dtype == np.float32
    # within bfloat16's error of the model's own bfloat16 logits; top-1 is not compared: on random
    # weights two classes can tie within that error, and the two computation orders (natively on
    # CPUs with AVX512_BF16) may then pick either (seen here: 11 vs 10 on one of three images)
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


FROZEN_CHILD = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from zoo.core.runtime import assume_frozen_weights
assume_frozen_weights()  # what the zoo commands do, before TensorFlow's import
import tensorflow as tf
from test_serving import perturbed
from zoo.core.serving import serving_function
images = np.random.default_rng(0).standard_normal((3, 64, 64, 3)).astype(np.float32)
model = perturbed("convnextv2_atto")
serve = serving_function(model)
first = serve(images).numpy()
expected = np.asarray(model.predict_on_batch(images))
np.testing.assert_allclose(first, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
np.testing.assert_array_equal(serve(images).numpy(), first)
print("frozen ok")
"""


def test_the_commands_frozen_weights_give_the_same_logits(tmp_path):
    """The `zoo` commands let oneDNN keep its packed weights (TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1, read
    once per process): in a fresh process as they run, the serving path still equals the model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS"}
    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, "-c", FROZEN_CHILD, str(tests)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tests.parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "frozen ok" in done.stdout


def test_frozen_weights_are_assumed_only_before_tensorflow_and_never_over_a_choice(monkeypatch):
    import os
    import sys

    from zoo.core.runtime import FROZEN_VAR, assume_frozen_weights

    monkeypatch.delenv(FROZEN_VAR, raising=False)
    assume_frozen_weights()  # tensorflow is imported here: too late, left alone
    assert FROZEN_VAR not in os.environ
    monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.setenv(FROZEN_VAR, "0")
    assume_frozen_weights()
    assert os.environ[FROZEN_VAR] == "0"
    monkeypatch.delenv(FROZEN_VAR)
    assume_frozen_weights()
    assert os.environ[FROZEN_VAR] == "1"
