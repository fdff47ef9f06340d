"""The ConvNeXt backbones of dense-prediction models convert as features models.

Sources are made as each framework saves them: transformers' `ConvNextBackbone` and
`UperNetForSemanticSegmentation` by `save_pretrained` (with their own image processor), FB's
segmentation and detection releases as `{"meta", "state_dict"}` pickles holding the backbone in FB's
layout beside the heads (BatchNorm counters included). Every tensor is perturbed to a realistic scale.
The references are the frameworks' own: transformers' `ConvNextBackbone`, and for FB's layout timm's
ConvNeXt and `LayerNorm2d` modules holding the tensors by FB's names (never the converter's key map).
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import torch

import zoo
from checkpoints.converted import open_folder
from converters.parity import compare_model
from converters.reference import perturbed, random_state_dict
from converters.reference_process import Network, reference_outputs
from tests.support import sources
from tests.support.archs import SMALL
from tests.support.cli import one_line_error, zoo_inline
from tests.support.fb_layout import to_fb_layout
from zoo.core.errors import BackboneError
from zoo.core.reports import DEFAULT_STAGE_RTOL, Comparison

V1, V2 = SMALL["linear_mlp"], SMALL["v2_grn"]


def _transformers_config(arch, out_features):
    import transformers

    family = "ConvNextV2" if arch.use_grn else "ConvNext"
    extra = {} if arch.use_grn else {"layer_scale_init_value": 1e-6}
    return getattr(transformers, f"{family}Config")(
        depths=list(arch.depths), hidden_sizes=list(arch.dims), out_features=out_features, **extra
    )


def transformers_backbone(root, arch, out_features=("stage1", "stage2", "stage3", "stage4"), seed=0):
    """transformers' ConvNextBackbone (V2 for a GRN row), saved by `save_pretrained`."""
    import transformers

    family = "ConvNextV2" if arch.use_grn else "ConvNext"
    model = getattr(transformers, f"{family}Backbone")(_transformers_config(arch, list(out_features)))
    sources.perturb(model, seed).save_pretrained(root)
    return root


def upernet(root, arch, size=512, seed=0):
    """transformers' UperNetForSemanticSegmentation on a ConvNeXt, with its SegformerImageProcessor
    (0-255 mean/std, no rescale: as openmmlab's UperNet repos on the Hub)."""
    import transformers

    config = transformers.UperNetConfig(
        backbone_config=_transformers_config(arch, ["stage1", "stage2", "stage3", "stage4"]),
        num_labels=5,
        hidden_size=16,
        auxiliary_channels=8,
    )
    model = sources.perturb(transformers.UperNetForSemanticSegmentation(config), seed)
    model.save_pretrained(root)
    transformers.SegformerImageProcessor(
        size={"height": size, "width": size},
        do_rescale=False,
        image_mean=[123.675, 116.28, 103.53],
        image_std=[58.395, 57.12, 57.375],
        resample=2,
    ).save_pretrained(root)
    return root


