"""What a conversion will do, decided before the slow work: one `Plan`, built by either front end.

A catalogue name gives its entry's network and source (`for_entry`); your own checkpoint gives the
network its tensors hold, checked against the config files beside them (`for_checkpoint`). Both
hand `converters.pipeline.run` the same plan.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from checkpoints import hub, store
from zoo.core.architectures import ARCHITECTURES, get_architecture
from zoo.core.catalogue import CatalogueEntry, catalogue
from zoo.core.errors import SourceError
from zoo.core.folder_config import FolderConfig, SourceRecord, check_name
from zoo.core.reports import DEFAULT_ATOL, DEFAULT_RTOL
from zoo.core.steps import Echo, step
from zoo.core.version import __version__

from . import inference, reading, source
from .inference import Inferred
from .layouts import LAYOUTS, fit_mlp
from .metadata import (
    SourceMetadata,
    check_label_names,
    check_normalisation,
    check_preprocessing,
    default_preprocessing,
    fit_channels,
    read_metadata,
)
from .reading import PLAIN_KEYS
from .recorded import random_path
from .reference_process import Network

log = logging.getLogger(__name__)

RANDOM_NOTE = "perturbed random weights in timm's layout; NOT pretrained"
NAMED_CLASS_COUNTS = (1000, 11821, 21841)  # heads whose class names the project ships


@dataclass(frozen=True)
class Options:
    """How a conversion is checked and told: the parity gate's logits tolerances, how much a key
    mismatch lists (`verbose`: every key, else the first few), and where each step's line goes."""

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    verbose: bool = False
    echo: Echo = log.info


@dataclass(frozen=True)
class Choices:
    """What the user may say of their own checkpoint where the files do not (`zoo convert --checkpoint`).

    Attributes:
        name: the converted model's name (default: the repo's, folder's or file's).
        arch: a timm architecture name the tensors must be (checked, not trusted).
        input_size, mean, std: preprocessing where the source's config does not say it (a mean
            and a std per input channel of the network).
        labels: a name per class, where the source's config does not name them.
        use_ema: take a training checkpoint's EMA weights when it has them.
        revision: Hub revision, for `hf://` sources.
    """

    name: str | None = None
    arch: str | None = None
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    labels: list[str] | None = None
    use_ema: bool = True
    revision: str | None = None


class Tensors:
    """A source's tensors read before the plan runs (own checkpoints: the network is read from them),
    handed over once: nothing else keeps them, so they leave memory once written."""

    def __init__(self, state: dict, src: source.SourceWeights):
        self._held: tuple[dict, source.SourceWeights] | None = (state, src)

    def take(self) -> tuple[dict, source.SourceWeights]:
        held, self._held = self._held, None
        if held is None:
            raise RuntimeError("the tensors were handed over already")
        return held


@dataclass(frozen=True)
class Plan:
    """One conversion: where the weights are, the network they make, and what the folder records.

    Attributes:
        name: the converted model's name.
        out: the folder to write (checked to be writable and free).
        network: what both sides of the parity check build and feed.
        source: the source file (random weights: the file the reference process writes).
        pretrained_cfg: preprocessing and head facts, in the shape of timm's `pretrained_cfg`.
        labels: a name per class, where the source names them.
        top1: the published ImageNet top-1, where known.
        release_url: the original release a Hub copy stands for (recorded with it).
        random_seed: the seed of perturbed random weights (not pretrained), else None.
        tensors: the tensors, where the front end has read them already.
    """

    name: str
    out: Path
    network: Network
    source: source.SourceWeights
    pretrained_cfg: dict
    labels: tuple[str, ...] | None = None
    top1: float | None = None
    release_url: str | None = None
    random_seed: int | None = None
    tensors: Tensors | None = field(default=None, compare=False, repr=False)

    def record(self, src: source.SourceWeights, params: int) -> FolderConfig:
        """The folder's record once `src` has been read (its sha256, layout, entry and prefix known)."""
        if self.random_seed is not None:
            origin = SourceRecord("random", src.sha256, seed=self.random_seed, note=RANDOM_NOTE)
        elif src.url is not None:
            origin = src.record("url")
        elif src.repo_id is None:
            origin = src.record("file", path=str(src.path))
        else:
            origin = src.record("hub", url=self.release_url)
        n = self.network
        return FolderConfig(
            name=self.name,
            architecture=n.arch,
            num_classes=n.num_classes,
            pretrained_cfg=self.pretrained_cfg,
            source=origin,
            pretrained=self.random_seed is None,
            head_norm_affine=n.head_norm_affine,
            top1=self.top1,
            converter={"convnext_zoo": __version__},
            params=params,
            labels=self.labels,
            features=n.features,
        )


