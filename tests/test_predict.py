"""`zoo predict`, run as users run it (a subprocess), checked against timm's transform and model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from timm.models import get_pretrained_cfg

import zoo
from converters.images import natural_images
from converters.reference import create, random_state_dict
from tests.support.archs import SMALL_V1
from tests.support.cli import zoo_cli, zoo_inline
from tests.support.folders import folder_config, small_model
from tests.support.porting import port
from tests.support.writing import write_converted

NAME = "convnext_tiny.fb_in1k"
TIMEOUT = 180


def write_folder(out, name: str, num_classes: int, state: dict | None = None):
    """A converted folder of SMALL_V1 labelled as catalogue entry `name` (its preprocessing)."""
    from zoo.core.model import build_model

    model = build_model(SMALL_V1, num_classes=num_classes, name=name)
    if state is not None:
        port(state, model)
    return write_converted(out, model, folder_config(name, SMALL_V1, num_classes), {"passed": True})


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A 1000-class folder, three images, and timm's own probabilities for them."""
    root = tmp_path_factory.mktemp("predict")
    state = random_state_dict(SMALL_V1, 1000, seed=4)
    folder = write_folder(root / "classifier", NAME, 1000, state)
    images = []
    for seed, (height, width, fmt) in enumerate([(333, 517, "png"), (700, 100, "jpeg"), (150, 120, "png")]):
        pixels = natural_images(1, max(height, width), seed=10 + seed)[0][:height, :width]
        images.append(root / f"photo{seed}.{fmt}")
        Image.fromarray(np.ascontiguousarray(pixels)).save(images[-1])
    # the whole reference side is timm's: its transform, its model, these weights
    transform = create_transform(**resolve_data_config(pretrained_cfg=get_pretrained_cfg(NAME).to_dict()))
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    model = create(SMALL_V1, 1000)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    with torch.no_grad():
        probabilities = torch.softmax(model(batch).double(), dim=-1).numpy()
    return folder, [str(p) for p in images], probabilities


def first_lemma(index: int) -> str:
    return ImageNetInfo("imagenet-1k").index_to_description(index).split(", ")[0]


