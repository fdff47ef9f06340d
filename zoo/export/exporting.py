"""After conversion: a converted folder as a SavedModel, a TFLite (LiteRT) file or a `.keras` file.

Every export is run on the parity images and compared with the Keras model and with PyTorch
(timm on the recorded source weights, in its own process) before it is renamed into place;
a report sits next to it (`parity.json` inside a SavedModel, `<file>.parity.json` beside a file).
The formats are `zoo.export.formats`, the bounds and the report `zoo.export.report`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from checkpoints import fs
from checkpoints.converted import ConvertedFolder
from converters import recorded as pytorch_side
from converters.images import parity_batch
from converters.layouts import LAYOUTS

from .. import loading
from ..core.errors import BackboneError, ExportError, StoreError, ZooError
from ..core.reports import DEFAULT_ATOL, DEFAULT_RTOL
from ..core.runtime import installed
from ..core.steps import Echo, step
from .formats import INPUT_NAME, SIGNATURE, Format, check_backend, check_options, output_name
from .report import REPORT_FORMAT, Agreement, ExportReport, bounds_for

log = logging.getLogger(__name__)

PYTORCH_MODES = ("auto", "require", "skip")
FOLDER_REPORT = "parity.json"


def export(
    name_or_path: str | Path,
    format: str,
    out: str | Path | None = None,
    quantize: str | None = None,
    *,
    pytorch: str = "auto",
    checkpoint: str | Path | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    convert: bool = True,
    echo: Echo = log.info,
) -> Path:
    """Export a converted checkpoint, check it on the parity images, and put it in place if it passed.

    Args:
        name_or_path: converted folder, or a name found as `zoo.load` finds it (local store,
            Hub, conversion).
        format: `savedmodel` (a folder: signature `serving_default`, input `pixels` of shape
            (batch, height, width, channels) with any batch and size, output `logits`), `tflite` (one
            file, same names, input fixed at the checkpoint's size, any batch) or `keras` (a
            `.keras` file; loading it needs `import zoo`, which registers the layers). SavedModel
            and TFLite exports need Keras' TensorFlow backend.
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
        BackendError: a SavedModel or TFLite export where Keras runs on another backend.
        ZooError: the checkpoint cannot be found, or (with `pytorch="require"`) compared.
    """
    quantize = quantize or "none"
    kind = check_options(format, quantize)
    check_backend(kind)
    if pytorch not in PYTORCH_MODES:
        raise ExportError(f"pytorch must be one of {', '.join(PYTORCH_MODES)}, got {pytorch!r}")
    folder = loading.locate(name_or_path, convert=convert)
    config = folder.config
    if config.is_backbone:
        raise BackboneError(
            f"{config.name} is a dense-prediction backbone (the feature maps of stages {list(config.features)}); "
            "the exports serve and check classifiers' logits: export the model you build on it "
            "(zoo.load gives the backbone as a Keras model)"
        )
    out = _destination(out, folder, kind, quantize)
    start = time.perf_counter()
    inputs = parity_batch(config.input_size, config.mean, config.std)
    with step(echo, f"load {folder.path} and run it"):
        model = loading.from_folder(folder)
        keras_logits = np.asarray(model(inputs, training=False))
    framework = LAYOUTS[config.source.layout or "timm"].framework
    with step(echo, f"PyTorch reference: {framework} (separate process)") if pytorch != "skip" else nullcontext():
        torch_logits, skipped = _pytorch_logits(folder, inputs, pytorch, checkpoint)
    if skipped:
        echo(f"   PyTorch comparison skipped: {skipped}")
    with _staging(out) as work:
        artefact = work / out.name
        with step(echo, f"write {format}" + ("" if quantize == "none" else f" ({quantize})")):
            kind.write(model, artefact, config.input_size, quantize)
        with step(echo, f"run the {format} export on the parity images"):
            logits, runtime = kind.run(artefact, inputs)
        report = ExportReport(
            export=_details(kind, quantize, artefact, out, folder, output_name(model), int(keras_logits.shape[-1])),
            source=_provenance(folder),
            bounds=bounds_for(quantize, atol, rtol),
            vs_keras=Agreement.of("keras", logits, keras_logits),
            vs_pytorch=None if torch_logits is None else Agreement.of("pytorch", logits, torch_logits),
            keras_vs_pytorch=None if torch_logits is None else Agreement.of("pytorch", keras_logits, torch_logits),
            pytorch_skipped=skipped,
            num_images=int(keras_logits.shape[0]),
            input_size=config.input_size,
            runtime=runtime,
            versions=_versions(),
            seconds=round(time.perf_counter() - start, 1),
        )
        if not report.passed:
            raise ExportError(
                f"the {format} export was refused: {report.failure}; nothing was written to {out}\n{report.table()}",
                report=report,
            )
        echo(report.table())
        _place(work, artefact, out, report.to_json())
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


# --- the steps --------------------------------------------------------------------------------


def _destination(out, folder: ConvertedFolder, kind: Format, quantize: str) -> Path:
    format = kind.name
    out = Path(out).expanduser() if out else Path.cwd() / kind.default_name(folder.path.name, quantize)
    out = out.absolute()
    if format == "keras" and out.suffix != ".keras":
        raise ExportError(f"{out}: a keras export's name must end in .keras (Keras requires it)")
    inside = folder.path.resolve()
    if out.resolve() == inside or inside in out.resolve().parents:
        raise ExportError(f"{out} is inside the converted folder {folder.path}; choose another --out")
    what = kind.what
    if out.exists():
        if kind.folder:
            replaceable = out.is_dir() and (_export_format(out) == format or not any(out.iterdir()))
        else:
            replaceable = out.is_file() and _export_format(out) == format
        if not replaceable:
            raise ExportError(
                f"{out} exists and is not a {what} export of convnext-zoo; choose another --out "
                f"(only an earlier {what} export is replaced)"
            )
    elif not kind.folder and report_path(out).exists() and _export_format(out) != format:
        raise ExportError(f"{report_path(out)} exists and is not a {what} export report; choose another --out")
    return out


def _export_format(path: Path) -> str | None:
    """The format of the convnext-zoo export at `path` (its report says), or None."""
    try:
        data = json.loads(report_path(path).read_text())
        return data["export"]["format"] if data.get("report_format") == REPORT_FORMAT else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def _pytorch_logits(
    folder: ConvertedFolder, inputs: np.ndarray, mode: str, checkpoint
) -> tuple[np.ndarray | None, str | None]:
    """timm's logits, or (None, why not) where the comparison cannot run and was not required."""
    if mode == "skip":
        return None, "not requested"
    if not (installed("torch") and installed("timm")):
        why = "needs torch and timm: pip install 'convnext-zoo[convert]'"
        if mode == "require":
            raise ExportError(f"the PyTorch comparison {why}")
        return None, why
    try:
        return pytorch_side.pytorch_logits(folder.config, inputs, checkpoint=checkpoint), None
    except ZooError as e:
        if mode == "require":
            raise
        why = str(e).splitlines()[0]
        log.warning("PyTorch comparison skipped: %s", why)
        return None, why


