"""Name resolution: canonical `arch.tag` names, FB aliases and bare architecture names."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import json
from dataclasses import dataclass
from importlib import resources

from .architectures import ARCHITECTURES, Architecture
from .errors import UnknownModelError


@dataclass(frozen=True)
class CatalogueEntry:
    """One pretrained checkpoint: where its weights live and how its inputs are prepared.

    A record of its own: it is the catalogue's data (`catalogue.json`, timm's `pretrained_cfg`
    fields), before anything is converted; `converters.reference_process.Network` is what a
    parity check builds from it, `FolderConfig` what a conversion records.

    Attributes:
        name: canonical name, timm's `arch.tag` (`convnext_tiny.fb_in1k`).
        architecture: timm architecture name.
        tag: timm pretrained tag.
        default: this tag is what timm loads for the bare architecture name.
        aliases: the official FB names (`convnext_tiny_1k`).
        hf_hub_id: source repo on the Hugging Face Hub (`timm/convnext_tiny.fb_in1k`); None for
            FB releases that only exist at `url`.
        hf_hub_filename: weights file in that repo.
        url: the original release URL (FB's for `fb_*` tags), if any.
        head_norm_affine: the checkpoint has head-norm weights (FCMAE pre-training has none).
        params: number of parameters of the converted model.
        num_classes: classifier width.
        input_size: timm's `(3, H, W)`.
        license: licence of the weights.
        top1: ImageNet-1k top-1 (%) published with the weights, if any.
    """

    name: str
    architecture: str
    tag: str
    default: bool
    aliases: tuple[str, ...]
    hf_hub_id: str | None
    hf_hub_filename: str | None
    url: str | None
    num_classes: int
    input_size: tuple[int, int, int]
    test_input_size: tuple[int, int, int] | None
    crop_pct: float
    test_crop_pct: float | None
    crop_mode: str
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    license: str | None
    top1: float | None
    origin_url: str | None
    head_norm_affine: bool = True
    params: int | None = None
    architecture_row: Architecture | None = dataclasses.field(default=None, repr=False)

    @property
    def arch(self) -> Architecture:
        """The architecture row this checkpoint is built on (`ARCHITECTURES[architecture]` unless one
        travels with the entry: `with_architecture`)."""
        return self.architecture_row or ARCHITECTURES[self.architecture]

    def with_architecture(self, row: Architecture) -> CatalogueEntry:
        """This checkpoint built on another architecture row (a smaller network of the same kind, for
        checks that need the whole pipeline fast), without touching the shared table."""
        return dataclasses.replace(self, architecture_row=row)

    def pretrained_cfg(self) -> dict:
        """Preprocessing and head facts in the shape of timm's `pretrained_cfg`."""
        return {
            "architecture": self.architecture,
            "tag": self.tag,
            "hf_hub_id": self.hf_hub_id,
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
            "test_input_size": list(self.test_input_size) if self.test_input_size else None,
            "crop_pct": self.crop_pct,
            "test_crop_pct": self.test_crop_pct,
            "crop_mode": self.crop_mode,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "license": self.license,
        }

    @classmethod
    def from_json(cls, row: dict) -> CatalogueEntry:
        """Build from a catalogue.json row."""
        values = dict(row)
        for key in ("aliases", "input_size", "test_input_size", "mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@functools.lru_cache(maxsize=1)
def catalogue() -> dict[str, CatalogueEntry]:
    """Every catalogued checkpoint by canonical name, in catalogue order."""
    text = resources.files("zoo.core").joinpath("catalogue.json").read_text()
    rows = json.loads(text)["checkpoints"]
    return {row["name"]: CatalogueEntry.from_json(row) for row in rows}


@functools.lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    """Every accepted spelling -> canonical name (aliases, bare architectures)."""
    names = {}
    for ckpt in catalogue().values():
        names[ckpt.name] = ckpt.name
        for alias in ckpt.aliases:
            names[alias] = ckpt.name
        if ckpt.default:
            names[ckpt.architecture] = ckpt.name
    return names


def resolve(name: str, *, or_folder: bool = False) -> CatalogueEntry:
    """The checkpoint a user means by `name`.

    Accepts the canonical `arch.tag`, an official FB alias (`convnext_tiny_1k`), or a bare
    architecture name, which means timm's default tag for it (as `timm.create_model(arch,
    pretrained=True)` does). `or_folder`: `name` could also have been a converted folder
    (and is not one); the error says so.

    Raises:
        UnknownModelError: with the closest known names.
    """
    names = _names()
    key = name.strip()
    if key in names:
        return catalogue()[names[key]]
    if key.startswith("timm/") and key[5:] in names and catalogue()[names[key[5:]]].hf_hub_id:
        return catalogue()[names[key[5:]]]
    close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    folder = f" (and there is no folder {name!r})" if or_folder else ""
    raise UnknownModelError(f"unknown model {name!r}; {hint}`zoo list` shows all{folder}")


def search(pattern: str | None = None) -> list[CatalogueEntry]:
    """Checkpoints whose name or alias matches a glob (or a substring when no glob chars)."""
    if not pattern:
        return list(catalogue().values())
    if not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    return [c for c in catalogue().values() if any(fnmatch.fnmatchcase(n, pattern) for n in (c.name, *c.aliases))]


def representatives(pattern: str | None = None) -> list[CatalogueEntry]:
    """One checkpoint per distinct (architecture, classes, head norm, input size), in order.

    Every catalogue entry converts exactly like its representative: the sweep and the tests
    cover the whole catalogue by covering these.
    """
    seen, out = set(), []
    for c in search(pattern):
        key = (c.architecture, c.num_classes, c.head_norm_affine, c.input_size[-1])
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out