def for_entry(
    entry: CatalogueEntry,
    out: Path,
    work: Path,
    *,
    checkpoint: str | Path | None = None,
    random_seed: int | None = None,
    revision: str | None = None,
    from_url: bool = False,
) -> Plan:
    """The plan of a catalogue conversion: the entry's network, its weights from the Hub, the release
    URL, a local `checkpoint` file, or perturbed random weights of `random_seed` (written under `work`
    by the parity check's reference process, then read here)."""
    if checkpoint is not None and random_seed is not None:
        raise SourceError("give either a checkpoint file or random weights, not both")
    if checkpoint is not None:
        src = source.local(checkpoint, hashed=False)  # hashed as it is read
    elif random_seed is not None:
        path = random_path(work, random_seed)
        src = source.SourceWeights(path, None, filename=path.name)
    elif from_url or not entry.hf_hub_id:
        if not entry.url:
            raise SourceError(f"{entry.name} has no original release URL; convert it from the Hub")
        src = source.fetch_url(entry.url)
    else:
        src = source.fetch(entry.hf_hub_id, entry.hf_hub_filename, revision=revision)
    return Plan(
        entry.name,
        out,
        Network.of_entry(entry),
        src,
        entry.pretrained_cfg(),
        top1=entry.top1,
        release_url=entry.url,
        random_seed=random_seed,
    )


def for_checkpoint(checkpoint: str | Path, choices: Choices, out: str | Path | None, echo: Echo) -> Plan:
    """The plan of your own checkpoint's conversion: its tensors read, the network they hold checked
    against the config files beside them and `choices`, its preprocessing and class names.

    Raises:
        InvalidNameError: `choices.name` cannot name a folder (before anything else).
        ZooError: the source, its config files or the choices are not usable.
    """
    if choices.name is not None:
        check_name(choices.name)
    with step(echo, "source weights"):
        src = source.open_checkpoint(checkpoint, revision=choices.revision)
    name = choices.name if choices.name is not None else name_from_checkpoint(checkpoint, src)
    out = store.check_destination(out if out else store.store_path(name))  # before the slow work
    meta = read_metadata(src.path)
    _preprocessing(meta, choices, lambda line: None)  # the choices too, before the tensors are read
    with step(echo, f"read {src.path.name}"):
        state, src = reading.read_source(src, use_ema=choices.use_ema, hint=meta.layout)
    release = known_release(src)
    if release is not None:
        echo(
            f"recognised {release.name}'s release file (sha256 {src.sha256[:8]}...): its preprocessing, "
            f"classes and top-1 ({release.top1}) are recorded"
        )
        meta = _release_metadata(release)
    found = _infer(state, src, meta, choices.arch)
    if meta.preprocessing is None and src.layout == "torchvision":
        meta = _torchvision_preprocessing(meta, found, echo)
    if found.features:
        meta = _backbone_metadata(meta, found, choices, echo)
    preprocessing = _preprocessing(meta, choices, echo, BACKBONE_INPUT if found.features else 224, found.arch.in_chans)
    names = _labels(choices.labels, meta, found.num_classes, echo)
    network = Network(
        found.arch,
        found.num_classes,
        found.head_norm_affine,
        int(preprocessing["input_size"][-1]),
        tuple(preprocessing["mean"]),
        tuple(preprocessing["std"]),
        src.state_key not in PLAIN_KEYS,
        found.features,
    )
    echo(_describe(src, found))
    cfg = {
        "architecture": found.arch.name,
        "tag": release.tag if release else meta.tag or "",
        "hf_hub_id": src.repo_id,
        "num_classes": found.num_classes,
        "test_input_size": meta.test_input_size,  # (a release's metadata says none: as it recorded before)
        "test_crop_pct": meta.test_crop_pct,
        **preprocessing,
        "license": release.license if release else meta.license,  # the source config's, where it says
    }
    return Plan(
        name,
        out,
        network,
        src,
        cfg,
        labels=names,
        top1=release.top1 if release else None,
        tensors=Tensors(fit_mlp(state, found.arch.conv_mlp), src),
    )


def framework_of(src: source.SourceWeights) -> str:
    """The library whose own model class runs `src` (timm where its layout is not known: random weights)."""
    return LAYOUTS[src.layout].framework if src.layout else "timm"


