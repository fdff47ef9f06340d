"""Export a converted model (SavedModel, TFLite, .keras), each checked against Keras and PyTorch.

`exporting` runs an export and writes its report, `formats` is the table of formats (how each is
written, run, loaded and named), `report` the report's types and bounds. Importing the package
imports nothing heavy: `export` and the rest load TensorFlow when first used.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "export": "exporting",
    "read_report": "exporting",
    "report_path": "exporting",
    "FORMATS": "formats",
    "Format": "formats",
    "check_options": "formats",
    "ExportReport": "report",
    "bounds_for": "report",
}


def __getattr__(name: str):
    if name == "ExportError":
        from ..core.errors import ExportError

        return ExportError
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "ExportError",
    "ExportReport",
    "Format",
    "bounds_for",
    "check_options",
    "export",
    "read_report",
    "report_path",
]
