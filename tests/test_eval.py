"""`zoo eval`: accuracy on a labelled image folder, and agreement with timm on the same files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from checkpoints import converted
from converters.images import natural_images
from tests.support.archs import SMALL
from tests.support.converted import convert_small
from zoo.core.errors import DatasetError, ImageError
from zoo.core.preprocessing import preprocess
from zoo.evaluation import evaluate, samples
from zoo.loading import from_folder

SYNSETS = ["n01440764", "n01443537", "n01484850"]  # ImageNet-1k classes 0, 1, 2
SIZES = [(300, 410), (224, 224), (517, 333), (150, 90)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return convert_small(tmp_path_factory.mktemp("eval") / "converted", SMALL["v2_grn"], seed=4)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """ImageNet layout: 3 class folders of 4 images of odd sizes, JPEG and PNG."""
    root = tmp_path_factory.mktemp("imagenet-val")
    for c, synset in enumerate(SYNSETS):
        (root / synset).mkdir()
        for i, (h, w) in enumerate(SIZES):
            pixels = natural_images(1, max(h, w), seed=10 * c + i)[0][:h, :w]
            Image.fromarray(pixels).save(root / synset / f"img{i}.{'png' if i % 2 else 'JPEG'}")
    return root


FRUIT = ["date", "cherry", "banana", "apple", "elderberry", "fig"]  # not in sorted order: banana is class 2


@pytest.fixture(scope="module")
def fruit(tmp_path_factory):
    """A converted 6-class checkpoint with its own class names (written through the store, as a
    conversion writes it), its head biased so that it predicts banana for every image: a folder of
    banana/ and cherry/ images then has a top-1 known in advance (the banana images), which
    numbering the folders in sorted order would miss."""
    from tests.support.folders import PARITY, folder_config, small_model
    from tests.support.writing import write_converted

    model = small_model(5, num_classes=len(FRUIT))
    bias = model.get_layer("head.fc").bias
    bias.assign(np.asarray(bias) + 50.0 * np.eye(len(FRUIT), dtype="float32")[FRUIT.index("banana")])
    config = folder_config(num_classes=len(FRUIT), labels=tuple(FRUIT))
    return write_converted(tmp_path_factory.mktemp("fruit") / "converted", model, config, dict(PARITY))


def _image_folder(root, counts: dict[str, int]):
    """`root` with a class folder per name of `counts`, holding that many small natural images."""
    for c, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i, pixels in enumerate(natural_images(count, 40, seed=c)):
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    return root


def expected_accuracy(folder_path, paths, labels, k):
    """Top-k computed independently: preprocess + the Keras model, image by image."""
    model = from_folder(converted.open_folder(folder_path))
    logits = np.concatenate([np.asarray(model(preprocess([p], folder_path))) for p in paths])
    top = np.argsort(-logits, axis=-1)[:, :k]
    return float(np.mean([label in row for label, row in zip(labels, top, strict=False)]))


def test_accuracy_and_agreement_with_timm(folder, image_folder):
    report = evaluate(folder, image_folder, batch_size=5, compare_torch=True, progress=False)
    found, _ = samples(image_folder, 1000)
    assert report.num_images == 12 and report.labels == "folder names as WordNet ids"
    assert sorted({s.label for s in found}) == [0, 1, 2]
    paths, labels = [s.path for s in found], [s.label for s in found]
    assert report.top1 == pytest.approx(expected_accuracy(folder, paths, labels, 1))
    assert report.top5 == pytest.approx(expected_accuracy(folder, paths, labels, 5))
    # timm, with its own transform on the same files, predicts what we predict
    torch = report.torch
    assert torch["agreement"] == 1.0 and torch["top1"] == report.top1 and torch["top5"] == report.top5
    assert torch["max_abs"] <= 1e-4


def test_images_are_prepared_in_parallel_exactly_as_in_one_thread(folder, image_folder, tmp_path):
    """Each batch from the worker threads is the array `zoo.preprocess` gives for it in one call;
    an unreadable image fails its batch, not the process."""
    from zoo.core.preprocessing import as_preprocessing
    from zoo.evaluation import prepared_batches

    prepare = as_preprocessing(folder)
    paths = sorted(image_folder.rglob("img*"))
    serial = list(prepared_batches(prepare, paths, 5, 0))
    parallel = list(prepared_batches(prepare, paths, 5, 3))
    assert [b.shape[0] for b in parallel] == [5, 5, 2]
    for a, b in zip(serial, parallel, strict=False):
        np.testing.assert_array_equal(a, b)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ImageError):
        list(prepared_batches(prepare, paths[:6] + [broken] + paths[6:], 5, 3))


def test_the_table_escapes_what_a_terminal_would_act_on(folder, image_folder, tmp_path):
    """A data folder's name is printed in the table as it is, control characters escaped: it cannot
    set the window title or forge an `error:` line."""
    from tests.support.cli import zoo_inline

    data = tmp_path / "val\x1b]0;title\x07\nerror: injected line"
    data.symlink_to(image_folder)
    result = zoo_inline("eval", "--data", data, "--model", folder, "--workers", "0")
    assert result.exit_code == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "val\\x1b]0;title\\x07\\nerror: injected line (12 images" in lines[0]


def test_labels_file_and_limit(folder, image_folder, tmp_path):
    # relabel so every image's label is the model's own top-1: accuracy must read 100%
    found, _ = samples(image_folder, 1000)
    model = from_folder(converted.open_folder(folder))
    predicted = [int(np.argmax(model(preprocess([s.path], folder)))) for s in found]
    lines = [f"{s.path.relative_to(image_folder)},{p}" for s, p in zip(found, predicted, strict=False)]
    labels = tmp_path / "labels.csv"
    labels.write_text("# path,label\n" + "\n".join(lines) + "\n")
    report = evaluate(folder, image_folder, labels_file=labels, progress=False)
    assert report.top1 == 1.0 and report.num_images == 12
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(
        "\n".join(
            f"{s.path.relative_to(image_folder)} {(p + 1) % 1000}" for s, p in zip(found, predicted, strict=False)
        )
    )
    assert evaluate(folder, image_folder, labels_file=wrong, progress=False).top1 == 0.0
    limited = evaluate(folder, image_folder, limit=5, progress=False)
    assert limited.num_images == 5
    assert [s.path for s in samples(image_folder, 1000, limit=5)[0]] == [
        s.path for s in samples(image_folder, 1000, limit=5)[0]
    ]  # a fixed sample


def test_folder_numbering_rules(tmp_path):
    for name in ("3", "7"):
        (tmp_path / "ints" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "ints" / name / "a.png")
    found, how = samples(tmp_path / "ints", 1000)
    assert how == "folder names as class indices" and [s.label for s in found] == [3, 7]
    # an ImageNet head's label names are the ImageNet names (as `zoo predict` prints them)
    for name in ("tench", "goldfish"):
        (tmp_path / "imagenet names" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "imagenet names" / name / "a.jpg")
    found, how = samples(tmp_path / "imagenet names", 1000)
    assert how == "folder names as the model's label names"
    assert [(s.path.parent.name, s.label) for s in found] == [("goldfish", 1), ("tench", 0)]
    # names that are no class's are refused, never numbered in sorted order
    for name in ("dog", "cat"):
        (tmp_path / "names" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "names" / name / "a.jpg")
    with pytest.raises(DatasetError, match=r"2 of 2 class folders name no class of this 1000-class head: 'cat', 'dog'"):
        samples(tmp_path / "names", 1000)
    (tmp_path / "shared" / "crane").mkdir(parents=True)  # the bird (134) and the machine (517)
    with pytest.raises(DatasetError, match=r"'crane' \(shared by classes 134, 517\)"):
        samples(tmp_path / "shared", 1000)


def test_folders_named_by_the_models_own_labels_map_by_name(fruit, tmp_path):
    """The user's case: banana/ and cherry/ named by a converted checkpoint's own class names are
    classes 2 and 1, not 0 and 1 in sorted order; top-1 is what the model itself scores on them."""
    data = _image_folder(tmp_path / "fruit", {"banana": 1, "cherry": 5})
    report = evaluate(fruit, data, progress=False, workers=0)
    found, how = samples(data, len(FRUIT), names=FRUIT)
    assert how == report.labels == "folder names as the model's label names"
    assert [s.label for s in found] == [FRUIT.index(s.path.parent.name) for s in found] == [2, 1, 1, 1, 1, 1]
    paths, labels = [s.path for s in found], [s.label for s in found]
    assert report.top1 == pytest.approx(expected_accuracy(fruit, paths, labels, 1)) == pytest.approx(1 / 6)
    # a labels file names classes the same way (each label a name, an index or a WordNet id)
    listing = tmp_path / "labels.txt"
    listing.write_text("banana/img0.png banana\ncherry/img0.png 1\ncherry/img1.png cherry\n")
    assert [s.label for s in samples(data, len(FRUIT), labels_file=listing, names=FRUIT)[0]] == [2, 1, 1]


def test_folders_that_name_no_class_are_one_error_naming_them(fruit, tmp_path):
    from tests.support.cli import one_line_error, zoo_inline

    data = _image_folder(tmp_path / "mixed", {"banana": 1, "kiwi": 1, "7": 1})
    with pytest.raises(DatasetError) as refused:
        samples(data, len(FRUIT), names=FRUIT)
    assert str(refused.value) == (
        f"{data}: 2 of 3 class folders name no class of this 6-class head: '7', 'kiwi'; name each class "
        "folder by the model's label names ('date', 'cherry', 'banana', 'apple', ...) or class index 0..5, "
        "or give --labels FILE"
    )
    line = one_line_error(zoo_inline("eval", "--data", data, "--model", fruit, "--workers", "0"))
    assert "'7', 'kiwi'" in line and "the model's label names" in line
    both = _image_folder(tmp_path / "both", {"banana": 1, "3": 1})  # each a class, but named two ways
    with pytest.raises(DatasetError, match="name their classes in different ways"):
        samples(both, len(FRUIT), names=FRUIT)
    listing = tmp_path / "labels.txt"
    listing.write_text("banana/img0.png kiwi\n")
    with pytest.raises(DatasetError, match=r"labels.txt:1: label 'kiwi' names no class; name a label by"):
        samples(data, len(FRUIT), labels_file=listing, names=FRUIT)


def test_bad_data_is_refused_clearly(tmp_path):
    with pytest.raises(DatasetError, match="no such image folder"):
        samples(tmp_path / "missing", 1000)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        samples(tmp_path / "empty", 1000)
    (tmp_path / "noimages" / "n01440764").mkdir(parents=True)
    (tmp_path / "noimages" / "n01440764" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        samples(tmp_path / "noimages", 1000)
    (tmp_path / "big" / "1000").mkdir(parents=True)
    with pytest.raises(DatasetError, match="outside this head"):
        samples(tmp_path / "big", 1000)
    labels = tmp_path / "labels.txt"
    labels.write_text("n01440764/none.png 0\n")
    with pytest.raises(DatasetError, match="no image"):
        samples(tmp_path / "noimages", 1000, labels_file=labels)
    labels.write_text("n01440764/notes.txt kitty\n")
    with pytest.raises(DatasetError, match="label 'kitty' names no class; name a label by the model's label names"):
        samples(tmp_path / "noimages", 1000, labels_file=labels)


def test_cli_eval_json_and_errors(folder, image_folder):
    run = [sys.executable, "-m", "zoo.cli", "eval", "--model", str(folder), "--data", str(image_folder)]
    proc = subprocess.run(
        run + ["--json", "--limit", "6", "--dtype", "bfloat16"], capture_output=True, text=True, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["num_images"] == 6 and 0.0 <= report["top1"] <= report["top5"] <= 1.0
    assert report["dtype"] == "bfloat16"
    proc = subprocess.run(run[:-2] + ["--data", str(folder)], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 1 and "no class sub-folders" in proc.stderr and "Traceback" not in proc.stderr


DISTRIBUTED = """
import json, sys
import numpy as np
from checkpoints import converted
from zoo.evaluation import distributed_runner, evaluate
from zoo.loading import from_folder
from zoo.core.preprocessing import preprocess
from zoo.core.serving import runner
folder, data, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
two = evaluate(folder, data, batch_size=5, progress=False, devices=2, workers=0)
one = evaluate(folder, data, batch_size=5, progress=False, workers=0)
import tensorflow as tf
batch = preprocess(paths, folder)
spread = distributed_runner(lambda: from_folder(converted.open_folder(folder)), 2)
single = runner(from_folder(converted.open_folder(folder)))
logits = [np.asarray(spread(batch[:5])), np.asarray(spread(batch[5:]))]
print(json.dumps({"two": [two.top1, two.top5, two.devices], "one": [one.top1, one.top5, one.devices],
                  "cpus": len(tf.config.list_logical_devices("CPU")),
                  "max_abs": float(np.abs(np.concatenate(logits) - np.asarray(single(batch))).max()),
                  "rows": sum(len(x) for x in logits)}))
"""


@pytest.mark.slow  # with -m slow: the default run keeps to its 10 minutes
def test_two_devices_give_the_results_of_one(folder, image_folder):
    """`--devices 2` on this CPU: two logical CPU devices under MirroredStrategy, each batch split
    between them (odd batches too); the same top-1/top-5, and per-image logits equal to one device's."""
    found, _ = samples(image_folder, 1000)
    paths = [str(s.path) for s in found][:9]
    out = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED, str(folder), str(image_folder), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cpus"] == 2 and got["two"][2] == 2 and got["one"][2] == 1
    assert got["two"][:2] == got["one"][:2]
    assert got["rows"] == 9 and got["max_abs"] <= 1e-5
