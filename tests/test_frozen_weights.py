"""`TF_ONEDNN_ASSUME_FROZEN_WEIGHTS` changes no number: unset, 0 or 1, set by the `zoo` commands or
by the user, every way of running a converted model gives the same outputs.

With the variable at 1, oneDNN keeps the packed weights of each kernel: TensorFlow's eager calls
share one kernel between convolutions of one shape (so a model's second block would run with the
first one's weights), and a graph's kernels keep the weights of their first run. Each setting
runs in a process of its own, as TensorFlow reads the variable once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.archs import SMALL_V1
from tests.support.cli import one_line_error, zoo_cli
from tests.support.converted import convert_small
from zoo.core.runtime import FROZEN_VAR

# Every way a user runs the model, in one process; outputs saved for the parent to compare.
CHILD = r"""
import sys
import numpy as np
import keras
import zoo
from checkpoints.converted import open_folder
from zoo.core.model import build_model
from zoo.core.serving import runner

folder, out = sys.argv[1], sys.argv[2]
config = open_folder(folder).config
x = np.random.default_rng(0).standard_normal((3, 64, 64, 3)).astype("float32")
got = {}
model = zoo.load(folder)
got["zoo.load eager"] = np.asarray(model(x))
got["zoo.load eager again"] = np.asarray(model(x))
got["zoo.load predict"] = model.predict(x, verbose=0)
got["keras.saving.load_model eager"] = np.asarray(keras.saving.load_model(folder)(x))
built = build_model(config.architecture, num_classes=config.num_classes)
built(x)  # a call before the weights arrive: nothing of it may be kept
built.load_weights(f"{folder}/model.weights.h5")
got["build + load_weights eager"] = np.asarray(built(x))
for i, fmap in enumerate(zoo.load(folder, features_only=True)(x)):
    got[f"features_only {i}"] = np.asarray(fmap)
got["include_top=False"] = np.asarray(zoo.load(folder, include_top=False)(x))
got["serving path"] = np.asarray(runner(model)(x))
# weights that change after a first call, the ways Keras offers
model.set_weights([w * np.float32(1.5) for w in model.get_weights()])
got["after set_weights eager"] = np.asarray(model(x))
got["after set_weights predict"] = model.predict(x, verbose=0)
model.load_weights(f"{folder}/model.weights.h5")
got["after load_weights eager"] = np.asarray(model(x))
got["after load_weights predict"] = model.predict(x, verbose=0)
np.savez(out, **got)
# fine-tuning: trains where oneDNN does not keep weights, and is refused, saying why, where it does
from zoo.core.errors import BackendError
tuned = zoo.load(folder, num_classes=3)
tuned.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
try:
    tuned.fit(x, np.array([0, 1, 2]), epochs=1, verbose=0)
except BackendError as e:
    print("fit refused:", e)
else:
    print("fit trained")
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # two blocks in stage 2: convolutions of one shape, in the same model
    assert SMALL_V1.depths[2] >= 2
    return convert_small(tmp_path_factory.mktemp("frozen") / "small", SMALL_V1)


def _env(value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != FROZEN_VAR}
    if value is not None:
        env[FROZEN_VAR] = value
    return env


def _run_child(folder: Path, out: Path, value: str | None) -> tuple[dict[str, np.ndarray], str]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(out)],
        env=_env(value),
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out)), done.stdout


@pytest.fixture(scope="module")
def unset(folder, tmp_path_factory):
    """What every way of running the model gives where the variable is unset, as most users run."""
    got, printed = _run_child(folder, tmp_path_factory.mktemp("unset") / "out.npz", None)
    assert printed.strip() == "fit trained"
    assert np.abs(got["zoo.load eager"]).max() > 1.0  # weights that reach the logits
    return got


# unset and 1 differ in what oneDNN does; 0 is unset's behaviour named (-m slow)
@pytest.mark.parametrize("value", ["1", pytest.param("0", marks=pytest.mark.slow)])
def test_every_way_of_running_the_model_gives_the_same_outputs_whatever_the_variable(value, folder, unset, tmp_path):
    """... and training runs where oneDNN does not keep weights; where it does (1), each graph kernel
    would keep the weights of its first step, so training is refused, saying why."""
    got, printed = _run_child(folder, tmp_path / "out.npz", value)
    if value == "1":
        assert printed.startswith("fit refused:") and FROZEN_VAR in printed and "stale" in printed
    else:
        assert printed.strip() == "fit trained"
    logits = unset["zoo.load eager"]
    for runs_of, outputs in ((f"{FROZEN_VAR}={value}", got), ("unset", unset)):
        for name, output in outputs.items():
            np.testing.assert_allclose(
                output, unset[name], rtol=0, atol=2e-5 * np.abs(unset[name]).max(), err_msg=f"{runs_of}: {name}"
            )
        # within one process: the same model the same way, before and after its weights changed back
        for name in (
            "zoo.load predict",
            "keras.saving.load_model eager",
            "build + load_weights eager",
            "serving path",
            "after load_weights eager",
            "after load_weights predict",
        ):
            np.testing.assert_allclose(
                outputs[name],
                outputs["zoo.load eager"],
                rtol=0,
                atol=2e-5 * np.abs(logits).max(),
                err_msg=f"{runs_of}: {name}",
            )
        assert np.abs(outputs["after set_weights eager"] - outputs["zoo.load eager"]).max() > 0.1  # the change shows


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """A full-size network converted as the README converts convnext_tiny (`--random-weights`):
    convnext_atto, whose export the kept copies broke (Keras side off by 3.15) where the small
    folder's did not, on an AMD EPYC with AVX512_BF16."""
    out = tmp_path_factory.mktemp("frozen") / "convnext_atto-random"
    done = zoo_cli("convert", "convnext_atto.d2_in1k", "--random-weights", "--out", out, env=_env(None))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# A full-size conversion and export (about 40 s): -m slow. The README's own export line runs as written,
# the variable unset, in CI's tour of the README; the small folder above checks every way of running.
@pytest.mark.slow
@pytest.mark.parametrize("value", [None, "0"], ids=["unset", "0"])
def test_the_readme_export_passes_whatever_the_variable(full_size, value, tmp_path):
    """`zoo export DIR --format tflite` as the README writes it: the commands set the variable to 1
    where the user set nothing (1 set by the user is the same); the Keras side of the check must not
    change with it."""
    out = tmp_path / "m.tflite"
    done = zoo_cli("export", full_size, "--format", "tflite", "--out", out, env=_env(value))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_name(out.name + ".parity.json").read_text())
    assert report["passed"] and report["vs_keras"]["max_abs"] <= 1e-4


def test_a_value_tensorflow_cannot_read_is_refused_in_one_line(folder, tmp_path):
    """TensorFlow aborts the process on a value it cannot read as a boolean (a C++ check, no Python
    error): the commands name the variable first."""
    message = one_line_error(zoo_cli("predict", tmp_path / "none.jpg", "--model", folder, env=_env("yes")))
    assert FROZEN_VAR in message
