"""Worked example: fine-tune a small timm ConvNeXt, convert its training checkpoint, export it to
TFLite, and get the same top-1 from all three.

    python examples/own_convnext.py WORKDIR

Runs offline on generated data (a few training steps on the CPU, about a minute in all). Each
step runs in its own process, as users run them: training with torch and timm only, then the
`zoo` commands, then the check with TensorFlow only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

CLASSES, SIZE, MEAN, STD = 4, 96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated pictures (NHWC, normalised): the class is the brightest quadrant."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    x = rng.uniform(0.0, 0.6, (n, SIZE, SIZE, 3))
    half = SIZE // 2
    for i, label in enumerate(labels):
        top, left = divmod(int(label), 2)
        x[i, top * half : (top + 1) * half, left * half : (left + 1) * half] += 0.4
    return ((x - MEAN) / STD).astype(np.float32), labels


def train(work: Path) -> None:
    """A few steps of timm training; saved as timm's train.py saves `model_best.pth.tar`."""
    import timm
    import torch
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=CLASSES)
    ema = ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(30):
        x, y = images(16, seed=step)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x).permute(0, 3, 1, 2)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
    torch.save(
        {
            "epoch": 1,
            "arch": "convnext_atto",
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "version": 2,
            "args": argparse.Namespace(model="convnext_atto", num_classes=CLASSES, lr=2e-3),
            "metric": float(loss),
            "state_dict_ema": ema.module.state_dict(),
        },
        work / "model_best.pth.tar",
    )
    x, _ = images(32, seed=1000)
    ema.module.eval()
    with torch.inference_mode():  # timm's own top-1 with the EMA weights, which the conversion takes
        np.save(work / "timm_top1.npy", ema.module(torch.from_numpy(x).permute(0, 3, 1, 2)).argmax(-1).numpy())


def check(work: Path) -> None:
    """Top-1 of the converted Keras model and of the TFLite export against timm's."""
    import tensorflow as tf

    import zoo

    x, _ = images(32, seed=1000)
    timm_top1 = np.load(work / "timm_top1.npy")
    keras_top1 = np.asarray(zoo.load(work / "converted")(x)).argmax(-1)
    interpreter = tf.lite.Interpreter(model_path=str(work / "model.tflite"))
    runner = interpreter.get_signature_runner()
    (name,) = runner.get_input_details()
    tflite_top1 = np.concatenate([next(iter(runner(**{name: x[i : i + 1]}).values())) for i in range(len(x))]).argmax(
        -1
    )
    print(
        f"top-1 agreement with timm: keras {np.mean(keras_top1 == timm_top1):.0%}, "
        f"tflite {np.mean(tflite_top1 == timm_top1):.0%} ({len(x)} images)"
    )
    if not (np.array_equal(keras_top1, timm_top1) and np.array_equal(tflite_top1, timm_top1)):
        sys.exit("the three disagree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--step", choices=["train", "check"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "train":
        return train(args.work)
    if args.step == "check":
        return check(args.work)
    run = [sys.executable, __file__, str(args.work), "--step"]
    zoo = [sys.executable, "-m", "zoo.cli"]
    work = args.work
    for command in (
        run + ["train"],
        zoo
        + [
            "convert",
            "--checkpoint",
            work / "model_best.pth.tar",
            "--out",
            work / "converted",
            "--input-size",
            str(SIZE),
            "--labels",
            _labels(work),
        ],
        zoo + ["export", work / "converted", "--format", "tflite", "--out", work / "model.tflite"],
        run + ["check"],
    ):
        subprocess.run([str(c) for c in command], check=True)


def _labels(work: Path) -> Path:
    path = work / "labels.txt"
    path.write_text("".join(f"{name}\n" for name in ("top left", "top right", "bottom left", "bottom right")))
    return path


if __name__ == "__main__":
    main()
