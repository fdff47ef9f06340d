"""The fixed parity batch: deterministic natural-looking images plus noise, numpy only.

Natural images have a 1/f amplitude spectrum, smooth regions and sharp edges; the generated
scenes have all three so that activations reach realistic ranges (pure noise does not). A
network of another input channel count gets the same kind of images in as many channels: grey
ones (the RGB scenes as PIL converts them to "L") for one, as many bands for more.
"""

from __future__ import annotations

import numpy as np


def _pink_noise(rng: np.random.Generator, size: int, channels: int = 3) -> np.ndarray:
    """Colour noise with a 1/f amplitude spectrum, scaled to [0, 1]."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size)
    out = np.empty((size, size, channels))
    for c in range(channels):
        phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
        out[..., c] = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(size, size))
    out -= out.min()
    return out / out.max()


def _scene(rng: np.random.Generator, size: int, channels: int = 3) -> np.ndarray:
    """A sky-like gradient with textured ellipses and boxes, in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    top, bottom = rng.uniform(0, 1, channels), rng.uniform(0, 1, channels)
    img = top * (1 - yy[..., None]) + bottom * yy[..., None]
    texture = _pink_noise(rng, size, channels)
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        ry, rx = rng.uniform(0.05, 0.35, 2)
        colour = rng.uniform(0, 1, channels)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        shade = 0.75 + 0.5 * texture[..., :1]
        img = np.where(mask[..., None], np.clip(colour * shade, 0, 1), img)
    return 0.85 * img + 0.15 * texture


def natural_images(count: int, size: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """`count` deterministic uint8 images of `size` x `size` and `channels` channels, NHWC: RGB
    (3), grey (1: the RGB images converted as PIL's `convert("L")` does), or as many bands."""
    rng = np.random.default_rng(seed)
    bands = 3 if channels == 1 else channels
    images = [(_pink_noise(rng, size, bands) if i % 3 == 2 else _scene(rng, size, bands)) for i in range(count)]
    out = np.round(np.stack(images) * 255).astype(np.uint8)
    if channels == 1:  # PIL's ITU-R 601-2 luma in its fixed point: (R*19595 + G*38470 + B*7471 + 2**15) >> 16
        luma = out.astype(np.uint32) @ np.array([19595, 38470, 7471], np.uint32) + (1 << 15)
        out = (luma >> 16).astype(np.uint8)[..., None]
    return out


def parity_batch(size: int, mean, std, natural: int = 6, noise: int = 2, seed: int = 0) -> np.ndarray:
    """The parity inputs in normalised space (what the network sees), float32 NHWC, with one
    channel per value of `mean` (the network's input channels).

    Args:
        size: square input resolution (the checkpoint's input size).
        mean, std: the checkpoint's per-channel normalisation, one value per input channel each.
        natural: generated natural-looking images.
        noise: standard-normal images, in normalised space.
        seed: everything is a function of the seed.
    """
    channels = len(mean)
    if len(std) != channels:
        raise ValueError(f"one std per mean (per input channel): {len(mean)} means, {len(std)} stds")
    pixels = natural_images(natural, size, seed, channels).astype(np.float32) / 255.0
    normalised = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    rng = np.random.default_rng(seed + 1)
    gaussian = rng.standard_normal((noise, size, size, channels)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([normalised, gaussian]), dtype=np.float32)


def in_batches(run, inputs: np.ndarray, batch_size: int = 2) -> dict[str, np.ndarray]:
    """`run` (a batch -> {name: array}) over `inputs`, `batch_size` images at a time, each output
    filled in place: the whole batch at once, or its parts then concatenated, would hold GBs of
    activations more for the largest networks (convnextv2_huge at 512)."""
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(inputs), batch_size):
        for name, value in run(inputs[i : i + batch_size]).items():
            if name not in out:
                out[name] = np.empty((len(inputs), *value.shape[1:]), value.dtype)
            out[name][i : i + len(value)] = value
    return out
