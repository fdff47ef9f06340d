"""A converted folder's recorded source, fetched again and checked, and its framework's outputs on it.

`zoo verify`, the export and evaluation checks and the backbone checks run the source framework (in its
own process, as the parity gate does) on the weights a folder was converted from, checked against the
sha256 recorded at conversion.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from checkpoints.fs import sha256_file, work_dir
from zoo.core.errors import IntegrityError
from zoo.core.folder_config import FolderConfig

from . import source
from .reference_process import Network, reference_classify, reference_outputs, run_reference_process


@contextlib.contextmanager
def recorded_reference(
    config: FolderConfig, work: Path, checkpoint: str | Path | None = None
) -> Iterator[tuple[source.SourceWeights, int | None]]:
    """The source of a converted folder for a reference run during the block, and the seed its
    reference process writes it from (random weights: one process, not two), else None.

    Random weights are checked against the recorded sha256 when the block ends; every other
    source before it starts (`recorded_source`).

    Raises:
        as `recorded_source`.
    """
    recorded = config.source
    if checkpoint is not None or recorded.kind != "random":
        yield recorded_source(config, work, checkpoint), None
        return
    path = random_path(work, recorded.seed)
    yield source.SourceWeights(path, None, filename=path.name), recorded.seed
    check_recorded(sha256_file(path), recorded.sha256)


def check_recorded(sha256: str, recorded: str) -> None:
    """Raises IntegrityError unless the source's bytes are those a folder was converted from."""
    if sha256 != recorded:
        raise IntegrityError(f"the source weights changed since conversion (sha256 {sha256}, recorded {recorded})")


def check_recorded_files(files: dict[str, str] | None, recorded: dict[str, str] | None) -> None:
    """Raises IntegrityError naming each file of a sharded checkpoint (its index, its shards) whose
    bytes differ from those a folder was converted from, or that it has or lacks since (a source that
    is one file now or was then is left to `check_recorded`)."""
    if not recorded or not files:
        return
    changed = [
        f"{name} (sha256 {files.get(name, 'none: not listed now')}, recorded {recorded.get(name, 'none')})"
        for name in sorted(files.keys() | recorded.keys())
        if files.get(name) != recorded.get(name)
    ]
    if changed:
        raise IntegrityError(f"the source weights changed since conversion: {'; '.join(changed)}")


def recorded_source(config: FolderConfig, work: Path, checkpoint: str | Path | None = None) -> source.SourceWeights:
    """The source weights a converted folder was made from, checked against its recorded sha256.

    Fetched again from where the folder's config says (Hub commit, release URL, file, or the
    seed of random weights, regenerated under `work`), or taken from `checkpoint`.

    Raises:
        SourceError: the source cannot be fetched.
        IntegrityError: it is not the file the folder was converted from.
    """
    recorded = config.source
    if checkpoint is not None:
        src = source.local(checkpoint)
    elif recorded.kind == "random":
        src = random_source(Network.of_folder(config), recorded.seed, work)
    elif recorded.kind == "hub":
        src = source.fetch_repo(recorded.repo_id, recorded.revision, recorded.filename)
    elif recorded.kind == "url":
        src = source.fetch_url(recorded.url, expected_sha256=recorded.sha256)
    else:
        src = source.local(recorded.path)
    check_recorded_files(src.files, recorded.files)  # naming the shard that changed
    check_recorded(src.sha256, recorded.sha256)
    return replace(src, layout=recorded.layout, state_key=recorded.state_key, prefix=recorded.prefix or "")


def random_source(network: Network, seed: int, work: Path) -> source.SourceWeights:
    """Perturbed random weights in timm's layout, written by timm itself (separate process).

    A conversion has the parity check's reference process write them instead (one process).
    """
    path = random_path(work, seed)
    run_reference_process(
        [
            "random",
            "--arch",
            json.dumps(network.arch.to_config()),
            "--num-classes",
            str(network.num_classes),
            "--seed",
            str(seed),
            "--out",
            str(path),
        ]
        + ([] if network.head_norm_affine else ["--no-head-norm"])
    )
    return source.local(path)


def random_path(work: Path, seed: int) -> Path:
    """Where the random weights of `seed` are written under `work`."""
    return work / f"random-seed{seed}.safetensors"


def pytorch_logits(config: FolderConfig, inputs: np.ndarray, *, checkpoint: str | Path | None = None) -> np.ndarray:
    """The source framework's logits on `inputs` (normalised NHWC) for a converted folder's source weights.

    Args:
        config: the folder's config.
        inputs: the batch to classify.
        checkpoint: compare against this local source file instead of fetching the recorded one
            (it must still have the recorded sha256).

    Raises:
        SourceError: the source cannot be fetched (offline, no access).
        IntegrityError: the source is not the file the folder was converted from.
        ReferenceRunError: torch/timm missing or the reference process failed.
    """
    with work_dir("zoo-source-") as work, recorded_reference(config, work, checkpoint) as (src, seed):
        return reference_outputs(Network.of_folder(config), src.path, inputs, random_seed=seed)["logits"]


def pytorch_classify(config: FolderConfig, files: list[Path], *, checkpoint: str | Path | None = None) -> np.ndarray:
    """The source framework's logits for image files, each prepared by timm's own eval transform.

    Raises:
        as `pytorch_logits`.
    """
    with work_dir("zoo-source-") as work, recorded_reference(config, work, checkpoint) as (src, seed):
        return reference_classify(Network.of_folder(config), src.path, files, config.pretrained_cfg, random_seed=seed)
