"""What the files beside a source checkpoint say: a transformers `config.json` and
`preprocessor_config.json`, or a timm Hub repo's `config.json` (layout, classes and their names,
preprocessing, norm epsilons). The tensors say the rest (`converters.inference`).

No torch and no tensorflow: this module also runs inside the PyTorch reference process.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn

from zoo.core.architectures import MAX_IN_CHANS
from zoo.core.errors import SourceError
from zoo.core.preprocessing import (
    CROP_MODES,
    CROP_OFFSETS,
    INTERPOLATIONS,
    MAX_RESIZE,
    SETTINGS,
    Preprocessing,
    with_defaults,
)

TRANSFORMERS_TYPES = {"convnext": False, "convnextv2": True}  # model_type -> ConvNeXt-V2
# PIL's resampling filters by number, as transformers' processors store them
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
MIN_INPUT, MAX_INPUT = 32, 2048  # a side of the network's input (it downsamples by 32)
MAX_MEAN, MIN_STD, MAX_STD = 1e3, 1e-6, 1e3  # normalised pixels stay far inside float32
_SHOWN = 60  # characters of a bad value quoted in an error


@dataclass(frozen=True)
class SourceMetadata:
    """Facts about a checkpoint from its config files; None where they say nothing.

    Attributes:
        layout: the layout the config belongs to (`transformers`, `timm`).
        num_classes: the classifier width the config says.
        labels: a name per class (transformers' `id2label`, timm's `label_names`).
        preprocessing: `input_size`, `crop_pct`, `crop_mode`, `interpolation`, `mean`, `std`
            in the shape of timm's `pretrained_cfg`.
        norm_eps: the blocks' LayerNorm epsilon (a timm repo's `model_args`).
        head_norm_eps: transformers' final LayerNorm epsilon (its config's `layer_norm_eps`).
        architecture: timm's architecture name (a timm repo's config).
        license, tag, test_input_size, test_crop_pct: those fields of a timm repo's
            `pretrained_cfg` (the weights' licence, timm's pretrained tag, the test-time size and
            crop), recorded as they are; transformers' config says none of them.
        shape: (depths, dims) the config says, to check against the tensors.
        notes: where each fact came from, for the conversion's output.
        features: the stages a dense-prediction backbone returns (transformers' `ConvNextBackbone`
            and UperNet configs' `out_features`, as stage indices 0..3).
        in_chans: the input channels the config says (transformers' `num_channels`, a timm repo's
            `model_args.in_chans`), to check against the stem.
    """

    layout: str | None = None
    num_classes: int | None = None
    labels: tuple[str, ...] | None = None
    preprocessing: dict | None = None
    norm_eps: float | None = None
    head_norm_eps: float | None = None
    architecture: str | None = None
    license: str | None = None
    tag: str | None = None
    test_input_size: list[int] | None = None
    test_crop_pct: float | None = None
    shape: tuple | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    features: tuple[int, ...] | None = None
    in_chans: int | None = None


CONFIG, PROCESSOR = "config.json", "preprocessor_config.json"


def read_metadata(weights: Path) -> SourceMetadata:
    """The config files in the folder of a weights file (none: an empty `SourceMetadata`).

    Every value used is checked here, before any slow work: types, finiteness and ranges.

    Raises:
        SourceError: a config file that cannot be read or holds a value no conversion can use
            (naming the file and the field), or a transformers ConvNeXt this project cannot build
            (another patch size, activation or channel count).
    """
    folder = Path(weights).parent
    files = {}
    for name in (CONFIG, PROCESSOR):
        path = folder / name
        if path.is_file():
            try:
                files[name] = path.read_bytes()
            except OSError as e:
                raise SourceError(f"{path}: cannot be read: {e.strerror or e}") from None
    return parse_metadata(folder, files)


def parse_metadata(folder: Path, files: dict[str, bytes]) -> SourceMetadata:
    """What config files in `folder` with these contents say (`read_metadata` once the files are read).

    Args:
        folder: where the files are, for the errors.
        files: the bytes of `config.json` and `preprocessor_config.json` by name; absent: no such file.

    Raises:
        SourceError: as `read_metadata`.
    """
    path = Path(folder) / CONFIG
    config = _json(path, files.get(CONFIG))
    if not isinstance(config, dict):
        return SourceMetadata()  # someone else's config.json (our own converted folders have one)
    model_type, architecture = config.get("model_type"), config.get("architecture")
    if model_type == "upernet":  # transformers' UperNetForSemanticSegmentation: a ConvNeXt backbone inside
        backbone = _Fields(path).object("backbone_config", config.get("backbone_config"))
        if backbone.get("model_type") not in TRANSFORMERS_TYPES:
            return SourceMetadata()  # another backbone: the tensors' layout decides
        processor = _processor_file(folder, files)
        meta = _transformers(_Fields(path, "backbone_config."), backbone, None, backbone=True)
        preprocessing = None if processor is None else _segmentation_processor(*processor)
        return replace(meta, preprocessing=preprocessing, notes=(*meta.notes, "UperNet's config.json: its backbone"))
    if isinstance(model_type, str) and model_type in TRANSFORMERS_TYPES:
        backbone = any(str(a).endswith("Backbone") for a in config.get("architectures") or [])
        return _transformers(_Fields(path), config, _processor_file(folder, files), backbone=backbone)
    if isinstance(architecture, str) and architecture.startswith("convnext"):
        return _timm(_Fields(path), config)
    return SourceMetadata()


def _processor_file(folder: Path, files: dict[str, bytes]) -> tuple | None:
    processor_path = Path(folder) / PROCESSOR
    processor = _json(processor_path, files.get(PROCESSOR))
    if processor is not None and not isinstance(processor, dict):
        raise SourceError(f"{processor_path}: must hold a JSON object (the image processor's settings)")
    return None if processor is None else (_Fields(processor_path), processor)


def _json(path: Path, data: bytes | None):
    if data is None:
        return None
    try:
        return json.loads(data)  # (json tells UTF-8, -16 and -32 apart itself)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise SourceError(f"{path}: cannot be read as JSON: {e}") from None


def _transformers(fields: _Fields, config: dict, processor: tuple | None, backbone: bool = False) -> SourceMetadata:
    for key, wanted in (("patch_size", 4), ("hidden_act", "gelu"), ("num_stages", 4)):
        if config.get(key, wanted) != wanted:
            raise SourceError(f"{fields.where}: {key}={_shown(config[key])}; only {key}={wanted!r} ConvNeXts convert")
    in_chans = fields.in_chans("num_channels", config.get("num_channels", 3))
    id2label = config.get("id2label")
    labels = None if id2label is None or id2label == {} else fields.label_map("id2label", id2label)
    num_labels = fields.count("num_labels", config.get("num_labels"))
    num_classes = len(labels) if labels is not None else num_labels
    if labels and all(re.fullmatch(rf"LABEL_{i}", name) for i, name in enumerate(labels)):
        labels = None  # transformers' placeholder names
    notes = ["layout, classes and final-norm epsilon from config.json (transformers)"]
    preprocessing = None
    if processor is not None:
        preprocessing = _processor(*processor, channels=in_chans)
        notes.append("preprocessing from preprocessor_config.json (ConvNextImageProcessor)")
    return SourceMetadata(
        layout="transformers",
        num_classes=None if backbone else num_classes,
        labels=None if backbone else labels,
        preprocessing=preprocessing,
        head_norm_eps=None if backbone else fields.eps("layer_norm_eps", config.get("layer_norm_eps"), 1e-12),
        shape=(
            fields.stages("depths", config.get("depths")),
            fields.stages("hidden_sizes", config.get("hidden_sizes")),
        ),
        notes=tuple(notes),
        features=fields.out_features("out_features", config.get("out_features")) if backbone else None,
        in_chans=in_chans,
    )


def _segmentation_processor(fields: _Fields, p: dict) -> dict:
    """A segmentation model's image processor (UperNet's `SegformerImageProcessor`): the image resized
    to a square `size` whatever its aspect (no crop), rescaled by `rescale_factor` (when `do_rescale`),
    then normalised: as timm's fields, mean and std over pixels in [0, 1]."""
    name, edge = _processor_size(fields, p.get("size"))
    edge = fields.side(name, edge)
    rescale = _default(p.get("rescale_factor"), 1 / 255) if _default(p.get("do_rescale"), True) else 1.0
    if _finite(rescale) is None or not 0 < rescale <= 1:
        fields.fail("rescale_factor", "a number in (0, 1]", rescale)
    scale = 255 * rescale  # normalising x * rescale by (m, s) is normalising x / 255 by (m, s) / (255 * rescale)
    mean = fields.channels("image_mean", p.get("image_mean"), (0.485, 0.456, 0.406), one_for_all=True)
    std = fields.channels("image_std", p.get("image_std"), (0.229, 0.224, 0.225), one_for_all=True, spread=True)
    cfg = default_preprocessing(edge, 1.0)
    cfg.update(
        crop_pct=1.0,
        crop_mode="squash",
        interpolation=_resample(fields, _default(p.get("resample"), 2)),
        mean=[m / scale for m in mean],
        std=[v / scale for v in std],
    )
    return check_preprocessing(cfg, fields.where)