def test_table_shows_timms_top_classes(classifier):
    folder, images, expected = classifier
    result = zoo_cli("predict", *images, "--model", str(folder), "--top", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = [block.splitlines() for block in result.stdout.strip().split("\n\n")]
    assert [block[0] for block in blocks] == images
    for block, probabilities in zip(blocks, expected, strict=False):
        assert block[1].split() == ["rank", "probability", "index", "label"]
        rows = [line.split(maxsplit=3) for line in block[2:]]
        assert [r[0] for r in rows] == ["1", "2", "3"]
        best = np.argsort(-probabilities)[:3]
        assert [int(r[2]) for r in rows] == list(best)
        assert [r[3] for r in rows] == [first_lemma(i) for i in best]
        for row, index in zip(rows, best, strict=False):
            assert abs(float(row[1].rstrip("%")) - 100 * probabilities[index]) <= 0.006


def test_json_lists_every_class(classifier):
    folder, images, expected = classifier
    result = zoo_cli("predict", images[1], "--model", str(folder), "--top", "2000", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    [entry] = json.loads(result.stdout)
    assert entry["image"] == images[1]
    predictions = entry["predictions"]
    assert len(predictions) == 1000  # --top is capped by the head
    probabilities = np.array([p["probability"] for p in predictions])
    assert abs(probabilities.sum() - 1.0) <= 1e-6 and np.all(np.diff(probabilities) <= 0)
    assert predictions[0]["index"] == int(expected[1].argmax())
    ours = np.zeros(1000)
    ours[[p["index"] for p in predictions]] = probabilities
    np.testing.assert_allclose(ours, expected[1], atol=1e-5)
    assert all(p["label"] == first_lemma(p["index"]) for p in predictions[:20])
    # a converted folder names its own preprocessing
    np.testing.assert_array_equal(zoo.preprocess(images, folder), zoo.preprocess(images, NAME))


def test_classify_is_what_predict_prints(classifier):
    """The Python API finds the classifier, its preprocessing and its class names as `zoo predict`
    does; names given replace the checkpoint's, one per class."""
    from zoo.core.errors import ZooError
    from zoo.prediction import classifier as find
    from zoo.prediction import classify

    folder, images, expected = classifier
    found = find(folder)
    assert (found.name, found.num_classes, found.folder.path) == (NAME, 1000, folder)
    assert found.labels[:3] == tuple(first_lemma(i) for i in range(3))
    best = classify(folder, images, top=3)
    for row, probabilities in zip(best, expected, strict=True):
        assert [p.index for p in row] == list(np.argsort(-probabilities, kind="stable")[:3])
        assert [p.label for p in row] == [first_lemma(p.index) for p in row]
        np.testing.assert_allclose([p.probability for p in row], probabilities[[p.index for p in row]], atol=1e-5)
    names = [f"class {i}" for i in range(1000)]
    renamed = classify(found, images[:1], top=2, labels=names)
    assert [p.label for p in renamed[0]] == [f"class {p.index}" for p in best[0][:2]]
    with pytest.raises(ZooError, match="3 class names for the 1000 classes"):
        find(folder, labels=["a", "b", "c"])
    catalogued = find("convnext_tiny_1k")  # a catalogue name: resolved, nothing looked up yet
    assert (catalogued.name, catalogued.folder, len(catalogued.labels)) == (NAME, None, 1000)


def test_head_without_labels_shows_indices(tmp_path):
    name = "convnext_base.clip_laion2b"  # a 640-wide CLIP embedding head
    folder = write_folder(tmp_path / "clip", name, 640)
    image = tmp_path / "photo.png"
    Image.fromarray(natural_images(1, 90, seed=2)[0]).save(image)
    result = zoo_cli("predict", str(image), "--model", str(folder), "--json", "--top", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without class names" in result.stderr and "class indices" in result.stderr
    [entry] = json.loads(result.stdout)
    assert [p["label"] for p in entry["predictions"]] == [None] * 4
    assert all(0 <= p["index"] < 640 for p in entry["predictions"])


HOSTILE_NAMES = (
    "\x1b]0;title\x07",
    "\x1b[2J",
    "cat\nerror: injected line",
    "tab\there\r",
    "\x9b31m\x7f",
    "\u202eevil",
    "\ud800",
    "chat \u732b",
)


def test_class_names_from_files_cannot_drive_the_terminal(tmp_path):
    """Names a conversion took from a source's files, as `zoo predict` prints them: each class on
    its own row, control characters escaped (no window title set, no screen cleared, no forged
    `error:` line, no reordered text), the image's path too; `--json` keeps every name exact."""
    from zoo.core.text import printable

    names = HOSTILE_NAMES + ("dog", "bird")
    folder = write_converted(
        tmp_path / "named",
        small_model(num_classes=10),
        folder_config(NAME, SMALL_V1, 10, labels=names),
        {"passed": True},
    )
    image = tmp_path / "photo\x1b[2J.png"
    Image.fromarray(natural_images(1, 90, seed=2)[0]).save(image)
    table = zoo_inline("predict", image, "--model", folder, "--top", "10")
    assert table.exit_code == 0, table.stderr[-3000:]
    assert not any(c in table.stdout for c in "\x1b\x07\x9b\x7f\r\t\u202e\ud800")
    rows = table.stdout.splitlines()
    assert len(rows) == 12 and rows[0] == str(image).replace("\x1b", "\\x1b")
    assert not any(row.startswith("error:") for row in rows)
    shown = {int(row.split(maxsplit=3)[2]): row.split(maxsplit=3)[3] for row in rows[2:]}
    assert shown == {i: printable(name) for i, name in enumerate(names)}
    assert shown[2] == "cat\\nerror: injected line" and shown[7] == "chat \u732b"
    as_json = zoo_inline("predict", image, "--model", folder, "--top", "10", "--json")
    predictions = json.loads(as_json.stdout)[0]["predictions"]
    assert {p["index"]: p["label"] for p in predictions} == dict(enumerate(names))


def test_user_errors_exit_1_with_a_message(tmp_path, classifier):
    folder, images, _ = classifier
    features = write_folder(tmp_path / "features", "convnext_tiny.dinov3_lvd1689m", 0)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    cases = [
        (["predict", images[0], str(tmp_path / "missing.png"), "--model", str(folder)], "missing.png: no such file"),
        (["predict", str(not_an_image), "--model", str(folder)], "not an image file"),
        (["predict", images[0], "--model", str(features)], "feature checkpoint without a classifier head"),
        (["predict", images[0], "--model", "convnext_tny"], "did you mean"),
    ]
    for args, message in cases:  # refusals of arguments: in-process
        result = zoo_inline(*args)
        assert result.exit_code == 1, (args, result.stderr[-3000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_help_names_the_default_model():
    result = zoo_inline("predict", "--help")
    assert result.exit_code == 0 and "convnext_tiny.fb_in1k" in result.stdout


@pytest.mark.parametrize(
    "num_classes, subset", [(1000, "imagenet-1k"), (11821, "imagenet-12k"), (21841, "imagenet-22k")]
)
def test_label_sets_equal_timms(num_classes, subset):
    from zoo.core.labels import descriptions, label_names, synsets

    info = ImageNetInfo(subset)
    assert synsets(num_classes) == info.label_names()
    assert descriptions(num_classes) == [info.index_to_description(i) for i in range(num_classes)]
    names = label_names(num_classes)
    assert len(names) == num_classes and names == [d.split(", ")[0] for d in descriptions(num_classes)]
    if num_classes == 1000:
        assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"


def test_heads_without_a_label_set():
    from zoo.core.labels import label_names, synsets

    for width in (0, 640, 768, 1024, 21843):
        assert label_names(width) is None and synsets(width) is None
    widths = {c.num_classes for c in zoo.catalogue().values()}
    assert widths - {0, 640, 768, 1024} == {1000, 11821, 21841}  # every classifier head is named


@pytest.mark.parametrize(
    "change",
    [{"crop_pct": 0.003}, {"crop_pct": float("nan")}, {"mean": [0.5]}, {"interpolation": "\x1b[2Jlanczos"}],
    ids=["tiny-crop", "nan-crop", "mean", "escape"],
)
def test_a_folder_recording_preprocessing_no_transform_can_apply_is_one_line(change, tmp_path):
    """Folders written before the values beside the weights were checked may record such values
    (their manifest is intact): predicting with one is one line, never a 22 GB resize or a traceback."""
    import dataclasses

    from zoo.core.model import build_model

    config = folder_config(NAME, SMALL_V1, 10)
    config = dataclasses.replace(config, pretrained_cfg={**config.pretrained_cfg, **change})
    folder = write_converted(
        tmp_path / "old", build_model(SMALL_V1, num_classes=10, name=NAME), config, {"passed": True}
    )
    image = tmp_path / "a.png"
    Image.fromarray(natural_images(1, 64)[0]).save(image)
    result = zoo_inline("predict", image, "--model", folder)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "\x1b" not in result.output, result.output
