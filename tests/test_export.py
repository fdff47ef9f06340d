"""Exports (SavedModel, TFLite, .keras): each loads where it promises to, its report holds figures
against Keras and PyTorch, fp32 meets the parity gate, and an export that differs is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import converters.pipeline as pipeline
import converters.recorded
import zoo.export
import zoo.loading
from converters.images import parity_batch
from converters.reference import create, forward, random_state_dict
from tests.support.archs import SMALL_V1
from tests.support.cli import BLOCK_TORCH, zoo_cli
from zoo.core.architectures import ARCHITECTURES
from zoo.core.reports import DEFAULT_ATOL, DEFAULT_RTOL
from zoo.export import ExportError, bounds_for, export, read_report, report_path
from zoo.export.formats import FORMATS

MEAN, STD, SIZE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224  # convnext_tiny.fb_in1k's


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A converted small convnext_tiny.fb_in1k (random weights, seed 0), converted once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ARCHITECTURES, "convnext_tiny", SMALL_V1)  # as the `small_tiny` fixture
        mp.setenv("HF_HUB_OFFLINE", "1")
        out, _ = pipeline.convert("convnext_tiny_1k", random_seed=0, out=tmp_path_factory.mktemp("export") / "small")
    return out


@pytest.fixture(scope="module")
def keras_logits(folder):
    return np.asarray(zoo.loading.load(folder)(parity_batch(SIZE, MEAN, STD), training=False))


@pytest.fixture
def timm_in_process(monkeypatch):
    """The PyTorch comparison run here rather than in its own process (torch came first in the tests).

    The random weights are regenerated from the folder's recorded seed, as the product does.
    The real separate-process path runs in the CLI test.
    """

    def pytorch_logits(config, inputs, checkpoint=None):
        arch = config.architecture
        state = random_state_dict(arch, config.num_classes, config.source.seed)
        model = create(arch, config.num_classes)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        return forward(model, inputs)["logits"]

    monkeypatch.setattr(converters.recorded, "pytorch_logits", pytorch_logits)


def _assert_fp32_report(report, fmt):
    assert report.passed and report.export["format"] == fmt and report.pytorch_skipped is None
    for against in (report.vs_keras, report.vs_pytorch):
        assert against.max_abs <= DEFAULT_ATOL and against.rel <= DEFAULT_RTOL and against.top1 == 8
    assert (report.bounds.atol, report.bounds.rtol) == (DEFAULT_ATOL, DEFAULT_RTOL)
    assert report.num_images == 8 and report.input_size == SIZE


SAVEDMODEL_ALONE = BLOCK_TORCH + textwrap.dedent("""
    for _name in ("zoo", "converters", "checkpoints", "keras"):
        sys.modules[_name] = None  # nothing of the project (nor Keras) is needed to serve it
    import json
    import numpy as np
    import tensorflow as tf

    path, inputs, result = sys.argv[1:]
    signature = tf.saved_model.load(path).signatures["serving_default"]
    names = {"inputs": sorted(signature.structured_input_signature[1]),
             "outputs": sorted(signature.structured_outputs)}
    x = np.load(inputs)
    out = {"at_224": signature(pixels=tf.constant(x))["logits"].numpy(),
           "at_160": signature(pixels=tf.constant(x[:2, :160, :160]))["logits"].numpy()}
    np.savez(result, **out)
    print(json.dumps(names))
