"""The whole conversion, top to bottom: name -> source -> port -> parity -> saved folder."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from checkpoints import store
from zoo.architectures import Architecture
from zoo.catalogue import Checkpoint, resolve
from zoo.errors import IntegrityError, SourceError

from . import parity, source
from .mapping import port

log = logging.getLogger(__name__)
Echo = Callable[[str], None]


def convert(name: str, *, out: str | Path | None = None, checkpoint: str | Path | None = None,
            random_seed: int | None = None, revision: str | None = None,
            atol: float = parity.DEFAULT_ATOL, rtol: float = parity.DEFAULT_RTOL,
            echo: Echo = log.info) -> tuple[Path, parity.ParityReport]:
    """Convert one catalogued checkpoint and write it only if parity passes.

    Args:
        name: catalogue name, FB alias or bare architecture name.
        out: destination folder (default: the local store, `store_path(canonical name)`).
        checkpoint: a local source file instead of the Hub download.
        random_seed: use perturbed random weights in timm's layout (not pretrained) instead.
        revision: Hub revision of the source repo.
        atol, rtol: logits tolerances of the parity gate.
        echo: receives one line per step.

    Returns:
        The written folder and the parity report.

    Raises:
        ZooError: any failure; nothing is written then.
    """
    ckpt = resolve(name)
    arch = ckpt.arch
    out = Path(out) if out else store.store_path(ckpt.name)
    with tempfile.TemporaryDirectory(prefix="zoo-convert-") as work:
        with _step(echo, "source weights"):
            src = _source(ckpt, arch, checkpoint, random_seed, revision, Path(work))
        with _step(echo, f"build {arch.name} and port {src.path.name}"):
            model = build(arch, ckpt.num_classes)
            port(source.load_source(src.path, conv_mlp=arch.conv_mlp), model)
        with _step(echo, "parity against timm (separate process)"):
            report = parity.check(model, arch, ckpt.num_classes, src.path, ckpt.input_size[-1],
                                  ckpt.mean, ckpt.std, atol=atol, rtol=rtol)
        echo(report.table())
        report.assert_passed()
        with _step(echo, f"write {out}"):
            config = _config(ckpt, arch, src, random_seed)
            path = store.write(out, model, config, report.to_json())
    return path, report


def verify(path: str | Path, *, checkpoint: str | Path | None = None,
           echo: Echo = log.info) -> parity.ParityReport:
    """Re-run parity on a converted folder against its recorded source weights.

    The folder's files are checked against the manifest, the source is fetched again (or
    taken from `checkpoint`) and must have the sha256 recorded at conversion, and the
    folder's Keras weights are compared with timm with the tolerances stored in its report.
    Writes nothing.

    Raises:
        ZooError: integrity or source problems (a failed comparison is in the report).
    """
    from zoo.loading import from_folder

    with _step(echo, f"check {path} against its manifest"):
        folder = store.open_folder(path)
    config, recorded = folder.config, folder.config["source"]
    arch = Architecture.from_config(config["architecture"])
    with tempfile.TemporaryDirectory(prefix="zoo-verify-") as work:
        with _step(echo, "source weights"):
            if checkpoint is not None:
                src = source.local(checkpoint)
            elif recorded["kind"] == "random":
                src = random_source(arch, config["num_classes"], recorded["seed"], Path(work))
            elif recorded["kind"] == "hub":
                src = source.fetch(recorded["repo_id"], recorded["filename"], revision=recorded["revision"])
            else:
                src = source.local(recorded["path"])
        if src.sha256 != recorded["sha256"]:
            raise IntegrityError(f"the source weights changed since conversion (sha256 {src.sha256}, "
                                 f"recorded {recorded['sha256']})")
        with _step(echo, "load the converted weights"):
            model = from_folder(folder)
        stored = folder.parity
        with _step(echo, "parity against timm (separate process)"):
            cfg = config["pretrained_cfg"]
            report = parity.check(model, arch, config["num_classes"], src.path, cfg["input_size"][-1],
                                  cfg["mean"], cfg["std"], atol=stored["atol"], rtol=stored["rtol"],
                                  stage_rtol=stored["stage_rtol"])
    echo(report.table())
    return report


def build(arch: Architecture, num_classes: int):
    from zoo.model import build_model

    return build_model(arch, num_classes=num_classes)


def _source(ckpt: Checkpoint, arch: Architecture, checkpoint, random_seed, revision, work: Path):
    if checkpoint is not None and random_seed is not None:
        raise SourceError("give either a checkpoint file or random weights, not both")
    if checkpoint is not None:
        return source.local(checkpoint)
    if random_seed is not None:
        return random_source(arch, ckpt.num_classes, random_seed, work)
    return source.fetch(ckpt.hf_hub_id, ckpt.hf_hub_filename, revision=revision)


def random_source(arch: Architecture, num_classes: int, seed: int, work: Path) -> source.SourceFile:
    """Perturbed random weights in timm's layout, written by timm itself (separate process)."""
    path = work / f"random-seed{seed}.safetensors"
    parity.run_reference_process(["random", "--arch", json.dumps(arch.to_config()),
                                  "--num-classes", str(num_classes), "--seed", str(seed), "--out", str(path)])
    return source.local(path)


def _config(ckpt: Checkpoint, arch: Architecture, src: source.SourceFile, random_seed) -> dict:
    from zoo import __version__

    if random_seed is not None:
        origin = {"kind": "random", "seed": random_seed, "sha256": src.sha256,
                  "note": "perturbed random weights in timm's layout; NOT pretrained"}
    elif src.repo_id is None:
        origin = {"kind": "file", "path": str(src.path), **src.to_json()}
    else:
        origin = {"kind": "hub", **src.to_json(), "url": ckpt.url}
    return {
        "name": ckpt.name,
        "pretrained": random_seed is None,
        "architecture": arch.to_config(),
        "num_classes": ckpt.num_classes,
        "pretrained_cfg": ckpt.pretrained_cfg(),
        "top1": ckpt.top1,
        "source": origin,
        "converter": {"convnext_zoo": __version__},
    }


@contextmanager
def _step(echo: Echo, what: str):
    start = time.perf_counter()
    echo(f"-> {what} ...")
    yield
    echo(f"   done in {time.perf_counter() - start:.1f} s")
