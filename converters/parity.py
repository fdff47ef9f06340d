"""Step 3 of a conversion: prove the Keras model computes what timm computes.

The PyTorch reference runs in its own process on the same weights and the same fixed batch;
the logits and the outputs of the stem, every stage and the pre-logits are compared. Parity
is an assertion: `assert_passed` raises, naming the first stage that diverged.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from checkpoints.store import work_dir
from zoo.architectures import Architecture
from zoo.errors import ParityError, ReferenceRunError, StoreError

from .images import parity_batch

log = logging.getLogger(__name__)

COMPARED = ("stem", "stages.0", "stages.1", "stages.2", "stages.3", "pre_logits", "logits")
DEFAULT_ATOL = 1e-4  # logits max abs error
DEFAULT_RTOL = 1e-5  # logits max abs error / max |reference logit|
# Intermediate outputs pass through up to 36 blocks of float32 arithmetic whose rounding
# differs between oneDNN and ATen; a mapping bug moves them by O(1) relative, rounding by
# O(1e-6). The bound sits between, with a wide margin to both.
DEFAULT_STAGE_RTOL = 1e-4


@dataclass
class Comparison:
    """Agreement of one compared tensor."""

    name: str
    shape: list[int]
    max_abs: float
    max_ref: float
    rel: float
    finite: bool

    @classmethod
    def of(cls, name: str, ours: np.ndarray, ref: np.ndarray) -> "Comparison":
        ours64, ref64 = ours.astype(np.float64), ref.astype(np.float64)
        finite = bool(np.isfinite(ours64).all() and np.isfinite(ref64).all())
        if ours.shape != ref.shape:
            return cls(name, list(ref.shape), float("inf"), float("nan"), float("inf"), finite)
        max_abs = float(np.max(np.abs(ours64 - ref64))) if finite else float("inf")
        max_ref = float(np.max(np.abs(ref64))) if finite else float("nan")
        rel = max_abs / max_ref if finite and max_ref > 0 else (0.0 if max_abs == 0 else float("inf"))
        return cls(name, list(ref.shape), max_abs, max_ref, rel, finite)


@dataclass
class ParityReport:
    """The machine-readable result of a parity check (written as `parity.json`)."""

    comparisons: list[Comparison]
    top1_agreement: float
    top5_agreement: float
    atol: float
    rtol: float
    stage_rtol: float
    num_images: int
    input_size: int
    passed: bool = False
    failure: str | None = None
    versions: dict = field(default_factory=dict)

    def __post_init__(self):
        self.failure = self._first_failure()
        self.passed = self.failure is None

    def by_name(self, name: str) -> Comparison:
        return next(c for c in self.comparisons if c.name == name)

    def _first_failure(self) -> str | None:
        for c in self.comparisons:
            if not c.finite:
                return f"{c.name}: non-finite values"
            if c.name == "logits":
                if c.max_abs > self.atol or c.rel > self.rtol:
                    return (f"logits: max abs error {c.max_abs:.3g} (atol {self.atol:g}), "
                            f"relative {c.rel:.3g} (rtol {self.rtol:g})")
            elif c.rel > self.stage_rtol:
                return f"{c.name}: relative error {c.rel:.3g} > {self.stage_rtol:g} (max abs {c.max_abs:.3g})"
        return None

    @property
    def logits(self) -> Comparison:
        return self.by_name("logits")

    def summary(self) -> str:
        c = self.logits
        return (f"logits max abs {c.max_abs:.2e}, relative {c.rel:.2e}; "
                f"top-1 agreement {self.top1_agreement:.0%}, top-5 {self.top5_agreement:.0%}")

    def table(self) -> str:
        rows = [f"{'output':<11} {'shape':<20} {'max abs':>10} {'relative':>10}"]
        rows += [f"{c.name:<11} {str(tuple(c.shape)):<20} {c.max_abs:>10.2e} {c.rel:>10.2e}"
                 for c in self.comparisons]
        return "\n".join(rows)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ParityReport":
        data = dict(data)
        data.pop("weights_sha256", None)  # added by the store: binds the report to the weights file
        data["comparisons"] = [Comparison(**c) for c in data["comparisons"]]
        stored_pass, stored_failure = data.pop("passed", None), data.pop("failure", None)
        report = cls(**data)
        if stored_pass is not None and stored_pass != report.passed:
            raise ValueError(f"parity report says passed={stored_pass} but its figures say "
                             f"{report.passed} ({stored_failure or report.failure})")
        return report

    def assert_passed(self) -> None:
        """Raise `ParityError` naming the first output that diverged."""
        if not self.passed:
            raise ParityError(f"parity check failed at {self.failure}\n{self.table()}", report=self)


def topk_hits(ours: np.ndarray, ref: np.ndarray, k: int) -> int:
    """On how many rows the two sets of top-k classes are the same."""
    k = min(k, ref.shape[-1])
    top_ours = np.argsort(-ours, axis=-1, kind="stable")[:, :k]
    top_ref = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
    return int(sum(set(a) == set(b) for a, b in zip(top_ours, top_ref)))


def _topk_agreement(ours: np.ndarray, ref: np.ndarray, k: int) -> float:
    return topk_hits(ours, ref, k) / len(ref)


def compare(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], *, atol: float = DEFAULT_ATOL,
            rtol: float = DEFAULT_RTOL, stage_rtol: float = DEFAULT_STAGE_RTOL,
            versions: dict | None = None) -> ParityReport:
    """Compare every output; the report's `passed` is the gate."""
    missing = [n for n in COMPARED if n not in ours or n not in ref]
    if missing:
        raise ParityError(f"outputs missing from the comparison: {missing}")
    comparisons = [Comparison.of(n, ours[n], ref[n]) for n in COMPARED]
    batch = ref["stem"].shape
    return ParityReport(
        comparisons=comparisons,
        top1_agreement=_topk_agreement(ours["logits"], ref["logits"], 1),
        top5_agreement=_topk_agreement(ours["logits"], ref["logits"], 5),
        atol=atol, rtol=rtol, stage_rtol=stage_rtol,
        num_images=int(batch[0]), input_size=int(batch[1] * 4),
        versions=versions or {},
    )


