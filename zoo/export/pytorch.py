"""Back to PyTorch: a Keras ConvNeXt (a converted folder, a name, a `.keras` file or a model in memory,
fine-tuned or not) as timm, transformers or torchvision weights, proven in that framework.

The files are what the framework's own loader reads (`converters.targets`); they are loaded by it in
the reference process and compared with the Keras model (`converters.back`) before they are put in
place, with the report (`parity.json`) beside them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import keras

from checkpoints import fs
from converters import back
from converters.metadata import check_label_names, default_preprocessing, fit_channels
from converters.targets import TARGETS, WEIGHTS, Described, processor_differs, target

from .. import loading
from ..core.errors import ExportError
from ..core.folder_config import check_name
from ..core.labels import label_names, read_label_file
from ..core.preprocessing import as_preprocessing
from ..core.reports import DEFAULT_ATOL, DEFAULT_RTOL
from ..core.steps import Echo, step
from .exporting import _place, _provenance, _staging

log = logging.getLogger(__name__)

REPORT = "parity.json"
REPORT_FORMAT = "convnext-zoo-pytorch-export/1"
FRAMEWORKS = tuple(TARGETS)


def to_pytorch(
    model: keras.Model | str | Path,
    framework: str,
    out: str | Path | None = None,
    *,
    labels=None,
    preprocessing=None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    convert: bool = True,
    echo: Echo = log.info,
) -> Path:
    """Write a Keras ConvNeXt as `framework`'s own weights and prove that framework computes what it does.

    Args:
        model: a converted folder or a name (found as `zoo.load` finds it), a `.keras` file, or a Keras
            model in memory (`zoo.load(...)`, fine-tuned or not; any head: the checkpoint's, a fresh
            one, none).
        framework: `timm` (a folder with `model.safetensors` and timm's `config.json`: loaded by
            `timm.create_model("local-dir:DIR", pretrained=True)`, or `"hf-hub:ORG/NAME"` once
            published), `transformers` (a `save_pretrained` folder: `config.json`,
            `preprocessor_config.json`, `model.safetensors`) or `torchvision` (`model.safetensors`,
            a state dict `torchvision.models.convnext_*(num_classes=N)` loads strictly).
        out: the folder to write (default `<name>.<framework>` in the current folder); an earlier
            export of the same framework there is replaced, anything else refused.
        labels: a name per class (a list, or a file with one name per line); default: a converted
            folder's own, ImageNet's for 1000/11821/21841 classes, else none.
        preprocessing: how images are prepared for the model (a name, a converted folder, a
            `Preprocessing` or a `pretrained_cfg`), recorded in the framework's config; default: a
            converted folder's own, else timm's ImageNet defaults at 224 (the output says so).
        atol, rtol: the logits' bounds (the parity gate's); stages and pre-logits at the gate's too.
        convert: let a name that is neither stored nor published be converted first.
        echo: receives one line per step.

    Returns:
        The folder written; its report is `parity.json` inside.

    Raises:
        ExportError: an architecture the framework cannot express (naming what it lacks and the
            frameworks that can hold it), a changed model (the layers listed), bad labels or
            preprocessing, a destination that is not such an export, or a failed proof; nothing
            is left at `out` then.
        ZooError: the model cannot be found; the framework cannot be run (torch, timm,
            transformers or torchvision missing).
    """
    kind = target(framework)
    start = time.perf_counter()
    keras_model, folder, name = _model(model, convert)
    with step(echo, f"read {name} back to timm's tensors"):
        twin, state, described = back.read_network(keras_model)
    described = _described(described, name, folder, labels, preprocessing, echo)
    kind.check(described)
    out = _destination(out, described.name, framework, folder)
    notes = []
    if framework == "transformers" and (differs := processor_differs(described)):
        notes.append(f"preprocessor_config.json: transformers' ConvNextImageProcessor {differs}")
    if not described.head_norm_affine and not described.features:
        notes.append("the head norm has no weights (an FCMAE model's): written as the identity it computes (1, 0)")
    if framework == "torchvision":
        notes.append("torchvision keeps no preprocessing beside the weights: " + _preprocessing_text(described))
    with _staging(out) as work:
        files = work / out.name
        files.mkdir()
        with step(echo, f"write the {framework} files"):
            written = back.write(kind, described, state, files)
        with step(echo, f"load them with {framework} (its own loader, separate process) and compare"):
            parity = back.prove(kind, twin, described, files, atol=atol, rtol=rtol)
        report = {
            "report_format": REPORT_FORMAT,
            "export": {
                "framework": framework,
                "path": out.name,
                "files": {
                    n: {"sha256": fs.sha256_file(files / n), "size": (files / n).stat().st_size} for n in written
                },
                "load": kind.load(described, str(out)),
            },
            "source": _source(folder, described, model),
            "keras": {"version": keras.__version__, "backend": keras.backend.backend()},
            "notes": notes,
            "parity": parity.to_json(),
            "passed": parity.passed,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if not parity.passed:
            raise ExportError(
                f"the {framework} export was refused: {framework} does not compute what the Keras model does "
                f"(at {parity.failure}); nothing was written to {out}\n{parity.table()}"
            )
        echo(parity.summary())
        for note in notes:
            echo(f"   note: {note}")
        _place(work, files, out, report)
    return out


def read_report(path: str | Path) -> dict:
    """The report of the PyTorch export at `path` (its `parity.json`).

    Raises:
        ExportError: there is none there.
    """
    try:
        data = json.loads((Path(path) / REPORT).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} has no readable PyTorch export report ({REPORT}): {e}") from None
    if not isinstance(data, dict) or data.get("report_format") != REPORT_FORMAT:
        raise ExportError(f"{Path(path) / REPORT} is not a convnext-zoo PyTorch export report")
    return data


# --- the steps ----------------------------------------------------------------------------------


def _model(model, convert: bool):
    """The Keras model, the converted folder it came from (None for a file or a model in memory), its name."""
    if isinstance(model, keras.Model):
        return model, None, model.name
    path = Path(model).expanduser()
    if path.suffix == ".keras":
        if not path.is_file():
            raise ExportError(f"{path}: no such .keras file")
        from ..core import model as _registers_layers  # noqa: F401

        try:
            loaded = keras.saving.load_model(path, safe_mode=True)
        except Exception as e:  # Keras raises many kinds for a file that is not its own
            raise ExportError(f"{path}: not a Keras model file Keras can load ({str(e).splitlines()[0]})") from None
        return loaded, None, path.name[: -len(".keras")]
    folder = loading.locate(model, convert=convert)
    return loading.from_folder(folder), folder, folder.config.name


def _described(described: Described, name: str, folder, labels, preprocessing, echo: Echo) -> Described:
    """The network with its name, class names and preprocessing: given, a folder's own, or defaults."""
    from dataclasses import replace

    channels = described.arch.in_chans
    if preprocessing is not None:
        cfg = as_preprocessing(preprocessing).to_config()
    elif folder is not None:
        cfg = dict(folder.config.pretrained_cfg)
    else:
        cfg = default_preprocessing()
        cfg["mean"], cfg["std"] = fit_channels(cfg["mean"], channels), fit_channels(cfg["std"], channels)
        if cfg["mean"] is None:
            raise ExportError(
                f"{name} takes {channels} input channels: say how its inputs are normalised "
                "(preprocessing=a converted folder or a pretrained_cfg with one mean and std per channel)"
            )
        echo(
            f"   {name}: no preprocessing given; timm's ImageNet defaults at 224 are recorded "
            "(preprocessing=... says otherwise)"
        )
    if len(cfg["mean"]) != channels:
        raise ExportError(
            f"{name} takes {channels} input channels; the preprocessing given normalises {len(cfg['mean'])}"
        )
    cfg["input_size"] = [channels, *list(cfg["input_size"])[-2:]]
    if labels is not None:
        names = read_label_file(labels) if isinstance(labels, (str, Path)) else list(labels)
        names = check_label_names(names, None, "labels")
    elif folder is not None and folder.config.labels is not None:
        names = folder.config.labels
    else:
        names = label_names(described.num_classes)
    if names is not None and len(names) != described.num_classes:
        raise ExportError(f"{len(names)} labels for {described.num_classes} classes: give one name per class")
    return replace(described, name=name, labels=tuple(names) if names is not None else None, pretrained_cfg=cfg)


