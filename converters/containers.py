"""What a checkpoint is on disk: its container (safetensors or a torch pickle), or a sharded checkpoint, an
index file naming the shard that holds each tensor, and the one sha256 that stands for all its files.

No torch and no tensorflow: this module also runs inside the PyTorch reference process.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from zoo.core.errors import SourceError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".pth.tar", ".ckpt")
INDEX_SUFFIX = ".index.json"  # a sharded checkpoint's index: `model.safetensors.index.json`
# a shard as transformers and huggingface_hub name them: `model-00001-of-00003.safetensors`
SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<number>\d+)-of-(?P<count>\d+)(?P<suffix>\.safetensors|\.bin)")


def is_index(path: Path) -> bool:
    """Whether `path` names a sharded checkpoint's index (`model.safetensors.index.json`,
    `pytorch_model.bin.index.json`: a checkpoint file's name and `.index.json`)."""
    return path.name.endswith(INDEX_SUFFIX) and path.name[: -len(INDEX_SUFFIX)].endswith(
        SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
    )


@dataclass(frozen=True)
class ShardIndex:
    """A sharded checkpoint's index (`model.safetensors.index.json`, as transformers' `save_pretrained`
    and huggingface_hub's `save_torch_state_dict` write it): which shard beside it holds each tensor.

    Attributes:
        path: the index file.
        weight_map: each tensor's key -> the file name of the shard that holds it.
        sha256: of the index file's bytes.
    """

    path: Path
    weight_map: dict[str, str]
    sha256: str

    @property
    def shards(self) -> list[str]:
        """The shards it lists, by file name, in name order (the order they are read in)."""
        return sorted(set(self.weight_map.values()))

    def shard(self, name: str) -> Path:
        return self.path.parent / name


def parse_index(path: Path, sha256: str | None = None) -> ShardIndex:
    """A sharded checkpoint's index file, checked: a JSON object whose `weight_map` names each
    tensor's shard, every shard a file name beside the index, of the container the index's name says.

    Args:
        path: the index file.
        sha256: its bytes' sha256, where already known (a Hub download).

    Raises:
        SourceError: unreadable or malformed, or a shard name with a folder part (`../x`) or of
            another container type; one line naming the index.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SourceError(f"{path}: cannot be read: {e.strerror or e}") from None
    try:
        index = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SourceError(
            f"{path.name} is not a sharded checkpoint's index: not JSON ({e}); save the checkpoint again"
        ) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(name, str) and name for name in weight_map.values())
    ):
        raise SourceError(
            f'{path.name} is not a sharded checkpoint\'s index: it needs a "weight_map" object naming each '
            "tensor's shard file; save the checkpoint again"
        )
    stored = SAFETENSORS_SUFFIXES if path.name[: -len(INDEX_SUFFIX)].endswith(SAFETENSORS_SUFFIXES) else PICKLE_SUFFIXES
    for name in sorted(set(weight_map.values())):
        if name != PurePosixPath(name).name or "\\" in name or name in (".", ".."):
            raise SourceError(
                f"{path.name} names shard {name!r}, which is not a file beside it (a path out of its folder "
                "or into another); a shard's name is a file name"
            )
        if not name.endswith(stored):
            raise SourceError(
                f"{path.name} names shard {name!r}, which is not a {'/'.join(stored)} file as the index's name says"
            )
    return ShardIndex(path, weight_map, sha256 or hashlib.sha256(data).hexdigest())


def read_index(path: Path) -> ShardIndex:
    """`parse_index`, every shard it lists present beside it.

    Raises:
        SourceError: as `parse_index`; a shard that is not there, named.
    """
    index = parse_index(path)
    for name in index.shards:
        if not index.shard(name).is_file():
            raise SourceError(
                f"{path.name} lists shard {name}, which is not in {path.parent}; put every shard it lists beside it"
            )
    return index


def files_manifest(files: dict[str, str]) -> bytes:
    """The lines `<sha256>  <name>` (as `sha256sum` prints them), one per file, in name order."""
    return "".join(f"{sha}  {name}\n" for name, sha in sorted(files.items())).encode()


def files_sha256(files: dict[str, str]) -> str:
    """The sha256 of a sharded checkpoint: of its files' `files_manifest`, so that a change to any
    of its files, or to which files it has, changes it."""
    return hashlib.sha256(files_manifest(files)).hexdigest()
