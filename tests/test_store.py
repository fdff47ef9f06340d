"""The converted-checkpoint folder (checkpoints/store.py) and loading it back (zoo.load)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

import zoo
import zoo.loading
from checkpoints import converted, store
from tests.support.archs import SMALL_V1
from tests.support.folders import NAME, PARITY, folder_config, small_model
from zoo.errors import IntegrityError, StoreError
from zoo.folder_config import CONTENT_FILES, MANIFEST, RECORD, FolderConfig
from zoo.model import build_model

FILES = (*CONTENT_FILES, MANIFEST)


def config() -> FolderConfig:
    """A config as converters.pipeline writes it, for the small row."""
    return folder_config()


def write(out: Path, model: keras.Model | None = None) -> tuple[Path, keras.Model]:
    model = model or small_model()
    return store.write(out, model, config(), dict(PARITY)), model


def batch(n: int = 2, size: int = 64) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(n, size, size, 3)).astype("float32")


def outputs(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- the written folder -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One folder written by store.write, with the written model's outputs on `batch()`."""
    parent = tmp_path_factory.mktemp("pristine")
    model = small_model()
    out, _ = write(parent / "ckpt", model)
    x = batch()
    pre_logits = keras.Model(model.input, model.get_layer("head.fc").input)
    return {"path": out, "logits": outputs(model, x), "pre_logits": outputs(pre_logits, x)}


@pytest.fixture
def ckpt(tmp_path, pristine) -> Path:
    """A private copy of the pristine folder, free to be damaged."""
    return Path(shutil.copytree(pristine["path"], tmp_path / "ckpt"))


def test_folder_layout_and_manifest(pristine):
    out = pristine["path"]
    assert out.is_absolute() and out.name == "ckpt"
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == converted.FORMAT
    assert set(manifest["files"]) == {"model.weights.h5", "config.json", "metadata.json", RECORD, "parity.json"}
    for name, meta in manifest["files"].items():
        data = (out / name).read_bytes()
        assert meta["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert meta["size"] == len(data), name
    weights_sha = manifest["files"]["model.weights.h5"]["sha256"]
    written_config = json.loads((out / RECORD).read_text())
    assert written_config["weights"] == {"file": "model.weights.h5", "sha256": weights_sha}
    assert written_config["architecture"] == SMALL_V1.to_config()
    assert written_config["name"] == NAME and written_config["num_classes"] == 10
    parity = json.loads((out / "parity.json").read_text())
    assert parity["weights_sha256"] == weights_sha and parity["atol"] == PARITY["atol"]
    # nothing but the folder itself is left in its parent
    assert [p.name for p in out.parent.iterdir()] == ["ckpt"]
    assert converted.is_converted_folder(out)


def test_open_folder_returns_config_and_parity(pristine):
    out = pristine["path"]
    folder = converted.open_folder(out)
    assert folder.path == out
    assert folder.weights == out / "model.weights.h5"
    assert folder.config.name == NAME
    assert folder.parity["passed"] is True


def test_load_gives_the_written_model(pristine):
    out, x = pristine["path"], batch()
    loaded = zoo.load(out)
    np.testing.assert_array_equal(outputs(loaded, x), pristine["logits"])
    assert loaded.name == NAME
    # loading is not vacuous: an unloaded model of the same row computes something else
    assert np.abs(outputs(build_model(SMALL_V1, num_classes=10), x) - pristine["logits"]).max() > 1e-3
    # a str path works as well as a Path
    np.testing.assert_array_equal(outputs(zoo.load(str(out)), x), pristine["logits"])


def test_load_headless(pristine):
    out, x = pristine["path"], batch()
    got = outputs(zoo.loading.load(out, include_top=False), x)
    assert got.shape == (2, SMALL_V1.dims[-1])
    np.testing.assert_allclose(got, pristine["pre_logits"], rtol=1e-6, atol=1e-6)
    stage_map = outputs(zoo.loading.load(out, include_top=False, pooling=None), x)
    assert stage_map.shape == (2, 2, 2, SMALL_V1.dims[-1])
    with pytest.raises(ValueError):
        zoo.loading.load(out, include_top=False, pooling="max")


# --- integrity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("opener", [converted.open_folder, zoo.load], ids=["open_folder", "zoo.load"])
def test_one_changed_byte_in_the_weights_is_caught(ckpt, opener):
    out = ckpt
    size = (out / "model.weights.h5").stat().st_size
    flip_byte(out / "model.weights.h5")
    assert (out / "model.weights.h5").stat().st_size == size
    with pytest.raises(IntegrityError):
        opener(out)


@pytest.mark.parametrize("opener", [converted.open_folder, zoo.load], ids=["open_folder", "zoo.load"])
@pytest.mark.parametrize("name", [RECORD, "parity.json", "config.json"])
def test_an_edited_json_file_is_caught(ckpt, opener, name):
    out = ckpt
    text = (out / name).read_text()
    edited = {"parity.json": text.replace('"atol": 0.0001', '"atol": 0.0009'),
              "config.json": text.replace('"epsilon": 1e-06', '"epsilon": 1e-05', 1)}.get(
                  name, text.replace("fb_in1k", "fb_in2k", 1))
    assert edited != text and len(edited) == len(text)
    (out / name).write_text(edited)
    with pytest.raises(IntegrityError):
        opener(out)


@pytest.mark.parametrize("name", ["model.weights.h5", "config.json", "metadata.json", RECORD, "parity.json"])
def test_a_deleted_file_is_caught(ckpt, name):
    out = ckpt
    (out / name).unlink()
    with pytest.raises((StoreError, IntegrityError)):
        converted.open_folder(out)
    with pytest.raises((StoreError, IntegrityError)):
        zoo.load(out)


def test_a_folder_without_manifest_is_not_a_converted_folder(ckpt, tmp_path):
    out = ckpt
    (out / "manifest.json").unlink()
    assert not converted.is_converted_folder(out)
    with pytest.raises(StoreError, match="manifest"):
        converted.open_folder(out)
    with pytest.raises(StoreError):
        zoo.load(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError):
        zoo.load(empty)


def test_a_manifest_that_omits_a_file_is_caught(ckpt):
    out = ckpt
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]["parity.json"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError):
        converted.open_folder(out)


