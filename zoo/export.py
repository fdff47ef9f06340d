"""After conversion: a converted folder as a SavedModel, a TFLite (LiteRT) file or a `.keras` file.

Every export is run on the parity images and compared with the Keras model and with PyTorch
(timm on the recorded source weights, in its own process) before it is renamed into place;
a report sits next to it (`parity.json` inside a SavedModel, `<file>.parity.json` beside a file).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from checkpoints import store
from converters.images import parity_batch
from converters.parity import DEFAULT_ATOL, DEFAULT_RTOL

from .errors import ExportError, ZooError
from .steps import Echo, step

log = logging.getLogger(__name__)

FORMATS = ("savedmodel", "tflite", "keras")
QUANTIZE = ("none", "fp16", "dynamic")
PYTORCH_MODES = ("auto", "require", "skip")
REPORT_FORMAT = "convnext-zoo-export/1"
FOLDER_REPORT = "parity.json"
INPUT_NAME = "pixels"
SIGNATURE = "serving_default"
LOAD_HINTS = {
    "savedmodel": "tf.saved_model.load(path).signatures['serving_default'](pixels=x)['logits']",
    "tflite": "Interpreter(model_path=path).get_signature_runner('serving_default')(pixels=x)['logits'] "
              "(ai_edge_litert.interpreter or tf.lite)",
    "keras": "import zoo.model (registers the ConvNeXt layers), then keras.saving.load_model(path)",
}

# Bounds of the quantized TFLite variants, against both Keras and PyTorch. Measured on the
# parity images of perturbed random-weight convnext_tiny models (full size and small): fp16
# weights moved the logits by at most 8.0e-4 relative with top-1 always kept; dynamic-range
# int8 by at most 2.3e-2 relative with 7/8 or 8/8 top-1 (flips only where the top two logits
# were within 0.05). The bounds leave a 4-6x margin.
FP16_RTOL = 5e-3
FP16_MIN_TOP1 = 7 / 8
DYNAMIC_RTOL = 1e-1
DYNAMIC_MIN_TOP1 = 6 / 8


@dataclass(frozen=True)
class Bounds:
    """What an export must meet on the parity images, against Keras and against PyTorch.

    Attributes:
        atol: max abs logit error (None: not bounded).
        rtol: max abs logit error / max |reference logit|.
        min_top1: least fraction of images whose top-1 class agrees (None: not bounded;
            fp32 is bounded by `atol` alone, where a near tie may legitimately flip).
    """

    atol: float | None
    rtol: float
    min_top1: float | None

    def describe(self, images: int) -> str:
        parts = ([f"max abs <= {self.atol:g}"] if self.atol is not None else []) + [f"relative <= {self.rtol:g}"]
        if self.min_top1 is not None:
            parts.append(f"top-1 >= {round(self.min_top1 * images)}/{images}")
        return ", ".join(parts)


def bounds_for(quantize: str, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> Bounds:
    """The bounds of an export: the parity gate's for fp32, the measured looser ones when quantized."""
    if quantize == "fp16":
        return Bounds(None, FP16_RTOL, FP16_MIN_TOP1)
    if quantize == "dynamic":
        return Bounds(None, DYNAMIC_RTOL, DYNAMIC_MIN_TOP1)
    return Bounds(atol, rtol, None)


