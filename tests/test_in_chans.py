"""Networks of any input channel count (timm's `in_chans`, transformers' `num_channels`): grey (1),
two bands, RGB + near-infrared (4), Sentinel-2's 13.

The checkpoints are real: timm's and transformers' own model classes built with that many
channels, every tensor perturbed to a realistic scale (tests/support/sources.py), saved as users
save them, and converted through the CLI without naming the architecture. The input channels are
read from the stem; the parity gate runs timm on N-channel inputs in its own process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from checkpoints.converted import open_folder
from converters import inference
from converters.images import natural_images, parity_batch
from converters.reference import random_state_dict
from tests.support import sources
from tests.support.archs import SMALL
from tests.support.cli import one_line_error, zoo_inline
from zoo.core.architectures import Architecture
from zoo.core.errors import ArchitectureError, ImageError
from zoo.core.preprocessing import Preprocessing

CLASSES = 5
# in_chans -> (architecture, how the source is saved, the options it needs). Overlapping stems
# read their channels from the same `stem.0.weight`; a timm `save_for_hf` folder says its own
# normalisation (timm fits its pretrained_cfg to the channels), plain files take --mean/--std.
CASES = {
    1: (SMALL["conv_mlp"], "file", ()),
    4: (SMALL["v2_grn"], "file", ("--mean", "0.3,0.4,0.5,0.2", "--std", "0.2,0.25,0.2,0.1")),
    2: (SMALL["overlap_tiered"], "timm_repo", ()),
    13: (
        SMALL["simplenorm_overlap_act"],
        "file",
        ("--mean", ",".join(["0.4"] * 13), "--std", ",".join(f"{0.1 + 0.01 * i:g}" for i in range(13))),
    ),
}
SLOW = (2, 13)  # the default run converts 1 and 4 (about 10 s each)


def _arch(channels: int) -> Architecture:
    return CASES[channels][0].replace(in_chans=channels)


def _source(root, channels: int):
    """The checkpoint as timm saves it: a state dict file, or a `save_for_hf` folder."""
    import timm

    model = sources.timm_model(_arch(channels), CLASSES, seed=channels)
    if CASES[channels][1] == "timm_repo":
        timm.models.save_for_hf(model, root / f"in{channels}", safe_serialization=True)
        return root / f"in{channels}"
    save_file(model.state_dict(), str(root / f"in{channels}.safetensors"))
    return root / f"in{channels}.safetensors"


def _timm_reference(channels: int):
    return sources.timm_model(_arch(channels), CLASSES, seed=channels)  # the very tensors saved


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """in_chans -> (source, converted folder, the conversion's stderr), each converted once."""
    root, done = tmp_path_factory.mktemp("in_chans"), {}

    def convert(channels: int):
        if channels not in done:
            src = _source(root, channels)
            out = root / f"converted{channels}"
            result = zoo_inline("convert", "--checkpoint", src, "--out", out, *CASES[channels][2])
            assert result.exit_code == 0, result.stderr[-3000:]
            done[channels] = src, out, result.stderr
        return done[channels]

    return convert


@pytest.mark.parametrize("channels", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_converts_with_the_stems_channels_and_runs_on_arrays_like_timm(channels, converted):
    import zoo

    _, out, stderr = converted(channels)
    folder = open_folder(out)
    assert folder.config.architecture.in_chans == channels and f"{channels} input channel" in stderr
    assert folder.config.pretrained_cfg["input_size"][0] == channels
    assert len(folder.config.mean) == len(folder.config.std) == channels
    if not CASES[channels][2]:  # nothing given: timm's own normalisation for this model (its defaults fitted)
        from timm.data.model_config import resolve_input_data_config

        timms = resolve_input_data_config(_timm_reference(channels))
        assert folder.config.mean == pytest.approx(timms["mean"]) and folder.config.std == pytest.approx(timms["std"])
    report = folder.parity
    assert report["passed"] and report["versions"]["reference"] == "timm"
    logits = next(c for c in report["comparisons"] if c["name"] == "logits")
    assert logits["max_abs"] <= 1e-4 and logits["rel"] <= 1e-5, logits
    print(f"in_chans {channels}: parity logits max abs {logits['max_abs']:.3g}, rel {logits['rel']:.3g}")

    model = zoo.load(out)
    assert tuple(model.input_shape) == (None, None, None, channels)
    x = np.random.default_rng(channels).standard_normal((2, 64, 64, channels)).astype(np.float32)
    with torch.inference_mode():
        theirs = _timm_reference(channels)(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    ours = np.asarray(model(x))
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())
    with pytest.raises(ArchitectureError, match=f"takes {channels}"):  # another count: one line, before loading
        zoo.load(out, input_shape=(64, 64, 3 if channels != 3 else 1))


def test_a_grey_model_normalises_and_decodes_as_timm_does(converted, tmp_path):
    """No preprocessing said: timm's own fit of its ImageNet defaults to one channel (the mean of the
    three). `zoo predict` decodes images as grey, as timm's loader does for such a model: the
    probabilities are timm's on timm's own transform of the same files."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from timm.data.model_config import resolve_input_data_config

    _, out, stderr = converted(1)
    config = open_folder(out).config
    timms = resolve_input_data_config(_timm_reference(1))  # timm's data config for this very model
    assert config.mean == pytest.approx(timms["mean"]) and config.std == pytest.approx(timms["std"])
    assert "mean 0.449 and std 0.226" in stderr
    grey, colour = tmp_path / "xray.png", tmp_path / "photo.jpg"
    Image.fromarray(natural_images(1, 150, seed=3, channels=1)[0, :97, :, 0], "L").save(grey)
    Image.fromarray(natural_images(1, 150, seed=4)[0, :, :131]).save(colour, quality=90)
    result = zoo_inline("predict", grey, colour, "--model", out, "--top", str(CLASSES), "--json")
    assert result.exit_code == 0, result.stderr[-3000:]
    shown = json.loads(result.stdout)
    transform = create_transform(**resolve_data_config(pretrained_cfg=config.pretrained_cfg))
    batch = torch.stack([transform(Image.open(f).convert("L")) for f in (grey, colour)])
    with torch.inference_mode():
        theirs = torch.softmax(_timm_reference(1)(batch), -1).numpy()
    for row, probs in zip(shown, theirs, strict=True):
        ours = sorted((p["index"], p["probability"]) for p in row["predictions"])
        assert np.allclose([p for _, p in ours], probs, atol=1e-5), (ours, probs)


def test_images_cannot_feed_a_four_channel_model_so_predict_and_eval_refuse_them(converted, tmp_path, monkeypatch):
    import zoo
    import zoo.loading
    from zoo.preprocessing import with_preprocessing

    _, out, _ = converted(4)
    monkeypatch.setattr(zoo.loading, "from_folder", lambda *a, **k: pytest.fail("the model was loaded"))
    photo = tmp_path / "photo.jpg"
    from PIL import Image

    Image.fromarray(natural_images(1, 64)[0]).save(photo)
    for args in (("predict", photo, "--model", out), ("eval", "--data", tmp_path, "--model", out)):
        line = one_line_error(zoo_inline(*args))
        assert "takes 4 input channels: images (RGB or grey) cannot feed it" in line, line
        assert line.endswith(f"float32 arrays of shape (batch, height, width, 4): zoo.load('{out}')(x)"), line
    with pytest.raises(ImageError, match="takes 4 input channels"):
        zoo.preprocess(photo, out)
    with pytest.raises(ImageError, match="takes 4 input channels"):
        with_preprocessing(None, out)  # before Keras builds anything


def test_four_channels_without_mean_and_std_are_refused_before_any_work(tmp_path):
    src = _source(tmp_path, 4)
    result = zoo_inline("convert", "--checkpoint", src, "--out", tmp_path / "out")
    line = one_line_error(result)
    assert line == (
        "error: the checkpoint's stem takes 4 input channels and nothing says how they were normalised: "
        "give --mean and --std with 4 values each (one per channel)"
    )
    assert "-> build" not in result.stderr and "ImageNet" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "channels, options, said",
    [
        (4, ("--mean", "0.5,0.5,0.5", "--std", "1,1,1"), "--mean has 3 values; the checkpoint's stem takes 4 input"),
        (4, ("--mean", "0.5,0.5,0.5,0.5"), "the checkpoint's stem takes 4 input channels and nothing says how"),
        (1, ("--mean", "0.5,0.5,0.5"), "--mean has 3 values; the checkpoint's stem takes 1 input channel: give 1"),
        (1, ("--std", "0.2,0.2"), "--std has 2 values; the checkpoint's stem takes 1 input channel: give 1"),
    ],
)
def test_mean_or_std_of_another_count_is_one_line_before_any_work(channels, options, said, tmp_path):
    src = _source(tmp_path, channels)
    result = zoo_inline("convert", "--checkpoint", src, "--out", tmp_path / "out", *options)
    assert said in one_line_error(result) and "-> build" not in result.stderr, result.stderr


def test_as_many_means_as_stds_is_checked_before_the_tensors_are_read(tmp_path):
    result = zoo_inline(
        "convert", "--checkpoint", _source(tmp_path, 1), "--out", tmp_path / "o", "--mean", "0.5,0.5", "--std", "1"
    )
    assert "--mean has 2 values and --std 1" in one_line_error(result) and "-> read" not in result.stderr


STEMS = ("conv_mlp", "overlap", "overlap_tiered", "simplenorm_overlap_act")


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 13])
def test_in_chans_is_read_from_every_stem(stem, channels):
    arch = SMALL[stem].replace(in_chans=channels)
    state = random_state_dict(arch, CLASSES)
    assert state["stem.0.weight"].shape[1] == channels  # timm built it with that many
    found = inference.infer(state)
    assert found.arch.in_chans == channels
    inference.check_named(found.arch.replace(in_chans=3), found.arch)  # `--arch NAME` takes any in_chans, as timm


def test_in_chans_is_a_field_of_the_architecture():
    arch = SMALL["conv_mlp"]
    assert arch.in_chans == 3 and "in_chans" not in arch.to_config()  # RGB records keep their fields
    assert Architecture.from_config(arch.to_config()).in_chans == 3  # folders written before: 3
    grey = arch.replace(in_chans=1)
    assert grey.to_config()["in_chans"] == 1 and Architecture.from_config(grey.to_config()) == grey
    assert grey.timm_kwargs()["in_chans"] == 1
    for bad in (0, -1, True, 2.0, "3", 5000):
        with pytest.raises(ArchitectureError, match="in_chans must be a whole number of input channels"):
            arch.replace(in_chans=bad)


def test_the_parity_batch_has_one_channel_per_mean():
    from PIL import Image

    rgb = natural_images(4, 48, seed=5)
    grey = natural_images(4, 48, seed=5, channels=1)
    assert grey.shape == (4, 48, 48, 1)
    assert all(
        np.array_equal(np.asarray(Image.fromarray(c).convert("L")), g[..., 0]) for c, g in zip(rgb, grey, strict=True)
    )
    for channels in (1, 2, 4, 13):
        batch = parity_batch(64, [0.45] * channels, [0.23] * channels)
        assert batch.shape == (8, 64, 64, channels) and batch.dtype == np.float32
        assert 0.3 < float(batch[:6].std()) < 3 and 0.3 < float(batch[6:].std()) < 3  # a realistic scale
        if channels > 1:  # each band its own content, not copies
            assert not np.allclose(batch[..., 0], batch[..., 1])
    with pytest.raises(ValueError, match="one std per mean"):
        parity_batch(64, [0.5] * 4, [0.2] * 3)


def test_preprocessing_takes_one_mean_and_std_per_channel():
    from PIL import Image

    grey = Preprocessing((32, 32), mean=(0.449,), std=(0.226,))
    assert (grey.channels, grey.mode) == (1, "L")
    picture = Image.fromarray(natural_images(1, 40)[0])
    out = grey(picture)
    assert out.shape == (1, 32, 32, 1)
    expected = Preprocessing((32, 32), mean=(0.449,), std=(0.226,))(picture.convert("L"))
    assert np.array_equal(out, expected)  # RGB images are made grey as PIL's convert("L") does
    with pytest.raises(ImageError, match="takes 4 input channels"):
        Preprocessing((32, 32), mean=(0.5,) * 4, std=(0.2,) * 4)(picture)
    with pytest.raises(Exception, match="one finite number per input channel"):
        Preprocessing((32, 32), mean=(0.5,) * 4, std=(0.2,) * 3)


def test_a_config_that_disagrees_with_the_stem_is_refused(tmp_path):
    """transformers' `num_channels` and a timm repo's `model_args.in_chans` are checked against the stem."""
    import transformers

    arch = SMALL["linear_mlp"]
    config = transformers.ConvNextConfig(
        depths=list(arch.depths), hidden_sizes=list(arch.dims), num_labels=3, num_channels=1
    )
    model = sources.perturb(transformers.ConvNextForImageClassification(config), 1)
    model.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**saved, "num_channels": 3}))
    line = one_line_error(zoo_inline("convert", "--checkpoint", tmp_path / "hf", "--out", tmp_path / "out"))
    assert line == "error: config.json says 3 input channels; the stem takes 1"


def test_a_torchvision_layout_with_another_stem_is_refused(tmp_path):
    state = sources.torchvision_model(SMALL["linear_mlp"], 4).state_dict()
    state["features.0.0.weight"] = state["features.0.0.weight"][:, :1].clone()
    torch.save(state, tmp_path / "tv.pth")
    result = zoo_inline("convert", "--checkpoint", tmp_path / "tv.pth", "--out", tmp_path / "out")
    line = one_line_error(result)
    assert "the stem takes 1 input channel; torchvision's ConvNeXt takes 3 (RGB)" in line, line
    assert "-> build" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("with_config", [True, False], ids=["save_pretrained", "bare_file"])
def test_a_transformers_checkpoint_with_num_channels_converts(with_config, tmp_path):
    """Against transformers' own class: from its config.json, or (a bare weights file) from the
    architecture, whose `num_channels` the reference must set."""
    import shutil

    import transformers

    arch = SMALL["linear_mlp"]
    config = transformers.ConvNextConfig(
        depths=list(arch.depths), hidden_sizes=list(arch.dims), num_labels=3, num_channels=2
    )
    sources.perturb(transformers.ConvNextForImageClassification(config), 2).save_pretrained(tmp_path / "hf")
    src = tmp_path / "hf"
    if not with_config:
        (tmp_path / "bare").mkdir()
        src = shutil.copy(tmp_path / "hf" / "model.safetensors", tmp_path / "bare" / "weights.safetensors")
    result = zoo_inline("convert", "--checkpoint", src, "--out", tmp_path / "out", "--mean", "0.5,0.4", "--std", "1,2")
    assert result.exit_code == 0, result.stderr[-3000:]
    folder = open_folder(tmp_path / "out")
    assert folder.config.architecture.in_chans == 2 and folder.parity["versions"]["reference"] == "transformers"


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 4])
def test_exports_take_the_models_channels_and_pass_their_parity_check(channels, converted, tmp_path):
    from zoo.export import export, read_report

    _, out, _ = converted(channels)
    for fmt in ("savedmodel", "tflite", "keras"):
        suffix = {"savedmodel": "savedmodel", "tflite": "tflite", "keras": "keras"}[fmt]
        path = export(out, fmt, out=tmp_path / f"m.{suffix}", pytorch="require")
        report = read_report(path)
        assert report.passed and report.vs_pytorch is not None
        shape = report.export["input"]["shape"]
        assert shape[-1] == channels and len(report.export["input"]["normalised_with"]["mean"]) == channels
    import tensorflow as tf

    signature = tf.saved_model.load(str(tmp_path / "m.savedmodel")).signatures["serving_default"]
    assert signature.structured_input_signature[1]["pixels"].shape[-1] == channels


@pytest.mark.slow
def test_a_grey_model_behind_the_preprocessing_layer_takes_grey_images(converted):
    import zoo
    from zoo.core.preprocessing import LAYER_MAX_ABS
    from zoo.preprocessing import with_preprocessing

    _, out, _ = converted(1)
    model = zoo.load(out)
    wrapped = with_preprocessing(model, out)
    assert tuple(wrapped.input_shape) == (None, None, None, 1)
    images = natural_images(2, 300, seed=6, channels=1)
    prepared = zoo.preprocess(list(images), out)
    inside = wrapped.get_layer("preprocess")(images.astype(np.float32))
    assert np.abs(np.asarray(inside) - prepared).max() <= LAYER_MAX_ABS


@pytest.mark.slow
def test_eval_of_a_grey_model_agrees_with_timm_on_its_own_loader(converted, tmp_path):
    """`zoo eval --compare-torch`: timm runs the source weights on the files decoded as its loader
    decodes them for a 1-channel model (grey), through its own transform."""
    from PIL import Image

    _, out, _ = converted(1)
    for label in range(2):
        (tmp_path / "data" / str(label)).mkdir(parents=True)
        for i, image in enumerate(natural_images(2, 80, seed=label)):
            Image.fromarray(image).save(tmp_path / "data" / str(label) / f"{i}.jpg")
    result = zoo_inline("eval", "--data", tmp_path / "data", "--model", out, "--compare-torch", "--json")
    assert result.exit_code == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["torch"]["agreement"] == 1.0 and report["torch"]["max_abs"] <= 1e-4, report


def test_a_network_needs_one_mean_and_std_per_input_channel():
    from converters.reference_process import Network
    from zoo.core.errors import PreprocessingError

    arch = SMALL["conv_mlp"].replace(in_chans=4)
    assert Network(arch, CLASSES, True, 64, (0.5,) * 4, (0.2,) * 4).parity_batch().shape == (8, 64, 64, 4)
    with pytest.raises(PreprocessingError, match="takes 4 input channels: its normalisation needs 4"):
        Network(arch, CLASSES, True, 64, (0.5,) * 3, (0.2,) * 3)
