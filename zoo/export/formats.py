"""The export formats as a table: how each is written, run, loaded and named (`zoo.export` drives them).

A SavedModel and a TFLite file serve one signature, `serving_default`, taking `pixels`
(normalised float32 NHWC) and returning `logits` (`pre_logits` without a classifier).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import BackendError, ExportError
from ..core.runtime import installed, native_stderr_held

INPUT_NAME = "pixels"
SIGNATURE = "serving_default"
QUANTIZE = ("none", "fp16", "dynamic")


@dataclass(frozen=True)
class Format:
    """One export format.

    Attributes:
        name: `savedmodel`, `tflite` or `keras`.
        write: `write(model, path, size, quantize)` writes the export of `model` at `path`
            (`size`: the checkpoint's input size, for formats with a fixed input).
        run: `run(path, inputs) -> (logits, description of the runtime)`.
        load: how a user loads it (recorded in the report).
        folder: the export is a folder (else one file).
        fixed_size: the export takes only the checkpoint's input size (else any size).
        quantizable: takes `quantize` other than `none`.
        what: the format's name in messages.
        tensorflow_only: written and run by TensorFlow (needs Keras' TensorFlow backend).
    """

    name: str
    write: Callable[..., None]
    run: Callable[[Path, np.ndarray], tuple[np.ndarray, str]]
    load: str
    folder: bool = False
    fixed_size: bool = False
    quantizable: bool = False
    what: str = ""
    tensorflow_only: bool = True

    def default_name(self, folder_name: str, quantize: str = "none") -> str:
        """The export's file or folder name for a converted folder's name."""
        return f"{folder_name}{'' if quantize == 'none' else '.' + quantize}.{self.name}"

    def input_shape(self, size: int, channels: int = 3) -> list:
        return [None, size, size, channels] if self.fixed_size else [None, None, None, channels]


def output_name(model) -> str:
    """`logits`, or `pre_logits` for a checkpoint without a classifier (num_classes 0)."""
    return "logits" if any(layer.name == "head.fc" for layer in model.layers) else "pre_logits"


def _saved_model(model, path: Path, size: int | None, fused_norms: bool | None = None) -> None:
    """A SavedModel with one named signature; `size` None leaves height and width free.
    `fused_norms` as `zoo.core.serving.serving_function`'s (False for TFLite: norms folded away)."""
    import keras
    import tensorflow as tf

    from ..core.serving import serving_function

    name = output_name(model)
    serve = serving_function(model, fused_norms=fused_norms)  # the inference graph `zoo predict` runs
    archive = keras.export.ExportArchive()
    for resource in serve.trackables:
        archive.track(resource)
    archive.add_endpoint(
        SIGNATURE,
        lambda pixels: {name: serve(pixels)},
        input_signature=[tf.TensorSpec((None, size, size, model.input_shape[-1]), tf.float32, name=INPUT_NAME)],
    )
    archive.write_out(str(path), verbose=False)


def _write_savedmodel(model, path: Path, size: int, quantize: str) -> None:
    _saved_model(model, path, None)


def _write_keras(model, path: Path, size: int, quantize: str) -> None:
    model.save(path)


def _write_tflite(model, path: Path, size: int, quantize: str) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="zoo-export-tflite-", dir=path.parent) as tmp:
        # static height and width for the converter; norms folded into the linear layers (TFLite has
        # no fused LayerNorm: the folded form is the fewest ops)
        _saved_model(model, Path(tmp) / "fixed", size, fused_norms=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(tmp) / "fixed"), signature_keys=[SIGNATURE])
        # Builtin ops only (no Select TF ops): erf GELU maps to GELU, LayerNorm to mean/rsqrt/mul/add.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        try:
            flat = converter.convert()
        except Exception as e:  # the converter raises ConverterError and plain errors alike
            raise ExportError(f"TFLite conversion failed: {str(e).strip().splitlines()[-1]}") from e
    path.write_bytes(flat)


def _run_savedmodel(path: Path, inputs: np.ndarray) -> tuple[np.ndarray, str]:
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures[SIGNATURE]
    outputs = signature(**{INPUT_NAME: tf.constant(inputs)})
    return np.asarray(next(iter(outputs.values()))), f"tensorflow {tf.__version__} (tf.saved_model.load)"


def _run_keras(path: Path, inputs: np.ndarray) -> tuple[np.ndarray, str]:
    import keras

    from ..core import model as _registers_layers  # noqa: F401

    loaded = keras.saving.load_model(path, safe_mode=True)
    return np.asarray(loaded(inputs, training=False)), f"keras {keras.__version__} (keras.saving.load_model)"


def tflite_interpreter(path: str | Path):
    """A TFLite interpreter for `path`: LiteRT's if `ai_edge_litert` is installed, else `tf.lite`'s.

    `tf.lite.Interpreter` is deprecated in favour of LiteRT's (identical API) but still ships
    with TensorFlow; its deprecation warning is silenced here.

    Returns:
        (interpreter, description of the runtime).
    """
    if installed("ai_edge_litert"):
        from importlib.metadata import version

        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_path=str(path)), f"ai_edge_litert {version('ai-edge-litert')}"
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        return tf.lite.Interpreter(model_path=str(path)), f"tf.lite.Interpreter (tensorflow {tf.__version__})"


def _run_tflite(path: Path, inputs: np.ndarray) -> tuple[np.ndarray, str]:
    with native_stderr_held():  # the interpreter's "Created TensorFlow Lite XNNPACK delegate" line
        interpreter, runtime = tflite_interpreter(path)
        runner = interpreter.get_signature_runner(SIGNATURE)
        outputs = runner(**{INPUT_NAME: inputs})  # the runner resizes the batch dimension
    return np.asarray(next(iter(outputs.values()))), runtime


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "savedmodel",
            _write_savedmodel,
            _run_savedmodel,
            "tf.saved_model.load(path).signatures['serving_default'](pixels=x)['logits']",
            folder=True,
            what="SavedModel",
        ),
        Format(
            "tflite",
            _write_tflite,
            _run_tflite,
            "Interpreter(model_path=path).get_signature_runner('serving_default')(pixels=x)['logits'] "
            "(ai_edge_litert.interpreter or tf.lite)",
            fixed_size=True,
            quantizable=True,
            what="tflite",
        ),
        Format(
            "keras",
            _write_keras,
            _run_keras,
            "import zoo (it registers the ConvNeXt layers), then keras.saving.load_model(path)",
            what="keras",
            tensorflow_only=False,
        ),
    )
}


def check_options(format: str, quantize: str) -> Format:
    """The format named `format`, if `quantize` applies to it.

    Raises:
        ExportError: an unknown format or quantization, or a quantized non-TFLite export.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ExportError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    if quantize != "none" and not FORMATS[format].quantizable:
        raise ExportError(f"--quantize {quantize} applies to tflite exports only; drop it for {format}")
    return FORMATS[format]


def check_backend(kind: Format) -> None:
    """Refuse a TensorFlow format where Keras runs on another backend (JAX), before any work.

    Raises:
        BackendError: naming the backend and what to do.
    """
    import keras

    backend = keras.backend.backend()
    if kind.tensorflow_only and backend != "tensorflow":
        raise BackendError(
            f"{kind.what} exports are made by TensorFlow, and Keras runs on {backend} here; run "
            "the export with KERAS_BACKEND=tensorflow (the keras format works on any backend)"
        )
