"""What the files beside a source checkpoint say: a transformers `config.json` and
`preprocessor_config.json`, or a timm Hub repo's `config.json` (layout, classes and their names,
preprocessing, norm epsilons). The tensors say the rest (`converters.inference`).

No torch and no tensorflow: this module also runs inside the PyTorch reference process.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from zoo.errors import SourceError

TRANSFORMERS_TYPES = {"convnext": False, "convnextv2": True}  # model_type -> ConvNeXt-V2
# PIL's resampling filters by number, as transformers' processors store them
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
        shape: (depths, dims) the config says, to check against the tensors.
        notes: where each fact came from, for the conversion's output.
    """

    layout: str | None = None
    num_classes: int | None = None
    labels: tuple[str, ...] | None = None
    preprocessing: dict | None = None
    norm_eps: float | None = None
    head_norm_eps: float | None = None
    architecture: str | None = None
    shape: tuple | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def read_metadata(weights: Path) -> SourceMetadata:
    """The config files in the folder of a weights file (none: an empty `SourceMetadata`).

    Raises:
        SourceError: a config file that cannot be read, or a transformers ConvNeXt this project
            cannot build (another patch size, activation or channel count).
    """
    folder = Path(weights).parent
    config = _json(folder / "config.json")
    if config is None:
        return SourceMetadata()
    if config.get("model_type") in TRANSFORMERS_TYPES:
        return _transformers(config, _json(folder / "preprocessor_config.json"))
    if "architecture" in config and str(config["architecture"]).startswith("convnext"):
        return _timm(config)
    return SourceMetadata()  # someone else's config.json (our own converted folders have one)


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} cannot be read: {e}") from None
    return data if isinstance(data, dict) else None


def _transformers(config: dict, processor: dict | None) -> SourceMetadata:
    for key, wanted in (("patch_size", 4), ("num_channels", 3), ("hidden_act", "gelu"), ("num_stages", 4)):
        if config.get(key, wanted) != wanted:
            raise SourceError(f"config.json: {key}={config[key]!r}; only {key}={wanted!r} ConvNeXts convert")
    id2label = config.get("id2label") or {}
    labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int)) if id2label else None
    if labels and all(re.fullmatch(rf"LABEL_{i}", name) for i, name in enumerate(labels)):
        labels = None  # transformers' placeholder names
    notes = ["layout, classes and final-norm epsilon from config.json (transformers)"]
    preprocessing = None
    if processor is not None:
        preprocessing = _processor(processor)
        notes.append("preprocessing from preprocessor_config.json (ConvNextImageProcessor)")
    return SourceMetadata(
        layout="transformers", num_classes=len(id2label) if id2label else config.get("num_labels"),
        labels=labels, preprocessing=preprocessing, head_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        shape=(tuple(config.get("depths") or ()), tuple(config.get("hidden_sizes") or ())), notes=tuple(notes))


def _processor(p: dict) -> dict:
    """ConvNextImageProcessor's settings as timm's preprocessing fields: below 384 it resizes the
    shortest edge to size/crop_pct and crops the centre; at 384 and above it resizes to a square."""
    size = p.get("size") or {}
    edge = int(size.get("shortest_edge") or size.get("height") or 224)
    crop_pct = float(p.get("crop_pct") or 224 / 256)
    resample = p.get("resample", 3)
    return {
        "input_size": [3, edge, edge],
        "crop_pct": crop_pct if edge < 384 else 1.0,
        "crop_mode": "center" if edge < 384 else "squash",
        "interpolation": _RESAMPLE.get(resample, str(resample)) if isinstance(resample, int) else str(resample),
        "mean": [float(v) for v in p.get("image_mean") or IMAGENET_MEAN],
        "std": [float(v) for v in p.get("image_std") or IMAGENET_STD],
        "crop_offsets": "floor",  # transformers' center_crop: (margin // 2)
    }


def _timm(config: dict) -> SourceMetadata:
    cfg = config.get("pretrained_cfg") or {}
    preprocessing = None
    if cfg.get("input_size"):
        preprocessing = {
            "input_size": list(cfg["input_size"]),
            "crop_pct": float(cfg.get("crop_pct", 0.875)),
            "crop_mode": cfg.get("crop_mode", "center"),
            "interpolation": cfg.get("interpolation", "bicubic"),
            "mean": list(cfg.get("mean", IMAGENET_MEAN)),
            "std": list(cfg.get("std", IMAGENET_STD)),
        }
    labels = config.get("label_names") or None
    if isinstance(labels, dict):  # index -> name, as timm allows
        labels = [labels[k] for k in sorted(labels, key=int)] if sorted(map(int, labels)) == list(range(len(labels))) \
            else None
    eps = (config.get("model_args") or {}).get("norm_eps")
    return SourceMetadata(
        layout="timm", num_classes=config.get("num_classes"), labels=tuple(map(str, labels)) if labels else None,
        preprocessing=preprocessing, architecture=str(config["architecture"]),
        norm_eps=float(eps) if eps is not None else None,
        notes=("classes and preprocessing from config.json (timm)",))


def default_preprocessing(input_size: int = 224) -> dict:
    """ImageNet preprocessing as timm's ConvNeXt defaults: bicubic, crop 0.875 (squash at 384+)."""
    return {"input_size": [3, input_size, input_size], "crop_pct": 0.875 if input_size < 384 else 1.0,
            "crop_mode": "center" if input_size < 384 else "squash", "interpolation": "bicubic",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