@dataclass
class Agreement:
    """How close an export's logits are to one reference's on the parity images."""

    against: str
    max_abs: float
    max_ref: float
    rel: float
    top1: int
    top5: int
    images: int
    finite: bool

    @classmethod
    def of(cls, against: str, ours: np.ndarray, ref: np.ndarray) -> "Agreement":
        from converters.parity import Comparison, topk_hits

        ours, ref = np.asarray(ours), np.asarray(ref)
        c = Comparison.of(against, ours, ref)
        images = int(ref.shape[0])
        if ours.shape != ref.shape or not c.finite:
            return cls(against, float("inf"), float("nan"), float("inf"), 0, 0, images, False)
        return cls(against, c.max_abs, c.max_ref, c.rel, topk_hits(ours, ref, 1), topk_hits(ours, ref, 5), images, True)

    def failure(self, bounds: Bounds) -> str | None:
        """Why these figures miss `bounds`, or None."""
        if not self.finite:
            return f"vs {self.against}: non-finite or misshapen output"
        if (bounds.atol is not None and self.max_abs > bounds.atol) or self.rel > bounds.rtol:
            return (f"vs {self.against}: max abs error {self.max_abs:.3g}, relative {self.rel:.3g} "
                    f"({bounds.describe(self.images)})")
        if bounds.min_top1 is not None and self.top1 < round(bounds.min_top1 * self.images):
            return (f"vs {self.against}: top-1 agrees on {self.top1}/{self.images} images "
                    f"({bounds.describe(self.images)})")
        return None


@dataclass
class ExportReport:
    """The machine-readable result of an export check (written next to the export)."""

    export: dict
    source: dict
    bounds: Bounds
    vs_keras: Agreement
    vs_pytorch: Agreement | None
    keras_vs_pytorch: Agreement | None
    pytorch_skipped: str | None
    num_images: int
    input_size: int
    runtime: str
    versions: dict = field(default_factory=dict)
    seconds: float | None = None
    passed: bool = False
    failure: str | None = None
    report_format: str = REPORT_FORMAT

    def __post_init__(self):
        failures = [a.failure(self.bounds) for a in (self.vs_keras, self.vs_pytorch) if a is not None]
        self.failure = next((f for f in failures if f), None)
        self.passed = self.failure is None

    def table(self) -> str:
        e = self.export
        kind = e["format"] if e["quantize"] == "none" else f"{e['format']} ({e['quantize']})"
        head = (f"{kind} of {self.source['name']}: {self.num_images} parity images at "
                f"{self.input_size}x{self.input_size}, run by {self.runtime}")
        rows = [head, f"{'logits':<16} {'max abs':>9} {'relative':>9} {'top-1':>6} {'top-5':>6}  bound"]
        bound = self.bounds.describe(self.num_images)
        for label, a in (("vs keras", self.vs_keras), ("vs pytorch", self.vs_pytorch),
                         ("keras vs pytorch", self.keras_vs_pytorch)):
            if a is None:
                if label == "vs pytorch":
                    rows.append(f"{label:<16} skipped: {self.pytorch_skipped}")
                continue
            gate = bound if label.startswith("vs") else "(the conversion's gate)"
            rows.append(f"{label:<16} {a.max_abs:>9.2e} {a.rel:>9.2e} {f'{a.top1}/{a.images}':>6} "
                        f"{f'{a.top5}/{a.images}':>6}  {gate}")
        rows.append("passed" if self.passed else f"FAILED: {self.failure}")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ExportReport":
        data = dict(data)
        data["bounds"] = Bounds(**data["bounds"])
        for key in ("vs_keras", "vs_pytorch", "keras_vs_pytorch"):
            data[key] = Agreement(**data[key]) if data.get(key) else None
        stored = data.pop("passed", None)
        data.pop("failure", None)
        report = cls(**data)
        if stored is not None and stored != report.passed:
            raise ValueError(f"export report says passed={stored} but its figures say {report.passed}")
        return report


