"""Back to PyTorch: a converted (or fine-tuned) Keras ConvNeXt exported as timm, transformers or
torchvision weights, each loaded by its framework's own loader in a fresh process.

The round trip is the identity: for every layout, `convert` then the export back to the source's
own framework gives back the source's tensors bit for bit (same keys, float32, same values), as
that framework itself holds them (FB's files: as timm's own remapping of them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support import sources
from tests.support.archs import SMALL
from tests.support.cli import one_line_error, zoo_cli, zoo_inline
from tests.support.fb_layout import to_fb_layout

V1, V1_CONV_MLP, V2 = SMALL["linear_mlp"], SMALL["conv_mlp"], SMALL["v2_grn"]
LABELS = ["cat", "dog", "bird"]


def _numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="session")
def sources_by_layout(tmp_path_factory):
    """One checkpoint per layout, written by its framework, with the tensors that framework holds for it."""
    root = tmp_path_factory.mktemp("back_sources")
    made = {}
    timm_v1 = sources.timm_model(V1_CONV_MLP, 5, seed=11)
    save_file(timm_v1.state_dict(), str(root / "timm.safetensors"))
    made["timm"] = (root / "timm.safetensors", "timm", _numpy_state(timm_v1))

    from timm.models.convnext import checkpoint_filter_fn

    fb_source = sources.timm_model(V2, 4, seed=12)
    fb = to_fb_layout(_numpy_state(fb_source))
    torch.save({"model": {k: torch.from_numpy(v) for k, v in fb.items()}}, root / "fb.pth")
    as_timm = checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in fb.items()}, fb_source)
    made["fb"] = (root / "fb.pth", "timm", {k: v.numpy() for k, v in as_timm.items()})

    for name, arch, seed in (("transformers_v1", V1, 13), ("transformers_v2", V2, 14)):
        model = sources.transformers_model(arch, 3, seed=seed, labels=LABELS)
        model.save_pretrained(root / name)
        made[name] = (
            root / name,
            "transformers",
            {k: v.numpy() for k, v in load_file(root / name / "model.safetensors").items()},
        )

    from tests.test_dense_backbones import transformers_backbone

    transformers_backbone(root / "backbone", V2, ("stage2", "stage4"), seed=16)
    made["transformers_backbone"] = (
        root / "backbone",
        "transformers",
        {k: v.numpy() for k, v in load_file(root / "backbone" / "model.safetensors").items()},
    )

    tv = sources.torchvision_model(V1, 7, seed=15)
    torch.save(tv.state_dict(), root / "tv.pth")
    made["torchvision"] = (root / "tv.pth", "torchvision", _numpy_state(tv))
    return made


def _exported_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# Each case converts and exports (two reference processes, ~15 s): the default run (10 minutes on 2 cores)
# takes one per framework; FB's (read through timm's own remapping), transformers' V1 (the layer-scale
# rename; V2's GRN reshape is the default's) and backbone (ConvNextBackbone's per-output norms) run with
# the slow tests.
@pytest.mark.parametrize(
    "layout",
    [
        "timm",
        pytest.param("fb", marks=pytest.mark.slow),
        pytest.param("transformers_v1", marks=pytest.mark.slow),
        "transformers_v2",
        "torchvision",
        pytest.param("transformers_backbone", marks=pytest.mark.slow),
    ],
)
def test_round_trip_is_the_identity(layout, sources_by_layout, tmp_path):
    source, framework, expected = sources_by_layout[layout]
    folder = tmp_path / "converted"
    result = zoo_inline("convert", "--checkpoint", source, "--out", folder)
    assert result.exit_code == 0, result.output
    out = tmp_path / f"back.{framework}"
    result = zoo_inline("export", folder, "--format", framework, "--out", out)
    assert result.exit_code == 0, result.output

    got = _exported_tensors(out)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32, key
        assert tuple(got[key].shape) == value.shape, key
        assert np.array_equal(got[key].numpy(), value.astype(np.float32)), key
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["export"]["framework"] == framework
    compared = {c["name"] for c in report["parity"]["comparisons"]}
    outputs = {"features.1", "features.3"} if layout == "transformers_backbone" else {"pre_logits", "logits"}
    assert {"stem", "stages.0", "stages.3", *outputs} <= compared


# --- what users bring: a model in memory, a .keras file, any head ------------------------------


def _snippet_logits(folder, inputs: np.ndarray) -> list[np.ndarray]:
    """The export loaded by each line of its report's `load` snippet, as written (every `model = ...` line
    a way to load it), run on `inputs` in a fresh process with torch only (never beside TensorFlow)."""
    code = """
