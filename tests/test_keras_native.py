"""A converted folder, and its published repo, is a Keras model folder: plain `keras.saving.load_model`
reads it (folder and `hf://`, safe mode, torch not importable), on the TensorFlow and JAX backends,
with the logits of `zoo.load` and within the parity tolerance of timm's; Keras' torch backend is
refused in one line; the published card's Python snippets run as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from checkpoints import converted, hub
from converters.reference_process import Network, reference_outputs
from tests.support.archs import SMALL
from tests.support.cli import BLOCK_TORCH
from tests.support.converted import convert_small
from tests.support.hub import local_hub
from zoo.core.errors import HubError, StoreError
from zoo.core.folder_config import CONTENT_FILES, MANIFEST, RECORD
from zoo.core.reports import DEFAULT_ATOL, DEFAULT_RTOL, Comparison

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ORG = "kerasorg"
NAME = "convnext_tiny.fb_in1k"
REPO = f"{ORG}/{NAME}"
SEED = 21
# Both of the project's weighted layers in one small network: V1's LayerScale and V2's GRN (timm
# builds the pair as well), with the linear MLP (PointwiseDense).
ARCH = SMALL["v2_grn"].replace(layer_scale=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder converted by the pipeline behind the parity gate."""
    return convert_small(tmp_path_factory.mktemp("native") / NAME, ARCH, seed=SEED, name=NAME)


@pytest.fixture(scope="module")
def hub_url(folder, tmp_path_factory):
    """The local Hub server over HTTP, the folder published to it as `REPO`."""
    from huggingface_hub import constants

    with local_hub(tmp_path_factory.mktemp("server")) as url, pytest.MonkeyPatch.context() as mp:
        for name, value in (("ENDPOINT", url), ("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_XET", True)):
            mp.setattr(constants, name, value)
        hub.publish(folder, REPO, allow_random=True)
        yield url


