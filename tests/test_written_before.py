"""Folders and files written by an earlier layout of the package still load, unchanged.

`tests/data/written_before/` was written before the ground modules moved under `zoo.core`: a converted
folder (`zoo convert`, seeded random weights of a small architecture) and its model saved as one
`.keras` file behind the preprocessing layer (`zoo.preprocessing.with_preprocessing(model, folder)
.save(...)`). Their Keras configs name the old modules (`"module": "zoo.model"`); Keras finds the
classes by their registered names (`convnext_zoo>...`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import zoo

DATA = Path(__file__).parent / "data" / "written_before"
FOLDER = DATA / "convnext_tiny.fb_in1k"


def test_the_files_name_the_old_module():
    """What makes these files a test of the old names (a guard against regenerating them now)."""
    modules = {layer.get("module") for layer in _configs(json.loads((FOLDER / "config.json").read_text()))}
    assert "zoo.model" in modules and "zoo.core.model" not in modules


def test_a_folder_written_before_loads_and_still_passes_verify(tmp_path):
    from converters.verify import verify

    folder = shutil.copytree(FOLDER, tmp_path / FOLDER.name)  # verify writes nothing; the copy proves it
    report = verify(folder)
    assert report.passed and report.logits.max_abs < 1e-4
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in FOLDER.iterdir())


def test_its_model_with_preprocessing_loads_and_gives_the_logits_of_the_layer_made_now():
    import keras

    from zoo.preprocessing import with_preprocessing

    saved = keras.saving.load_model(DATA / "with_preprocessing.keras")
    assert [layer.__class__.__name__ for layer in saved.layers][:2] == ["InputLayer", "Preprocess"]
    made_now = with_preprocessing(zoo.load(FOLDER), FOLDER)
    image = np.random.default_rng(0).integers(0, 256, (1, 260, 300, 3)).astype(np.float32)
    ours, theirs = np.asarray(made_now(image)), np.asarray(saved(image))
    assert np.abs(ours).max() > 0.1  # logits the weights reach
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def _configs(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _configs(value)