def _processor(fields: _Fields, p: dict, channels: int = 3) -> dict:
    """ConvNextImageProcessor's settings as timm's preprocessing fields: below 384 it resizes the
    shortest edge to size/crop_pct and crops the centre; at 384 and above it resizes to a square.
    `channels`: the model's (config.json's `num_channels`), one mean and std each."""
    name, edge = _processor_size(fields, p.get("size"))
    edge = fields.side(name, edge)
    crop_pct = 224 / 256 if p.get("crop_pct") is None else fields.fraction("crop_pct", p["crop_pct"])
    cfg = default_preprocessing(edge, crop_pct)
    cfg["input_size"][0] = channels
    mean, std = cfg["mean"], cfg["std"]
    cfg.update(
        {
            "interpolation": _resample(fields, _default(p.get("resample"), 3)),
            "mean": fields.channels("image_mean", p.get("image_mean"), mean, one_for_all=True, count=channels),
            "std": fields.channels("image_std", p.get("image_std"), std, one_for_all=True, spread=True, count=channels),
            "crop_offsets": "floor",  # transformers' center_crop: (margin // 2)
        }
    )
    return check_preprocessing(cfg, fields.where)


def _processor_size(fields: _Fields, size) -> tuple[str, object]:
    """(the field, the edge) of the processor's `size`: `{"shortest_edge": N}` as it saves it, a
    square `{"height": N, "width": N}`, or a bare number (older saves)."""
    if size is None:
        return "size", 224
    if isinstance(size, dict):
        if size.get("shortest_edge") is not None:
            return "size.shortest_edge", size["shortest_edge"]
        if size.get("height") is not None and size.get("width", size["height"]) == size["height"]:
            return "size.height", size["height"]
    elif not isinstance(size, (list, str)):
        return "size", size
    fields.fail("size", '{"shortest_edge": N} or a square {"height": N, "width": N}', size)