def _destination(out, name: str, framework: str, folder) -> Path:
    if not out:
        check_name(name, "the model's name (the default --out)")
    out = Path(out).expanduser() if out else Path.cwd() / f"{name}.{framework}"
    out = out.absolute()
    if folder is not None:
        inside = folder.path.resolve()
        if out.resolve() == inside or inside in out.resolve().parents:
            raise ExportError(f"{out} is inside the converted folder {folder.path}; choose another --out")
    if out.exists():
        earlier = out.is_dir() and (not any(out.iterdir()) or _framework_of(out) == framework)
        if not earlier:
            raise ExportError(
                f"{out} exists and is not a {framework} export of convnext-zoo; choose another --out "
                f"(only an earlier {framework} export is replaced)"
            )
    return out


def _framework_of(path: Path) -> str | None:
    try:
        data = json.loads((path / REPORT).read_text())
        return data["export"]["framework"] if data.get("report_format") == REPORT_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _source(folder, described: Described, model) -> dict:
    if folder is None and isinstance(model, keras.Model):
        return {"name": described.name, "keras_model": "in memory"}
    if folder is None:
        path = Path(model).expanduser().absolute()
        return {"name": described.name, "keras_file": str(path), "sha256": fs.sha256_file(path)}
    return _provenance(folder)  # the converted folder, as every export's report records it


def _preprocessing_text(d: Described) -> str:
    cfg = d.pretrained_cfg
    return (
        f"resize {cfg.get('interpolation', 'bicubic')} to {d.input_size}/{cfg.get('crop_pct', 0.875)}, "
        f"{cfg.get('crop_mode', 'center')} crop {d.input_size}, mean {list(cfg['mean'])}, std {list(cfg['std'])} "
        f"(in {WEIGHTS}'s report)"
    )


__all__ = ["FRAMEWORKS", "read_report", "to_pytorch"]