import sys, json, numpy as np, torch, timm, transformers, torchvision, safetensors.torch
x = torch.from_numpy(np.load(sys.argv[1]).transpose(0, 3, 1, 2).copy())
blocks = []  # each from a `model = ` line to the next
for line in json.load(open(sys.argv[3]))["export"]["load"].splitlines():
    if line.startswith("model = ") or not blocks:
        blocks.append([])
    blocks[-1].append(line.split("  #")[0])
out = []
for block in blocks:
    exec("\\n".join(block))
    with torch.inference_mode():
        y = model.eval()(x)
    out.append((y.logits if hasattr(y, "logits") else y).numpy())
np.save(sys.argv[2], np.stack(out))
"""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", inputs)
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(Path(tmp) / "x.npy"),
                str(Path(tmp) / "y.npy"),
                str(folder / "parity.json"),
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return list(np.load(Path(tmp) / "y.npy"))


@pytest.fixture(scope="module")
def tuned():
    """A small ConvNeXt with a fresh 5-class head, its weights moved as a fine-tune moves them."""
    from tests.support.folders import small_model

    return small_model(seed=21, arch=V1, num_classes=5)


def test_a_model_in_memory_goes_to_timm_with_its_labels(tuned, tmp_path):
    from zoo.export import to_pytorch

    out = to_pytorch(tuned, "timm", out=tmp_path / "tuned.timm", labels=["a", "b", "c", "d", "e"])
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "convnext_tiny" and config["num_classes"] == 5
    assert config["label_names"] == ["a", "b", "c", "d", "e"]
    assert config["model_args"] == {"depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32]}
    umask = os.umask(0)
    os.umask(umask)
    assert {(out / n).stat().st_mode & 0o777 for n in ("model.safetensors", "config.json")} == {0o666 & ~umask}
    x = np.random.default_rng(0).standard_normal((3, 64, 64, 3)).astype(np.float32)
    keras_logits = np.asarray(tuned(x))
    loaded = _snippet_logits(out, x)
    assert len(loaded) == 2  # "local-dir:" and the file named
    for logits in loaded:
        np.testing.assert_allclose(logits, keras_logits, atol=1e-4, rtol=0)


@pytest.mark.slow  # a full-size convnext_tiny (28M parameters) written, proven and loaded again: ~30 s
def test_torchvision_sizes_load_with_its_builders(tmp_path):
    from tests.support.folders import small_model
    from zoo.core.architectures import ARCHITECTURES
    from zoo.export import to_pytorch

    model = small_model(seed=8, arch=ARCHITECTURES["convnext_tiny"], num_classes=3)
    out = to_pytorch(model, "torchvision", out=tmp_path / "tv")
    report = json.loads((out / "parity.json").read_text())
    assert "torchvision.models.convnext_tiny(num_classes=3)" in report["export"]["load"]
    x = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
    (logits,) = _snippet_logits(out, x)
    np.testing.assert_allclose(logits, np.asarray(model(x)), atol=1e-4, rtol=0)


def test_a_keras_file_goes_to_transformers_with_a_processor(tuned, tmp_path):
    import transformers  # noqa: F401  (the export's own process loads it; here only its files are read)

    tuned.save(tmp_path / "tuned.keras")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join("vwxyz"))
    out = tmp_path / "tuned.transformers"
    result = zoo_inline(
        "export", tmp_path / "tuned.keras", "--format", "transformers", "--labels", labels,
        "--preprocessing", "convnext_tiny.fb_in1k", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ConvNextForImageClassification"]
    assert config["id2label"] == {str(i): c for i, c in enumerate("vwxyz")}
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 224} and processor["crop_pct"] == 0.875
    x = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    (logits,) = _snippet_logits(out, x)
    np.testing.assert_allclose(logits, np.asarray(tuned(x)), atol=1e-4, rtol=0)


@pytest.mark.slow  # two more exports (~20 s); the pooled form's keys are the classifier's less head.fc
def test_a_model_without_its_classifier_goes_to_timm_and_transformers(tuned, tmp_path):
    import keras

    from zoo.core.model import pre_logits
    from zoo.export import to_pytorch

    pooled = keras.Model(tuned.input, pre_logits(tuned), name="pooled")
    for framework in ("timm", "transformers"):
        out = to_pytorch(pooled, framework, out=tmp_path / framework)
        report = json.loads((out / "parity.json").read_text())
        assert report["passed"], report
    assert json.loads((tmp_path / "transformers" / "config.json").read_text())["architectures"] == ["ConvNextModel"]


# --- refused, one line, nothing written --------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "framework", "says"),
    [
        (SMALL["overlap_tiered"], "transformers", "no overlapping stem"),
        (SMALL["v2_grn"], "torchvision", "no GRN"),
        (SMALL["head_mlp"], "torchvision", "no pre-logits MLP"),
        (SMALL["simplenorm_overlap_act"], "transformers", "no simplenorm"),
        (SMALL["eps_1e-5"], "torchvision", "no LayerNorm epsilon 1e-05"),
    ],
)
def test_what_a_framework_cannot_hold_is_named_with_those_that_can(arch, framework, says, tmp_path):
    from tests.support.folders import small_model
    from zoo.core.errors import ExportError
    from zoo.export import to_pytorch

    model = small_model(seed=3, arch=arch, num_classes=4)
    with pytest.raises(ExportError, match=says) as caught:
        to_pytorch(model, framework, out=tmp_path / "out")
    assert "export it to timm" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_transformers_head_norm_epsilon_is_not_forced_into_timm(tmp_path):
    from tests.support.folders import small_model
    from zoo.core.errors import ExportError
    from zoo.export import to_pytorch

    model = small_model(seed=4, arch=V1.replace(head_norm_eps=1e-12), num_classes=3)
    with pytest.raises(ExportError, match=r"timm cannot hold .* head norm uses 1e-12.*export it to transformers"):
        to_pytorch(model, "timm", out=tmp_path / "out")


def test_a_changed_model_is_refused_listing_what_changed(tuned, tmp_path):
    import keras

    from zoo.core.errors import ExportError
    from zoo.export import to_pytorch

    extra = keras.layers.Dense(3, name="extra")(tuned.output)
    with pytest.raises(ExportError, match=r"(?s)have no place in a timm ConvNeXt.*extra\.weight"):
        to_pytorch(keras.Model(tuned.input, extra, name="grown"), "timm", out=tmp_path / "a")
    softmax = keras.layers.Activation("softmax", name="probabilities")(tuned.output)
    with pytest.raises(ExportError, match=r"(?s)1 layers added.*not in a ConvNeXt: probabilities"):
        to_pytorch(keras.Model(tuned.input, softmax, name="probs"), "timm", out=tmp_path / "b")
    stages = keras.Model(tuned.input, tuned.get_layer("stages.3.blocks.0").output, name="cut")
    with pytest.raises(ExportError, match="cut at its stages"):
        to_pytorch(stages, "timm", out=tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_a_wrong_export_fails_its_proof_and_leaves_nothing(tuned, tmp_path, monkeypatch):
    """The proof can fail: one tensor written 1% off is caught by the framework's own run, at its stage."""
    from converters import targets
    from zoo.core.errors import ExportError
    from zoo.export import to_pytorch

    right = targets.from_timm

    def one_off(state, layout):
        state = dict(state)
        state["stages.2.blocks.1.mlp.fc2.weight"] = state["stages.2.blocks.1.mlp.fc2.weight"] * np.float32(1.01)
        return right(state, layout)

    monkeypatch.setattr(targets, "from_timm", one_off)
    with pytest.raises(ExportError, match=r"does not compute what the Keras model does \(at stages\.2"):
        to_pytorch(tuned, "timm", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(tuned, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    tuned.save(tmp_path / "m.keras")
    result = zoo_inline("export", tmp_path / "m.keras", "--format", "timm", "--out", tmp_path / "taken")
    assert "is not a timm export of convnext-zoo" in one_line_error(result)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    result = zoo_inline("export", tmp_path / "nothing.keras", "--format", "timm", "--out", tmp_path / "x")
    assert "no such .keras file" in one_line_error(result)
    (tmp_path / "labels.txt").write_text("one\ntwo\n")
    result = zoo_inline(
        "export", tmp_path / "m.keras", "--format", "timm", "--labels", tmp_path / "labels.txt", "--out", tmp_path / "y"
    )
    assert "2 labels for 5 classes" in one_line_error(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt", "m.keras", "taken"]
    result = zoo_inline("export", tmp_path / "m.keras", "--format", "timm", "--quantize", "fp16")
    assert result.exit_code == 2 and "--quantize applies to savedmodel, tflite and keras" in result.output


@pytest.mark.slow  # a process importing JAX, TensorFlow and the reference (~25 s): beyond the default run's 10 minutes
def test_a_model_tuned_on_jax_goes_back_the_same_way(tmp_path):
    """Fine-tuned on Keras' JAX backend (TPUs): read, written and proven there too (a process of its own)."""
    from tests.support.folders import small_model

    small_model(seed=2, arch=V2, num_classes=4).save(tmp_path / "tuned.keras")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = zoo_cli("export", tmp_path / "tuned.keras", "--format", "timm", "--out", tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["passed"] and report["keras"]["backend"] == "jax"