def _heads(rng, names):
    """A dense model's other modules: convs, and BatchNorms with their int64 counters."""
    out = {}
    for name in names:
        out[f"{name}.conv_seg.weight"] = torch.from_numpy(perturbed("w", (5, 8, 1, 1), rng))
        out[f"{name}.conv_seg.bias"] = torch.from_numpy(perturbed("b", (5,), rng))
        out[f"{name}.bn.weight"] = torch.from_numpy(perturbed("bn.weight", (8,), rng))
        out[f"{name}.bn.running_mean"] = torch.zeros(8)
        out[f"{name}.bn.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)
    return out


def fb_dense(path, arch, features=(0, 1, 2, 3), heads=("decode_head", "auxiliary_head"), seed=0):
    """FB's segmentation/detection release: `{"meta", "state_dict"}`, the backbone in FB's layout under
    `backbone.` with `norm{i}` for each output, beside the heads."""
    rng = np.random.default_rng(seed)
    trunk = {
        k: v
        for k, v in to_fb_layout(random_state_dict(arch, 10, seed=seed)).items()
        if not k.startswith(("head.", "norm."))
    }
    for i in features:
        trunk[f"norm{i}.weight"] = perturbed("norm.weight", (arch.dims[i],), rng)
        trunk[f"norm{i}.bias"] = perturbed("norm.bias", (arch.dims[i],), rng)
    state = {f"backbone.{k}": torch.from_numpy(v) for k, v in trunk.items()} | _heads(rng, heads)
    meta = {"mmseg_version": "0.20.2", "CLASSES": ("road", "sky"), "config": "model = dict(type='EncoderDecoder')"}
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """source name -> (source path, converted folder, conversion stderr), converted once through the CLI."""
    root = tmp_path_factory.mktemp("dense")
    done = {}

    def get(kind):
        if kind not in done:
            src = {
                "upernet_v2": lambda: upernet(root / "upernet", V2),
                "fb_segmentation": lambda: fb_dense(root / "upernet_convnext_small_512.pth", V1),
                "transformers_backbone": lambda: transformers_backbone(root / "backbone", V1),
                "fb_detection": lambda: fb_dense(
                    root / "mask_rcnn_convnext.pth", V2, (1, 2, 3), ("neck", "rpn_head", "roi_head")
                ),
            }[kind]()
            out = root / f"{kind}_converted"
            result = zoo_inline("convert", "--checkpoint", src, "--out", out)
            assert result.exit_code == 0, result.stderr[-3000:]
            done[kind] = src, out, result.stderr
        return done[kind]

    return get


# (framework, features, input size, keys of other models left out)
CASES = {
    "upernet_v2": ("transformers", (0, 1, 2, 3), 512, None),
    "fb_segmentation": ("timm", (0, 1, 2, 3), 512, 10),
    "transformers_backbone": ("transformers", (0, 1, 2, 3), 512, 0),
    "fb_detection": ("timm", (1, 2, 3), 512, 15),
}
SLOW = {"transformers_backbone", "fb_detection"}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in CASES])
def test_a_backbone_converts_checked_at_every_feature_map(made, kind, tmp_path):
    framework, features, size, left = CASES[kind]
    src, out, stderr = made(kind)
    assert "a dense-prediction backbone" in stderr
    if left:
        assert f"{left} keys of another model left out" in stderr
    folder = open_folder(out)
    config, report = folder.config, folder.parity
    assert config.features == features and config.num_classes == 0 and config.input_size == size
    assert report["passed"] and report["versions"]["reference"] == framework
    assert report["top1_agreement"] is None
    names = [c["name"] for c in report["comparisons"]]
    assert names == ["stem", "stages.0", "stages.1", "stages.2", "stages.3", *(f"features.{i}" for i in features)]
    assert all(c["shape"][1] == size // 2 ** (int(c["name"][-1]) + 2) for c in report["comparisons"][-len(features) :])

    # loaded both ways, at another size, not square: every map against the framework's own backbone
    x = np.random.default_rng(1).standard_normal((2, 160, 96, 3)).astype(np.float32)
    ours = zoo.load(out)(x)
    plain = keras.saving.load_model(out)(x)
    theirs = reference_outputs(Network.of_folder(config), src if src.is_file() else src / "model.safetensors", x)
    assert len(ours) == len(features)
    for i, mine, again in zip(features, ours, plain, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(again))
        c = Comparison.of(f"features.{i}", np.asarray(mine), theirs[f"features.{i}"])
        assert c.finite and c.rel <= DEFAULT_STAGE_RTOL and mine.shape == (2, 160 >> (i + 2), 96 >> (i + 2), V1.dims[i])


def test_the_upernet_image_processor_is_recorded(made):
    """SegformerImageProcessor: a square resize whatever the aspect, 0-255 mean/std without rescaling."""
    _, out, _ = made("upernet_v2")
    cfg = open_folder(out).config.pretrained_cfg
    assert (cfg["crop_mode"], cfg["crop_pct"], cfg["interpolation"]) == ("squash", 1.0, "bilinear")
    np.testing.assert_allclose(cfg["mean"], [0.485, 0.456, 0.406], rtol=1e-6)
    np.testing.assert_allclose(cfg["std"], [0.229, 0.224, 0.225], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fb_segmentation", "upernet_v2"])
def test_a_backbone_folder_verifies_against_its_framework(made, kind):
    result = zoo_inline("verify", made(kind)[1])
    assert result.exit_code == 0, result.stderr[-2000:]
    assert "features.3" in result.stderr


def test_a_backbone_folder_picks_outputs_but_has_no_classes(made, tmp_path):
    src, out, _ = made("fb_segmentation")
    whole = zoo.load(out)
    picked = zoo.load(out, features_only=True, out_indices=(1, 3))
    x = np.random.default_rng(2).standard_normal((1, 64, 64, 3)).astype(np.float32)
    maps, two = whole(x), picked(x)
    assert len(two) == 2
    assert all(np.array_equal(np.asarray(a), np.asarray(maps[i])) for a, i in zip(two, (1, 3), strict=True))
    with pytest.raises(BackboneError, match="dense-prediction backbone"):
        zoo.load(out, num_classes=10)
    with pytest.raises(ValueError, match="out_indices must be stages this backbone returns"):
        zoo.load(out, features_only=True, out_indices=(4,))

    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    for command in (("predict", image, "--model", out), ("export", out, "--format", "savedmodel")):
        line = one_line_error(zoo_inline(*command))
        assert "is a dense-prediction backbone" in line, line


def test_a_broken_feature_norm_fails_the_gate(made):
    """The check can fail: one per-output norm's scale changed on the Keras side."""
    src, out, _ = made("fb_segmentation")
    config = open_folder(out).config
    network = Network.of_folder(config)
    inputs = network.parity_batch()[:2]
    ref = reference_outputs(network, src, inputs)
    model = zoo.load(out)
    norm = model.get_layer("norm2")
    norm.gamma.assign(np.asarray(norm.gamma) * 1.01)
    report = compare_model(model, config.architecture, inputs, ref, features=config.features)
    assert not report.passed and report.failure.startswith("features.2"), report.failure


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_backbone_refusals_are_one_line_before_any_slow_work(tmp_path):
    # the stem as an output: transformers can, this project's backbones cannot
    stem = transformers_backbone(tmp_path / "stem", V1, ("stem", "stage2", "stage4"))
    line = one_line_error(zoo_inline("convert", "--checkpoint", stem, "--out", tmp_path / "a"))
    assert "out_features" in line and "stage1" in line, line

    # out_features that say other stages than the norms the tensors hold
    other = transformers_backbone(tmp_path / "other", V1, ("stage2", "stage4"))
    config = json.loads((other / "config.json").read_text())
    _write(other / "config.json", {**config, "out_features": ["stage1", "stage4"], "out_indices": [1, 4]})
    line = one_line_error(zoo_inline("convert", "--checkpoint", other, "--out", tmp_path / "b"))
    assert "out_features" in line and "stage2" in line, line

    # class names for a model without classes
    fb = fb_dense(tmp_path / "seg.pth", V1)
    labels = _write(tmp_path / "labels.txt", ["a", "b"])
    line = one_line_error(zoo_inline("convert", "--checkpoint", fb, "--labels", labels, "--out", tmp_path / "c"))
    assert "--labels" in line and "backbone" in line, line

    # per-output norms and a classifier in one checkpoint
    state = torch.load(fb)["state_dict"] | {"backbone.head.weight": torch.ones(3, V1.dims[3])}
    torch.save({"state_dict": state}, tmp_path / "both.pth")
    line = one_line_error(zoo_inline("convert", "--checkpoint", tmp_path / "both.pth", "--out", tmp_path / "d"))
    assert "per-output norms" in line and "classifier" in line, line
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.parametrize("bad", [(2, 1), (4,), (0, 0), (-1,)])
def test_out_indices_no_backbone_has_are_refused_by_the_model_and_the_record(bad):
    from tests.support.folders import folder_config
    from zoo.core.model import build_model

    with pytest.raises(ValueError, match="increasing stage indices in 0..3"):
        build_model(V1, features=bad)
    with pytest.raises(ValueError, match="increasing stage indices in 0..3"):
        folder_config(features=bad)
