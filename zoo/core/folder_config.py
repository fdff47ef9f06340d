"""The typed schema of a converted folder's own record (`convnext_zoo.json`): the only code that
reads or writes its fields, and the names of the folder's files.

A converted folder is a Keras model folder first: `config.json`, `metadata.json` and
`model.weights.h5` are exactly what Keras' own directory save writes (so `keras.saving.load_model`
reads it), and the project's record of what the weights are and where they came from is
`convnext_zoo.json`, beside `parity.json` and `manifest.json`. A model's name becomes a folder's
name (in the store, and by default), so what a name may be is checked here too (`check_name`).

Ground layer: the store writes it, the converters fill it, loading, export and evaluation read it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .architectures import Architecture, check_features
from .errors import InvalidNameError

FORMAT = "convnext-zoo/2"
OLD_FORMATS = ("convnext-zoo/1",)  # the project's record in config.json: Keras could not load those folders
WEIGHTS = "model.weights.h5"  # Keras' weights file
KERAS_CONFIG = "config.json"  # Keras' serialized model
KERAS_METADATA = "metadata.json"  # Keras' save metadata (its version, the date)
RECORD = "convnext_zoo.json"  # this module's `FolderConfig`
PARITY = "parity.json"
MANIFEST = "manifest.json"
CONTENT_FILES = (WEIGHTS, KERAS_CONFIG, KERAS_METADATA, RECORD, PARITY)
SOURCE_KINDS = ("hub", "url", "file", "random")
MAX_NAME_BYTES = 200  # a staging sibling adds `.` + `.partial-<pid>-<8 random>`: within 255-byte file names
NAME_RULE = (
    "a name is one folder name: not empty, '.' or '..', not starting with '.', without '/', '\\' or "
    f"control characters, at most {MAX_NAME_BYTES} bytes (letters, digits, '.', '_' and '-' are safe)"
)


def check_name(name: str, what: str = "name") -> str:
    """`name`, if it can be the name of one folder; else refused before anything is done with it.

    Names become paths (`<store>/<name>`, the default name of a converted folder, `<org>/<name>`
    on the Hub): `.` would be the store itself, `..` its parent, `a/b` a folder inside another,
    and a leading `.` the store's own hidden entries (staging folders of writers).

    Args:
        name: the name to check.
        what: how the error calls it (`--name`, `the name taken from FILE`).

    Raises:
        InvalidNameError: naming the value (escaped) and what a name may be, in one line.
    """
    why = _name_fault(name)
    if why is not None:
        raise InvalidNameError(f"{what} {name!r} cannot name a folder ({why}): {NAME_RULE}")
    return name


_SPECIAL_NAMES = {"": "empty", ".": "the folder itself", "..": "the folder above"}


def _name_fault(name) -> str | None:
    """Why `name` cannot name a folder, or None."""
    if not isinstance(name, str):
        return f"a {type(name).__name__}, not text"
    if name in _SPECIAL_NAMES:
        return _SPECIAL_NAMES[name]
    if "/" in name or "\\" in name:
        return "a path separator"
    if not name.isprintable():  # control, format and line-separator characters (surrogates too)
        return "a control or non-printing character"
    if name.startswith("."):
        return "hidden"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    return None


@dataclass(frozen=True)
class SourceRecord:
    """Where a folder's source weights came from, and the sha256 of the bytes converted.

    Attributes:
        kind: `hub` (a Hub repo at a commit), `url` (an original release file), `file` (a local
            file) or `random` (seeded perturbed random weights, regenerated from `seed`).
        sha256: of the source file as converted; of a sharded checkpoint, the sha256 of its
            `files` listed as `sha256sum` prints them (`<sha256>  <name>` lines in name order).
        repo_id, revision, filename: the Hub repo, commit and file (`hub`); `filename` also
            names the file of the other kinds.
        url: the release URL (`url`; for `hub`, the original release's, if any).
        path: the local file (`file`).
        seed: the seed of `random` weights.
        note: a remark shown with the record (`random`: not pretrained).
        layout: the key layout of the source (`timm`, `fb`, `transformers`, `torchvision`).
        state_key: the entry of a training checkpoint the weights were read from
            (`state_dict_ema`, `state_dict`, ...); None when the file is the state dict.
        prefix: the wrapper prefix every key carried (`module.`), removed.
        files: a sharded checkpoint's files by name, each with its sha256: its index (`filename`)
            and every shard it lists. None (and absent from the record) for one file.
    """

    kind: str
    sha256: str
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    url: str | None = None
    path: str | None = None
    seed: int | None = None
    note: str | None = None
    layout: str | None = None
    state_key: str | None = None
    prefix: str | None = None
    files: dict[str, str] | None = None

    @property
    def use_ema(self) -> bool:
        """The weights read were a training checkpoint's EMA weights, or it had none."""
        return self.state_key not in ("state_dict", "model")

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"unknown source kind {self.kind!r}")
        if self.files is not None and not (
            isinstance(self.files, dict) and all(isinstance(v, str) and len(v) == 64 for v in self.files.values())
        ):
            raise ValueError("source files must map each file name to its sha256")

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k in _KEPT[self.kind]}

    @classmethod
    def from_json(cls, data: dict) -> SourceRecord:
        return cls(**data)