def export(name_or_path: str | Path, format: str, out: str | Path | None = None, quantize: str | None = None, *,
           pytorch: str = "auto", checkpoint: str | Path | None = None, atol: float = DEFAULT_ATOL,
           rtol: float = DEFAULT_RTOL, convert: bool = True, echo: Echo = log.info) -> Path:
    """Export a converted checkpoint, check it on the parity images, and put it in place if it passed.

    Args:
        name_or_path: converted folder, or a name found as `zoo.load` finds it (local store,
            Hub, conversion).
        format: `savedmodel` (a folder: signature `serving_default`, input `pixels` of shape
            (batch, height, width, 3) with any batch and size, output `logits`), `tflite` (one
            file, same names, input fixed at the checkpoint's size, any batch) or `keras` (a
            `.keras` file; loading it needs `import zoo.model`, which registers the layers).
        out: destination (default: `<folder name>.savedmodel|.tflite|.keras` in the current
            folder, `.fp16.tflite` / `.dynamic.tflite` when quantized). An earlier export there is
            replaced; anything else is refused.
        quantize: TFLite only: `none` (fp32), `fp16` (float16 weights) or `dynamic` (dynamic-range
            int8 weights).
        pytorch: `auto` compares with PyTorch when torch, timm and the source weights are at hand
            and says in the report why not otherwise; `require` fails then; `skip` never runs it.
        checkpoint: local source file for the PyTorch comparison instead of fetching it again.
        atol, rtol: logits bounds of fp32 exports (the parity gate's); quantized ones have
            fixed looser bounds (`bounds_for`).
        convert: let a name that is neither stored nor published be converted first.
        echo: receives one line per step.

    Returns:
        The export's path; its report is `report_path(path)`.

    Raises:
        ExportError: bad options, a destination that is not an export, a failed conversion or
            missed bounds; nothing is left at `out` then (an earlier export there is kept).
        ZooError: the checkpoint cannot be found, or (with `pytorch="require"`) compared.
    """
    quantize = _check_options(format, quantize or "none", pytorch)
    from .loading import from_folder, locate

    folder = locate(name_or_path, convert=convert)
    cfg = folder.config["pretrained_cfg"]
    size = int(cfg["input_size"][-1])
    out = _destination(out, folder, format, quantize)
    start = time.perf_counter()
    inputs = parity_batch(size, cfg["mean"], cfg["std"])
    with step(echo, f"load {folder.path} and run it"):
        model = from_folder(folder)
        keras_logits = np.asarray(model(inputs, training=False))
    with step(echo, "PyTorch reference (separate process)") if pytorch != "skip" else nullcontext():
        torch_logits, skipped = _pytorch_logits(folder.config, inputs, pytorch, checkpoint)
    if skipped:
        echo(f"   PyTorch comparison skipped: {skipped}")
    work = _workdir(out)
    try:
        artefact = work / out.name
        with step(echo, f"write {format}" + ("" if quantize == "none" else f" ({quantize})")):
            _WRITERS[format](model, artefact, size, quantize)
        with step(echo, f"run the {format} export on the parity images"):
            logits, runtime = _RUNNERS[format](artefact, inputs)
        report = _report(folder, format, quantize, _output_name(model), artefact, out, size, logits,
                         keras_logits, torch_logits, skipped, bounds_for(quantize, atol, rtol), runtime,
                         time.perf_counter() - start)
        if not report.passed:
            raise ExportError(f"the {format} export was refused: {report.failure}; nothing was written to "
                              f"{out}\n{report.table()}", report=report)
        echo(report.table())
        _place(work, artefact, out, report.to_json())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def report_path(path: str | Path) -> Path:
    """Where the report of the export at `path` is: inside a folder export, beside a file."""
    path = Path(path)
    return path / FOLDER_REPORT if path.is_dir() else path.with_name(path.name + ".parity.json")


def read_report(path: str | Path) -> ExportReport:
    """The report of the export at `path`.

    Raises:
        ExportError: there is no export report there.
    """
    try:
        data = json.loads(report_path(path).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} has no readable export report ({report_path(path)}): {e}") from None
    if not isinstance(data, dict) or data.get("report_format") != REPORT_FORMAT:
        raise ExportError(f"{report_path(path)} is not a convnext-zoo export report")
    return ExportReport.from_json(data)


def default_name(folder_name: str, format: str, quantize: str = "none") -> str:
    """The export's file or folder name for a converted folder's name."""
    if format == "tflite":
        return f"{folder_name}{'' if quantize == 'none' else '.' + quantize}.tflite"
    return f"{folder_name}.{format}"


# --- the steps --------------------------------------------------------------------------------