def _details(
    kind: Format, quantize: str, artefact: Path, out: Path, folder: ConvertedFolder, output: str, classes: int
) -> dict:
    """The report's description of the export: format, files and their sha256, input, output, how to load."""
    files = sorted(p for p in artefact.rglob("*") if p.is_file()) if artefact.is_dir() else [artefact]
    name_of = (lambda p: p.relative_to(artefact).as_posix()) if artefact.is_dir() else (lambda p: out.name)
    details = {
        "format": kind.name,
        "quantize": quantize,
        "path": out.name,
        "files": {name_of(p): {"sha256": fs.sha256_file(p), "size": p.stat().st_size} for p in files},
        "input": {
            "name": INPUT_NAME,
            "shape": kind.input_shape(folder.config.input_size, folder.config.architecture.in_chans),
            "dtype": "float32",
            "layout": "NHWC",
            "normalised_with": {"mean": list(folder.config.mean), "std": list(folder.config.std)},
        },
        "output": {"name": output, "shape": [None, classes]},
    }
    if kind.name != "keras":
        details["signature"] = SIGNATURE
    details["load"] = kind.load
    return details


def _provenance(folder: ConvertedFolder) -> dict:
    config = folder.config
    layout = config.source.layout or "timm"
    return {
        "name": config.name,
        "pretrained": config.pretrained,
        "folder": str(folder.path),
        "weights_sha256": config.weights_sha256,
        "source_sha256": config.source.sha256,
        "source_layout": layout,
        "pytorch_reference": LAYOUTS[layout].framework,
    }


def _versions() -> dict:
    return {"tensorflow": tf.__version__, "keras": keras.__version__}


@contextmanager
def _staging(out: Path):
    """The store's staging folder beside `out` (a killed export's is removed by the next one)."""
    stack = ExitStack()
    try:
        work = stack.enter_context(fs.staging(out))
    except StoreError as e:
        raise ExportError(str(e)) from None
    with stack:
        yield work


def _place(work: Path, artefact: Path, out: Path, report: dict) -> None:
    """Rename the checked export (and its report) into place, replacing an earlier export,
    under the store's lock and with its atomic swap."""
    try:
        fs.fsync_tree(artefact) if artefact.is_dir() else fs.fsync_file(artefact)
        fs.write_json(
            report_path(artefact) if artefact.is_dir() else work / "report.json", report, indent=1, fsync=True
        )
        with fs.locked(out):
            if artefact.is_dir():
                fs.swap_into_place(artefact, out)
            else:
                # The file first: a crash between the two renames leaves the new file without a
                # report, or beside the earlier report whose sha256 does not match it.
                os.replace(artefact, out)
                os.replace(work / "report.json", report_path(out))
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
