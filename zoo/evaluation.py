"""Accuracy on a labelled image set with a checkpoint's official preprocessing (`zoo eval`)."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .core.errors import DatasetError, ZooError
from .core.folder_config import FolderConfig
from .core.reports import topk_accuracy
from .core.runtime import usable_cpus
from .core.text import printable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


@dataclass
class Sample:
    path: Path
    label: int


@dataclass
class EvalReport:
    """Top-1/top-5 of the Keras model, and of timm on the same files when compared."""

    model: str
    data: str
    labels: str
    num_images: int
    top1: float
    top5: float
    seconds: float
    torch: dict | None = None
    dtype: str = "float32"
    model_seconds: float | None = None  # of `seconds`, the time inside the model
    devices: int = 1

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds else float("inf")

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        precision = "" if self.dtype == "float32" else f", in {self.dtype}"
        precision += f", on {self.devices} devices" if self.devices > 1 else ""
        speed = f"{self.images_per_second:.1f} images/s"
        if self.model_seconds:
            speed += f"; the model alone {self.num_images / self.model_seconds:.1f}"
        # names and paths escaped: one line each, nothing a terminal acts on (`to_json` keeps them exact)
        lines = [
            f"{printable(self.model)} on {printable(self.data)} ({self.num_images} images, labels: "
            f"{printable(self.labels)}{precision}; {speed})",
            f"{'':<8} {'top-1':>8} {'top-5':>8}",
            f"{'keras':<8} {self.top1:>8.2%} {self.top5:>8.2%}",
        ]
        if self.torch:
            t = self.torch
            lines += [
                f"{'timm':<8} {t['top1']:>8.2%} {t['top5']:>8.2%}",
                f"top-1 prediction agreement {t['agreement']:.2%}, logits max abs difference {t['max_abs']:.2e}",
            ]
        return "\n".join(lines)


def samples(
    data: str | Path,
    num_classes: int,
    *,
    labels_file: str | Path | None = None,
    limit: int | None = None,
    names: Sequence[str] | None = None,
) -> tuple[list[Sample], str]:
    """The labelled images of `data` and how their labels were read.

    A label names a class by its WordNet id (ImageNet's `n01440764`, for the heads whose label
    set the project ships), by its index, or by the model's own label name (`names`, as
    `zoo predict` prints them). Without `labels_file`, `data` is an ImageFolder: one sub-folder
    per class, every one named the same one of those ways (tried in that order). Folders that
    are not are refused, never numbered in sorted order: that pairs folders with classes by
    chance. A `labels_file` has one `relative/path label` per line (space, tab or comma
    separated), each label read the same way.

    `limit` keeps a fixed random sample (seed 0) of that many images.

    Args:
        names: the model's class names in index order (a converted folder's own `labels`);
            None: the ImageNet names of a 1000-, 11821- or 21841-way head, else none.

    Raises:
        DatasetError: no such folder, no images, or labels that name no class of the head.
    """
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such image folder")
    classes = _Classes.of(num_classes, names)
    if labels_file is not None:
        found, how = _from_labels_file(root, Path(labels_file).expanduser(), classes.label_of), f"file {labels_file}"
    else:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DatasetError(
                f"{root}: no class sub-folders (ImageFolder layout: {root}/<class>/<image>), or give --labels FILE"
            )
        how, numbering = classes.of_folders(root, folders)
        found = [
            Sample(p, numbering[c])
            for c in folders
            for p in sorted((root / c).rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ]
    if not found:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    if limit is not None and limit < len(found):
        found = sorted(random.Random(0).sample(found, limit), key=lambda s: str(s.path))
    return found, how


_SHOWN = 4  # names an error quotes before `...`


@dataclass(frozen=True)
class _Classes:
    """How a label may name a class of a `num_classes`-way head: its WordNet id, its index, or its
    label name (a name two classes share names neither)."""

    num_classes: int
    synsets: dict[str, int]
    names: dict[str, int]
    shared: dict[str, list[int]]  # label names of several classes
    first_names: tuple[str, ...]  # for the errors

    @classmethod
    def of(cls, num_classes: int, names: Sequence[str] | None) -> _Classes:
        from .core.labels import label_names, synsets

        names = list(names) if names is not None else label_names(num_classes) or []
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            by_name.setdefault(name, []).append(i)
        return cls(
            num_classes,
            {s: i for i, s in enumerate(synsets(num_classes) or ())},
            {name: found[0] for name, found in by_name.items() if len(found) == 1},
            {name: found for name, found in by_name.items() if len(found) > 1},
            tuple(names[: _SHOWN + 1]),
        )

    def label_of(self, value: str, where: str) -> int:
        """The class `value` names: as a WordNet id, else as an index, else as a label name.

        Raises:
            DatasetError: it names no class (saying what a label may be), or an index out of range.
        """
        if value in self.synsets:
            return self.synsets[value]
        index = _index(value)
        if index is not None and index < self.num_classes:
            return index
        if value in self.names:
            return self.names[value]
        if index is not None:
            raise DatasetError(f"{where}: class index {index} outside this head's 0..{self.num_classes - 1}")
        if value in self.shared:
            raise DatasetError(
                f"{where}: label {value!r} is the label name of several classes{self._shared(value)}; "
                "give its class index instead"
            )
        raise DatasetError(f"{where}: label {value!r} names no class; {self.ways('a label')}")

    def of_folders(self, root: Path, folders: list[str]) -> tuple[str, dict[str, int]]:
        """How the class `folders` of `root` name their classes (all one way), and the class of each.

        Raises:
            DatasetError: folders that name no class (each named), an index out of range, or
                folders that name their classes in different ways.
        """
        if all(c in self.synsets for c in folders):
            return "folder names as WordNet ids", {c: self.synsets[c] for c in folders}
        indices = all(_index(c) is not None for c in folders)
        if indices and all(_index(c) < self.num_classes for c in folders):
            return "folder names as class indices", {c: _index(c) for c in folders}
        if all(c in self.names for c in folders):
            return "folder names as the model's label names", {c: self.names[c] for c in folders}
        if indices:  # an index past the head
            return "folder names as class indices", {c: self.label_of(c, str(root / c)) for c in folders}
        unknown = [c for c in folders if not self._names_a_class(c)]
        if not unknown:
            raise DatasetError(
                f"{root}: the class folders name their classes in different ways; "
                f"{self.ways('every class folder')}, all one way, or give --labels FILE"
            )
        shown = ", ".join(repr(c) + self._shared(c) for c in unknown[:_SHOWN])
        more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
        raise DatasetError(
            f"{root}: {len(unknown)} of {len(folders)} class folders name no class of this "
            f"{self.num_classes}-class head: {shown}{more}; {self.ways('each class folder')}, or give --labels FILE"
        )

    def _names_a_class(self, value: str) -> bool:
        index = _index(value)
        return value in self.synsets or value in self.names or (index is not None and index < self.num_classes)

    def _shared(self, value: str) -> str:
        found = self.shared.get(value)
        return f" (shared by classes {', '.join(map(str, found))})" if found else ""

    def ways(self, what: str) -> str:
        """How `what` may name a class: the advice of an error."""
        ways = []
        if self.first_names:
            more = ", ..." if len(self.first_names) > _SHOWN else ""
            ways.append(f"the model's label names ({', '.join(map(repr, self.first_names[:_SHOWN]))}{more})")
        ways.append(f"class index 0..{self.num_classes - 1}")
        if self.synsets:
            ways.append(f"WordNet id ({next(iter(self.synsets))}, ...)")
        return f"name {what} by " + " or ".join([", ".join(ways[:-1]), ways[-1]] if len(ways) > 1 else ways)


def _index(value: str) -> int | None:
    """`value` as a class index: ASCII digits (in range or not), else None."""
    return int(value) if value.isascii() and value.isdigit() else None


def _from_labels_file(root: Path, path: Path, label_of) -> list[Sample]:
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except OSError as e:
        raise DatasetError(f"cannot read the labels file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"the labels file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
            "UTF-8, one `relative/path label` per line"
        ) from None
    found = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.replace(",", " ").replace("\t", " ").split()
        if len(parts) != 2:
            raise DatasetError(f"{path}:{number}: expected `relative/path label`, got {line!r}")
        image = root / parts[0]
        if not image.is_file():
            raise DatasetError(f"{path}:{number}: no image {image}")
        found.append(Sample(image, label_of(parts[1], f"{path}:{number}")))
    return found


def evaluate(
    model_name: str | Path,
    data: str | Path,
    *,
    labels_file: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    compare_torch: bool = False,
    progress: bool = True,
    dtype: str = "float32",
    workers: int | None = None,
    devices: int | None = None,
) -> EvalReport:
    """Top-1/top-5 of a converted checkpoint on a labelled image folder.

    Labels name classes as `samples` reads them, the model's own label names included. Images
    are prepared with the checkpoint's own eval transform (`zoo.core.preprocessing`, equal to
    timm's), decoded and prepared on `workers` threads (default: one per CPU this process may
    use; 0: in this thread, before each batch runs) up to two batches ahead of the model, so
    that on a machine with many cores the model, not the input, sets the pace; the numbers are
    those of `zoo.preprocess` either way. With `compare_torch`, timm runs the checkpoint's
    source weights (a separate process; needs the `convert` extra) with timm's own transform on
    the same files, and the report adds its accuracy, the rate at which both predict the same
    class, and the largest logit difference. `dtype` is the Keras model's precision (see
    `zoo.load`). The model runs its serving path (`zoo.core.serving`); with `devices` > 1, the Keras
    model runs on that many devices through `tf.distribute.MirroredStrategy`, each batch split
    between them (`distributed_runner`).

    Raises:
        DatasetError, ImageError: unusable data (`zoo.core.errors`).
        ZooError: the model cannot be loaded, or the PyTorch side cannot run.
    """
    from tqdm.auto import tqdm

    from .core.preprocessing import Preprocessing
    from .core.serving import runner
    from .loading import from_folder, locate

    folder = locate(model_name)
    config = folder.config
    num_classes = config.num_classes
    if not num_classes:
        raise DatasetError(
            f"{config.name} is a feature checkpoint without a classifier: "
            "evaluate a checkpoint with a classification head"
        )
    prepare = Preprocessing.from_pretrained_cfg(config.pretrained_cfg)
    prepare.check_images(config.name, f"zoo.load({str(model_name)!r})")  # before the data is read
    found, how = samples(data, num_classes, labels_file=labels_file, limit=limit, names=config.labels)
    if devices and devices > 1:
        run = distributed_runner(lambda: from_folder(folder, dtype=dtype), devices)
    else:
        run = runner(from_folder(folder, dtype=dtype))
    start, in_model = time.perf_counter(), 0.0
    chunks = []
    batches = prepared_batches(prepare, [s.path for s in found], batch_size, default_workers(workers))
    for batch in tqdm(
        batches, total=-(-len(found) // batch_size), desc="eval", unit="batch", disable=not progress or None
    ):
        began = time.perf_counter()
        chunks.append(np.asarray(run(batch), dtype=np.float32))
        in_model += time.perf_counter() - began
    logits = np.concatenate(chunks)
    labels = np.array([s.label for s in found])
    report = EvalReport(
        model=config.name,
        data=str(data),
        labels=how,
        num_images=len(found),
        top1=topk_accuracy(logits, labels, 1),
        top5=topk_accuracy(logits, labels, 5),
        seconds=round(time.perf_counter() - start, 2),
        dtype=dtype,
        model_seconds=round(in_model, 2),
        devices=devices or 1,
    )
    if compare_torch:
        theirs = _torch_logits(config, [s.path for s in found])
        report.torch = {
            "top1": topk_accuracy(theirs, labels, 1),
            "top5": topk_accuracy(theirs, labels, 5),
            "agreement": float((theirs.argmax(-1) == logits.argmax(-1)).mean()),
            "max_abs": float(np.abs(theirs.astype(np.float64) - logits).max()),
        }
    return report


def eval_devices(count: int) -> list[str]:
    """The names of `count` devices for a MirroredStrategy: GPUs where TensorFlow sees any, else
    CPU devices. A CPU-only process whose TensorFlow runtime has not started yet gets its CPU
    split into `count` logical devices (how the distributed path is tested without a GPU).

    Raises:
        ZooError: fewer devices than `count`.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        cpus = tf.config.list_physical_devices("CPU")
        try:
            tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:
            pass  # the runtime has started: its logical devices are fixed
    kind = "GPU" if gpus else "CPU"
    found = [d.name for d in tf.config.list_logical_devices(kind)]
    if len(found) < count:
        raise ZooError(f"--devices {count}: TensorFlow sees {len(found)} {kind} device(s) in this process")
    return found[:count]