def _resample(fields: _Fields, value) -> str:
    if isinstance(value, str) and value in INTERPOLATIONS:
        return value
    if _is_int(value) and _RESAMPLE.get(value) in INTERPOLATIONS:
        return _RESAMPLE[value]
    known = f" ({_RESAMPLE[value]})" if _is_int(value) and value in _RESAMPLE else ""
    fields.fail("resample", "2 (bilinear) or 3 (bicubic), the resampling zoo.preprocess reproduces", value, known)


def _timm(fields: _Fields, config: dict) -> SourceMetadata:
    cfg = fields.object("pretrained_cfg", config.get("pretrained_cfg"))
    preprocessing = None
    if cfg.get("input_size") is not None:
        given = {name: cfg.get(name) for name in ("input_size", *SETTINGS)}
        preprocessing = check_preprocessing(with_defaults(given), fields.where, "pretrained_cfg.", fit=True)
    labels = fields.label_names("label_names", config.get("label_names"))
    num_classes = fields.count("num_classes", config.get("num_classes"))
    if labels is not None and num_classes is not None and len(labels) != num_classes:
        raise SourceError(
            f"{fields.where}: label_names has {len(labels)} names for num_classes {num_classes}; "
            "give one name per class"
        )
    args = fields.object("model_args", config.get("model_args"))
    test_size, test_crop = cfg.get("test_input_size"), cfg.get("test_crop_pct")
    return SourceMetadata(
        layout="timm",
        num_classes=num_classes,
        labels=labels,
        preprocessing=preprocessing,
        architecture=config["architecture"],
        norm_eps=fields.eps("model_args.norm_eps", args.get("norm_eps")),
        in_chans=None if args.get("in_chans") is None else fields.in_chans("model_args.in_chans", args["in_chans"]),
        notes=("classes and preprocessing from config.json (timm)",),
        license=fields.text("pretrained_cfg.license", cfg.get("license"), "a licence id ('apache-2.0')"),
        tag=fields.text("pretrained_cfg.tag", cfg.get("tag"), "timm's pretrained tag ('fb_in1k', or '')", empty=True),
        test_input_size=None if test_size is None else fields.input_size("pretrained_cfg.test_input_size", test_size),
        test_crop_pct=None if test_crop is None else fields.fraction("pretrained_cfg.test_crop_pct", test_crop),
    )