def test_missing_paths_raise_store_error(tmp_path):
    with pytest.raises(StoreError):
        converted.open_folder(tmp_path / "nope")
    with pytest.raises(StoreError):
        zoo.load(tmp_path / "nope")
    with pytest.raises(StoreError):
        zoo.load(str(tmp_path / "model.weights.h5"))


# --- writing over things ----------------------------------------------------------------------------

def test_write_refuses_a_foreign_folder_and_leaves_it_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = {p.relative_to(out): (p.read_bytes() if p.is_file() else None) for p in out.rglob("*")}
    with pytest.raises(StoreError):
        write(out)
    after = {p.relative_to(out): (p.read_bytes() if p.is_file() else None) for p in out.rglob("*")}
    assert after == before
    assert leftovers(tmp_path) == []


def test_write_refuses_a_file(tmp_path):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    with pytest.raises(StoreError):
        write(out)
    assert out.read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_write_into_an_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert leftovers(tmp_path) == []


def test_write_replaces_a_converted_folder(ckpt, tmp_path, pristine):
    out = ckpt
    old_sha = json.loads((out / "manifest.json").read_text())["files"]["model.weights.h5"]["sha256"]
    _, second = write(out, small_model(seed=1))
    new_sha = json.loads((out / "manifest.json").read_text())["files"]["model.weights.h5"]["sha256"]
    assert new_sha != old_sha
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    x = batch()
    loaded = outputs(zoo.load(out), x)
    np.testing.assert_array_equal(loaded, outputs(second, x))
    assert np.abs(loaded - pristine["logits"]).max() > 1e-3
    assert leftovers(tmp_path) == []


def test_a_failing_write_leaves_nothing(tmp_path, monkeypatch):
    model = small_model()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_weights", boom)
    out = tmp_path / "ckpt"
    with pytest.raises(StoreError):
        write(out, model)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_failing_write_keeps_the_previous_folder(ckpt, tmp_path, monkeypatch, pristine):
    out = ckpt
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    model = small_model(seed=1)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_weights", boom)
    with pytest.raises(StoreError):
        write(out, model)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []
    x = batch()
    np.testing.assert_array_equal(outputs(zoo.load(out), x), pristine["logits"])


# --- the local store ------------------------------------------------------------------------------

def test_store_root_follows_zoo_home(isolated_home):
    assert store.store_root() == isolated_home / "store"
    assert store.store_path(NAME) == isolated_home / "store" / NAME


def test_load_by_name_needs_a_conversion_first(isolated_home):
    with pytest.raises(StoreError, match="zoo convert"):
        zoo.load("convnext_tiny_1k")
    assert not (isolated_home / "store" / NAME).exists()


def test_load_by_name_from_the_store(isolated_home):
    where = store.store_path(NAME)
    assert str(where).startswith(str(isolated_home)) and not where.parent.exists()
    _, model = write(where)  # the store root is created on the way
    x = batch()
    expected = outputs(model, x)
    for name in ("convnext_tiny_1k", NAME, "convnext_tiny_1k_224_ema"):
        np.testing.assert_array_equal(outputs(zoo.load(name), x), expected)
    # another checkpoint of the same architecture is not there
    with pytest.raises(StoreError, match="zoo convert"):
        zoo.load("convnext_tiny_22k_1k")


def test_load_by_unknown_name(isolated_home):
    with pytest.raises(zoo.UnknownModelError):
        zoo.load("convnext_tny_1k")


# --- concurrency and crashes ------------------------------------------------------------------

def test_readers_never_see_a_missing_or_partial_folder_while_it_is_replaced(tmp_path):
    import threading

    out, model = write(tmp_path / "ckpt")
    stop, seen, errors = threading.Event(), [], []

    def read():
        while not stop.is_set():
            try:
                seen.append(converted.open_folder(out).config.name)
            except Exception as e:  # noqa: BLE001  (any failure is the finding)
                errors.append(repr(e))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(15):
            write(out, model)
    finally:
        stop.set()
        reader.join()
    assert errors == [] and len(seen) > 15
    assert leftovers(tmp_path) == []


def test_concurrent_writers_of_one_folder_all_succeed(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    models = [small_model(seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda m: write(tmp_path / "ckpt", m)[0], models))
    assert done == [tmp_path / "ckpt"] * 4
    folder = converted.open_folder(tmp_path / "ckpt")  # one whole, valid folder: one writer's
    assert folder.parity["weights_sha256"] == folder.config.weights_sha256
    assert leftovers(tmp_path) == []


def test_partials_of_killed_writers_are_cleared_by_the_next_write(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ckpt.partial-{int(dead.stdout)}-abc123"
    live = tmp_path / ".ckpt.partial-1-running"  # pid 1 is alive: a writer still at work
    for path in (stale, live):
        path.mkdir()
        (path / "model.weights.h5").write_bytes(b"half")
    write(tmp_path / "ckpt")
    assert not stale.exists() and live.exists()