def _check_options(format: str, quantize: str, pytorch: str) -> str:
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ExportError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    if quantize != "none" and format != "tflite":
        raise ExportError(f"--quantize {quantize} applies to tflite exports only; drop it for {format}")
    if pytorch not in PYTORCH_MODES:
        raise ExportError(f"pytorch must be one of {', '.join(PYTORCH_MODES)}, got {pytorch!r}")
    return quantize


def _destination(out, folder: store.ConvertedCheckpoint, format: str, quantize: str) -> Path:
    out = Path(out).expanduser() if out else Path.cwd() / default_name(folder.path.name, format, quantize)
    out = out.absolute()
    if format == "keras" and out.suffix != ".keras":
        raise ExportError(f"{out}: a keras export's name must end in .keras (Keras requires it)")
    inside = folder.path.resolve()
    if out.resolve() == inside or inside in out.resolve().parents:
        raise ExportError(f"{out} is inside the converted folder {folder.path}; choose another --out")
    what = "SavedModel" if format == "savedmodel" else format
    if out.exists():
        if format == "savedmodel":
            replaceable = out.is_dir() and (_export_format(out) == format or not any(out.iterdir()))
        else:
            replaceable = out.is_file() and _export_format(out) == format
        if not replaceable:
            raise ExportError(f"{out} exists and is not a {what} export of convnext-zoo; choose another --out "
                              f"(only an earlier {what} export is replaced)")
    elif format != "savedmodel" and report_path(out).exists() and _export_format(out) != format:
        raise ExportError(f"{report_path(out)} exists and is not a {what} export report; choose another --out")
    return out


def _export_format(path: Path) -> str | None:
    """The format of the convnext-zoo export at `path` (its report says), or None."""
    try:
        data = json.loads(report_path(path).read_text())
        return data["export"]["format"] if data.get("report_format") == REPORT_FORMAT else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        return False


def _pytorch_logits(config: dict, inputs: np.ndarray, mode: str, checkpoint) -> tuple[np.ndarray | None, str | None]:
    """timm's logits, or (None, why not) where the comparison cannot run and was not required."""
    if mode == "skip":
        return None, "not requested"
    if not (_installed("torch") and _installed("timm")):
        why = "needs torch and timm: pip install 'convnext-zoo[convert]'"
        if mode == "require":
            raise ExportError(f"the PyTorch comparison {why}")
        return None, why
    from converters.exports import pytorch_logits

    try:
        return pytorch_logits(config, inputs, checkpoint=checkpoint), None
    except ZooError as e:
        if mode == "require":
            raise
        why = str(e).splitlines()[0]
        log.warning("PyTorch comparison skipped: %s", why)
        return None, why


def _serving_fn(model):
    return lambda pixels: {_output_name(model): model(pixels, training=False)}


def _output_name(model) -> str:
    """`logits`, or `pre_logits` for a checkpoint without a classifier (num_classes 0)."""
    return "logits" if any(layer.name == "head.fc" for layer in model.layers) else "pre_logits"