def _infer(state: dict, src: source.SourceWeights, meta: SourceMetadata, named: str | None) -> Inferred:
    """The network in the tensors, checked against the config beside them and a named architecture."""
    layout = LAYOUTS[src.layout]
    found = inference.infer(
        state, mlp_form_known=layout.name == "timm", norm_eps=meta.norm_eps, head_norm_eps=meta.head_norm_eps
    )
    if meta.head_norm_eps is not None and meta.head_norm_eps == found.arch.norm_eps:
        found = replace(found, arch=found.arch.replace(head_norm_eps=None))
    if meta.num_classes is not None and found.num_classes and meta.num_classes != found.num_classes:
        raise SourceError(f"config.json says {meta.num_classes} classes; the classifier has {found.num_classes}")
    if meta.shape and all(meta.shape) and meta.shape != (found.arch.depths, found.arch.dims):
        raise SourceError(
            f"config.json says depths {list(meta.shape[0])}, widths {list(meta.shape[1])}; "
            f"the tensors have {list(found.arch.depths)}, {list(found.arch.dims)}"
        )
    channels = found.arch.in_chans
    if meta.in_chans is not None and meta.in_chans != channels:
        raise SourceError(f"config.json says {_input_channels(meta.in_chans)}; the stem takes {channels}")
    if layout.name == "torchvision" and channels != 3:  # its ConvNeXt class builds a 3-channel stem, always
        raise SourceError(
            f"the stem takes {_input_channels(channels)}; torchvision's ConvNeXt takes 3 (RGB) and cannot "
            "run this checkpoint: save it from timm (in_chans) or transformers (num_channels) instead"
        )
    if named:
        row = get_architecture(named)
        inference.check_named(row, found.arch, mlp_form_known=layout.name == "timm")
    elif meta.architecture in ARCHITECTURES:  # a timm repo's own name for its network
        row = ARCHITECTURES[meta.architecture]
    else:
        return found
    return replace(found, arch=found.arch.replace(name=row.name, norm_eps=meta.norm_eps or row.norm_eps))


def _torchvision_preprocessing(meta: SourceMetadata, found: Inferred, echo: Echo) -> SourceMetadata:
    """torchvision files carry no preprocessing: its eval transform for the size the tensors are."""
    row = ARCHITECTURES.get(found.arch.name)
    same = row is not None and (row.depths, row.dims) == (found.arch.depths, found.arch.dims)
    like = catalogue().get(f"{found.arch.name}.tv_in1k") if same else None
    like = like or catalogue()["convnext_base.tv_in1k"]  # torchvision's recipe beyond its four sizes
    echo(
        f"note: torchvision's eval transform for {like.architecture} assumed (bilinear, resize to "
        f"{math.floor(like.input_size[-1] / like.crop_pct)}, crop {like.input_size[-1]}; --input-size/--mean/"
        "--std to change)"
    )
    return replace(meta, preprocessing=_release_metadata(like).preprocessing)


def _backbone_metadata(meta: SourceMetadata, found: Inferred, choices: Choices, echo: Echo) -> SourceMetadata:
    """A dense-prediction backbone's: its config's out_features must be the norms the tensors hold; the
    config's classes are its decode head's, which is not converted."""
    if choices.labels is not None:
        raise SourceError(
            "--labels names classes; a dense-prediction backbone has none (its feature maps are its output)"
        )
    if meta.features is not None and meta.features != found.features:
        raise SourceError(
            f"config.json says out_features {[f'stage{i + 1}' for i in meta.features]}; the checkpoint normalises "
            f"the outputs of stages {[f'stage{i + 1}' for i in found.features]}"
        )
    echo(
        f"a dense-prediction backbone: the feature maps of stages {list(found.features)} (strides "
        f"{[2 ** (i + 2) for i in found.features]}), each through its own norm, are the output"
    )
    return replace(meta, labels=None, num_classes=None)


BACKBONE_INPUT = 512  # the crop segmentation models train at: the parity input of a backbone with no preprocessing


def _preprocessing(
    meta: SourceMetadata, choices: Choices, echo: Echo, size: int = 224, in_chans: int | None = None
) -> dict:
    """The preprocessing the folder records, checked: the source's, else the defaults, with the
    choices over them, and a mean and a std per input channel of the stem (`in_chans`; None before
    the tensors are read: the choices and the source's values are checked on their own).

    Raises:
        SourceError: a bad value, or a mean/std that cannot be one per input channel (refused, not
            guessed, for networks of neither 1 nor 3 channels that nothing gives them for).
    """
    input_size, mean, std = choices.input_size, choices.mean, choices.std
    note = None
    if meta.preprocessing is not None:
        cfg = dict(meta.preprocessing)
    else:
        cfg = default_preprocessing(input_size or size)
        if input_size is None or mean is None or std is None:
            note = (
                "note: the source says nothing of its preprocessing: ImageNet mean/std, bicubic resize, "
                f"{'crop 0.875' if (input_size or size) < 384 else 'no crop'} at {input_size or size} assumed "
                "(--input-size/--mean/--std to change)"
            )
    if input_size is not None:
        cfg.update(default_preprocessing(input_size) if meta.preprocessing is None else {})
        cfg["input_size"] = [cfg["input_size"][0], input_size, input_size]
    if in_chans is None:  # the choices on their own, and with the source's values (--input-size, crop_pct)
        check_normalisation(mean, std)
        return check_preprocessing(cfg)
    cfg["input_size"] = [in_chans, *cfg["input_size"][1:]]
    fitted = _normalisation(cfg, in_chans, mean, std, "the source's preprocessing" if meta.preprocessing else None)
    for line in (note, fitted):
        if line:
            echo(line)
    return check_preprocessing(cfg)