# Keys written even when None, as each kind has always recorded them.
_KEPT = {
    "hub": ("repo_id", "revision", "filename", "url"),
    "url": ("repo_id", "revision", "filename", "url"),
    "file": ("repo_id", "revision", "filename", "path"),
    "random": (),
}


@dataclass(frozen=True)
class FolderConfig:
    """A converted folder's record (`convnext_zoo.json`): what the weights are, for which network, from where.

    A record of its own: it is a file format, read back by later versions and by users' tools (one
    typed schema, checked on read), and it says where the weights came from (`SourceRecord`), which
    no other record does.

    Attributes:
        name: the catalogue name the folder was converted as (`convnext_tiny.fb_in1k`).
        architecture: the network's architecture row.
        num_classes: classifier width (0: no classifier).
        pretrained_cfg: preprocessing and head facts in the shape of timm's `pretrained_cfg`.
        source: where the source weights came from (`SourceRecord`).
        pretrained: False for seeded random weights (`--random-weights`).
        head_norm_affine: the head norm has weights (FCMAE pre-training has none).
        top1: ImageNet-1k top-1 (%) published with the weights, if any.
        converter: the converter's name and version.
        params: number of parameters of the Keras model.
        weights_sha256: the sha256 of `model.weights.h5` (set when the folder is written).
        labels: a name per class from the source (its config or `--labels`); None: the
            ImageNet names of a 1000/11821/21841-way head, or indices.
        features: a dense-prediction backbone's out_indices: the model returns these stages'
            outputs, each through its own norm (`norm{i}`), and has no head; empty for a classifier.
    """

    name: str
    architecture: Architecture
    num_classes: int
    pretrained_cfg: dict
    source: SourceRecord
    pretrained: bool = True
    head_norm_affine: bool = True
    top1: float | None = None
    converter: dict = field(default_factory=dict)
    params: int | None = None
    weights_sha256: str | None = None
    labels: tuple[str, ...] | None = None
    features: tuple[int, ...] = ()

    def __post_init__(self):
        check_features(self.features)

    @property
    def input_size(self) -> int:
        """The square input resolution the checkpoint was evaluated at."""
        return int(self.pretrained_cfg["input_size"][-1])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.pretrained_cfg["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.pretrained_cfg["std"])

    @property
    def license(self) -> str | None:
        return self.pretrained_cfg.get("license")

    @property
    def tag(self) -> str:
        return self.pretrained_cfg.get("tag") or ""

    @property
    def base_model(self) -> str | None:
        """The Hub repo the weights came from, when they came from one."""
        return self.pretrained_cfg.get("hf_hub_id") or (self.source.repo_id if self.source.kind == "hub" else None)

    def with_weights(self, sha256: str) -> FolderConfig:
        return dataclasses.replace(self, weights_sha256=sha256)

    def to_json(self) -> dict:
        """The record's content."""
        out = {
            "name": self.name,
            "pretrained": self.pretrained,
            "architecture": self.architecture.to_config(),
            "num_classes": self.num_classes,
            "head_norm_affine": self.head_norm_affine,
            "pretrained_cfg": self.pretrained_cfg,
            "top1": self.top1,
            "source": self.source.to_json(),
            "converter": self.converter,
            "params": self.params,
            "format": FORMAT,
        }
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.features:
            out["features"] = list(self.features)
        if self.weights_sha256 is not None:
            out["weights"] = {"file": WEIGHTS, "sha256": self.weights_sha256}
        return out

    @classmethod
    def from_json(cls, data: dict) -> FolderConfig:
        """Read the record's content.

        Raises:
            ValueError: a field is missing or malformed.
        """
        try:
            weights = data.get("weights")
            return cls(
                name=data["name"],
                architecture=Architecture.from_config(data["architecture"]),
                num_classes=int(data["num_classes"]),
                pretrained_cfg=dict(data["pretrained_cfg"]),
                source=SourceRecord.from_json(data["source"]),
                pretrained=bool(data["pretrained"]),
                head_norm_affine=bool(data["head_norm_affine"]),
                top1=data.get("top1"),
                converter=dict(data.get("converter") or {}),
                params=data.get("params"),
                weights_sha256=weights["sha256"] if isinstance(weights, dict) else None,
                labels=tuple(str(n) for n in data["labels"]) if data.get("labels") is not None else None,
                features=tuple(_stage(i) for i in data.get("features") or ()),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"missing or malformed field {e}") from None

    @property
    def is_backbone(self) -> bool:
        """A dense-prediction backbone: feature maps out, no classifier."""
        return bool(self.features)

    @classmethod
    def read(cls, folder: str | Path) -> FolderConfig:
        """The config of the folder at `folder`, read as it is (`checkpoints.converted.open_folder`
        checks the folder's files first; this does not).

        Raises:
            OSError: no readable config file.
            ValueError: not a converted folder's config.
        """
        return cls.from_json(json.loads((Path(folder) / RECORD).read_text()))


def _stage(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"'features' holds {value!r}, not a stage index")
    return value
