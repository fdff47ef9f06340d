"""Step 4 of a conversion: prove the Keras model computes what timm computes.

The PyTorch reference runs in its own process on the same weights and the same fixed batch
(`converters.reference_process`); the logits and the outputs of the stem, every stage and the
pre-logits are compared into a `ParityReport` (`zoo.core.reports`). Parity is an assertion:
`assert_passed` raises, naming the first stage that diverged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from checkpoints.fs import work_dir
from zoo.core.architectures import Architecture
from zoo.core.errors import IntegrityError, ParityError
from zoo.core.reports import (
    COMPARED,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    DEFAULT_STAGE_RTOL,
    SERVING,
    Comparison,
    ParityReport,
    compared,
    topk_agreement,
)

from .images import in_batches
from .reference_process import (
    SOURCE_SHA256,
    Network,
    ReferenceRun,
    outputs_file,
    reference_process,
    versions,
    write_spec,
)


def compare(
    ours: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    stage_rtol: float = DEFAULT_STAGE_RTOL,
    versions: dict | None = None,
) -> ParityReport:
    """Compare every output; the report's `passed` is the gate."""
    _check_present(ours, ref)
    comparisons = [Comparison.of(n, ours[n], ref[n]) for n in COMPARED]
    if SERVING in ours:  # the serving path's logits, held to the logits' tolerances
        comparisons.append(Comparison.of(SERVING, ours[SERVING], ref["logits"]))
    return _report(
        comparisons, ours["logits"], ref["logits"], atol=atol, rtol=rtol, stage_rtol=stage_rtol, versions=versions
    )


def compare_model(
    model,
    arch: Architecture,
    inputs: np.ndarray,
    ref: Mapping[str, np.ndarray],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    stage_rtol: float = DEFAULT_STAGE_RTOL,
    versions: dict | None = None,
    features: tuple[int, ...] = (),
) -> ParityReport:
    """`compare` of the Keras model's outputs on `inputs` (every compared tensor, and the logits of
    its serving path, `zoo.core.serving`) with the reference's `ref`, each output let go of once compared.
    A backbone (`features`: its out_indices) is compared at its stem, stages and every feature map.

    Run as a graph, two images at a time: an eager call of a functional model keeps every
    intermediate tensor alive until it returns (over 22 GB for convnextv2_huge at 512). The
    serving path runs once the probe's outputs are compared and gone, and reads the kernels no
    fold changes from the model itself (`shared`: the same values, not a second copy of them).
    `ref` may read each output when asked for it (`np.load` of an `.npz`).
    """
    ours = _probe_outputs(model, arch, inputs, features)
    _check_present(ours, ref, compared(features))
    comparisons = [Comparison.of(n, ours[n], ref[n]) for n in compared(features)]
    if features:  # no logits and no serving path: every feature map is held to the stages' bound
        return _report(comparisons, None, None, atol=atol, rtol=rtol, stage_rtol=stage_rtol, versions=versions)
    logits = ours["logits"]
    del ours
    serving = _serving_logits(model, inputs)  # checked against PyTorch too
    ref_logits = ref["logits"]
    comparisons.append(Comparison.of(SERVING, serving, ref_logits))
    return _report(comparisons, logits, ref_logits, atol=atol, rtol=rtol, stage_rtol=stage_rtol, versions=versions)


def _serving_logits(model, inputs: np.ndarray) -> np.ndarray:
    """The serving path's logits, two images at a time; what predict, eval and the exports run."""
    from zoo.core.serving import runner

    run = runner(model, shared=True)
    return np.concatenate([np.asarray(run(inputs[i : i + 2])) for i in range(0, len(inputs), 2)])


def _check_present(ours: Mapping, ref: Mapping, names: tuple[str, ...] = COMPARED) -> None:
    missing = [n for n in names if n not in ours or n not in ref]
    if missing:
        raise ParityError(f"outputs missing from the comparison: {missing}")