def distributed_runner(build: Callable[[], object], devices: int) -> Callable[[np.ndarray], np.ndarray]:
    """The Keras model `build()` makes, built in a MirroredStrategy over `devices` devices; each call
    runs one batch split across them (Keras' `predict` distributes it) and returns its outputs in order."""
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(eval_devices(devices))
    with strategy.scope():
        model = build()
    return lambda batch: model.predict(batch, batch_size=len(batch), verbose=0)


def default_workers(workers: int | None) -> int:
    """`workers`, or one per CPU this process may use."""
    if workers is not None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        return workers
    return usable_cpus()


AHEAD = 2  # batches prepared ahead of the one the model runs


def prepared_batches(
    prepare: Callable[[list], np.ndarray], paths: list[Path], batch_size: int, workers: int
) -> Iterator[np.ndarray]:
    """`prepare(batch)` for each batch of `paths`, in order.

    With `workers`, each image is prepared on its own (`prepare([path])`: the transform is per
    image, so the batch is the same array) on a pool of that many threads, up to `AHEAD` batches
    ahead of the one being consumed; PIL decodes and resizes without holding the GIL. An error
    preparing an image is raised when its batch is reached, and the work queued behind it is
    dropped.
    """
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    if not workers:
        for batch in batches:
            yield prepare(batch)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="zoo-eval-input")
    try:
        pending = deque()
        for batch in batches:
            pending.append([pool.submit(prepare, [path]) for path in batch])
            if len(pending) > AHEAD:
                yield np.concatenate([f.result() for f in pending.popleft()])
        while pending:
            yield np.concatenate([f.result() for f in pending.popleft()])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _torch_logits(config: FolderConfig, files: list[Path]) -> np.ndarray:
    from converters.recorded import pytorch_classify

    return pytorch_classify(config, files)


__all__ = ["EvalReport", "Sample", "evaluate", "samples"]