def client_env(url: str, home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "KERAS_BACKEND")}
    env.update(
        HF_ENDPOINT=url,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_CACHE=str(home / "hub-cache"),
        ZOO_HOME=str(home / "store"),
        HF_HUB_DISABLE_TELEMETRY="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


# In a child where torch cannot be imported: plain Keras first without zoo (the error a user without
# the package gets), then `import zoo` after Keras (it registers the layers then), then every way in;
# on TensorFlow, last, the published card's Python blocks as they are (in the child's folder, beside
# an image.jpg).
LOAD_EVERY_WAY = BLOCK_TORCH + textwrap.dedent("""
    import contextlib, io, json, sys
    import numpy as np
    import keras

    folder, repo, card_blocks = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    try:
        keras.saving.load_model(folder)
        unregistered = None
    except Exception as e:
        unregistered = str(e).splitlines()[0]
    import zoo

    jax = keras.backend.backend() == "jax"
    x = np.load("inputs.npy")
    ways = {"keras_folder": lambda: keras.saving.load_model(folder, safe_mode=True),
            "keras_hf": lambda: keras.saving.load_model("hf://" + repo, safe_mode=True),
            "zoo_folder": lambda: zoo.load(folder),
            "zoo_hf": lambda: zoo.load("hf://" + repo)}
    logits, classes = {}, {}
    for way in ("keras_hf", "zoo_folder") if jax else ways:
        model = ways[way]()
        classes[way] = type(model).__name__
        # on JAX a compiled predict: an eager call compiles each op on its own (5x slower here)
        logits[way] = model.predict(x, verbose=0) if jax else np.asarray(model(x))
    np.savez("logits.npz", **logits)
    refused = None
    if jax:  # exports other than .keras are TensorFlow's
        from zoo.export import export
        try:
            export(folder, "savedmodel", out="exported.savedmodel", pytorch="skip")
        except zoo.ZooError as e:
            refused = f"{type(e).__name__}: {e}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in card_blocks:
            exec(compile(block, "README.md", "exec"), {})
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm") and sys.modules[m] is not None)
    print(json.dumps({"backend": keras.backend.backend(), "unregistered": unregistered, "classes": classes,
                      "leaked": leaked, "card_output": printed.getvalue(), "export_refused": refused}))
""")


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


@pytest.fixture(scope="module")
def card(folder) -> str:
    return hub.model_card(converted.open_folder(folder), REPO)


@pytest.fixture(scope="module")
def loaded(folder, hub_url, card, tmp_path_factory) -> dict:
    """The folder's logits loaded every way on TensorFlow (two ways on JAX), timm's on the same
    weights, and what the card's Python blocks printed."""
    work = tmp_path_factory.mktemp("loaded")
    network = Network.of_folder(converted.open_folder(folder).config)
    inputs = network.parity_batch()[:4]
    out = {"timm": reference_outputs(network, work / "timm.safetensors", inputs, random_seed=SEED)["logits"]}
    for backend, blocks in (("tensorflow", python_blocks(card)), ("jax", [])):
        run_dir = work / backend
        run_dir.mkdir()
        np.save(run_dir / "inputs.npy", inputs)
        image = np.random.default_rng(0).integers(0, 255, (300, 260, 3), np.uint8)
        Image.fromarray(image).save(run_dir / "image.jpg")
        proc = subprocess.run(
            [sys.executable, "-c", LOAD_EVERY_WAY, str(folder), REPO, json.dumps(blocks)],
            cwd=run_dir,
            capture_output=True,
            text=True,
            timeout=300,
            env=client_env(hub_url, run_dir, KERAS_BACKEND=backend),
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(run_dir / "logits.npz") as f:
            out[backend] = {"report": report, "logits": dict(f)}
    return out


def within_parity(ours: np.ndarray, ref: np.ndarray) -> Comparison:
    c = Comparison.of("logits", ours, ref)
    assert c.finite and c.max_abs <= DEFAULT_ATOL and c.rel <= DEFAULT_RTOL, c
    return c


def test_plain_keras_loads_folder_and_repo_as_zoo_load_does(loaded):
    """TensorFlow, torch blocked: `keras.saving.load_model` (folder, hf://, safe mode) gives exactly
    zoo.load's logits, a `ConvNeXt` model, within the parity tolerance of timm on the same weights."""
    tf = loaded["tensorflow"]
    assert tf["report"]["backend"] == "tensorflow" and tf["report"]["leaked"] == []
    assert set(tf["logits"]) == {"keras_folder", "keras_hf", "zoo_folder", "zoo_hf"}
    for way, logits in tf["logits"].items():
        np.testing.assert_array_equal(logits, tf["logits"]["zoo_folder"], err_msg=way)
        assert tf["report"]["classes"][way] == "ConvNeXt"
    within_parity(tf["logits"]["keras_hf"], loaded["timm"])


def test_without_zoo_keras_names_the_class_the_readme_explains(loaded):
    message = loaded["tensorflow"]["report"]["unregistered"]
    assert message and "Could not locate class 'ConvNeXt'" in message
    assert "Could not locate class 'ConvNeXt'" in README and "pip install convnext-zoo" in README


def test_jax_backend_gives_tensorflows_logits(loaded):
    jax = loaded["jax"]
    assert jax["report"]["backend"] == "jax" and jax["report"]["leaked"] == []
    for way in ("keras_hf", "zoo_folder"):
        within_parity(jax["logits"][way], loaded["tensorflow"]["logits"]["zoo_folder"])
        assert jax["report"]["classes"][way] == "ConvNeXt"
    within_parity(jax["logits"]["keras_hf"], loaded["timm"])


def test_tensorflow_exports_say_so_on_jax(loaded):
    refused = loaded["jax"]["report"]["export_refused"]
    assert refused.startswith("BackendError: SavedModel exports are made by TensorFlow, and Keras runs on jax")
    assert "KERAS_BACKEND=tensorflow" in refused and len(refused.splitlines()) == 1


def without_object_ids(config):
    """A Keras config without the `shared_object_id`s (the `id()` of shared objects in the saving process)."""
    if isinstance(config, dict):
        return {k: without_object_ids(v) for k, v in config.items() if k != "shared_object_id"}
    return [without_object_ids(v) for v in config] if isinstance(config, list) else config


def test_folder_files_are_what_keras_save_writes(folder, tmp_path):
    """config.json and metadata.json are those `model.save(folder)` writes for the model zoo.load builds."""
    import keras

    import zoo

    model = zoo.load(folder)
    model.save(tmp_path / "saved", zipped=False)
    ours, keras_own = (
        without_object_ids(json.loads((d / "config.json").read_text())) for d in (folder, tmp_path / "saved")
    )
    assert ours == keras_own and ours["registered_name"] == "convnext_zoo>ConvNeXt"
    assert ours["config"]["name"] == NAME
    metadata = json.loads((folder / "metadata.json").read_text())
    assert set(metadata) == set(json.loads((tmp_path / "saved" / "metadata.json").read_text()))
    assert metadata["keras_version"] == keras.__version__
    manifest = json.loads((folder / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(CONTENT_FILES) and RECORD in manifest["files"]


def test_folders_in_the_earlier_layout_are_refused(folder, tmp_path):
    """A folder (or repo) of the earlier layout, the project's record in config.json: convert again."""
    old = Path(shutil.copytree(folder, tmp_path / "old"))
    (old / "config.json").write_text((old / RECORD).read_text())
    for name in ("metadata.json", RECORD):
        (old / name).unlink()
    manifest = json.loads((old / MANIFEST).read_text())
    manifest = {
        "format": "convnext-zoo/1",
        "files": {n: manifest["files"][n] for n in ("model.weights.h5", "parity.json")},
    }
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="earlier convnext-zoo .*convert it again"):
        converted.open_folder(old)
    with pytest.raises(HubError, match="earlier convnext-zoo .*convert and publish it again"):
        hub._published_files("org/old", old / MANIFEST)


def test_keras_torch_backend_is_refused_in_one_line(folder):
    code = textwrap.dedent("""
        import sys
        import zoo, keras  # zoo first: it registers the layers once Keras is imported
        from zoo.core.errors import BackendError
        for load in (lambda: zoo.load(sys.argv[1]), lambda: keras.saving.load_model(sys.argv[1])):
            try:
                load()
                print("loaded")
            except BackendError as e:
                print(str(e))
    """)
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all("not torch" in line and "KERAS_BACKEND=tensorflow" in line for line in lines)


def test_card_metadata_and_snippets_run_against_the_hub(card, loaded, tmp_path):
    """The card's Hub metadata, and its Python blocks run as they are (torch blocked) against the
    local Hub server (in the `loaded` child)."""
    from huggingface_hub import ModelCard

    (tmp_path / "README.md").write_text(card)
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["library_name"] == "keras" and data["pipeline_tag"] == "image-classification"
    assert data["license"] == "apache-2.0" and data["base_model"] == "timm/convnext_tiny.fb_in1k"
    assert data["datasets"] == ["imagenet-1k"] and "keras" in data["tags"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["type"] == "max_abs_logit_error"
    blocks = python_blocks(card)
    assert len(blocks) == 2 and f'keras.saving.load_model("hf://{REPO}")' in blocks[0]
    assert f'zoo.load("hf://{REPO}")' in blocks[1] and 'zoo.preprocess(["image.jpg"]' in blocks[1]
    printed = loaded["tensorflow"]["report"]["card_output"]
    assert re.fullmatch(r"\[\d+\]", printed.strip())  # the top class of image.jpg


def test_card_of_a_checkpoint_without_classifier(folder):
    opened = converted.open_folder(folder)
    features = dataclasses.replace(opened, config=dataclasses.replace(opened.config, num_classes=0))
    card = hub.model_card(features, f"{ORG}/features")
    assert "pipeline_tag: image-feature-extraction" in card and "zoo predict" not in card
    assert "features = model.predict(images" in python_blocks(card)[1]
