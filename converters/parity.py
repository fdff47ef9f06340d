"""Step 4 of a conversion: prove the Keras model computes what timm computes.

The PyTorch reference runs in its own process on the same weights and the same fixed batch
(`converters.reference_process`); the logits and the outputs of the stem, every stage and the
pre-logits are compared into a `ParityReport` (`zoo.reports`). Parity is an assertion:
`assert_passed` raises, naming the first stage that diverged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from checkpoints.fs import work_dir
from zoo.architectures import Architecture
from zoo.errors import ParityError
from zoo.reports import (
    COMPARED,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    DEFAULT_STAGE_RTOL,
    SERVING,
    Comparison,
    ParityReport,
    topk_agreement,
)

from .reference_process import Network, ReferenceRun, reference_process, results, versions, write_spec


def compare(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], *, atol: float = DEFAULT_ATOL,
            rtol: float = DEFAULT_RTOL, stage_rtol: float = DEFAULT_STAGE_RTOL,
            versions: dict | None = None) -> ParityReport:
    """Compare every output; the report's `passed` is the gate."""
    missing = [n for n in COMPARED if n not in ours or n not in ref]
    if missing:
        raise ParityError(f"outputs missing from the comparison: {missing}")
    comparisons = [Comparison.of(n, ours[n], ref[n]) for n in COMPARED]
    if SERVING in ours:  # the serving path's logits, held to the logits' tolerances
        comparisons.append(Comparison.of(SERVING, ours[SERVING], ref["logits"]))
    batch = ref["stem"].shape
    return ParityReport(
        comparisons=comparisons,
        top1_agreement=topk_agreement(ours["logits"], ref["logits"], 1),
        top5_agreement=topk_agreement(ours["logits"], ref["logits"], 5),
        atol=atol, rtol=rtol, stage_rtol=stage_rtol,
        num_images=int(batch[0]), input_size=int(batch[1] * 4),
        versions=versions or {},
    )


def keras_outputs(model, arch: Architecture, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every compared tensor from the Keras model, and the logits of its serving path (`zoo.serving`).

    Run as a graph, two images at a time: an eager call of a functional model keeps every
    intermediate tensor alive until it returns (over 22 GB for convnextv2_huge at 512).
    """
    from zoo.model import probe_model

    from zoo.serving import runner

    outputs = probe_model(model, arch).predict(inputs, batch_size=2, verbose=0)
    outputs = {k: np.asarray(v) for k, v in outputs.items()}
    run = runner(model)  # what predict, eval and the exports run: checked against PyTorch too
    outputs[SERVING] = np.concatenate([np.asarray(run(inputs[i:i + 2])) for i in range(0, len(inputs), 2)])
    return outputs


def _our_versions() -> dict:
    """The frameworks on the Keras side of a comparison."""
    import keras
    import tensorflow as tf

    return {"keras": keras.__version__, "tensorflow": tf.__version__}


@contextlib.contextmanager
def started(network: Network, source: Path, *, random_seed: int | None = None) -> Iterator["PendingCheck"]:
    """A parity check whose PyTorch side starts now, in its own process.

    timm imports, loads `source` and runs the parity batch while the block prepares the
    Keras model and calls `check(model)` on the `PendingCheck` yielded. With `random_seed`,
    the child first writes `source` (perturbed random weights; `PendingCheck.source_written`
    waits for it), saving a second process and its imports. The child is killed if the block
    raises.
    """
    inputs = network.parity_batch()
    with work_dir("zoo-parity-") as tmp:  # named with our PID: cleared by the next run if we are killed
        spec = write_spec(network, source, tmp, inputs=inputs, random_seed=random_seed)
        with reference_process(["forward", str(spec)]) as run:
            yield PendingCheck(network.arch, inputs, run, spec, source)


@dataclass
class PendingCheck:
    """The Keras half of a parity check whose PyTorch half is running (see `started`)."""

    arch: Architecture
    inputs: np.ndarray
    run: ReferenceRun
    spec: Path
    source: Path

    def source_written(self) -> None:
        """Wait until the PyTorch side has written the random source weights (see `started`).

        Raises:
            ReferenceRunError: it failed first.
        """
        self.run.wait_for(self.source)

    def check(self, model, *, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
              stage_rtol: float = DEFAULT_STAGE_RTOL) -> ParityReport:
        """Run `model` on the parity batch, wait for timm's outputs, compare (does not raise on failure).

        Raises:
            ReferenceRunError: the PyTorch side failed.
        """
        ours = keras_outputs(model, self.arch, self.inputs)
        self.run.wait()
        return compare(ours, results(self.spec), atol=atol, rtol=rtol, stage_rtol=stage_rtol,
                       versions={**_our_versions(), **versions(self.spec)})
