"""`zoo verify`: a converted folder checked again, against its manifest and its recorded source weights."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from checkpoints import converted
from checkpoints.fs import work_dir
from checkpoints.weights import load_keras_folder
from zoo.core.reports import ParityReport
from zoo.core.steps import Echo, step

from . import parity
from .plan import framework_of
from .recorded import recorded_reference
from .reference_process import Network

log = logging.getLogger(__name__)


def verify(path: str | Path, *, checkpoint: str | Path | None = None, echo: Echo = log.info) -> ParityReport:
    """Re-run parity on a converted folder against its recorded source weights.

    The folder's files are checked against the manifest, the source is fetched again (or
    taken from `checkpoint`) and must have the sha256 recorded at conversion, and the
    folder's Keras model (its `config.json` and weights, as `keras.saving.load_model` reads
    them) is compared with the source's framework with the tolerances stored in its report.
    Writes nothing.

    Raises:
        ZooError: integrity or source problems (a failed comparison is in the report).
    """
    with step(echo, f"check {path} against its manifest"):
        folder = converted.open_folder(path)
    network = Network.of_folder(folder.config)
    with work_dir("zoo-verify-") as work, contextlib.ExitStack() as sourced:
        with step(echo, "source weights"):
            src, seed = sourced.enter_context(recorded_reference(folder.config, work, checkpoint))
        with parity.started(network, src.path, random_seed=seed) as pending:
            with step(echo, "the PyTorch reference runs the parity batch (separate process)"):
                pending.wait_for_reference()  # to its end first: one process holds the weights at a time
            with step(echo, "load the folder as keras.saving.load_model does"):
                model = load_keras_folder(folder.path)
            stored = folder.parity
            with step(echo, f"parity against {framework_of(src)} (separate process)"):
                report = pending.check(model, atol=stored["atol"], rtol=stored["rtol"], stage_rtol=stored["stage_rtol"])
            parity.check_same_source(report, folder.config.source.sha256)
    echo(report.table())
    return report
