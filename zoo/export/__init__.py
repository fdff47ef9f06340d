"""Export a converted model (SavedModel, TFLite, .keras), each checked against Keras and PyTorch,
or take a Keras ConvNeXt back to PyTorch (timm, transformers, torchvision), proven in that framework.

`exporting` runs an export and writes its report, `formats` is the table of formats (how each is
written, run, loaded and named), `report` the report's types and bounds, `pytorch` the way back
(`to_pytorch`), `publishing` a timm or transformers export on the Hub (`zoo publish --format timm`).
Importing the package imports nothing heavy: `export`, `read_report`, `report_path` and `to_pytorch`
load TensorFlow when first used.
"""

from __future__ import annotations

from ..core.errors import ExportError
from .formats import FORMATS, Format, check_options
from .report import ExportReport, bounds_for

_EXPORTING = ("export", "read_report", "report_path")  # imports Keras and TensorFlow: resolved on first use


def __getattr__(name: str):
    if name in _EXPORTING:
        from . import exporting

        return getattr(exporting, name)
    if name == "to_pytorch":
        from .pytorch import to_pytorch

        return to_pytorch
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
    "to_pytorch",
]