def check_preprocessing(cfg: dict, where: str | Path | None = None, prefix: str = "", *, fit: bool = False) -> dict:
    """`cfg` (timm's preprocessing fields: `input_size`, `crop_pct`, `crop_mode`, `interpolation`,
    `mean`, `std`, optionally `crop_offsets`) with every value checked and numbers as floats: what
    `zoo.preprocess` can apply to any image in bounded memory, with one mean and one std per input
    channel (`input_size[0]`).

    Args:
        cfg: the fields.
        where: the file they were read from, for the error (None: options given).
        prefix: the fields' path in that file (`pretrained_cfg.`).
        fit: a mean or std of another count is fitted to the channels as timm fits it, where it
            can be (`fit_channels`; a timm config's).

    Raises:
        SourceError: naming the file and the first bad field.
    """
    fields = _Fields(where, prefix)
    size = fields.input_size("input_size", cfg["input_size"])
    crop_pct = fields.fraction("crop_pct", cfg["crop_pct"])
    edge = max(size[1:])
    if edge / crop_pct > MAX_RESIZE:
        fields.fail(
            "crop_pct",
            f"a number in (0, 1] and at least {edge / MAX_RESIZE:.4g} for input size {edge} "
            f"(images are resized to {edge} / crop_pct before the crop: at most {MAX_RESIZE} pixels)",
            crop_pct,
        )
    checked = {
        "input_size": size,
        "crop_pct": crop_pct,
        "crop_mode": fields.choice("crop_mode", cfg["crop_mode"], CROP_MODES),
        "interpolation": fields.choice("interpolation", cfg["interpolation"], INTERPOLATIONS),
        "mean": fields.channels("mean", cfg["mean"], count=size[0], fit=fit),
        "std": fields.channels("std", cfg["std"], spread=True, count=size[0], fit=fit),
    }
    if "crop_offsets" in cfg:
        checked["crop_offsets"] = fields.choice("crop_offsets", cfg["crop_offsets"], CROP_OFFSETS)
    return {**cfg, **checked}


