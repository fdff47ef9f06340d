"""Preprocessing equals timm's eval transform; the Keras layer stays within its stated bound."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg

import zoo
from converters.images import natural_images
from converters.reference import random_state_dict
from tests.support.archs import SMALL_V1
from tests.support.porting import port
from zoo.core.catalogue import catalogue
from zoo.core.errors import ImageError, UnknownModelError, ZooError
from zoo.core.preprocessing import (
    LAYER_MAX_ABS,
    LAYER_MEAN_ABS,
    Preprocessing,
    as_preprocessing,
    pictures,
    preprocess,
    with_preprocessing,
)

# crop 0.875 (1k), 0.95 (12k head), 1.0 at 256 with CLIP's mean/std, 0.9 with mean 0.5, squash 384
CASES = [
    "convnext_tiny.fb_in1k",
    "convnext_nano.in12k",
    "convnext_base.clip_laion2b_augreg_ft_in1k",
    "convnext_zepto_rms_ols.ra4_e3600_r224_in1k",
    "convnext_tiny.fb_in22k_ft_in1k_384",
]
# (height, width, format, mode): odd sizes, both orientations, square, smaller than every crop
FILES = [
    (333, 517, "png", "RGB"),
    (224, 224, "jpeg", "RGB"),
    (700, 100, "png", "RGB"),
    (100, 700, "jpeg", "RGB"),
    (150, 120, "png", "L"),
    (61, 90, "png", "RGBA"),
    (385, 383, "jpeg", "RGB"),
]


def natural(height: int, width: int, seed: int) -> np.ndarray:
    return np.ascontiguousarray(natural_images(1, max(height, width), seed)[0][:height, :width])


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, (height, width, fmt, mode) in enumerate(FILES):
        image = Image.fromarray(natural(height, width, seed))
        if mode == "RGBA":
            image.putalpha(Image.fromarray(natural(height, width, 50 + seed)[..., 0]))
        path = folder / f"image{seed}_{width}x{height}.{fmt}"
        image.convert(mode).save(path, **({"quality": 90} if fmt == "jpeg" else {}))
        paths.append(path)
    return paths


def timm_eval(name: str, use_catalogue: bool = False):
    """timm's own eval transform for a checkpoint (its registered pretrained_cfg, not ours)."""
    cfg = zoo.resolve(name).pretrained_cfg() if use_catalogue else get_pretrained_cfg(name).to_dict()
    return create_transform(**resolve_data_config(pretrained_cfg=cfg))


def timm_batch(transform, paths) -> np.ndarray:
    """As timm evaluates files: `Image.open(f).convert('RGB')`, the transform, NCHW -> NHWC."""
    return np.stack([transform(Image.open(p).convert("RGB")).numpy().transpose(1, 2, 0) for p in paths])


@pytest.mark.parametrize("name", CASES)
def test_equals_timms_eval_transform(name, image_files):
    reference = timm_batch(timm_eval(name), image_files)
    ours = preprocess(image_files, name)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    assert ours.shape[1:3] == zoo.resolve(name).input_size[1:]
    max_abs = float(np.max(np.abs(ours - reference)))
    assert max_abs <= 1e-5
    assert np.array_equal(ours, reference), f"max abs {max_abs}: not bit-identical to timm"
    # the catalogue's pretrained_cfg is timm's for what preprocessing needs
    np.testing.assert_array_equal(timm_batch(timm_eval(name, use_catalogue=True), image_files[:2]), ours[:2])


@pytest.mark.parametrize(
    "size, crop_pct, mode, interpolation",
    [
        ((200, 300), 0.9, "center", "bilinear"),  # non-square: timm's ResizeKeepRatio
        ((224, 224), 1.2, "center", "bicubic"),  # crop larger than the resized image: zero padding
        ((160, 192), 1.15, "squash", "bilinear"),
    ],
)
def test_equals_timm_beyond_the_catalogue(size, crop_pct, mode, interpolation, image_files):
    transform = create_transform(
        input_size=(3, *size),
        crop_pct=crop_pct,
        crop_mode=mode,
        interpolation=interpolation,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.3, 0.25),
    )
    ours = Preprocessing(size, crop_pct, mode, interpolation, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25))(image_files)
    np.testing.assert_array_equal(ours, timm_batch(transform, image_files))


def test_input_forms_agree(image_files):
    name = "convnext_tiny.fb_in1k"
    expected = preprocess(image_files, name)
    images = [Image.open(p) for p in image_files]
    np.testing.assert_array_equal(preprocess(images, name), expected)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in image_files]
    np.testing.assert_array_equal(preprocess(arrays, name), expected)
    np.testing.assert_array_equal(preprocess([str(p) for p in image_files], name), expected)
    np.testing.assert_array_equal(zoo.preprocess(image_files[0], zoo.resolve(name)), expected[:1])
    np.testing.assert_array_equal(
        preprocess(arrays[1], Preprocessing.from_checkpoint(zoo.resolve(name))), expected[1:2]
    )
    # a uint8 NHWC batch, and grey images as (H, W) or (H, W, 1)
    batch = np.stack([arrays[1], arrays[1][::-1]])
    np.testing.assert_array_equal(preprocess(batch, name), preprocess(list(batch), name))
    grey = np.asarray(Image.open(image_files[4]))
    assert grey.ndim == 2
    np.testing.assert_array_equal(preprocess(grey, name), expected[4:5])
    np.testing.assert_array_equal(preprocess(grey[..., None], name), expected[4:5])


def test_every_catalogue_entry_has_a_preprocessing():
    for ckpt in catalogue().values():
        p = Preprocessing.from_checkpoint(ckpt)
        assert p == Preprocessing.from_pretrained_cfg(ckpt.pretrained_cfg()) == as_preprocessing(ckpt.name)
        assert p.input_size == ckpt.input_size[1:] and p.scale_size[0] >= p.input_size[0]


