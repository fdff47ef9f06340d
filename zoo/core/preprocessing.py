"""The step before the network: images -> the normalised NHWC batch a checkpoint expects.

`Preprocessing` reproduces timm's evaluation transform (PIL resize, torchvision's centre crop,
`ToTensor`, `Normalize`) exactly, with PIL and numpy only: no torch, no TensorFlow. The Keras
layer `Preprocess` does the same inside a graph, closely but not bit for bit.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .catalogue import CatalogueEntry, resolve
from .errors import ImageError, PreprocessingError
from .folder_config import RECORD, FolderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The preprocessing fields of timm's `pretrained_cfg` besides the input size; one left out takes
# `Preprocessing`'s default, as timm's `resolve_data_config` does
SETTINGS = ("crop_pct", "crop_mode", "interpolation", "mean", "std")
CROP_MODES = ("center", "squash")
MAX_RESIZE = 4096  # a side of an image resized before the crop (input size / crop_pct): bounded memory
CROP_OFFSETS = ("round", "floor")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
INTERPOLATIONS = tuple(_RESAMPLE)

# What the Keras layer may differ from timm's transform on natural-looking images, in normalised
# units (see `Preprocess`): measured max 0.069 and mean 0.0037, bounded with a margin.
LAYER_MAX_ABS = 0.1
LAYER_MEAN_ABS = 0.006


@dataclass(frozen=True)
class Preprocessing:
    """How a checkpoint's inputs are prepared: timm's eval transform for its `pretrained_cfg`.

    Calling it maps images to the normalised float32 NHWC batch the network was evaluated on,
    equal to `timm.data.create_transform(**resolve_data_config(pretrained_cfg=...))` (the
    same PIL resampling, the same integer sizes and crop offsets, the same float32 arithmetic).

    Attributes:
        input_size: network input `(height, width)`.
        crop_pct: the crop covers this fraction of the resized image: images are first
            resized to `floor(input_size / crop_pct)`.
        crop_mode: "center" resizes the shorter side (keeping the aspect ratio), "squash"
            resizes both sides (ignoring it); both then crop the centre.
        interpolation: PIL resampling, "bicubic" or "bilinear".
        mean, std: per-channel normalisation of pixels scaled to [0, 1], one value per input
            channel of the network: 3 for RGB images; 1 for grey ones (images decoded as PIL's
            "L", as timm's loader does for a 1-channel model); any other count is a network
            whose inputs are arrays, not images (`check_images`).
        crop_offsets: where an odd margin goes: "round" (torchvision's and timm's CenterCrop,
            `round(margin / 2)`, half to even) or "floor" (transformers' image processors,
            `margin // 2`).
    """

    input_size: tuple[int, int]
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_offsets: str = "round"

    def __post_init__(self):
        size = tuple(int(s) for s in self.input_size)
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        # a converted folder's record is read here too: a value no transform can apply is one line
        if len(size) != 2 or min(size) < 1:
            raise PreprocessingError(f"input_size must be (height, width), got {self.input_size!r}")
        if not (math.isfinite(self.crop_pct) and self.crop_pct > 0):
            raise PreprocessingError(f"crop_pct must be a finite number > 0, got {self.crop_pct}")
        if max(size) / self.crop_pct > MAX_RESIZE:
            raise PreprocessingError(
                f"input size {max(size)} with crop_pct {self.crop_pct:g} resizes images to "
                f"{max(size) / self.crop_pct:.0f} pixels before the crop (at most {MAX_RESIZE})"
            )
        if self.crop_mode not in CROP_MODES:
            raise PreprocessingError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.interpolation not in _RESAMPLE:
            raise PreprocessingError(f"interpolation must be one of {tuple(_RESAMPLE)}, got {self.interpolation!r}")
        if self.crop_offsets not in CROP_OFFSETS:
            raise PreprocessingError(f"crop_offsets must be one of {CROP_OFFSETS}, got {self.crop_offsets!r}")
        if (
            not self.mean
            or len(self.mean) != len(self.std)
            or not all(map(math.isfinite, self.mean + self.std))
            or min(self.std) <= 0
        ):
            raise PreprocessingError(
                f"mean and std need one finite number per input channel each (as many means as stds) "
                f"and std > 0, got {self.mean}, {self.std}"
            )

    @classmethod
    def from_checkpoint(cls, ckpt: CatalogueEntry) -> Preprocessing:
        """The eval preprocessing of a catalogue entry."""
        return cls(ckpt.input_size[-2:], ckpt.crop_pct, ckpt.crop_mode, ckpt.interpolation, ckpt.mean, ckpt.std)

    @classmethod
    def from_pretrained_cfg(cls, cfg: dict) -> Preprocessing:
        """From a timm-style `pretrained_cfg` (a converted folder's `config["pretrained_cfg"]`).

        Missing (or None) values take this class's defaults, timm's (`resolve_data_config`):
        crop 0.875, centre crop, bicubic, ImageNet mean and std.
        """
        given = {k: cfg[k] for k in (*SETTINGS, "crop_offsets") if cfg.get(k) is not None}
        return cls(tuple(cfg["input_size"][-2:]), **given)

    def to_config(self) -> dict:
        """Plain values (JSON and Keras layer config)."""
        config = {
            "input_size": list(self.input_size),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.crop_offsets != "round":  # (saved layers of earlier versions have no such key)
            config["crop_offsets"] = self.crop_offsets
        return config

    @property
    def channels(self) -> int:
        """The network's input channels: one mean and one std each."""
        return len(self.mean)

    @property
    def mode(self) -> str | None:
        """The PIL mode images are decoded in: "RGB", "L" (grey) for 1 channel as timm's loader
        does, None where images cannot feed the network (other channel counts)."""
        return {3: "RGB", 1: "L"}.get(self.channels)

    def check_images(self, model: str = "the model", loaded_as: str = "zoo.load(FOLDER)") -> None:
        """Refuse, in one line, to prepare images for a network they cannot feed.

        Args:
            model: how the message names the model; loaded_as: how its hint loads it.

        Raises:
            ImageError: the network takes neither 3 (RGB) nor 1 (grey) channels.
        """
        if self.mode is None:
            n = self.channels
            raise ImageError(
                f"{model} takes {n} input channels: images (RGB or grey) cannot feed it; from Python, call "
                f"the model on normalised float32 arrays of shape (batch, height, width, {n}): {loaded_as}(x)"
            )

    @property
    def scale_size(self) -> tuple[int, int]:
        """The size the crop is taken from: `floor(input_size / crop_pct)` per side (timm)."""
        return tuple(math.floor(s / self.crop_pct) for s in self.input_size)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """`(height, width)` an image of this size is resized to before the crop."""
        scale_h, scale_w = self.scale_size
        if self.crop_mode == "squash":
            return scale_h, scale_w
        if scale_h == scale_w:
            # torchvision's Resize(int): the shorter side becomes `scale`, the longer one is truncated
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(scale_h * long / short)
            return (new_long, scale_h) if width <= height else (scale_h, new_long)
        # timm's ResizeKeepRatio for non-square inputs (Python's round: half to even)
        ratio = min(height / scale_h, width / scale_w)
        return round(height / ratio), round(width / ratio)

    def transform(self, picture: Image.Image) -> np.ndarray:
        """One PIL image in this preprocessing's `mode` -> normalised float32 HWC."""
        width, height = picture.size
        size = self.resized_size(height, width)
        if size != (height, width):  # torchvision returns the image untouched then
            picture = picture.resize((size[1], size[0]), _RESAMPLE[self.interpolation])
        pixels = np.asarray(picture)
        pixels = center_crop(pixels[..., None] if pixels.ndim == 2 else pixels, self.input_size, self.crop_offsets)
        # ToTensor then Normalize, in float32 and in this order: equal to torchvision's bits
        scaled = pixels.astype(np.float32) / np.float32(255)
        return (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def __call__(self, images) -> np.ndarray:
        """Images -> normalised float32 NHWC batch.

        Args:
            images: one or a list of file paths, PIL images or uint8 HWC arrays (any sizes),
                or a uint8 NHWC batch.

        Raises:
            ImageError: a file is missing or not an image, or an array has the wrong shape or
                dtype; or the network takes neither RGB nor grey images (`check_images`).
        """
        self.check_images()
        return np.stack([self.transform(picture) for picture in pictures(images, self.mode)])


def center_crop(pixels: np.ndarray, size: tuple[int, int], offsets: str = "round") -> np.ndarray:
    """torchvision's CenterCrop on an HWC array: zero padding if smaller, then its offsets
    (`offsets="floor"`: transformers' `center_crop`, an odd margin's extra pixel at the end)."""
    height, width = pixels.shape[:2]
    crop_h, crop_w = size
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = pixels.shape[:2]
    if offsets == "floor":
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    else:
        top = int(round((height - crop_h) / 2.0))  # Python's round: half to even, as torchvision
        left = int(round((width - crop_w) / 2.0))
    return pixels[top : top + crop_h, left : left + crop_w]


def pictures(images, mode: str = "RGB") -> list[Image.Image]:
    """Accepted image inputs -> PIL images in `mode` ("RGB", or "L" for grey; files converted as
    timm's loader does).

    Raises:
        ImageError: see `Preprocessing.__call__`.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        _check_dtype(images, "the batch")
        items = list(images)
    elif isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        items = [images]
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise ImageError(
            f"cannot read images from a {type(images).__name__}; pass file paths, PIL images "
            f"or uint8 HWC arrays (one, a list, or an NHWC batch)"
        )
    if not items:
        raise ImageError("no images given")
    return [_picture(item, index, mode) for index, item in enumerate(items)]


def _picture(item, index: int, mode: str) -> Image.Image:
    if isinstance(item, (str, os.PathLike)):
        return _read(Path(item), mode)
    if isinstance(item, Image.Image):
        try:
            return item.convert(mode)
        except (ValueError, OSError) as e:
            raise ImageError(f"image {index}: PIL cannot convert mode {item.mode!r} to {mode} ({e})") from None
    if isinstance(item, np.ndarray):
        return _from_array(item, f"image {index}", mode)
    raise ImageError(
        f"image {index}: cannot read a {type(item).__name__}; pass a file path, a PIL image or a uint8 HWC array"
    )


def _read(path: Path, mode: str) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path} is a folder; pass image files")
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # as timm's loader; also decodes now, inside the `try`
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read (PNG, JPEG, ...)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode the image ({e}); the file may be truncated or damaged") from None


def _check_dtype(array: np.ndarray, what: str) -> None:
    if array.dtype != np.uint8:
        raise ImageError(
            f"{what} has dtype {array.dtype}; pass uint8 pixels 0..255 "
            f"(e.g. `np.clip(x * 255, 0, 255).round().astype(np.uint8)` for floats in [0, 1])"
        )


def _from_array(array: np.ndarray, what: str, mode: str) -> Image.Image:
    _check_dtype(array, what)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        given = "L"
    elif array.ndim == 3 and array.shape[-1] in (3, 4):
        given = "RGB" if array.shape[-1] == 3 else "RGBA"
    else:
        hint = " (channels first? use `x.transpose(1, 2, 0)`)" if array.ndim == 3 and array.shape[0] in (1, 3) else ""
        raise ImageError(
            f"{what} has shape {array.shape}; expected (height, width, 3) RGB, (height, width) "
            f"grey, or an NHWC batch{hint}"
        )
    if array.size == 0:
        raise ImageError(f"{what} is empty (shape {array.shape})")
    return Image.fromarray(np.ascontiguousarray(array), given).convert(mode)


def with_defaults(cfg: dict) -> dict:
    """`cfg` (timm's preprocessing fields) with each of `SETTINGS` it leaves out (or gives as None)
    as timm's `resolve_data_config` takes it: `Preprocessing`'s defaults, mean and std as lists."""

    def default(name: str):
        value = getattr(Preprocessing, name)
        return list(value) if isinstance(value, tuple) else value

    return {**cfg, **{name: default(name) for name in SETTINGS if cfg.get(name) is None}}


def as_preprocessing(spec) -> Preprocessing:
    """A `Preprocessing` from itself, a `CatalogueEntry`, a `pretrained_cfg` dict, a name or alias,
    a converted folder (its record) or its `FolderConfig`.

    Raises:
        UnknownModelError: a name that is not in the catalogue (and no such folder).
    """
    if isinstance(spec, Preprocessing):
        return spec
    if isinstance(spec, CatalogueEntry):
        return Preprocessing.from_checkpoint(spec)
    if isinstance(spec, dict):
        return Preprocessing.from_pretrained_cfg(spec)
    if isinstance(spec, FolderConfig):
        return Preprocessing.from_pretrained_cfg(spec.pretrained_cfg)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / RECORD).is_file():
        return Preprocessing.from_pretrained_cfg(FolderConfig.read(path).pretrained_cfg)
    return Preprocessing.from_checkpoint(resolve(str(spec)))


def preprocess(images, name) -> np.ndarray:
    """Images -> the normalised float32 NHWC batch checkpoint `name` expects (timm's eval transform).

    Args:
        images: one or a list of file paths, PIL images or uint8 HWC arrays (any sizes), or a
            uint8 NHWC batch.
        name: a checkpoint name or alias, a `CatalogueEntry`, a `Preprocessing`, or a converted
            folder.

    Returns:
        float32 array `(N, H, W, C)` equal to timm's `create_transform` output (NCHW there): C = 3
        (RGB), or 1 for a grey model (images decoded as grey, as timm's loader does then).

    Raises:
        ImageError: unreadable file, or an array of the wrong shape or dtype; or a model of
            another channel count (its inputs are arrays: call the model on them).
        UnknownModelError: `name` is not a catalogue name.
    """
    return as_preprocessing(name)(images)


def with_preprocessing(model, preprocessing):
    """`model` behind a `Preprocess` layer: a `keras.Model` that takes raw images.

    The new model takes a batch of RGB images NHWC (grey ones, NHW1, for a 1-channel model),
    uint8 or float 0..255, of any size (one size per batch), and returns `model`'s output.
    Saving it works as for any model; loading it needs the layer class registered: `import zoo`
    (before or after Keras) does it. A model of another channel count is refused (its inputs are
    arrays, not images).

    Args:
        model: a Keras model taking normalised NHWC images.
        preprocessing: anything `preprocess` accepts as `name` (a `Preprocessing`, checkpoint
            name, `CatalogueEntry`, `pretrained_cfg` dict or converted folder).
    """
    import keras

    prepared = as_preprocessing(preprocessing)
    prepared.check_images()  # before Keras builds anything
    layer = _layer_class()(**prepared.to_config(), name="preprocess")
    images = keras.Input((None, None, prepared.channels), dtype="float32", name="images")
    return keras.Model(images, model(layer(images)), name=f"{model.name}_with_preprocessing")


@functools.cache
def _layer_class():
    # Defined on first use: the class needs Keras (so TensorFlow), and `zoo.preprocess` must not
    # import it (TensorFlow imported before torch and timm breaks timm in the same process).
    import keras
    import tensorflow as tf

    from .model import PACKAGE

    @keras.saving.register_keras_serializable(package=PACKAGE)
    class Preprocess(keras.layers.Layer):
        """timm's eval transform inside the graph: resize, centre crop, scale, normalise.

        Takes a batch of RGB images NHWC (grey NHW1 with one mean and std), uint8 or float
        0..255, any height and width (one size per batch), and returns the normalised float32
        crop. Sizes and crop offsets are
        exactly timm's; the resampling is `tf.image.resize` (antialiased, Keys cubic a = -0.5
        like PIL's) with the result rounded and clipped to 0..255 as PIL's uint8 output is.
        PIL resamples in two passes with uint8 rounding in between and fixed-point weights,
        so pixels differ by a level or a few. Measured against timm's transform on generated
        natural-looking images (50 images, 60 to 1000 pixels a side, odd aspect ratios; crops
        0.875, 0.95, 1.0 and squash 384): max abs 0.069 and mean abs 0.0037 per image on the
        normalised tensor, i.e. 1 to 4 pixel levels (bounds `LAYER_MAX_ABS` = 0.1 and
        `LAYER_MEAN_ABS` = 0.006); class probabilities of a model fed both ways differed by
        at most 0.01. Content made to alias (uniform noise, 4-pixel checkerboards, tiny
        images enlarged) differs more: up to 0.34 max and 0.044 mean. For outputs equal to
        timm's, use `Preprocessing` (numpy, outside the graph).
        Needs the TensorFlow backend.

        Args:
            input_size, crop_pct, crop_mode, interpolation, mean, std, crop_offsets: as `Preprocessing`.
        """

        def __init__(
            self,
            input_size,
            crop_pct=Preprocessing.crop_pct,
            crop_mode=Preprocessing.crop_mode,
            interpolation=Preprocessing.interpolation,
            mean=Preprocessing.mean,
            std=Preprocessing.std,
            crop_offsets=Preprocessing.crop_offsets,
            **kwargs,
        ):
            kwargs.setdefault("dtype", "float32")  # sizes and pixel levels need float32
            super().__init__(**kwargs)
            self.preprocessing = Preprocessing(input_size, crop_pct, crop_mode, interpolation, mean, std, crop_offsets)

        def _resized_size(self, height, width):
            p = self.preprocessing
            scale_h, scale_w = p.scale_size
            if p.crop_mode == "squash":
                return tf.constant([scale_h, scale_w], tf.int32)
            height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
            if scale_h == scale_w:
                # integer floor division: the same integer as torchvision's int(size * long / short)
                short, long = tf.minimum(height, width), tf.maximum(height, width)
                new_long = scale_h * long // short
                scale = tf.constant(scale_h, tf.int64)
                size = tf.where(width <= height, tf.stack([new_long, scale]), tf.stack([scale, new_long]))
                return tf.cast(size, tf.int32)
            h64, w64 = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
            ratio = tf.minimum(h64 / scale_h, w64 / scale_w)
            return tf.cast(tf.round(tf.stack([h64 / ratio, w64 / ratio])), tf.int32)  # half to even

        def call(self, images):
            p = self.preprocessing
            crop_h, crop_w = p.input_size
            x = tf.cast(images, tf.float32)
            shape = tf.shape(x)
            size = self._resized_size(shape[1], shape[2])
            x = tf.image.resize(x, size, method=p.interpolation, antialias=True)
            x = tf.clip_by_value(tf.round(x), 0.0, 255.0)  # PIL's output is uint8
            height, width = tf.shape(x)[1], tf.shape(x)[2]
            pad_h, pad_w = tf.maximum(crop_h - height, 0), tf.maximum(crop_w - width, 0)
            x = tf.pad(x, [[0, 0], [pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2], [0, 0]])
            if p.crop_offsets == "floor":
                top, left = (height + pad_h - crop_h) // 2, (width + pad_w - crop_w) // 2
            else:
                top = tf.cast(tf.round(tf.cast(height + pad_h - crop_h, tf.float64) / 2.0), tf.int32)  # half to even
                left = tf.cast(tf.round(tf.cast(width + pad_w - crop_w, tf.float64) / 2.0), tf.int32)
            x = tf.slice(x, [0, top, left, 0], [-1, crop_h, crop_w, p.channels])
            x = x / 255.0
            return (x - tf.constant(p.mean, tf.float32)) / tf.constant(p.std, tf.float32)

        def compute_output_shape(self, input_shape):
            return (input_shape[0], *self.preprocessing.input_size, self.preprocessing.channels)

        def get_config(self):
            return {**super().get_config(), **self.preprocessing.to_config()}

    return Preprocess


def __getattr__(name):
    if name == "Preprocess":
        return _layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocess",  # noqa: F822  (made on first use: __getattr__)
    "Preprocessing",
    "as_preprocessing",
    "center_crop",
    "pictures",
    "preprocess",
    "with_preprocessing",
]
