"""Users' own ConvNeXts: every layout and container converts without naming the architecture,
and parity runs against the framework the checkpoint came from.

The sources are made here by timm, transformers and torchvision themselves (their model classes
and savers), every tensor perturbed away from its identity init (tests/support/sources.py).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from checkpoints.converted import open_folder
from checkpoints.hub import model_card
from converters import inference, layouts, mapping, plan, reading, recorded
from converters.parity import compare_model
from converters.pipeline import empty_model
from converters.reference_process import Network, reference_outputs
from converters.source import SourceWeights
from tests.support import sources
from tests.support.archs import SMALL
from tests.support.cli import verify_then_export_keras, zoo_inline
from tests.support.hub import local_hub
from tests.support.porting import port
from zoo.core.architectures import make_divisible
from zoo.core.errors import MappingError, SourceError
from zoo.core.preprocessing import Preprocessing

V1, V1_CONV_MLP, V2 = SMALL["linear_mlp"], SMALL["conv_mlp"], SMALL["v2_grn"]
LABELS = ["cat", "dog", "bird"]


# Session-scoped (once per xdist worker), not module-scoped: the tests spread over the workers
# (tests/conftest.py keeps module-scoped users on one), each worker making what its tests need.
@pytest.fixture(scope="session")
def src(tmp_path_factory):
    """One checkpoint per layout and container, as each framework writes it."""
    root = tmp_path_factory.mktemp("sources")
    import timm

    timm.models.save_for_hf(
        sources.timm_model(V1_CONV_MLP, 10, seed=1),
        root / "timm_repo",
        safe_serialization=True,
        # timm's way to say the licence and tag of weights (its pretrained_cfg); the default's is apache-2.0
        model_config={
            "label_names": [f"class_{i}" for i in range(10)],
            "pretrained_cfg": {"license": "cc-by-nc-4.0", "tag": "ft_pets"},
        },
        data_config={
            "input_size": (3, 192, 192),
            "crop_pct": 0.9,
            "test_input_size": (3, 224, 224),
            "test_crop_pct": 1.0,
        },
    )
    plain, ema = sources.timm_model(V2, 37, seed=2), sources.timm_model(V2, 37, seed=3)
    sources.train_checkpoint(plain, ema, root / "model_best.pth.tar", "convnextv2_tiny")
    sources.ddp_save(sources.timm_model(V1, 10, seed=4), root / "ddp.pth")
    sources.transformers_model(V1, 3, seed=5, labels=LABELS).save_pretrained(root / "hf_v1")
    sources.transformers_model(V2, 3, seed=6, labels=LABELS).save_pretrained(root / "hf_v2")
    sources.transformers_model(V2, 0, seed=7, head=False).save_pretrained(root / "hf_v2_features")
    torch.save(sources.torchvision_model(V1, 7, seed=8).state_dict(), root / "tv.pth")
    return root


# (source, framework, layout, classes, container entry read, prefix removed, class names)
CASES = {
    "timm_repo_folder": ("timm_repo", "timm", "timm", 10, None, None, [f"class_{i}" for i in range(10)]),
    "timm_train_checkpoint_ema": ("model_best.pth.tar", "timm", "timm", 37, "state_dict_ema", None, None),
    "ddp_save": ("ddp.pth", "timm", "timm", 10, None, "module.", None),
    "transformers_convnext": ("hf_v1", "transformers", "transformers", 3, None, None, LABELS),
    "transformers_convnextv2": ("hf_v2", "transformers", "transformers", 3, None, None, LABELS),
    "transformers_features_only": ("hf_v2_features", "transformers", "transformers", 0, None, None, None),
    "torchvision": ("tv.pth", "torchvision", "torchvision", 7, None, None, None),
}


@pytest.fixture(scope="session")
def converted(src, tmp_path_factory):
    """Each case converted once through the CLI, as users run it: case -> (folder, stderr)."""
    done = {}

    def convert(case):
        if case not in done:
            out = tmp_path_factory.mktemp("converted") / case
            result = zoo_inline("convert", "--checkpoint", src / CASES[case][0], "--out", out)
            assert result.exit_code == 0, result.stderr[-3000:]
            done[case] = out, result.stderr
        return done[case]

    return convert


# a DDP save: timm's state dict behind `module.` (see test_wrapper_prefixes_are_removed_and_reported): -m slow
@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c == "ddp_save" else c for c in sorted(CASES)]
)
def test_converts_without_naming_the_architecture_against_its_own_framework(case, converted):
    name, framework, layout, classes, state_key, prefix, labels = CASES[case]
    out, stderr = converted(case)
    assert f"parity against {framework} (separate process)" in stderr
    folder = open_folder(out)
    config, report = folder.config, folder.parity
    assert report["versions"]["reference"] == framework and report["versions"]["layout"] == layout
    assert framework in report["versions"] and report["passed"]
    logits = next(c for c in report["comparisons"] if c["name"] == "logits")
    assert logits["max_abs"] <= 1e-4 and logits["rel"] <= 1e-5
    assert config.num_classes == classes and config.head_norm_affine == (classes > 0 or layout != "timm")
    assert (config.source.layout, config.source.state_key, config.source.prefix) == (layout, state_key, prefix)
    assert config.labels == (tuple(labels) if labels else None)
    assert config.architecture.depths == V1.depths and config.architecture.dims == V1.dims
    assert f"side by side with {framework} on the same weights" in model_card(folder, "someone/mine")
    if layout == "transformers":  # its final LayerNorm's eps is the config's, not the blocks'
        assert config.architecture.head_norm_eps == 1e-12
    if layout == "torchvision":  # no config: torchvision's own eval transform for ConvNeXt (base's: 232 -> 224)
        assert config.pretrained_cfg["interpolation"] == "bilinear" and "torchvision's eval transform" in stderr
        assert Preprocessing.from_pretrained_cfg(config.pretrained_cfg).scale_size == (232, 232)
    if case == "timm_repo_folder":  # timm's config.json: its name for the network, its preprocessing
        assert config.architecture.name == "convnext_atto" and config.architecture.conv_mlp
        assert (config.input_size, config.pretrained_cfg["crop_pct"]) == (192, 0.9)
        # ... and every other fact of its pretrained_cfg the folder has a place for; the card says the licence
        cfg = config.pretrained_cfg
        assert (config.license, config.tag, cfg["architecture"]) == ("cc-by-nc-4.0", "ft_pets", "convnext_atto")
        assert (cfg["test_input_size"], cfg["test_crop_pct"]) == ([3, 224, 224], 1.0)
        assert "license: cc-by-nc-4.0" in model_card(folder, "someone/mine")
    elif layout != "torchvision":  # no config, or transformers' (it has no licence, tag or test size)
        cfg = config.pretrained_cfg
        assert (config.license, config.tag, cfg["test_input_size"], cfg["test_crop_pct"]) == (None, "", None, None)


def test_named_classes_are_what_predict_prints(converted, tmp_path):
    from PIL import Image

    out, _ = converted("transformers_convnextv2")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    result = zoo_inline("predict", image, "--model", out, "--top", "3", "--json")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)[0]["predictions"]
    assert sorted(p["label"] for p in shown) == sorted(LABELS)
    assert all(p["label"] == LABELS[p["index"]] for p in shown)


# Measured against transformers' default (torchvision-backed) ConvNextImageProcessor on natural
# images of odd sizes: max 0.016, mean 0.0013 in normalised units (a pixel level: its resize is
# torchvision's antialiased bicubic on tensors, not PIL's); bounded with a margin.
FAST_PROCESSOR_MAX, FAST_PROCESSOR_MEAN = 0.05, 0.005


@pytest.mark.parametrize("edge, crop_pct", [(224, 0.875), (224, 0.95), (384, 1.0)])
def test_preprocessing_of_a_transformers_folder_is_its_image_processor(edge, crop_pct, tmp_path):
    """`zoo.preprocess` with the preprocessing recorded from `preprocessor_config.json` equals
    transformers' PIL ConvNextImageProcessor bit for bit on natural images of odd sizes (resize
    to size/crop_pct and centre crop below 384, a square resize at 384), and its default
    torchvision-backed processor within the stated bound."""
    import transformers
    from PIL import Image

    from converters.images import natural_images
    from converters.metadata import read_metadata

    processors = {
        kind: getattr(transformers, name)(size={"shortest_edge": edge}, crop_pct=crop_pct, resample=3)
        for kind, name in (("pil", "ConvNextImageProcessorPil"), ("default", "ConvNextImageProcessor"))
    }
    processors["pil"].save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "convnext"}))
    ours = Preprocessing.from_pretrained_cfg(read_metadata(tmp_path / "model.safetensors").preprocessing)
    worst = []
    for i, (h, w) in enumerate([(301, 257), (257, 301), (480, 640), (231, 999), (97, 411), (1001, 333)]):
        picture = Image.fromarray(natural_images(1, max(h, w), seed=i)[0][:h, :w])
        mine = ours(picture)[0]
        theirs = {
            k: p(picture, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0) for k, p in processors.items()
        }
        assert np.array_equal(mine, theirs["pil"]), (h, w)
        worst.append(np.abs(mine - theirs["default"]))
    assert max(float(d.max()) for d in worst) <= FAST_PROCESSOR_MAX
    assert max(float(d.mean()) for d in worst) <= FAST_PROCESSOR_MEAN


ODD_NAMES = {"0": "\x1b]0;pwned\x07title", "2": "chat\nerror: injected line", "1": "\u202etxt.exe \u732b"}


def test_an_odd_but_good_timm_config_converts_and_predicts(tmp_path):
    """A timm repo's config.json with every field at an unusual but valid value: a label map in
    another key order with names a terminal would act on, squash crop, bilinear, crop_pct 1, its
    own eps, mean and std. It converts; the names stay exact in the folder and `--json`, and
    `zoo predict` prints each escaped on its own row."""
    from PIL import Image

    from converters.images import natural_images
    from converters.reference import random_state_dict

    repo = tmp_path / "repo"
    repo.mkdir()
    save_file(
        {k: torch.from_numpy(v) for k, v in random_state_dict(V1_CONV_MLP, 3, seed=2).items()},
        str(repo / "model.safetensors"),
    )
    (repo / "config.json").write_text(
        json.dumps(
            {
                "architecture": "convnext_atto",
                "num_classes": 3,
                "label_names": ODD_NAMES,
                "model_args": {"norm_eps": 1e-5},
                "pretrained_cfg": {
                    "input_size": [3, 64, 64],
                    "crop_pct": 1,
                    "crop_mode": "squash",
                    "interpolation": "bilinear",
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.25, 0.3, 0.35],
                },
            }
        )
    )
    out = tmp_path / "out"
    result = zoo_inline("convert", "--checkpoint", repo, "--out", out)
    assert result.exit_code == 0, result.stderr[-3000:]
    names = tuple(ODD_NAMES[str(i)] for i in range(3))
    record = open_folder(out).config
    assert record.labels == names and record.architecture.norm_eps == 1e-5
    assert (record.pretrained_cfg["crop_mode"], record.pretrained_cfg["interpolation"]) == ("squash", "bilinear")
    image = tmp_path / "photo.png"
    Image.fromarray(natural_images(1, 90, seed=1)[0][:70, :90]).save(image)
    shown = zoo_inline("predict", image, "--model", out, "--json")
    assert shown.exit_code == 0 and {p["label"] for p in json.loads(shown.stdout)[0]["predictions"]} == set(names)
    table = zoo_inline("predict", image, "--model", out)
    assert table.exit_code == 0, table.stderr
    rows = table.stdout.splitlines()
    assert len(rows) == 5 and not any(c in table.stdout for c in "\x1b\x07\u202e")
    assert {row.split(maxsplit=3)[3] for row in rows[2:]} == {
        r"\x1b]0;pwned\x07title",
        r"chat\nerror: injected line",
        "\\u202etxt.exe \u732b",
    }


def test_options_where_the_tensors_cannot_know(src, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class {i}\n" for i in range(7)))
    out = tmp_path / "out"
    given = [
        *("--checkpoint", src / "tv.pth", "--out", out, "--name", "my_tv", "--input-size", "160"),
        *("--mean", "0.5,0.5,0.5", "--std", "0.25 0.25 0.25", "--labels", names),
    ]
    result = zoo_inline("convert", *given, "--arch", "convnext_tiny")
    assert result.exit_code == 1  # convnext_tiny's depths and widths are not these tensors'
    assert "the checkpoint is not a convnext_tiny" in result.stderr and "depths" in result.stderr
    assert not out.exists()
    result = zoo_inline("convert", *given)
    assert result.exit_code == 0, result.stderr[-3000:]
    config = open_folder(out).config
    assert config.name == "my_tv" and config.input_size == 160
    assert config.mean == (0.5,) * 3 and config.std == (0.25,) * 3
    assert config.labels == tuple(f"class {i}" for i in range(7))
    assert open_folder(out).parity["input_size"] == 160  # the parity batch was at that size


def test_hub_repo_in_transformers_layout_converts_over_http(src, tmp_path, monkeypatch):
    """`zoo convert hf://ORG/REPO` downloads with huggingface_hub from the local Hub server, and
    records the commit and the weights' sha256."""
    from huggingface_hub import HfApi, constants

    with local_hub(tmp_path / "server") as url:
        for name, value in (
            ("ENDPOINT", url),
            ("HF_HUB_OFFLINE", False),
            ("HF_HUB_DISABLE_XET", True),
            ("HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
        ):
            monkeypatch.setattr(constants, name, value)
        monkeypatch.delenv("HF_HUB_OFFLINE")
        api = HfApi(endpoint=url, token="hf_test")
        api.create_repo("someone/convnextv2-finetune")
        commit = api.upload_folder(repo_id="someone/convnextv2-finetune", folder_path=src / "hf_v2").oid
        out = tmp_path / "out"
        result = zoo_inline("convert", "hf://someone/convnextv2-finetune", "--out", out)
        assert result.exit_code == 0, result.stderr[-3000:]
        bad = zoo_inline("convert", "hf://someone/no-such-repo", "--out", tmp_path / "none")
    assert bad.exit_code == 1 and "no such repo" in bad.stderr and not (tmp_path / "none").exists()
    config = open_folder(out).config
    recorded = config.source
    assert (recorded.kind, recorded.repo_id, recorded.revision) == ("hub", "someone/convnextv2-finetune", commit)
    assert recorded.sha256 == hashlib.sha256((src / "hf_v2" / "model.safetensors").read_bytes()).hexdigest()
    assert config.labels == tuple(LABELS) and config.name == "convnextv2-finetune"
    assert open_folder(out).parity["versions"]["reference"] == "transformers"


@pytest.mark.slow  # with -m slow: the default run keeps to its 10 minutes
def test_export_and_verify_check_against_the_source_framework(converted, tmp_path):
    verified, report = verify_then_export_keras(converted("torchvision")[0], tmp_path)
    assert "parity against torchvision" in verified
    assert report["source"]["pytorch_reference"] == "torchvision" and report["vs_pytorch"] is not None


TORCHVISION = {  # entry -> (file, top-1, resize before the 224 crop), from torchvision's weights metadata
    "convnext_tiny.tv_in1k": ("convnext_tiny-983f1562.pth", 82.52, 236),
    "convnext_small.tv_in1k": ("convnext_small-0c510722.pth", 83.616, 230),
    "convnext_base.tv_in1k": ("convnext_base-6075fbad.pth", 84.062, 232),
    "convnext_large.tv_in1k": ("convnext_large-ea097f82.pth", 84.414, 232),
}


def test_torchvision_imagenet_weights_are_catalogue_entries():
    import zoo

    for name, (filename, top1, resize) in TORCHVISION.items():
        entry = zoo.resolve(name)
        assert entry.url == f"https://download.pytorch.org/models/{filename}" and entry.hf_hub_id is None
        assert entry.top1 == top1 and entry.interpolation == "bilinear" and entry.num_classes == 1000
        assert Preprocessing.from_checkpoint(entry).scale_size == (resize, resize)  # torchvision's resize_size


def test_torchvision_entries_preprocess_as_torchvisions_own_transform():
    """`zoo.preprocess(image, "convnext_base.tv_in1k")` equals torchvision's `weights.transforms()`
    (bilinear antialiased resize of the shorter side, centre crop) bit for bit on PIL images."""
    import torchvision.models as tvm
    from PIL import Image

    import zoo
    from converters.images import natural_images

    for name, weights in (
        ("convnext_tiny.tv_in1k", tvm.ConvNeXt_Tiny_Weights),
        ("convnext_base.tv_in1k", tvm.ConvNeXt_Base_Weights),
    ):
        transform = weights.IMAGENET1K_V1.transforms()
        for i, (h, w) in enumerate([(301, 257), (480, 640), (231, 999)]):
            picture = Image.fromarray(natural_images(1, max(h, w), seed=i)[0][:h, :w])
            theirs = transform(picture).numpy().transpose(1, 2, 0)
            assert np.array_equal(zoo.preprocess(picture, name)[0], theirs), (name, h, w)


@pytest.mark.slow  # with -m slow: the default run keeps to its 10 minutes
def test_torchvision_entry_converts_from_its_release_url(monkeypatch, tmp_path):
    """`zoo convert convnext_tiny.tv_in1k` downloads torchvision's file (served here over HTTP) and
    checks it against torchvision's own model class; the same file given as `--checkpoint` is
    recognised by its name and sha256 (torchvision's file names carry its first hex digits), and
    converts with the entry's preprocessing and top-1; renamed or changed, it is not."""
    import dataclasses
    import io
    import shutil

    from huggingface_hub import constants

    import converters.pipeline as pipeline
    from tests.support.http_files import serve
    from zoo.core.architectures import ARCHITECTURES
    from zoo.core.catalogue import catalogue

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setitem(ARCHITECTURES, "convnext_tiny", V1)
    buffer = io.BytesIO()
    torch.save(sources.torchvision_model(V1, 1000, seed=9).state_dict(), buffer)
    data = buffer.getvalue()
    filename = f"convnext_tiny-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # as torchvision names its files
    name = "convnext_tiny.tv_in1k"
    with serve({f"/models/{filename}": data}) as (base, requests):
        entry = catalogue()[name]
        monkeypatch.setitem(catalogue(), name, dataclasses.replace(entry, url=f"{base}/models/{filename}"))
        out, report = pipeline.convert(name, out=tmp_path / "out")
    assert report.passed and report.versions["reference"] == "torchvision" and len(requests) == 1
    config = open_folder(out).config
    assert (config.source.kind, config.source.layout) == ("url", "torchvision") and config.top1 == 82.52

    shutil.copy(recorded.recorded_source(config, tmp_path).path, tmp_path / filename)
    own, _ = pipeline.convert_checkpoint(tmp_path / filename, out=tmp_path / "own")
    mine = open_folder(own).config
    assert mine.top1 == 82.52 and mine.pretrained_cfg["interpolation"] == "bilinear"
    assert mine.pretrained_cfg["crop_pct"] == entry.crop_pct and mine.license == "bsd-3-clause"
    (tmp_path / "renamed.pth").write_bytes(data)
    assert plan.known_release(SourceWeights(tmp_path / "renamed.pth", hashlib.sha256(data).hexdigest())) is None
    assert plan.known_release(SourceWeights(tmp_path / filename, "0" * 64)) is None


# --- the parity gate rejects broken key maps of the new layouts --------------------------------


def _broken(layout: str, pattern: str, repl: str):
    """`layout` with one of its renames replaced (the converter's side only)."""
    rules = tuple((p, repl if p.pattern == pattern else r) for p, r in layouts.LAYOUTS[layout].rules)
    assert rules != layouts.LAYOUTS[layout].rules, pattern
    return layouts.Layout(layout, layouts.LAYOUTS[layout].framework, layouts.LAYOUTS[layout].signature, rules)


def _grn_weight_bias_swapped(state):
    key = next(k for k in state if k.endswith("mlp.grn.weight"))
    bias = key[: -len("weight")] + "bias"
    state[key], state[bias] = state[bias], state[key]
    return state


def _block_norm_from_stem(state):
    return {
        **state,
        "stages.0.blocks.0.norm.weight": state["stem.1.weight"],
        "stages.0.blocks.0.norm.bias": state["stem.1.bias"],
    }


def _gamma_dropped(state):
    return {**state, "stages.2.blocks.1.gamma": np.ones_like(state["stages.2.blocks.1.gamma"])}


MUTATIONS = {  # layout -> {name: (what is broken, how)}
    "transformers": {
        "pwconv1_pwconv2_renamed_wrong": ("rule", r"\.pwconv(\d)\.", r".mlp.fc\1x."),
        "grn_weight_bias_swapped": ("state", _grn_weight_bias_swapped),
        "block_norm_from_the_stem": ("state", _block_norm_from_stem),
        "final_norm_eps_keras_default": ("eps", 1e-3),
    },
    "torchvision": {
        "block_3_read_as_fc2": ("rule", r"\.block\.3\.", ".mlp.fc2."),
        "stages_misnumbered": ("rule", r"^features\.5\.(\d+)\.", r"stages.1.blocks.\1."),
        "layer_scale_dropped": ("state", _gamma_dropped),
        "head_norm_eps_keras_default": ("eps", 1e-3),
    },
}


# transformers' by default; torchvision's breaks the same gate the same way (-m slow)
@pytest.mark.parametrize(
    "layout,source", [("transformers", "hf_v2"), pytest.param("torchvision", "tv.pth", marks=pytest.mark.slow)]
)
def test_parity_rejects_a_broken_key_map(layout, source, src, monkeypatch):
    """One reference run of the source framework; the unbroken conversion passes against it and
    every mutation of the converter's side fails (parity, or the strict key check)."""
    path = src / source if source.endswith(".pth") else src / source / "model.safetensors"
    state, read = reading.read_source(SourceWeights(path, None), hint=layout)
    found = inference.infer(state, mlp_form_known=False, head_norm_eps=1e-12 if layout == "transformers" else None)
    network = Network(found.arch, found.num_classes, found.head_norm_affine, 64, (0.5,) * 3, (0.25,) * 3)
    inputs = network.parity_batch()
    reference = reference_outputs(network, path, inputs)

    def converted(state, arch=found.arch):
        model = empty_model(Network(arch, found.num_classes, found.head_norm_affine, 64, (0.5,) * 3, (0.25,) * 3))
        port(layouts.fit_mlp(state, arch.conv_mlp), model)
        return compare_model(model, arch, inputs, reference)

    assert converted(dict(state)).passed, "the control conversion must pass"
    for name, (kind, *how) in MUTATIONS[layout].items():
        with monkeypatch.context() as m:
            if kind == "rule":
                m.setitem(layouts.LAYOUTS, layout, _broken(layout, *how))
                try:
                    mutated, _ = reading.read_source(SourceWeights(path, None), hint=layout)
                    report = converted(mutated)
                except (MappingError, SourceError):
                    continue
            elif kind == "state":
                try:
                    report = converted(how[0](dict(state)))
                except MappingError:
                    continue
            else:
                report = converted(dict(state), found.arch.replace(head_norm_eps=how[0]))
        assert not report.passed, f"{layout}: {name} passed parity"


# --- reading, detection, inference: quick and fuzzed ------------------------------------------


def test_training_checkpoint_entries_and_the_namespace(src, tmp_path):
    ema, key = reading.read_checkpoint(src / "model_best.pth.tar")
    plain, plain_key = reading.read_checkpoint(src / "model_best.pth.tar", use_ema=False)
    assert (key, plain_key) == ("state_dict_ema", "state_dict")
    assert not np.array_equal(ema["stem.0.weight"], plain["stem.0.weight"])
    refused = tmp_path / "gadget.pth.tar"

    class Gadget:
        def __reduce__(self):
            return (open, (str(tmp_path / "executed"), "w"))

    torch.save(
        {
            "state_dict": {"stem.0.weight": torch.zeros(1)},
            "args": __import__("argparse").Namespace(a=1),
            "payload": Gadget(),
        },
        refused,
    )
    with pytest.raises(SourceError, match="cannot be loaded safely"):
        reading.read_checkpoint(refused)
    assert not (tmp_path / "executed").exists()


def test_wrapper_prefixes_are_removed_and_reported():
    state = {"module._orig_mod.stem.0.weight": 1, "module._orig_mod.head.fc.bias": 2}
    assert layouts.strip_prefix(state) == ({"stem.0.weight": 1, "head.fc.bias": 2}, "module._orig_mod.")
    assert layouts.strip_prefix({"model.a": 1, "b": 2})[1] == ""


def test_a_file_in_no_layout_gets_a_short_message_naming_the_closest():
    vit = [f"encoder.layer.{i}.attention.q.weight" for i in range(300)]
    vit.append("embeddings.patch_embeddings.projection.weight")
    for keys, says in (
        (vit, "the closest is transformers"),
        (
            vit + ["embeddings.patch_embeddings.weight"],
            "301 of 302 keys have no place in a ConvNeXt of the transformers layout",
        ),
    ):
        with pytest.raises(SourceError) as err:
            layouts.detect(keys)
        text = str(err.value)
        assert len(text.splitlines()) <= 15 and says in text and "... and 29" in text
    with pytest.raises(SourceError, match="config file says the timm layout"):
        layouts.detect(["features.0.0.weight"], hint="timm")


def test_mismatch_lists_are_short_unless_verbose():
    class Var:
        def __init__(self, shape):
            self.shape = shape

    wanted = [mapping.Assignment(f"k{i}", Var((1,)), mapping.Rule("kernel", "")) for i in range(40)]
    with pytest.raises(MappingError) as err:
        mapping.check({}, wanted)
    assert len(str(err.value).splitlines()) == 1 + mapping.LISTED + 1 and "28 more" in str(err.value)
    with pytest.raises(MappingError) as err:
        mapping.check({}, wanted, listed=None)
    assert len(str(err.value).splitlines()) == 41


@pytest.mark.parametrize("variant", sorted(SMALL))
def test_inference_reads_every_architecture_row_back_from_its_tensors(variant):
    from converters.reference import random_state_dict

    arch = SMALL[variant]
    found = inference.infer(random_state_dict(arch, 5))
    assert found.num_classes == 5 and found.head_norm_affine
    if arch.stem_type == "overlap_tiered" and found.arch.stem_type == "overlap":  # as wide at 8 channels:
        assert make_divisible(arch.dims[0] // 2) == arch.dims[0]  # the same network
        arch = arch.replace(stem_type="overlap")
    assert found.arch.replace(name=arch.name, norm_eps=arch.norm_eps) == arch


def test_named_architecture_must_agree_with_the_tensors():
    from converters.reference import random_state_dict

    found = inference.infer(random_state_dict(V2, 5)).arch
    with pytest.raises(SourceError, match="use_grn: False named, True in the checkpoint"):
        inference.check_named(V1, found)


def test_fuzzed_keys_give_a_layout_or_one_clear_error():
    """Random key sets in and around the known layouts: detection, renaming and inference end in a
    result or a SourceError, never another exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    parts = st.sampled_from(
        [
            "stem",
            "stages",
            "features",
            "downsample_layers",
            "blocks",
            "0",
            "1",
            "3",
            "weight",
            "bias",
            "gamma",
            "layer_scale",
            "module",
            "convnext",
            "embeddings",
            "patch_embeddings",
            "encoder",
            "layers",
            "grn",
            "classifier",
            "head",
            "fc",
            "norm",
        ]
    )
    key = st.lists(parts, min_size=1, max_size=6).map(".".join)
    shape = st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple)

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(key, shape, max_size=12))
    def check(spec):
        state = {k: np.zeros(s, np.float32) for k, s in spec.items()}
        try:
            state, _ = layouts.strip_prefix(state)
            timm_keyed = layouts.to_timm(state, layouts.detect(state))
            inference.infer(timm_keyed)
        except SourceError:
            pass

    check()


def test_convert_usage_errors_are_one_line(tmp_path):
    result = zoo_inline("convert", "convnext_tiny_1k", "--name", "x")
    assert result.exit_code == 2 and "--name: only for your own checkpoints" in result.stderr
    result = zoo_inline("convert", "--checkpoint", tmp_path, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "holds no checkpoint file" in result.stderr
    bad = tmp_path / "names.txt"
    bad.write_text("a\n\nb\n")
    empty = tmp_path / "empty.safetensors"
    save_file({"x": torch.zeros(1)}, str(empty))
    result = zoo_inline("convert", "--checkpoint", empty, "--labels", bad)
    assert result.exit_code == 2 and "no blank lines" in result.stderr
    result = zoo_inline("convert", "--checkpoint", empty, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "not a ConvNeXt checkpoint in a known layout" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny", "small", "base", pytest.param("large", marks=pytest.mark.heavy)])
def test_torchvision_full_size_networks_convert_against_torchvision(size, tmp_path):
    """torchvision's own `convnext_{size}` (its builder, perturbed weights), at full size."""
    import torchvision.models as tvm

    from converters.pipeline import convert_checkpoint

    model = sources.perturb(getattr(tvm, f"convnext_{size}")(weights=None), seed=3)
    torch.save(model.state_dict(), tmp_path / f"convnext_{size}.pth")
    del model
    out, report = convert_checkpoint(tmp_path / f"convnext_{size}.pth", out=tmp_path / "out")
    assert report.passed and report.versions["reference"] == "torchvision"
    assert open_folder(out).config.architecture.name == f"convnext_{size}"


@pytest.mark.slow
def test_the_worked_example_gets_the_same_top1_from_timm_keras_and_tflite(tmp_path):
    """README's worked example: train with timm, convert the training checkpoint, export TFLite."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "own_convnext.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "work")], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top-1 agreement with timm: keras 100%, tflite 100% (32 images)" in proc.stdout
    config = open_folder(tmp_path / "work" / "converted").config
    assert config.source.state_key == "state_dict_ema" and config.labels[0] == "top left"