def fit_channels(values: list[float], channels: int) -> list[float] | None:
    """A mean or std for `channels` input channels from `values`, as timm fits its `pretrained_cfg`'s
    (`timm.data.resolve_data_config`, `resolve_input_data_config`): one value per channel as it is,
    a single value for every channel, and for a grey (1-channel) network the mean of the values
    (ImageNet's RGB means give 0.449, its stds 0.226). None where timm would guess (3 values for 4
    channels: it averages them too; here the user says)."""
    values = list(values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and values:
        return [sum(values) / len(values)]
    return None


def check_normalisation(mean, std) -> None:
    """`--mean`/`--std` as given, before the tensors say how many input channels there are: each a
    list of numbers in range, and as many means as stds.

    Raises:
        SourceError: naming the option.
    """
    fields = _Fields()
    for name, values, spread in (("mean", mean, False), ("std", std, True)):
        if values is not None:
            fields.channels(name, values, spread=spread, count=len(values) if isinstance(values, (list, tuple)) else 1)
    if mean is not None and std is not None and len(mean) != len(std):
        raise SourceError(
            f"--mean has {len(mean)} values and --std {len(std)}: give one of each per input channel of the network"
        )


def check_label_names(names, where: str | Path | None = None, field: str = "labels") -> tuple[str, ...]:
    """`names` (a list of class names in index order) as a tuple, each a string.

    Raises:
        SourceError: not a list of strings.
    """
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return tuple(names)
    _Fields(where).fail(field, "a list of class names (strings) in class index order", names)


class _Fields:
    """Reads the fields of one config file, each checked, and names the file and the field when one
    is bad: `error: FILE: FIELD must be WHAT, got VALUE` (the value quoted with its escapes)."""

    def __init__(self, where: str | Path | None = None, prefix: str = ""):
        self.where, self.prefix = where, prefix

    def fail(self, name: str, wanted: str, value, note: str = "") -> NoReturn:
        at = f"{self.where}: " if self.where else ""
        raise SourceError(f"{at}{self.prefix}{name} must be {wanted}, got {_shown(value)}{note}")

    def text(self, name: str, value, wanted: str, *, empty: bool = False) -> str | None:
        """A string of one line, nothing a terminal acts on (`empty`: or ""); None where not given."""
        if value is not None and not (isinstance(value, str) and value.isprintable() and (empty or value)):
            self.fail(name, f"{wanted}: one line of text", value)
        return value

    def object(self, name: str, value) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(name, "an object", value)
        return value

    def count(self, name: str, value) -> int | None:
        if value is not None and not (_is_int(value) and value >= 0):
            self.fail(name, "a whole number >= 0", value)
        return value

    def side(self, name: str, value) -> int:
        if not (_is_int(value) and MIN_INPUT <= value <= MAX_INPUT):
            self.fail(name, f"a whole number of pixels in [{MIN_INPUT}, {MAX_INPUT}]", value)
        return value

    def input_size(self, name: str, value) -> list[int]:
        if not (
            isinstance(value, (list, tuple))
            and len(value) == 3
            and all(_is_int(v) for v in value)
            and 1 <= value[0] <= MAX_IN_CHANS
            and all(MIN_INPUT <= v <= MAX_INPUT for v in value[1:])
        ):
            self.fail(
                name,
                f"[channels, height, width]: input channels in [1, {MAX_IN_CHANS}] (3 for RGB), whole numbers "
                f"of pixels in [{MIN_INPUT}, {MAX_INPUT}]",
                value,
            )
        return list(value)

    def in_chans(self, name: str, value) -> int:
        if not (_is_int(value) and 1 <= value <= MAX_IN_CHANS):
            self.fail(name, f"a whole number of input channels in [1, {MAX_IN_CHANS}] (3 for RGB)", value)
        return value

    def fraction(self, name: str, value) -> float:
        number = _finite(value)
        if number is None or not 0 < number <= 1:
            self.fail(name, "a number in (0, 1]", value)
        return number

    def eps(self, name: str, value, default: float | None = None) -> float | None:
        if value is None:
            return default
        number = _finite(value)
        if number is None or number <= 0:
            self.fail(name, "a finite number > 0", value)
        return number

    def choice(self, name: str, value, choices: tuple[str, ...]) -> str:
        if not (isinstance(value, str) and value in choices):
            self.fail(name, f"one of {', '.join(map(repr, choices))}", value)
        return value

    def channels(
        self,
        name: str,
        value,
        default=None,
        *,
        one_for_all: bool = False,
        spread: bool = False,
        count: int = 3,
        fit: bool = False,
    ) -> list:
        """`count` numbers, one per input channel (`spread`: a std, in [MIN_STD, MAX_STD]; else a mean,
        within +-MAX_MEAN); `one_for_all`: a single number stands for all of them (transformers);
        `fit`: a list of another length is fitted as timm fits it (`fit_channels`), where it can be.
        A `default` (value None) is fitted."""
        if value is None and default is not None:
            fitted = fit_channels(default, count)
            if fitted is None:
                wanted = f"given for {count} input channels ({count} numbers; the default's {len(default)} do not fit)"
                self.fail(name, wanted, value)
            return fitted
        low, high = (MIN_STD, MAX_STD) if spread else (-MAX_MEAN, MAX_MEAN)
        numbers = [value] * count if one_for_all and _finite(value) is not None else value
        if isinstance(numbers, (list, tuple)) and 1 <= len(numbers) <= MAX_IN_CHANS:
            numbers = [_finite(v) for v in numbers]
            if all(v is not None and low <= v <= high for v in numbers):
                fitted = fit_channels(numbers, count) if fit else numbers if len(numbers) == count else None
                if fitted is not None:
                    return fitted
        numbers_of = f"{count} numbers" if count != 1 else "1 number"
        either = " (or one for all)" if fit and count != 1 else ""
        self.fail(name, f"{numbers_of} in [{low:g}, {high:g}], one per input channel{either}", value)

    def out_features(self, name: str, value) -> tuple[int, ...]:
        """transformers' `out_features` (`["stage1", ..., "stage4"]`) as stage indices 0..3."""
        names = {f"stage{i + 1}": i for i in range(4)}
        if not (isinstance(value, list) and value and all(isinstance(v, str) and v in names for v in value)):
            self.fail(
                name, 'stage names from "stage1" to "stage4" (a ConvNeXt backbone\'s stem is no output here)', value
            )
        return tuple(sorted({names[v] for v in value}))

    def stages(self, name: str, value) -> tuple[int, ...]:
        if value is None:
            return ()
        if not (isinstance(value, list) and len(value) == 4 and all(_is_int(v) and v > 0 for v in value)):
            self.fail(name, "a list of 4 whole numbers > 0, one per stage", value)
        return tuple(value)

    def label_names(self, name: str, value) -> tuple[str, ...] | None:
        """timm's `label_names`: a list of names, or an object of index -> name."""
        if value is None or value == [] or value == {}:
            return None
        if isinstance(value, dict):
            return self.label_map(name, value)
        if not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
            self.fail(
                name, "a list of class names (strings) in index order, or an object of class index -> name", value
            )
        return tuple(value)

    def label_map(self, name: str, value) -> tuple[str, ...]:
        """An object of class index -> name: keys the integers 0..N-1 (as JSON writes them, "0"),
        each once, values strings; the names in index order."""
        if not isinstance(value, dict):
            self.fail(name, 'an object of class index -> name ({"0": "cat", "1": "dog"})', value)
        names: dict[int, tuple[str, str]] = {}
        for key, label in value.items():
            if not re.fullmatch(r"[0-9]+", key):
                self.fail(f"{name} keys", "class indices 0, 1, 2, ...", key)
            if not isinstance(label, str):
                self.fail(f"{name}[{key!r}]", "a class name (a string)", label)
            digits = key.lstrip("0") or "0"
            index = int(digits) if len(digits) <= 18 else len(value)  # (past every class)
            if index in names:
                self.fail(f"{name} keys", f"each class index once ({names[index][0]!r} is class {index} too)", key)
            names[index] = (key, label)
        missing = next((i for i in range(len(names)) if i not in names), None)
        if missing is not None:
            keys = sorted(names)
            self.fail(
                f"{name} keys",
                f"the class indices 0..{len(names) - 1}, each once (no class {missing})",
                keys if len(keys) <= 8 else keys[:8] + ["..."],
            )
        return tuple(names[i][1] for i in range(len(names)))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> float | None:
    """`value` as a float if it is a finite number (not a bool, not NaN or Infinity), else None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer past float's range
        return None
    return number if math.isfinite(number) else None


def _default(value, default):
    return default if value is None else value


def _shown(value) -> str:
    """`value` as Python writes it (control characters escaped), cut to a line."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested past repr's depth, or an integer past str's length
        text = f"a {type(value).__name__}"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def default_preprocessing(input_size: int = 224, crop_pct: float = Preprocessing.crop_pct) -> dict:
    """ImageNet preprocessing as timm's ConvNeXt checkpoints (and transformers' image processor) are
    evaluated at `input_size`: a centre crop of `crop_pct` below 384 pixels, the whole image
    squashed at 384 and above; timm's defaults otherwise (`zoo.core.preprocessing.with_defaults`)."""
    cfg = {"input_size": [3, input_size, input_size], "crop_pct": crop_pct}
    if input_size >= 384:
        cfg.update(crop_pct=1.0, crop_mode="squash")
    return with_defaults(cfg)