def _saved_model(model, path: Path, size: int | None) -> None:
    """A SavedModel with one named signature; `size` None leaves height and width free."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, _serving_fn(model),
                         input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME)])
    archive.write_out(str(path), verbose=False)


def _write_savedmodel(model, path: Path, size: int, quantize: str) -> None:
    _saved_model(model, path, None)


def _write_keras(model, path: Path, size: int, quantize: str) -> None:
    model.save(path)


def _write_tflite(model, path: Path, size: int, quantize: str) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="zoo-export-tflite-", dir=path.parent) as tmp:
        _saved_model(model, Path(tmp) / "fixed", size)  # the converter wants static height and width
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

    from . import model as _registers_layers  # noqa: F401

    loaded = keras.saving.load_model(path, safe_mode=True)
    return np.asarray(loaded(inputs, training=False)), f"keras {keras.__version__} (keras.saving.load_model)"


def tflite_interpreter(path: str | Path):
    """A TFLite interpreter for `path`: LiteRT's if `ai_edge_litert` is installed, else `tf.lite`'s.

    `tf.lite.Interpreter` is deprecated in favour of LiteRT's (identical API) but still ships
    with TensorFlow; its deprecation warning is silenced here.

    Returns:
        (interpreter, description of the runtime).
    """
    if _installed("ai_edge_litert"):
        from importlib.metadata import version

        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_path=str(path)), f"ai_edge_litert {version('ai-edge-litert')}"
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        return tf.lite.Interpreter(model_path=str(path)), f"tf.lite.Interpreter (tensorflow {tf.__version__})"


def _run_tflite(path: Path, inputs: np.ndarray) -> tuple[np.ndarray, str]:
    interpreter, runtime = tflite_interpreter(path)
    runner = interpreter.get_signature_runner(SIGNATURE)
    outputs = runner(**{INPUT_NAME: inputs})  # the runner resizes the batch dimension
    return np.asarray(next(iter(outputs.values()))), runtime


_WRITERS = {"savedmodel": _write_savedmodel, "tflite": _write_tflite, "keras": _write_keras}
_RUNNERS = {"savedmodel": _run_savedmodel, "tflite": _run_tflite, "keras": _run_keras}


def _report(folder, format, quantize, output, artefact: Path, out: Path, size, logits, keras_logits, torch_logits,
            skipped, bounds, runtime, seconds) -> ExportReport:
    import keras
    import tensorflow as tf

    files = sorted(p for p in artefact.rglob("*") if p.is_file()) if artefact.is_dir() else [artefact]
    name_of = (lambda p: p.relative_to(artefact).as_posix()) if artefact.is_dir() else (lambda p: out.name)
    cfg = folder.config["pretrained_cfg"]
    shape = [None, None, None, 3] if format != "tflite" else [None, size, size, 3]
    details = {
        "format": format, "quantize": quantize, "path": out.name,
        "files": {name_of(p): {"sha256": store.sha256_file(p), "size": p.stat().st_size} for p in files},
        "input": {"name": INPUT_NAME, "shape": shape, "dtype": "float32", "layout": "NHWC",
                  "normalised_with": {"mean": cfg["mean"], "std": cfg["std"]}},
        "output": {"name": output, "shape": [None, int(keras_logits.shape[-1])]},
    }
    if format != "keras":
        details["signature"] = SIGNATURE
    details["load"] = LOAD_HINTS[format]
    source = {"name": folder.config["name"], "pretrained": folder.config.get("pretrained", True),
              "folder": str(folder.path), "weights_sha256": folder.config["weights"]["sha256"],
              "source_sha256": folder.config["source"]["sha256"]}
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
    return ExportReport(
        export=details, source=source, bounds=bounds,
        vs_keras=Agreement.of("keras", logits, keras_logits),
        vs_pytorch=None if torch_logits is None else Agreement.of("pytorch", logits, torch_logits),
        keras_vs_pytorch=None if torch_logits is None else Agreement.of("pytorch", keras_logits, torch_logits),
        pytorch_skipped=skipped, num_images=int(keras_logits.shape[0]), input_size=size, runtime=runtime,
        versions=versions, seconds=round(seconds, 1))


def _workdir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write to {out.parent}: {e.strerror or e}") from None


def _place(work: Path, artefact: Path, out: Path, report: dict) -> None:
    """Rename the checked export (and its report) into place, replacing an earlier export."""
    try:
        for path in (sorted(artefact.rglob("*")) if artefact.is_dir() else [artefact]):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        _write_json(report_path(artefact) if artefact.is_dir() else work / "report.json", report)
        if artefact.is_dir():
            if out.exists():
                os.replace(out, work / "previous")  # removed with `work`
            os.replace(artefact, out)
        else:
            # The file first: a crash between the two renames leaves the new file without a
            # report, or beside the earlier report whose sha256 does not match it.
            os.replace(artefact, out)
            os.replace(work / "report.json", report_path(out))
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