def reference_outputs(arch: Architecture, num_classes: int, source: Path, inputs: np.ndarray,
                      workdir: Path, head_norm_affine: bool = True,
                      out_indices: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """Run timm on `inputs` in a separate process and return its outputs (NHWC).

    With `out_indices`, the outputs are timm's `features_only=True` maps, `features.{i}`.

    Raises:
        ReferenceRunError: torch/timm missing or the process failed.
    """
    return _run_forward(_forward_spec(arch, num_classes, source, inputs, workdir, head_norm_affine, out_indices))


def reference_classify(arch: Architecture, num_classes: int, source: Path, files: list[Path],
                       pretrained_cfg: dict, workdir: Path, head_norm_affine: bool = True) -> np.ndarray:
    """timm's logits for image files, each prepared by timm's own eval transform (separate process).

    Raises:
        ReferenceRunError: torch/timm missing or the process failed.
    """
    extra = {"files": [str(f) for f in files], "pretrained_cfg": pretrained_cfg}
    return _run_forward(_reference_spec(arch, num_classes, source, head_norm_affine, workdir, extra))["logits"]


def _forward_spec(arch: Architecture, num_classes: int, source: Path, inputs: np.ndarray, workdir: Path,
                  head_norm_affine: bool, out_indices: tuple[int, ...] | None = None) -> Path:
    np.save(workdir / "inputs.npy", inputs)
    extra = {"inputs": str(workdir / "inputs.npy")}
    if out_indices is not None:
        extra["out_indices"] = list(out_indices)
    return _reference_spec(arch, num_classes, source, head_norm_affine, workdir, extra)


def _reference_spec(arch: Architecture, num_classes: int, source: Path, head_norm_affine: bool,
                    workdir: Path, extra: dict) -> Path:
    spec = {"arch": arch.to_config(), "num_classes": num_classes, "source": str(source),
            "head_norm_affine": head_norm_affine, "outputs": str(workdir / "reference.npz"),
            "versions": str(workdir / "reference-versions.json"), **extra}
    (workdir / "spec.json").write_text(json.dumps(spec))
    return workdir / "spec.json"


def _run_forward(spec: Path) -> dict[str, np.ndarray]:
    run_reference_process(["forward", str(spec)])
    return _reference_results(spec)


def _reference_results(spec: Path) -> dict[str, np.ndarray]:
    with np.load(json.loads(spec.read_text())["outputs"]) as data:
        return {k: data[k] for k in data.files}


def run_reference_process(args: list[str]) -> None:
    """`python -m converters.reference ARGS` in a clean child process, to its end."""
    with reference_process(args):
        pass


class ReferenceRun:
    """A running `python -m converters.reference ARGS` child (see `reference_process`)."""

    def __init__(self, args: list[str]):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["ZOO_PARENT_PID"] = str(os.getpid())  # the child ends itself if this process dies
        self._proc = subprocess.Popen([sys.executable, "-m", "converters.reference", *args],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self._drain = ThreadPoolExecutor(1)  # a full pipe would stall the child
        self._stderr = self._drain.submit(self._proc.communicate)

    def wait(self) -> None:
        """Wait for the child to end.

        Raises:
            ReferenceRunError: torch/timm missing or the process failed.
            StoreError: $TMPDIR filled up under the child.
        """
        stderr = self._stderr.result()[1]
        self._drain.shutdown()
        if self._proc.returncode != 0:
            _raise_reference_failure(self._proc.returncode, stderr)

    def kill(self) -> None:
        self._proc.kill()
        self._stderr.result()
        self._drain.shutdown()


@contextlib.contextmanager
def reference_process(args: list[str]):
    """`python -m converters.reference ARGS` running in a clean child process during the block.

    Yields the `ReferenceRun`; the child is waited for when the block ends (`wait` raises if
    it failed), and killed if the block raises.
    """
    run = ReferenceRun(args)
    try:
        yield run
    except BaseException:
        run.kill()
        raise
    run.wait()


def _raise_reference_failure(returncode: int, stderr: str) -> None:
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    if "No module named 'torch'" in stderr or "No module named 'timm'" in stderr:
        raise ReferenceRunError(
            "the PyTorch reference needs torch and timm: pip install 'convnext-zoo[convert]'")
    if "No space left on device" in stderr or "os error 28" in stderr:
        # the child writes random weights and its outputs under $TMPDIR: one line, not its traceback
        where = Path(tempfile.gettempdir()).absolute()
        raise StoreError(f"no space left on the disk holding {where} ($TMPDIR) for the PyTorch reference's "
                         f"files; free some space there or set TMPDIR to another folder")
    raise ReferenceRunError(f"the PyTorch reference process failed (exit {returncode}):\n{tail}")


def keras_outputs(model, arch: Architecture, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every compared tensor from the Keras model.

    Run as a graph, two images at a time: an eager call of a functional model keeps every
    intermediate tensor alive until it returns (over 22 GB for convnextv2_huge at 512).
    """
    from zoo.model import probe_model

    outputs = probe_model(model, arch).predict(inputs, batch_size=2, verbose=0)
    return {k: np.asarray(v) for k, v in outputs.items()}


def _versions(spec: Path) -> dict:
    """The frameworks on each side of a comparison: ours, and those the reference reported."""
    import keras
    import tensorflow as tf

    reference = Path(json.loads(spec.read_text())["versions"])
    theirs = json.loads(reference.read_text()) if reference.exists() else {}
    return {"keras": keras.__version__, "tensorflow": tf.__version__, **theirs}


@contextlib.contextmanager
def started(arch: Architecture, source: Path, *, num_classes: int, input_size: int, mean, std,
            head_norm_affine: bool = True) -> Iterator["PendingCheck"]:
    """A parity check whose PyTorch side starts now, in its own process.

    timm imports, loads `source` and runs the parity batch while the block prepares the
    Keras model and calls `check(model)` on the `PendingCheck` yielded. The child is killed
    if the block raises.
    """
    inputs = parity_batch(input_size, mean, std)
    with work_dir("zoo-parity-") as tmp:  # named with our PID: cleared by the next run if we are killed
        spec = _forward_spec(arch, num_classes, source, inputs, tmp, head_norm_affine)
        with reference_process(["forward", str(spec)]) as run:
            yield PendingCheck(arch, inputs, run, spec)


@dataclass
class PendingCheck:
    """The Keras half of a parity check whose PyTorch half is running (see `started`)."""

    arch: Architecture
    inputs: np.ndarray
    run: ReferenceRun
    spec: Path

    def check(self, model, *, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
              stage_rtol: float = DEFAULT_STAGE_RTOL) -> ParityReport:
        """Run `model` on the parity batch, wait for timm's outputs, compare (does not raise on failure).

        Raises:
            ReferenceRunError: the PyTorch side failed.
        """
        ours = keras_outputs(model, self.arch, self.inputs)
        self.run.wait()
        return compare(ours, _reference_results(self.spec), atol=atol, rtol=rtol, stage_rtol=stage_rtol,
                       versions=_versions(self.spec))
