"""The whole conversion, top to bottom: name -> source -> read and map -> write -> parity -> saved folder."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from checkpoints import converted, store
from checkpoints.fs import check_writable, sha256_file, work_dir, write_json_atomic
from checkpoints.weights import load_keras_folder
from zoo.architectures import ARCHITECTURES, get_architecture
from zoo.catalogue import CatalogueEntry, catalogue, resolve
from zoo.errors import IntegrityError, MappingError, SourceError, ZooError
from zoo.folder_config import KERAS_CONFIG, PARITY, WEIGHTS, FolderConfig, SourceRecord, check_name
from zoo.reports import DEFAULT_ATOL, DEFAULT_RTOL, ParityReport
from zoo.steps import Echo, step
from zoo.version import __version__

from . import inference, mapping, parity, reading, source
from .inference import Inferred
from .layouts import LAYOUTS, fit_mlp
from .metadata import SourceMetadata, check_label_names, check_preprocessing, default_preprocessing, read_metadata
from .reading import PLAIN_KEYS
from .reference_process import Network, run_reference_process

log = logging.getLogger(__name__)


def convert(name: str, *, out: str | Path | None = None, checkpoint: str | Path | None = None,
            random_seed: int | None = None, revision: str | None = None, from_url: bool = False,
            atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
            echo: Echo = log.info) -> tuple[Path, ParityReport]:
    """Convert one catalogued checkpoint and write it only if parity passes.

    Args:
        name: catalogue name, FB alias or bare architecture name.
        out: destination folder (default: the local store, `store_path(canonical name)`).
        checkpoint: a local source file instead of the Hub download.
        random_seed: use perturbed random weights in timm's layout (not pretrained) instead.
        revision: Hub revision of the source repo.
        from_url: download the original release (FB's `.pth`/`.pt`) instead of timm's Hub copy;
            the only source of checkpoints timm does not carry.
        atol, rtol: logits tolerances of the parity gate.
        echo: receives one line per step.

    Returns:
        The written folder and the parity report.

    Raises:
        ZooError: any failure; nothing is written then.
    """
    entry = resolve(name)
    network = Network.of_entry(entry)
    out = store.check_destination(out if out else store.store_path(entry.name))  # before the slow work
    with work_dir("zoo-convert-") as work:
        with step(echo, "source weights"):
            src = _source(entry, checkpoint, random_seed, revision, from_url, work)
        with parity.started(network, src.path, random_seed=random_seed) as pending:
            # the source framework imports, loads the source (random weights: writes them first)
            # and runs the parity batch in its own process, to its end, before this one reads the
            # source: the two processes never hold the weights at the same time
            with step(echo, f"build {network.arch.name}"):
                built = Built(None, empty_model(network, storage=False))  # written from the source's tensors
            try:
                with step(echo, "the PyTorch reference runs the parity batch (separate process)"):
                    _await_reference(pending, src, network, built.model)
                with step(echo, f"read {src.path.name}"):
                    built.state, src = _read(src, network)
                return _write_checked(out, built, pending, _framework(src),
                                      _config(entry, src, random_seed, built.model.count_params()), atol, rtol, echo)
            except MappingError as e:
                if checkpoint is None:
                    raise
                raise MappingError(f"{e}\n(a fine-tune of {entry.name} with another head converts without the "
                                   "catalogue name: zoo convert --checkpoint FILE --out DIR)") from None


@dataclass
class Built:
    """The mapped source tensors and the model they are written from (built without storage),
    held here only until the folder is written (parity then loads the folder: the tensors would
    otherwise stay in memory beside it, one source size more at the peak)."""

    state: dict | None
    model: object | None


def _write_checked(out: Path, built: Built, pending: parity.PendingCheck, framework: str,
                   record: FolderConfig, atol: float, rtol: float,
                   echo: Echo, verbose: bool = False) -> tuple[Path, ParityReport]:
    """Write `built.state` into `built.model`'s weights file at `out` with `record` beside it (and
    let go of both), check the bytes written against the source framework, and commit the folder
    only if parity passed."""
    with store.writing(out, built.model) as folder:
        with step(echo, f"write the Keras model ({WEIGHTS}, {KERAS_CONFIG})"):
            listed = None if verbose else mapping.LISTED
            folder.save_model(built.model, record.name, mapping.values(built.state, built.model, listed))
            built.state = built.model = None
        with step(echo, "load it back as keras.saving.load_model does"):
            model = folder.load_model()  # parity judges the bytes written: Keras' config and the weights
        with step(echo, f"parity against {framework} (separate process)"):
            report = pending.check(model, atol=atol, rtol=rtol)
        parity.check_same_source(report, record.source.sha256)
        echo(report.table())
        report.assert_passed()
        with step(echo, f"finish {folder.out}"):
            folder.commit(record, report.to_json())
    return folder.out, report


def _read(src: source.SourceWeights, network: Network) -> tuple[dict, source.SourceWeights]:
    """(the state dict, MLP weights shaped for `network`; `src` with its sha256 and layout)."""
    state, src = reading.read_source(src, use_ema=network.use_ema)
    return fit_mlp(state, network.arch.conv_mlp), src


def _await_reference(pending: parity.PendingCheck, src: source.SourceWeights, network: Network, model) -> None:
    """Wait until the PyTorch reference has run the parity batch and ended.

    Where it failed, a source this process cannot read or map onto `model` either fails as it
    would here (the converter's own error, naming what is wrong with the file) rather than with
    how the source framework took it; random weights it did not write, with its own error.
    """
    try:
        pending.wait_for_reference()
    except ZooError:
        if src.path.is_file():
            state, _ = _read(src, network)
            mapping.values(state, model)  # raises naming every missing, unexpected and mis-shaped tensor
        raise


def _framework(src: source.SourceWeights) -> str:
    return LAYOUTS[src.layout].framework if src.layout else "timm"


def convert_checkpoint(checkpoint: str | Path, *, out: str | Path | None = None, name: str | None = None,
                       arch: str | None = None, input_size: int | None = None,
                       mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                       labels: list[str] | None = None, use_ema: bool = True, revision: str | None = None,
                       atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, verbose: bool = False,
                       echo: Echo = log.info) -> tuple[Path, ParityReport]:
    """Convert any PyTorch ConvNeXt checkpoint, its architecture and head read from its tensors.

    Takes timm, FB, transformers (ConvNext, ConvNextV2) and torchvision layouts, in safetensors
    or pickle containers (training checkpoints: EMA weights first, as timm), wrapper prefixes
    (`module.`) removed, from a file, a `save_pretrained`/timm repo folder, or `hf://ORG/REPO`.
    The parity check runs the checkpoint in the framework it came from.

    Args:
        checkpoint: a file, a folder, or `hf://ORG/REPO[@REVISION]`.
        out: destination folder (default: the local store under `name`).
        name: the converted model's name, one folder name (`zoo.folder_config.check_name`;
            default: the repo's, folder's or file's).
        arch: a timm architecture name the tensors must be (checked, not trusted).
        input_size, mean, std: preprocessing where the source's config does not say it.
        labels: a name per class, where the source's config does not name them.
        use_ema: take a training checkpoint's EMA weights when it has them.
        revision: Hub revision, for `hf://` sources.
        atol, rtol: logits tolerances of the parity gate.
        verbose: a mismatch lists every key, not the first few.
        echo: receives one line per step.

    Returns:
        The written folder and the parity report.

    Raises:
        InvalidNameError: `name` cannot name a folder (before anything else).
        ZooError: any failure; nothing is written then.
    """
    if name is not None:
        check_name(name)
    with work_dir("zoo-convert-"):
        with step(echo, "source weights"):
            src = source.open_checkpoint(checkpoint, revision=revision)
        name = name if name is not None else default_name(checkpoint, src)
        out = store.check_destination(out if out else store.store_path(name))  # before the slow work
        meta = read_metadata(src.path)
        _preprocessing(meta, input_size, mean, std, lambda line: None)  # the options too, before the tensors are read
        with step(echo, f"read {src.path.name}"):
            state, src = reading.read_source(src, use_ema=use_ema, hint=meta.layout)
        release = known_release(src)
        if release is not None:
            echo(f"recognised {release.name}'s release file (sha256 {src.sha256[:8]}...): its preprocessing, "
                 f"classes and top-1 ({release.top1}) are recorded")
            meta = _release_metadata(release)
        found = _infer(state, src, meta, arch)
        if meta.preprocessing is None and src.layout == "torchvision":
            row = ARCHITECTURES.get(found.arch.name)
            same = row is not None and (row.depths, row.dims) == (found.arch.depths, found.arch.dims)
            like = catalogue().get(f"{found.arch.name}.tv_in1k") if same else None
            like = like or catalogue()["convnext_base.tv_in1k"]  # torchvision's recipe beyond its four sizes
            echo(f"note: torchvision's eval transform for {like.architecture} assumed (bilinear, resize to "
                 f"{math.floor(like.input_size[-1] / like.crop_pct)}, crop {like.input_size[-1]}; --input-size/--mean/"
                 "--std to change)")
            meta = replace(meta, preprocessing=_release_metadata(like).preprocessing)
        state = fit_mlp(state, found.arch.conv_mlp)
        preprocessing = _preprocessing(meta, input_size, mean, std, echo)
        names = _labels(labels, meta, found.num_classes, echo)
        network = Network(found.arch, found.num_classes, found.head_norm_affine, int(preprocessing["input_size"][-1]),
                          tuple(preprocessing["mean"]), tuple(preprocessing["std"]), src.state_key not in PLAIN_KEYS)
        echo(_describe(src, found))
        with parity.started(network, src.path) as pending:
            with step(echo, f"build {found.arch.name}"):
                built, state = Built(state, empty_model(network, storage=False)), None
            return _write_checked(out, built, pending, _framework(src),
                                  _own_config(name, src, found, preprocessing, names, built.model.count_params(),
                                              release),
                                  atol, rtol, echo, verbose)


def _infer(state: dict, src: source.SourceWeights, meta: SourceMetadata, named: str | None) -> Inferred:
    """The network in the tensors, checked against the config beside them and a named architecture."""
    layout = LAYOUTS[src.layout]
    found = inference.infer(state, mlp_form_known=layout.name == "timm", norm_eps=meta.norm_eps,
                            head_norm_eps=meta.head_norm_eps)
    if meta.head_norm_eps is not None and meta.head_norm_eps == found.arch.norm_eps:
        found = replace(found, arch=found.arch.replace(head_norm_eps=None))
    if meta.num_classes is not None and found.num_classes and meta.num_classes != found.num_classes:
        raise SourceError(f"config.json says {meta.num_classes} classes; the classifier has {found.num_classes}")
    if meta.shape and all(meta.shape) and meta.shape != (found.arch.depths, found.arch.dims):
        raise SourceError(f"config.json says depths {list(meta.shape[0])}, widths {list(meta.shape[1])}; "
                          f"the tensors have {list(found.arch.depths)}, {list(found.arch.dims)}")
    if named:
        row = get_architecture(named)
        inference.check_named(row, found.arch, mlp_form_known=layout.name == "timm")
        found = replace(found, arch=found.arch.replace(name=row.name, norm_eps=meta.norm_eps or row.norm_eps))
    elif meta.architecture in ARCHITECTURES:  # a timm repo's own name for its network
        row = ARCHITECTURES[meta.architecture]
        found = replace(found, arch=found.arch.replace(name=row.name, norm_eps=meta.norm_eps or row.norm_eps))
    return found


def _preprocessing(meta: SourceMetadata, input_size: int | None, mean, std, echo: Echo) -> dict:
    if meta.preprocessing is not None:
        cfg = dict(meta.preprocessing)
    else:
        cfg = default_preprocessing(input_size or 224)
        if input_size is None or mean is None or std is None:
            echo("note: the source says nothing of its preprocessing: ImageNet mean/std, bicubic resize, "
                 "crop 0.875 at 224 assumed (--input-size/--mean/--std to change)")
    if input_size is not None:
        cfg.update(default_preprocessing(input_size) if meta.preprocessing is None else {})
        cfg["input_size"] = [3, input_size, input_size]
    if mean is not None:
        cfg["mean"] = list(mean)
    if std is not None:
        cfg["std"] = list(std)
    return check_preprocessing(cfg)  # the options given, also with the source's values (--input-size, crop_pct)


def _labels(given: list[str] | None, meta: SourceMetadata, num_classes: int, echo: Echo) -> tuple[str, ...] | None:
    names = check_label_names(given) if given is not None else meta.labels
    if names is not None and len(names) != num_classes:
        raise SourceError(f"{len(names)} class names for a {num_classes}-class head")
    if names is None and num_classes and num_classes not in (1000, 11821, 21841):
        echo(f"note: no class names for the {num_classes} classes (--labels FILE names them, one per line)")
    return names


def default_name(checkpoint: str | Path, src: source.SourceWeights) -> str:
    """The repo's name, the folder's, or the file's without its suffixes (`model_best.pth.tar`: `model_best`).

    Characters other than letters, digits, `.`, `_` and `-` become `_`, and leading dots go
    (`..` and hidden names are no folder names); `converted` if nothing is left.

    Raises:
        InvalidNameError: what is left still cannot name a folder (too long); `--name` gives one.
    """
    text = str(checkpoint).rstrip("/")
    if text.startswith(source.HF_SCHEME):
        base = source.parse_hf(text)[0].split("/")[-1]
    elif Path(text).expanduser().is_dir():
        base = Path(text).expanduser().resolve().name
    else:
        base = src.path.name.split(".")[0]
    name = re.sub(r"[^\w.-]", "_", base).lstrip(".") or "converted"
    return check_name(name, f"the name taken from {text!r} (--name to give another)")


def _describe(src: source.SourceWeights, found: Inferred) -> str:
    a = found.arch
    parts = [f"{src.layout} layout"]
    if src.prefix:
        parts.append(f"prefix {src.prefix!r} removed")
    if src.state_key:
        parts.append(f"weights from {src.state_key!r}")
    head = f"{found.num_classes} classes" if found.num_classes else "no classifier"
    return (f"{', '.join(parts)}: {'ConvNeXt-V2' if a.use_grn else 'ConvNeXt'} like {a.name}, depths "
            f"{list(a.depths)}, widths {list(a.dims)}, {head}")


def known_release(src: source.SourceWeights) -> CatalogueEntry | None:
    """The catalogue entry whose release file this is: the same file name, whose hash part
    (torchvision names its files `ARCH-<first 8 hex of the sha256>.pth`) the bytes match."""
    for entry in catalogue().values():
        filename = (entry.url or "").rsplit("/", 1)[-1]
        hashed = re.fullmatch(r".+-([0-9a-f]{8,})\.pth", filename)
        if hashed and filename == src.path.name and src.sha256 and src.sha256.startswith(hashed[1]):
            return entry
    return None


def _release_metadata(entry: CatalogueEntry) -> SourceMetadata:
    cfg = entry.pretrained_cfg()
    return SourceMetadata(num_classes=entry.num_classes, architecture=entry.architecture,
                          preprocessing={k: cfg[k] for k in ("input_size", "crop_pct", "crop_mode", "interpolation",
                                                             "mean", "std")})


def _own_config(name: str, src: source.SourceWeights, found: Inferred, preprocessing: dict,
                labels: tuple[str, ...] | None, params: int, release: CatalogueEntry | None = None) -> FolderConfig:
    origin = src.record("hub") if src.repo_id else src.record("file", path=str(src.path))
    cfg = {"architecture": found.arch.name, "tag": release.tag if release else "", "hf_hub_id": src.repo_id,
           "num_classes": found.num_classes, "test_input_size": None, "test_crop_pct": None, **preprocessing,
           "license": release.license if release else None}
    return FolderConfig(name=name, architecture=found.arch, num_classes=found.num_classes, pretrained_cfg=cfg,
                        source=origin, head_norm_affine=found.head_norm_affine, top1=release.top1 if release else None,
                        converter={"convnext_zoo": __version__}, params=params, labels=labels)


def verify(path: str | Path, *, checkpoint: str | Path | None = None,
           echo: Echo = log.info) -> ParityReport:
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
            with step(echo, f"parity against {_framework(src)} (separate process)"):
                report = pending.check(model, atol=stored["atol"], rtol=stored["rtol"], stage_rtol=stored["stage_rtol"])
            parity.check_same_source(report, folder.config.source.sha256)
    echo(report.table())
    return report


@contextlib.contextmanager
def recorded_reference(config: FolderConfig, work: Path,
                       checkpoint: str | Path | None = None) -> Iterator[tuple[source.SourceWeights, int | None]]:
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
    path = _random_path(work, recorded.seed)
    yield source.SourceWeights(path, None, filename=path.name), recorded.seed
    _check_recorded(sha256_file(path), recorded.sha256)


def _check_recorded(sha256: str, recorded: str) -> None:
    if sha256 != recorded:
        raise IntegrityError(f"the source weights changed since conversion (sha256 {sha256}, recorded {recorded})")


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
    _check_recorded(src.sha256, recorded.sha256)
    return replace(src, layout=recorded.layout, state_key=recorded.state_key, prefix=recorded.prefix or "")


def empty_model(network: Network, *, storage: bool = True):
    """The float32 Keras model for `network`, whatever dtype policy is set globally.

    Its kernels start at zero, not random: every variable is assigned from the source next.
    Without `storage`, its variables have their shapes and dtypes but hold no values (Keras'
    deferred initialisation): the model a weights file is written for from the source's
    tensors (`checkpoints.weights.write_weights`), at no memory (convnext_xxlarge: 3.4 GB of
    zeros otherwise).
    """
    from zoo.model import build_model, dtype_policy

    with dtype_policy("float32"), (contextlib.nullcontext() if storage else _without_storage()):
        return build_model(network.arch, num_classes=network.num_classes,
                           head_norm_affine=network.head_norm_affine, initialize=False)


@contextlib.contextmanager
def _without_storage() -> Iterator[None]:
    """Keras variables made in the block have their shapes and dtypes and hold no values.

    Keras defers a variable made in a stateless scope and initialises every deferred one when the
    next such scope it opens itself ends: the block's are taken off that list, so that they never
    take memory. A Keras without these pieces makes the variables as usual.
    """
    try:
        from keras import StatelessScope
        from keras.src.backend.common import global_state
    except ImportError:
        yield
        return
    key = "uninitialized_variables"
    before = list(global_state.get_global_attribute(key) or [])
    try:
        with StatelessScope(initialize_variables=False):
            yield
    finally:
        global_state.set_global_attribute(key, before)


def _source(entry: CatalogueEntry, checkpoint, random_seed, revision, from_url, work: Path):
    if checkpoint is not None and random_seed is not None:
        raise SourceError("give either a checkpoint file or random weights, not both")
    if checkpoint is not None:
        return source.local(checkpoint, hashed=False)  # hashed as it is read
    if random_seed is not None:  # written by the parity check's reference process, then read here
        path = _random_path(work, random_seed)
        return source.SourceWeights(path, None, filename=path.name)
    if from_url or not entry.hf_hub_id:
        if not entry.url:
            raise SourceError(f"{entry.name} has no original release URL; convert it from the Hub")
        return source.fetch_url(entry.url)
    return source.fetch(entry.hf_hub_id, entry.hf_hub_filename, revision=revision)


def random_source(network: Network, seed: int, work: Path) -> source.SourceWeights:
    """Perturbed random weights in timm's layout, written by timm itself (separate process).

    A conversion has the parity check's reference process write them instead (one process).
    """
    path = _random_path(work, seed)
    run_reference_process(["random", "--arch", json.dumps(network.arch.to_config()),
                           "--num-classes", str(network.num_classes), "--seed", str(seed), "--out", str(path)]
                          + ([] if network.head_norm_affine else ["--no-head-norm"]))
    return source.local(path)


def _random_path(work: Path, seed: int) -> Path:
    return work / f"random-seed{seed}.safetensors"


def _config(entry: CatalogueEntry, src: source.SourceWeights, random_seed: int | None, params: int) -> FolderConfig:
    if random_seed is not None:
        origin = SourceRecord("random", src.sha256, seed=random_seed,
                              note="perturbed random weights in timm's layout; NOT pretrained")
    elif src.url is not None:
        origin = src.record("url")
    elif src.repo_id is None:
        origin = src.record("file", path=str(src.path))
    else:
        origin = src.record("hub", url=entry.url)
    return FolderConfig(
        name=entry.name, architecture=entry.arch, num_classes=entry.num_classes,
        pretrained_cfg=entry.pretrained_cfg(), source=origin, pretrained=random_seed is None,
        head_norm_affine=entry.head_norm_affine, top1=entry.top1, converter={"convnext_zoo": __version__},
        params=params)


def convert_all(names: list[str], *, out_root: str | Path | None = None, force: bool = False,
                random_seed: int | None = None, from_url: bool = False,
                atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                keep_weights: bool = True, echo: Echo = log.info) -> tuple[list[dict], Path]:
    """Convert many checkpoints; one failure does not stop the rest.

    Already converted entries (a valid folder whose report passed) are skipped unless
    `force`. A `summary.json` with one row per entry (name, params, max abs / relative logit
    error, top-1 agreement, seconds, status) is written to `out_root` (default: the store).
    With `keep_weights=False` (parity sweeps) each folder keeps only its config, report and manifest,
    and an entry counts as done when its report passed.

    Returns:
        The rows and the summary file's path.
    """
    from tqdm.auto import tqdm

    root = Path(out_root) if out_root else store.store_root()
    check_writable(root)  # before the first conversion, not after it
    summary = root / "summary.json"
    rows = []
    for name in tqdm(names, desc="convert", unit="ckpt", disable=None):
        out = root / check_name(name)
        row = {"name": name, "architecture": resolve(name).architecture}
        start = time.perf_counter()
        try:
            done = None if force else _passed(out, keep_weights)
            if done is not None:
                config, report = done
                row.update(status="skipped (done)", params=config.params)
            else:
                path, report = convert(name, out=out, random_seed=random_seed, from_url=from_url,
                                       atol=atol, rtol=rtol, echo=echo)
                row.update(status="ok", params=FolderConfig.read(path).params)
                if not keep_weights:
                    (path / WEIGHTS).unlink()
            c = report.logits
            row.update(max_abs=c.max_abs, rel=c.rel, top1_agreement=report.top1_agreement)
        except ZooError as e:
            row.update(status="failed", error=str(e).splitlines()[0])
            echo(f"FAILED {name}: {row['error']}")
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        write_json_atomic(summary, {"rows": rows})  # a crash keeps the rows so far
    return rows, summary


def _passed(out: Path, whole: bool) -> tuple[FolderConfig, ParityReport] | None:
    """(config, report) of the conversion at `out` if its report passed, else None.

    `whole`: the folder must also be intact against its manifest (weights included).
    """
    try:
        if whole:
            folder = converted.open_folder(out)
            config, report = folder.config, folder.parity
        else:
            config = FolderConfig.read(out)
            report = json.loads((out / PARITY).read_text())
    except (ZooError, OSError, ValueError):
        return None
    return (config, ParityReport.from_json(report)) if report.get("passed") else None


def summary_table(rows: list[dict]) -> str:
    """A fixed-width table of `convert_all` rows."""
    lines = [f"{'name':<52} {'params':>12} {'max abs':>9} {'relative':>9} {'top-1':>6} {'s':>7}  status"]
    for r in rows:
        figures = (f"{r['max_abs']:>9.2e} {r['rel']:>9.2e} {r['top1_agreement']:>6.0%}"
                   if "max_abs" in r else f"{'-':>9} {'-':>9} {'-':>6}")
        params = f"{r['params']:>12,}" if r.get("params") else f"{'-':>12}"
        lines.append(f"{r['name']:<52} {params} {figures} {r['seconds']:>7.1f}  {r['status']}"
                     + (f": {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)
