"""Errors raised anywhere in the pipeline; the CLI catches `ZooError` once and exits 1."""

from __future__ import annotations


class ZooError(Exception):
    """Base class of every error a user can cause or fix (bad name, bad file, failed parity)."""


class ReportedError(ZooError):
    """An error that carries the report of the check that failed (`.report`, or None)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class UnknownModelError(ZooError, KeyError):
    """A name that is neither a catalogue entry, an alias, nor an architecture."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ArchitectureError(ZooError, ValueError):
    """An architecture row no network can have (a non-positive or non-finite epsilon, a stage
    without blocks, an unknown stem or norm)."""


class SourceError(ZooError):
    """The source checkpoint cannot be fetched or read."""


class MappingError(ZooError):
    """The source state dict does not match the Keras model exactly."""


class ParityError(ReportedError):
    """The Keras model and the PyTorch reference disagree beyond tolerance."""


class IntegrityError(ZooError):
    """A stored file does not match the sha256 recorded for it."""


class StoreError(ZooError):
    """A converted checkpoint folder is missing, incomplete or cannot be written."""


class HubError(ZooError):
    """A Hub operation failed or was refused (nothing was published then)."""


class ReferenceRunError(ZooError):
    """The PyTorch reference process failed (missing `convert` extra, crash)."""


class BackendError(ZooError):
    """The Keras backend this process runs cannot do what was asked (the model on torch, an
    export on anything but TensorFlow)."""


class PreprocessingError(ZooError, ValueError):
    """Preprocessing settings no transform can apply (a crop of no pixels, a non-finite mean)."""


class ImageError(ZooError):
    """An input image cannot be read or has the wrong shape or dtype."""


class DatasetError(ZooError):
    """An evaluation image set or its labels cannot be used."""


class ExportError(ReportedError):
    """An export failed or missed its bounds (nothing was written at the destination then)."""


class InvalidNameError(ZooError, ValueError):
    """A model name that cannot be a folder's name (`.`, `..`, empty, a path separator, a control
    character): names become folders of the store and default folder and repo names."""


class BackboneError(ZooError, ValueError):
    """A dense-prediction backbone (feature maps out, no head) asked for a head, classes or logits."""