def _normalisation(cfg: dict, channels: int, mean, std, said: str | None) -> str | None:
    """Put one mean and one std per input channel in `cfg`: the user's (exactly one per channel), else
    the source's or the defaults fitted as timm fits them (`fit_channels`: a 1-channel network takes the
    mean of the RGB values); for other channel counts without values of their own, refused. Returns
    the note saying what was fitted, if anything was."""
    averaged = []
    for name, given in (("mean", mean), ("std", std)):
        if given is not None:
            if len(given) != channels:
                raise SourceError(
                    f"--{name} has {len(given)} value{'s' if len(given) != 1 else ''}; the checkpoint's stem takes "
                    f"{_input_channels(channels)}: give {channels}, one per channel"
                )
            cfg[name] = list(given)
            continue
        fitted = fit_channels(cfg[name], channels)
        if fitted is None:
            raise SourceError(
                f"the checkpoint's stem takes {channels} input channels and "
                + (f"{said} gives {len(cfg[name])} {name} values" if said else "nothing says how they were normalised")
                + f": give --mean and --std with {channels} values each (one per channel)"
            )
        if len(cfg[name]) != channels:
            averaged.append(f"{name} {fitted[0]:.4g}")
        cfg[name] = fitted
    if not averaged:
        return None
    return (
        f"note: the stem takes {_input_channels(channels)}: {' and '.join(averaged)}"
        f"{' for each' if channels != 1 else ''}, fitted from {said or 'the ImageNet defaults'} as timm fits them "
        "(--mean/--std to change)"
    )


def _labels(given: list[str] | None, meta: SourceMetadata, num_classes: int, echo: Echo) -> tuple[str, ...] | None:
    names = check_label_names(given) if given is not None else meta.labels
    if names is not None and len(names) != num_classes:
        raise SourceError(f"{len(names)} class names for a {num_classes}-class head")
    if names is None and num_classes and num_classes not in NAMED_CLASS_COUNTS:
        echo(f"note: no class names for the {num_classes} classes (--labels FILE names them, one per line)")
    return names


def name_from_checkpoint(checkpoint: str | Path, src: source.SourceWeights | None) -> str:
    """The repo's name, the folder's, or the file's without its suffixes (`model_best.pth.tar`: `model_best`);
    for a sharded checkpoint named by its index or a shard, the folder's (its files are `model-0000i-...`).

    Characters other than letters, digits, `.`, `_` and `-` become `_`, and leading dots go
    (`..` and hidden names are no folder names); `converted` if nothing is left.

    Raises:
        InvalidNameError: what is left still cannot name a folder (too long); `--name` gives one.
    """
    text = str(checkpoint).rstrip("/")
    if text.startswith(hub.HF_SCHEME):
        base = hub.parse_hf(text)[0].split("/")[-1]
    elif Path(text).expanduser().is_dir():
        base = Path(text).expanduser().resolve().name
    elif src is not None and src.files:
        base = src.path.parent.resolve().name
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
    if src.left:
        parts.append(f"{src.left} keys of another model left out (the {src.layout} layout declares them)")
    if found.features:
        head = f"a backbone with per-output norms for stages {list(found.features)}"
    else:
        head = f"{found.num_classes} classes" if found.num_classes else "no classifier"
    return (
        f"{', '.join(parts)}: {'ConvNeXt-V2' if a.use_grn else 'ConvNeXt'} like {a.name}, depths "
        f"{list(a.depths)}, widths {list(a.dims)}, {head}"
        + ("" if a.in_chans == 3 else f", {_input_channels(a.in_chans)}")
    )


def _input_channels(count: int) -> str:
    return f"{count} input channel{'s' if count != 1 else ''}"


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
    return SourceMetadata(
        num_classes=entry.num_classes,
        architecture=entry.architecture,
        preprocessing={k: cfg[k] for k in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")},
    )


__all__ = [
    "Choices",
    "Options",
    "Plan",
    "Tensors",
    "for_checkpoint",
    "for_entry",
    "framework_of",
    "known_release",
    "name_from_checkpoint",
]
