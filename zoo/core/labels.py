"""Class names for the classifier heads in the catalogue (ImageNet-1k, -12k and -22k), as timm's."""

from __future__ import annotations

import csv
import functools
import gzip
from importlib import resources
from pathlib import Path

from .errors import SourceError

# Head width -> synset list; the mapping timm infers a label set from (`infer_imagenet_subset`).
SYNSET_FILES = {
    1000: "imagenet_synsets.txt.gz",  # ImageNet-1k
    11821: "imagenet12k_synsets.txt.gz",  # timm's ImageNet-12k subset of fall11
    21841: "imagenet22k_synsets.txt.gz",  # ImageNet-22k, fall11 order
}
_LEMMA_FILE = "imagenet_synset_to_lemma.txt.gz"


def _read(name: str) -> str:
    data = resources.files("zoo.core").joinpath("label_data", name).read_bytes()
    return gzip.decompress(data).decode("utf-8")


@functools.cache
def _synsets(num_classes: int) -> tuple[str, ...] | None:
    if num_classes not in SYNSET_FILES:
        return None
    return tuple(_read(SYNSET_FILES[num_classes]).splitlines())


@functools.lru_cache(maxsize=1)
def _lemmas() -> dict[str, str]:
    # csv with a tab delimiter, as timm's ImageNetInfo reads the same file
    return dict(csv.reader(_read(_LEMMA_FILE).splitlines(), delimiter="\t"))


def synsets(num_classes: int) -> list[str] | None:
    """WordNet ids (`n01440764`) of a head's classes in index order; None without a label set."""
    ids = _synsets(num_classes)
    return None if ids is None else list(ids)


def descriptions(num_classes: int) -> list[str] | None:
    """Every WordNet lemma of each class (`tench, Tinca tinca`), as timm's `index_to_description`.

    None for heads without a label set (feature checkpoints, CLIP embedding heads).
    """
    ids = _synsets(num_classes)
    if ids is None:
        return None
    lemmas = _lemmas()
    return [lemmas[i] for i in ids]


def label_names(num_classes: int) -> list[str] | None:
    """A short name per class of a head, its first lemma (`tench`), in index order.

    A few ImageNet names repeat (`crane` the bird and the machine); `descriptions` and
    `synsets` tell them apart.

    Returns:
        The names, or None for a head without a label set: one that is not 1000, 11821 or
        21841 wide (feature checkpoints with 0 classes, CLIP embedding heads).
    """
    full = descriptions(num_classes)
    return None if full is None else [d.split(", ")[0] for d in full]


def read_label_file(path: str | Path) -> list[str]:
    """Class names from a text file: one per line in class index order (`--labels FILE`).

    Raises:
        SourceError: the file cannot be read, or as `parse_label_file`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SourceError(f"{path}: cannot read the class names: {e.strerror or e}") from None
    return parse_label_file(data, path)


def parse_label_file(data: bytes, path: str | Path) -> list[str]:
    """Class names from the bytes of a `--labels` file at `path`.

    UTF-8 (a byte-order mark is dropped), lines ending in LF or CRLF; each name is its line
    without the spaces around it, trailing empty lines are ignored. Names are kept as written
    (any script; the commands escape control characters when they print them).

    Raises:
        SourceError: not UTF-8 text, names nothing, or has an empty line between names.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(
            f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the class names as UTF-8, one per line"
        ) from None
    if "\0" in text:
        raise SourceError(f"{path}: not a text file (it holds NUL bytes); give one class name per line")
    names = [line.strip() for line in text.split("\n")]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise SourceError(f"{path}: no class names; one class name per line, in class index order, no blank lines")
    if not all(names):
        raise SourceError(
            f"{path}: line {names.index('') + 1} is empty; one class name per line, in class index "
            "order, no blank lines"
        )
    return names


__all__ = ["SYNSET_FILES", "descriptions", "label_names", "parse_label_file", "read_label_file", "synsets"]