def _report(
    comparisons: list[Comparison],
    logits: np.ndarray | None,
    ref_logits: np.ndarray | None,
    *,
    atol: float,
    rtol: float,
    stage_rtol: float,
    versions: dict | None,
) -> ParityReport:
    batch = next(c.shape for c in comparisons if c.name == "stem")  # the reference's
    return ParityReport(
        comparisons=comparisons,
        top1_agreement=None if logits is None else topk_agreement(logits, ref_logits, 1),
        top5_agreement=None if logits is None else topk_agreement(logits, ref_logits, 5),
        atol=atol,
        rtol=rtol,
        stage_rtol=stage_rtol,
        num_images=int(batch[0]),
        input_size=int(batch[1] * 4),
        versions=versions or {},
    )


def _probe_outputs(
    model, arch: Architecture, inputs: np.ndarray, features: tuple[int, ...] = ()
) -> dict[str, np.ndarray]:
    """Every compared tensor of the Keras model, two images at a time (`predict` would hold every
    batch's outputs and their concatenation at once)."""
    from zoo.core.model import probe_model

    return in_batches(probe_model(model, arch, features).predict_on_batch, inputs)


def check_same_source(report: ParityReport, sha256: str | None) -> None:
    """Refuse a check whose PyTorch side ran other bytes than the converter converted (`sha256`):
    the source file changed between the two reads.

    Raises:
        IntegrityError: naming both digests.
    """
    ran = report.versions.get(SOURCE_SHA256)
    if ran is not None and sha256 is not None and ran != sha256:
        raise IntegrityError(
            f"the source changed during the conversion: the PyTorch reference ran sha256 "
            f"{ran[:16]}..., the converter read {sha256[:16]}...; convert again"
        )


def _our_versions() -> dict:
    """The frameworks on the Keras side of a comparison."""
    import keras
    import tensorflow as tf

    return {"keras": keras.__version__, "tensorflow": tf.__version__}


@contextlib.contextmanager
def started(network: Network, source: Path, *, random_seed: int | None = None) -> Iterator[PendingCheck]:
    """A parity check whose PyTorch side starts now, in its own process.

    timm imports, loads `source` and runs the parity batch while the block prepares the
    Keras model and calls `check(model)` on the `PendingCheck` yielded (`wait_for_reference`
    first, to hold the weights in one process at a time). With `random_seed`, the child first
    writes `source` (perturbed random weights), saving a second process and its imports. The
    child is killed if the block raises.
    """
    inputs = network.parity_batch()
    with work_dir("zoo-parity-") as tmp:  # named with our PID: cleared by the next run if we are killed
        spec = write_spec(network, source, tmp, inputs=inputs, random_seed=random_seed)
        with reference_process(["forward", str(spec)]) as run:
            yield PendingCheck(network.arch, inputs, run, spec, network.features)


@dataclass
class PendingCheck:
    """The Keras half of a parity check whose PyTorch half is running (see `started`)."""

    arch: Architecture
    inputs: np.ndarray
    run: ReferenceRun
    spec: Path
    features: tuple[int, ...] = ()

    def wait_for_reference(self) -> None:
        """Wait until the PyTorch side has ended: its outputs are written and its memory (its own
        copy of the weights) is free again.

        Raises:
            ReferenceRunError: it failed.
            StoreError: $TMPDIR filled up under it.
        """
        self.run.wait()

    def check(
        self, model, *, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, stage_rtol: float = DEFAULT_STAGE_RTOL
    ) -> ParityReport:
        """Wait for timm's outputs, run `model` on the parity batch, compare (does not raise on failure).

        The PyTorch side ends first, so that the two never hold the weights and the parity
        batch's activations at once.

        Raises:
            ReferenceRunError: the PyTorch side failed.
        """
        self.run.wait()
        with np.load(outputs_file(self.spec)) as ref:  # each output read when it is compared
            return compare_model(
                model,
                self.arch,
                self.inputs,
                ref,
                atol=atol,
                rtol=rtol,
                stage_rtol=stage_rtol,
                versions={**_our_versions(), **versions(self.spec)},
                features=self.features,
            )
