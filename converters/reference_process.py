"""The PyTorch reference, seen from the converter: `python -m converters.reference` run in a clean
child process on a spec file, and its outputs (or the failure it reports, in one line) read back.

The child imports torch and timm only: TensorFlow imported before them in one process
crashes timm's forward pass. `Network` is what both sides of a comparison build and feed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from checkpoints.fs import reason, work_dir
from zoo.core.architectures import Architecture
from zoo.core.catalogue import CatalogueEntry
from zoo.core.errors import PreprocessingError, ReferenceRunError, StoreError, ZooError
from zoo.core.folder_config import FolderConfig

from .images import parity_batch

log = logging.getLogger(__name__)

# A failing child reports its failure on its stdout, kept for it alone: one JSON object,
# {"kind": ..., "message": ...} (`failure_record`). A child that ends without one crashed.
MISSING = "missing"  # the kind of failure: torch or timm is not installed
NO_SPACE = "no_space"  # the kind of failure: the disk is full
REQUIRED = ("torch", "timm")  # what the reference cannot run without
# a full disk where the error carries no errno (numpy's writer, safetensors' Rust writer)
_FULL_DISK = re.compile(r"No space left on device|os error 28")
LONGEST_CAUSE = 600  # characters of the child's error quoted in the one line reported


@dataclass(frozen=True)
class Network:
    """What both sides of a comparison build and feed: an architecture, its head and its input.

    Built from a catalogue entry (conversion), from what a checkpoint's tensors and config files say
    (your own checkpoints), or from a converted folder's config (verify, exports, evaluation), so that
    every check describes its network the same way; the one record both processes of a check share
    (it travels to the child as the spec's `arch`, `num_classes`, ... fields).
    """

    arch: Architecture
    num_classes: int
    head_norm_affine: bool
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    use_ema: bool = True  # which weights of a training checkpoint the source framework loads
    features: tuple[int, ...] = ()  # a dense-prediction backbone's out_indices (`converters.inference.Inferred`)

    def __post_init__(self):
        channels = self.arch.in_chans
        if len(self.mean) != channels or len(self.std) != channels:
            raise PreprocessingError(
                f"{self.arch.name} takes {channels} input channels: its normalisation needs {channels} "
                f"means and stds, got {len(self.mean)} and {len(self.std)}"
            )

    @classmethod
    def of_entry(cls, entry: CatalogueEntry) -> Network:
        return cls(entry.arch, entry.num_classes, entry.head_norm_affine, entry.input_size[-1], entry.mean, entry.std)

    @classmethod
    def of_folder(cls, config: FolderConfig) -> Network:
        return cls(
            config.architecture,
            config.num_classes,
            config.head_norm_affine,
            config.input_size,
            config.mean,
            config.std,
            config.source.use_ema,
            config.features,
        )

    def parity_batch(self) -> np.ndarray:
        """The fixed parity inputs for this network, normalised as its checkpoint expects: one
        channel per input channel of its stem (grey natural images for one, bands for more)."""
        return parity_batch(self.input_size, self.mean, self.std)


def write_spec(
    network: Network,
    source: Path,
    workdir: Path,
    *,
    inputs: np.ndarray | None = None,
    out_indices: tuple[int, ...] | None = None,
    files: list[Path] | None = None,
    pretrained_cfg: dict | None = None,
    random_seed: int | None = None,
    export: dict | None = None,
) -> Path:
    """The spec file of one reference run: `network` loaded from `source`, run on `inputs`
    (every compared tensor, or timm's `features_only` maps for `out_indices`) or on image
    `files` prepared by timm's transform for `pretrained_cfg`. With `random_seed`, the
    reference first writes `source` itself: perturbed random weights in timm's layout. With
    `export` (`{"framework", "folder", "builder"}`), the network is a model exported back to
    PyTorch, loaded from that folder by its framework's own loader (`source`: its weights file)."""
    spec = {
        "arch": network.arch.to_config(),
        "num_classes": network.num_classes,
        "source": str(source),
        "head_norm_affine": network.head_norm_affine,
        "use_ema": network.use_ema,
        "features": list(network.features),
        "outputs": str(workdir / "reference.npz"),
        "versions": str(workdir / "reference-versions.json"),
    }
    files_written = {}
    if inputs is not None:
        buffer = io.BytesIO()
        np.save(buffer, inputs)
        files_written["inputs.npy"] = buffer.getvalue()
        spec["inputs"] = str(workdir / "inputs.npy")
    if out_indices is not None:
        spec["out_indices"] = list(out_indices)
    if files is not None:
        spec.update(files=[str(f) for f in files], pretrained_cfg=pretrained_cfg)
    if random_seed is not None:
        spec["random_seed"] = random_seed
    if export is not None:
        spec["export"] = export
    files_written["spec.json"] = json.dumps(spec).encode()
    try:
        for name, data in files_written.items():
            (workdir / name).write_bytes(data)  # (numpy's own writer reports a full disk without errno)
    except OSError as e:
        why = reason(e, workdir, remedy="free some space there or set TMPDIR to another folder")
        raise StoreError(f"cannot write the PyTorch reference's files in {workdir} ($TMPDIR): {why}") from None
    return workdir / "spec.json"


SOURCE_SHA256 = "source_sha256"  # in what the reference reports: the sha256 of the bytes it ran


def outputs_file(spec: Path) -> Path:
    """The `.npz` file the reference writes its outputs to for `spec`."""
    return Path(json.loads(spec.read_text())["outputs"])


def results(spec: Path) -> dict[str, np.ndarray]:
    """The outputs the reference wrote for `spec`."""
    with np.load(outputs_file(spec)) as data:
        return {k: data[k] for k in data.files}


def versions(spec: Path) -> dict:
    """The frameworks the reference reported running on for `spec` (torch, timm)."""
    reported = Path(json.loads(spec.read_text())["versions"])
    return json.loads(reported.read_text()) if reported.exists() else {}


def reference_outputs(
    network: Network,
    source: Path,
    inputs: np.ndarray,
    out_indices: tuple[int, ...] | None = None,
    random_seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Run timm on `inputs` in a separate process and return its outputs (NHWC).

    With `out_indices`, the outputs are timm's `features_only=True` maps, `features.{i}`. With
    `random_seed`, the process first writes `source` (perturbed random weights in timm's layout).

    Raises:
        ReferenceRunError: torch/timm missing or the process failed.
    """
    with work_dir("zoo-reference-") as work:
        return _run_forward(
            write_spec(network, source, work, inputs=inputs, out_indices=out_indices, random_seed=random_seed)
        )


def reference_classify(
    network: Network, source: Path, files: list[Path], pretrained_cfg: dict, random_seed: int | None = None
) -> np.ndarray:
    """timm's logits for image files, each prepared by timm's own eval transform (separate process).

    Raises:
        ReferenceRunError: torch/timm missing or the process failed.
    """
    with work_dir("zoo-reference-") as work:
        return _run_forward(
            write_spec(network, source, work, files=files, pretrained_cfg=pretrained_cfg, random_seed=random_seed)
        )["logits"]


def exported_outputs(
    network: Network, weights: Path, inputs: np.ndarray, export: dict, work: Path
) -> tuple[dict[str, np.ndarray], dict]:
    """A model exported back to PyTorch run on `inputs` in a separate process, loaded from its folder by
    its framework's own loader (`export`: `{"framework", "folder", "builder"}`; `weights`: its weights
    file): every compared tensor (NHWC), and what it ran on (versions, the weights' sha256).

    Raises:
        ReferenceRunError: the framework refused the files, is not installed, or the process failed.
    """
    spec = write_spec(network, weights, work, inputs=inputs, export=export)
    run_reference_process(["forward", str(spec)])
    return results(spec), versions(spec)


def _run_forward(spec: Path) -> dict[str, np.ndarray]:
    run_reference_process(["forward", str(spec)])
    return results(spec)


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
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "converters.reference", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._drain = ThreadPoolExecutor(1)  # a full pipe would stall the child
        self._output = self._drain.submit(self._proc.communicate)

    def wait(self) -> None:
        """Wait for the child to end.

        Raises:
            ReferenceRunError: torch/timm missing or the process failed.
            StoreError: $TMPDIR filled up under the child.
        """
        stdout, stderr = self._output.result()
        self._drain.shutdown()
        if self._proc.returncode != 0:
            _raise_reference_failure(self._proc.returncode, _reported_failure(stdout), stderr)

    def kill(self) -> None:
        self._proc.kill()
        self._output.result()
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


def failure_record(error: BaseException) -> dict[str, str]:
    """What a failing child reports of `error`: its kind and its message on one line.

    The kind is `MISSING` (torch or timm is not installed), `NO_SPACE` (the disk is full), else
    the error's class name; either is read from the error and the errors it was raised from or
    while handling. The message is a project error's own (a message for users); any other's, named.
    """
    text = " ".join(str(error).split())
    if not isinstance(error, ZooError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    if any(isinstance(e, ModuleNotFoundError) and e.name in REQUIRED for e in chain):
        kind = MISSING
    elif any(getattr(e, "errno", None) == errno.ENOSPC or _FULL_DISK.search(str(e)) for e in chain):
        kind = NO_SPACE
    else:
        kind = type(error).__name__
    return {"kind": kind, "message": text}


def _reported_failure(stdout: str) -> dict[str, str] | None:
    """The failure a child reported on its stdout (`failure_record`); None where it reported none."""
    lines = stdout.strip().splitlines()
    try:
        failure = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return failure if isinstance(failure, dict) and {"kind", "message"} <= failure.keys() else None


def _raise_reference_failure(returncode: int, failure: dict[str, str] | None, stderr: str) -> None:
    log.debug("the PyTorch reference process's stderr:\n%s", stderr)
    kind = failure["kind"] if failure else None
    if kind == MISSING:
        raise ReferenceRunError("the PyTorch reference needs torch and timm: pip install 'convnext-zoo[convert]'")
    if kind == NO_SPACE:
        # the child writes random weights and its outputs under $TMPDIR: one line, not its traceback
        where = Path(tempfile.gettempdir()).absolute()
        raise StoreError(
            f"no space left on the disk holding {where} ($TMPDIR) for the PyTorch reference's "
            f"files; free some space there or set TMPDIR to another folder"
        )
    cause = failure["message"] if failure else _last_words(stderr)
    if len(cause) > LONGEST_CAUSE:
        cause = cause[:LONGEST_CAUSE] + " ..."
    raise ReferenceRunError(f"the PyTorch reference process {_ended(returncode)}" + (f": {cause}" if cause else ""))


def _ended(returncode: int) -> str:
    if returncode >= 0:
        return f"failed (exit {returncode})"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"  # SIGKILL: out of memory, often
    except ValueError:
        return f"was killed by signal {-returncode}"


def _last_words(stderr: str) -> str:
    """What a child that reported no failure (killed, crashed) last wrote, never its stack frames:
    the last exception line of a traceback, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line)]
    return (raised or lines or [""])[-1]