def test_import_stays_free_of_frameworks():
    code = (
        "import sys, numpy as np, zoo\n"
        "x = zoo.preprocess(np.zeros((40, 30, 3), np.uint8), 'convnext_tiny')\n"
        "assert x.shape == (1, 224, 224, 3)\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'torch', 'timm') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    assert "preprocess" in zoo.__all__


def test_errors_say_what_is_wrong(tmp_path, image_files):
    name = "convnext_tiny.fb_in1k"
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.jpeg"
    truncated.write_bytes(image_files[1].read_bytes()[:2000])
    cases = [
        (tmp_path / "missing.jpg", "no such file"),
        (tmp_path, "is a folder"),
        (text, "not an image file"),
        (truncated, "truncated"),
        ([image_files[0], tmp_path / "missing.jpg"], "missing.jpg: no such file"),
        (np.zeros((32, 32, 3), np.float32), "dtype float32"),
        (np.zeros((3, 32, 32), np.uint8), "channels first"),
        (np.zeros((32, 32, 5), np.uint8), "shape (32, 32, 5)"),
        (np.zeros((0, 32, 3), np.uint8), "empty"),
        (np.zeros((2, 32, 32, 3), np.int64), "the batch has dtype int64"),
        (np.zeros((1, 2, 32, 32, 3), np.uint8), "shape"),
        ([], "no images given"),
        (42, "cannot read images from a int"),
        ([b"bytes"], "cannot read a bytes"),
    ]
    for images, message in cases:
        with pytest.raises(ImageError) as caught:
            preprocess(images, name)
        assert message in str(caught.value), (message, str(caught.value))
        assert isinstance(caught.value, ZooError)
    with pytest.raises(UnknownModelError, match="did you mean"):
        preprocess(image_files[0], "convnext_tny.fb_in1k")
    with pytest.raises(ValueError, match="crop_mode"):
        Preprocessing((224, 224), crop_mode="border")


@pytest.fixture(scope="module")
def small_classifier():
    """A small ConvNeXt with perturbed random weights: logits of realistic spread."""
    from zoo.core.model import build_model

    model = build_model(SMALL_V1, num_classes=1000)
    port(random_state_dict(SMALL_V1, 1000, seed=0), model)
    return model


def test_keras_layer_stays_within_its_bound(image_files, small_classifier):
    arrays = [np.asarray(image) for image in pictures(image_files)]
    arrays += [natural(h, w, seed=20 + i) for i, (h, w) in enumerate([(480, 640), (257, 255), (1000, 800)])]
    worst_max, worst_mean, agree, total, prob_diff = 0.0, 0.0, 0, 0, 0.0
    for name in CASES[:2] + CASES[-2:]:
        layer = with_preprocessing(small_classifier, name).get_layer("preprocess")
        reference = preprocess(arrays, name)  # equals timm's (test above)
        ours = np.concatenate([np.asarray(layer(array[None])) for array in arrays])
        diff = np.abs(ours - reference)
        worst_max, worst_mean = max(worst_max, float(diff.max())), max(worst_mean, float(diff.mean((1, 2, 3)).max()))
        exact, raw = np.asarray(small_classifier(reference)), np.asarray(small_classifier(ours))
        agree += int((exact.argmax(-1) == raw.argmax(-1)).sum())
        total += len(arrays)
        prob_diff = max(prob_diff, float(np.abs(softmax(exact) - softmax(raw)).max()))
    print(
        f"Keras layer vs timm: max abs {worst_max:.4f}, worst mean abs {worst_mean:.5f}, "
        f"top-1 {agree}/{total}, probabilities within {prob_diff:.4f}"
    )
    # measured: max 0.069, mean 0.0037, every top-1 equal, probabilities within 0.01
    assert worst_max <= LAYER_MAX_ABS and worst_mean <= LAYER_MEAN_ABS, (worst_max, worst_mean)
    assert agree / total >= 0.95 and prob_diff <= 0.02, (agree, total, prob_diff)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_keras_layer_is_exact_where_no_resampling_happens():
    """Integer sizes, offsets and padding are timm's: without resampling the outputs are equal."""
    from zoo.core.preprocessing import Preprocess

    image = natural(256, 300, seed=3)  # shorter side already 256 = floor(224 / 0.875)
    layer = Preprocess(**Preprocessing.from_checkpoint(zoo.resolve("convnext_tiny.fb_in1k")).to_config())
    np.testing.assert_allclose(np.asarray(layer(image[None])), preprocess(image, "convnext_tiny.fb_in1k"), atol=1e-6)
    padded = Preprocessing((224, 224), crop_pct=1.1)  # resized to 203, padded to 224
    small = natural(203, 203, seed=4)
    np.testing.assert_allclose(np.asarray(Preprocess(**padded.to_config())(small[None])), padded(small), atol=1e-6)


def test_keras_model_with_preprocessing_saves_and_loads_safely(tmp_path, small_classifier):
    import keras

    model = with_preprocessing(small_classifier, "convnext_tiny.fb_in22k_ft_in1k_384")
    images = np.stack([natural(300, 451, seed=7), natural(300, 451, seed=8)])
    expected = model.predict(images, verbose=0)  # in a graph: any height and width
    assert expected.shape == (2, 1000)
    model.save(tmp_path / "with_preprocessing.keras")
    loaded = keras.saving.load_model(tmp_path / "with_preprocessing.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(images.astype(np.float32), verbose=0), expected, atol=1e-5)
    assert loaded.get_layer("preprocess").preprocessing.crop_mode == "squash"
