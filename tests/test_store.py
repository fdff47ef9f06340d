"""The converted-checkpoint folder (checkpoints/store.py) and loading it back (zoo.load)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

import zoo
import zoo.loading
from checkpoints import converted, fs, store
from tests.support.archs import SMALL_V1
from tests.support.cli import one_line_error, zoo_cli
from tests.support.faults import dead_pid
from tests.support.folders import NAME, PARITY, folder_config, small_model
from tests.support.writing import write_converted
from zoo.core.errors import IntegrityError, StoreError
from zoo.core.folder_config import CONTENT_FILES, MANIFEST, RECORD, FolderConfig
from zoo.core.model import build_model

FILES = (*CONTENT_FILES, MANIFEST)


def config() -> FolderConfig:
    """A config as converters.pipeline writes it, for the small row."""
    return folder_config()


def write(out: Path, model: keras.Model | None = None) -> tuple[Path, keras.Model]:
    model = model or small_model()
    return write_converted(out, model, config(), dict(PARITY)), model


def batch(n: int = 2, size: int = 64) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(n, size, size, 3)).astype("float32")


def outputs(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def tree(root: Path) -> dict[str, bytes | None]:
    """Everything under `root`: {relative path: a file's bytes, None for a folder}."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- the written folder -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One folder written by write_converted, with the written model's outputs on `batch()`."""
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
    edited = {
        "parity.json": text.replace('"atol": 0.0001', '"atol": 0.0009'),
        "config.json": text.replace('"epsilon": 1e-06', '"epsilon": 1e-05', 1),
    }.get(name, text.replace("fb_in1k", "fb_in2k", 1))
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


@pytest.mark.parametrize(
    "change, said",
    [
        (lambda m: m["files"]["parity.json"].pop("sha256"), "parity.json needs its sha256"),
        (lambda m: m["files"]["config.json"].update(size="12"), "config.json needs its sha256 (a string) and size"),
        (lambda m: m.update(files=["parity.json"]), "its files must be an object"),
        (lambda m: m.update(format="convnext-zoo/99"), "unknown format 'convnext-zoo/99'"),
    ],
    ids=["no sha256", "size a string", "files a list", "unknown format"],
)
def test_a_folder_and_a_published_repo_check_their_manifest_alike(ckpt, change, said):
    """One check of a manifest, for a folder on disk and for a published repo's manifest before its
    files are fetched: a manifest that cannot describe a converted folder is named, in one line."""
    from checkpoints import hub
    from zoo.core.errors import HubError

    manifest = json.loads((ckpt / "manifest.json").read_text())
    change(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises((StoreError, IntegrityError), match=re.escape(said)) as on_disk:
        converted.open_folder(ckpt)
    with pytest.raises(HubError, match=re.escape(said)) as published:
        hub._published_files("org/model", ckpt / "manifest.json")
    assert "\n" not in str(on_disk.value) and str(published.value).startswith("org/model")


@pytest.mark.parametrize("opener", [converted.open_folder, zoo.load], ids=["open_folder", "zoo.load"])
@pytest.mark.parametrize("extra", ["notes.txt", "runs/"])
def test_an_entry_the_manifest_does_not_list_is_caught(ckpt, opener, extra):
    """Every file of a converted folder is in its manifest: a file or a folder beside them is
    named, in one line."""
    if extra.endswith("/"):
        (ckpt / extra).mkdir()
        (ckpt / extra / "log.txt").write_text("keep me")
    else:
        (ckpt / extra).write_text("keep me")
    with pytest.raises(IntegrityError) as raised:
        opener(ckpt)
    message = str(raised.value)
    assert repr(extra) in message and "does not list" in message and "\n" not in message, message


def test_verify_names_a_file_the_manifest_does_not_list(ckpt):
    (ckpt / "notes.txt").write_text("keep me")
    line = one_line_error(zoo_cli("verify", ckpt))
    assert "'notes.txt'" in line and "does not list" in line, line
    assert (ckpt / "notes.txt").read_text() == "keep me"


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


@pytest.mark.parametrize("extra", ["notes.txt", "runs/", "config.json/"])
def test_write_refuses_a_converted_folder_holding_other_entries(ckpt, tmp_path, extra):
    """Only a converted folder's own files are replaced: a file or a folder its manifest does
    not list (also a folder under a listed name) is named, and nothing is deleted."""
    if extra.endswith("/"):
        (ckpt / extra).unlink(missing_ok=True)
        (ckpt / extra).mkdir()
        (ckpt / extra / "log.txt").write_text("keep me")
    else:
        (ckpt / extra).write_text("keep me")
    before = tree(ckpt)
    with pytest.raises(StoreError) as raised:
        write(ckpt, small_model(seed=1))
    message = str(raised.value)
    assert repr(extra) in message and "does not list" in message and "\n" not in message, message
    assert tree(ckpt) == before
    assert leftovers(tmp_path) == []


def test_write_checks_the_destination_again_before_the_swap(ckpt, tmp_path, monkeypatch):
    """A file put in the destination while the new folder is assembled (another program, during
    a conversion's slow steps) is found under the lock, before the swap: refused, kept, the
    previous folder as it was."""
    before = tree(ckpt)
    assemble = store.assemble

    def assemble_then_intrude(*args):
        assemble(*args)
        (ckpt / "notes.txt").write_text("keep me")

    monkeypatch.setattr(store, "assemble", assemble_then_intrude)
    with pytest.raises(StoreError, match="notes.txt"):
        write(ckpt, small_model(seed=1))
    assert tree(ckpt) == {**before, "notes.txt": b"keep me"}
    assert leftovers(tmp_path) == []


def test_a_file_that_turns_up_during_the_swap_is_kept(ckpt, tmp_path, monkeypatch):
    """Put in the destination after the check under the lock, just before the swap (by a program
    that takes no lock): the new folder goes in, and the file is kept beside it, not deleted."""
    exchange = fs._exchange

    def intrude_then_exchange(new, out):
        (out / "notes.txt").write_text("keep me")
        return exchange(new, out)

    monkeypatch.setattr(fs, "_exchange", intrude_then_exchange)
    _, model = write(ckpt, small_model(seed=1))
    x = batch()
    np.testing.assert_array_equal(outputs(zoo.load(ckpt), x), outputs(model, x))
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("ckpt.kept-")]
    assert len(kept) == 1 and tree(kept[0]) == {"notes.txt": b"keep me"}
    assert leftovers(tmp_path) == []


def test_a_store_made_a_converted_folder_is_not_swapped_out(tmp_path):
    """The store's root made a converted folder (what `--name .` once did), with the store's
    models inside: writing over it is refused naming them, and so is writing into it."""
    root = store.store_root()
    write(root)
    other, _ = write(tmp_path / "other", small_model(seed=2))
    for name in ("convnext_small.fb_in1k", "convnext_tiny.fb_in1k"):
        shutil.copytree(other, root / name)
    before = tree(root)
    with pytest.raises(StoreError) as raised:
        write(root, small_model(seed=1))
    assert "'convnext_small.fb_in1k/', 'convnext_tiny.fb_in1k/'" in str(raised.value), raised.value
    with pytest.raises(StoreError, match="inside the converted folder"):
        write(root / "convnext_base.fb_in1k")
    assert tree(root) == before


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


def test_stale_staging_links_are_removed_not_followed(tmp_path):
    """A killed writer's staging entry may be a link (the swap with a destination that was one):
    the link goes, what it points to stays."""
    pid = dead_pid()
    target = tmp_path / "target"
    target.mkdir()
    (target / "data.bin").write_bytes(b"keep me")
    (tmp_path / f".ckpt.partial-{pid}-link").symlink_to(target)
    (tmp_path / f".ckpt.partial-{pid}-dangling").symlink_to(tmp_path / "gone")
    (tmp_path / f".ckpt.partial-{pid}-file").write_bytes(b"half")
    write(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "target"]
    assert tree(target) == {"data.bin": b"keep me"}


# --- a destination that is a link ----------------------------------------------------------------


@pytest.mark.parametrize("points_to", ["an empty folder", "nothing", "a converted folder"])
def test_write_through_a_link_writes_where_it_points(points_to, tmp_path, pristine):
    """`--out LINK`: the folder is written where the link points (a converted folder there is
    replaced), the link stays, and nothing is left beside either."""
    target = tmp_path / "elsewhere" / "target"
    target.parent.mkdir()
    if points_to == "an empty folder":
        target.mkdir()
    elif points_to == "a converted folder":
        shutil.copytree(pristine["path"], target)
    link = tmp_path / "link"
    link.symlink_to(target)
    out, model = write(link, small_model(seed=1))
    assert out == target and link.is_symlink() and link.resolve() == target
    x = batch()
    np.testing.assert_array_equal(outputs(zoo.load(link), x), outputs(model, x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "link"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["target"]


def test_write_through_a_link_loop_is_refused(tmp_path):
    link = tmp_path / "loop"
    link.symlink_to(link)
    with pytest.raises(StoreError) as raised:
        write(link)
    assert "\n" not in str(raised.value)
    assert [p.name for p in tmp_path.iterdir()] == ["loop"] and link.is_symlink()


@pytest.mark.slow  # with -m slow: the default run keeps to its 10 minutes
def test_convert_out_through_a_link_to_a_converted_folder(tmp_path):
    """As users run it: `zoo convert --out LINK` replaces the converted folder the link points
    to; the link stays and no staging entry is left."""
    target, _ = write(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    proc = zoo_cli("convert", "convnext_atto", "--random-weights", "--out", link)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()) == target
    assert link.is_symlink() and converted.open_folder(link).config.name == "convnext_atto.d2_in1k"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