""")


def test_savedmodel_serves_with_tensorflow_alone(folder, keras_logits, timm_in_process, tmp_path):
    out = export(folder, "savedmodel", out=tmp_path / "small.savedmodel")
    assert out == tmp_path / "small.savedmodel" and (out / "saved_model.pb").is_file()
    report = read_report(out)
    _assert_fp32_report(report, "savedmodel")
    assert report_path(out) == out / "parity.json" and report.export["input"]["shape"] == [None, None, None, 3]

    x = parity_batch(SIZE, MEAN, STD)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run(
        [sys.executable, "-c", SAVEDMODEL_ALONE, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npz")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"inputs": ["pixels"], "outputs": ["logits"]}
    served = np.load(tmp_path / "y.npz")
    np.testing.assert_allclose(served["at_224"], keras_logits, rtol=0, atol=DEFAULT_ATOL)
    # free spatial size: another resolution runs and matches the Keras model at that size
    at_160 = np.asarray(zoo.loading.load(folder)(x[:2, :160, :160], training=False))
    np.testing.assert_allclose(served["at_160"], at_160, rtol=0, atol=DEFAULT_ATOL)


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")  # LiteRT's has the same API
@pytest.mark.parametrize("quantize", ["none", "fp16", "dynamic"])
def test_tflite_runs_in_the_interpreter_with_builtin_ops(quantize, folder, keras_logits, timm_in_process, tmp_path):
    import tensorflow as tf

    out = export(folder, "tflite", out=tmp_path / "small.tflite", quantize=quantize)
    report = read_report(out)
    assert report_path(out) == tmp_path / "small.tflite.parity.json"
    assert report.passed and report.export["quantize"] == quantize and report.bounds == bounds_for(quantize)
    if quantize == "none":
        _assert_fp32_report(report, "tflite")
    assert report.export["files"]["small.tflite"]["size"] == out.stat().st_size

    interpreter = tf.lite.Interpreter(model_path=str(out))  # the plain interpreter, as users have it
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "GELU" in ops and not any(op.startswith("Flex") or op == "CUSTOM" for op in ops), ops
    detail = interpreter.get_input_details()[0]
    assert list(detail["shape_signature"]) == [-1, SIZE, SIZE, 3]
    dtypes = {t["dtype"] for t in interpreter.get_tensor_details()}
    assert (np.float16 in dtypes) == (quantize == "fp16") and (np.int8 in dtypes) == (quantize == "dynamic")

    logits = interpreter.get_signature_runner("serving_default")(pixels=parity_batch(SIZE, MEAN, STD))["logits"]
    bounds = bounds_for(quantize)
    error = np.max(np.abs(logits - keras_logits))
    assert error <= (bounds.atol or np.inf) and error / np.max(np.abs(keras_logits)) <= bounds.rtol
    assert np.isclose(error, report.vs_keras.max_abs, rtol=1e-3, atol=1e-7)
    agree = int(np.sum(logits.argmax(-1) == keras_logits.argmax(-1)))
    assert agree == report.vs_keras.top1 >= round((bounds.min_top1 or 0) * 8)


def test_keras_file_loads_in_safe_mode(folder, keras_logits, timm_in_process, tmp_path, monkeypatch):
    import keras

    import zoo.core.model  # noqa: F401  (registers the ConvNeXt layers, as users must)

    monkeypatch.chdir(tmp_path)
    out = export(folder, "keras")  # default destination: <folder name>.keras here
    assert out == tmp_path / "small.keras"
    report = read_report(out)
    _assert_fp32_report(report, "keras")
    assert report.vs_keras.max_abs == 0.0
    loaded = keras.saving.load_model(out, safe_mode=True)
    np.testing.assert_array_equal(np.asarray(loaded(parity_batch(SIZE, MEAN, STD), training=False)), keras_logits)


def _perturb(model):
    layer = model.get_layer("stages.1.blocks.0.mlp.fc2")
    layer.kernel.assign(np.asarray(layer.kernel) * 1.01)
    return model


def test_an_export_that_differs_is_refused_and_the_earlier_one_kept(folder, timm_in_process, tmp_path, monkeypatch):
    out = export(folder, "keras", out=tmp_path / "m.keras")
    before = out.read_bytes(), report_path(out).read_bytes()

    keras_format = FORMATS["keras"]  # the written file holds a weight 1% off
    monkeypatch.setitem(
        FORMATS,
        "keras",
        dataclasses.replace(keras_format, write=lambda model, *a: keras_format.write(_perturb(model), *a)),
    )
    with pytest.raises(ExportError, match="refused: vs keras") as refused:
        export(folder, "keras", out=out)
    assert refused.value.report.vs_pytorch.max_abs > DEFAULT_ATOL
    assert (out.read_bytes(), report_path(out).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "m.keras.parity.json"]


def test_a_keras_model_that_differs_from_pytorch_is_refused(folder, timm_in_process, tmp_path, monkeypatch):
    load = zoo.loading.from_folder
    monkeypatch.setattr(zoo.loading, "from_folder", lambda f: _perturb(load(f)))
    with pytest.raises(ExportError, match="refused: vs pytorch") as refused:
        export(folder, "savedmodel", out=tmp_path / "sm")
    assert refused.value.report.vs_keras.max_abs <= DEFAULT_ATOL  # the export is faithful to Keras...
    assert list(tmp_path.iterdir()) == []  # ...but Keras is not to PyTorch: nothing is written


def test_refuses_bad_options_and_paths_that_are_not_exports(folder, tmp_path):
    notes = tmp_path / "notes.tflite"
    notes.write_text("not a model")
    with pytest.raises(ExportError, match="not a tflite export"):
        export(folder, "tflite", out=notes)
    assert notes.read_text() == "not a model"
    busy = tmp_path / "busy"
    (busy / "data").mkdir(parents=True)
    with pytest.raises(ExportError, match="not a SavedModel export"):
        export(folder, "savedmodel", out=busy)
    other = tmp_path / "other.tflite"  # an export, but of another format: not replaced either
    other.write_text("model")
    report_path(other).write_text(json.dumps({"report_format": "convnext-zoo-export/1", "export": {"format": "keras"}}))
    with pytest.raises(ExportError, match="only an earlier tflite export is replaced"):
        export(folder, "tflite", out=other)
    with pytest.raises(ExportError, match="tflite exports only"):
        export(folder, "savedmodel", out=tmp_path / "x", quantize="fp16")
    with pytest.raises(ExportError, match=r"end in \.keras"):
        export(folder, "keras", out=tmp_path / "x.h5")
    with pytest.raises(ExportError, match="inside the converted folder"):
        export(folder, "tflite", out=folder / "m.tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "busy",
        "notes.tflite",
        "other.tflite",
        "other.tflite.parity.json",
    ]


def test_cli_exports_tflite_compared_with_pytorch_in_its_own_process(folder, tmp_path):
    out = tmp_path / "cli.tflite"
    proc = zoo_cli("export", str(folder), "--format", "tflite", "--out", str(out), "--pytorch", "require")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    assert "vs pytorch" in proc.stderr and "passed" in proc.stderr
    # only the command's own lines: the interpreter's native "Created ... XNNPACK delegate" is held back
    assert "XNNPACK" not in proc.stderr and "INFO:" not in proc.stderr, proc.stderr
    report = json.loads(report_path(out).read_text())
    assert report["passed"] and report["vs_pytorch"]["rel"] <= DEFAULT_RTOL
    assert report["vs_pytorch"]["max_abs"] <= DEFAULT_ATOL and report["pytorch_skipped"] is None

    proc = zoo_cli("export", str(folder), "--format", "keras", "--out", str(tmp_path / "m.h5"))
    assert proc.returncode == 1 and "error:" in proc.stderr and ".keras" in proc.stderr
    assert "Traceback" not in proc.stderr


WITHOUT_TORCH = BLOCK_TORCH + textwrap.dedent("""
    import json
    from zoo.export import ExportError, export, read_report

    folder, out = sys.argv[1:]
    report = read_report(export(folder, "keras", out=out))
    try:
        export(folder, "keras", out=out, pytorch="require")
        required = "exported"
    except ExportError as e:
        required = str(e)
    leaked = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in ("torch", "timm"))
    print(json.dumps({"passed": report.passed, "skipped": report.pytorch_skipped, "required": required,
                      "vs_keras": report.vs_keras.max_abs, "leaked": leaked}))
""")


def test_without_torch_the_report_says_why_pytorch_was_skipped(folder, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, str(folder), str(tmp_path / "m.keras")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["passed"] and result["vs_keras"] == 0.0 and result["leaked"] == []
    assert "convnext-zoo[convert]" in result["skipped"] and "convnext-zoo[convert]" in result["required"]
