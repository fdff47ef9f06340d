"""Worked example: fine-tune a converted ConvNeXt in Keras with a fresh head, export it back to timm,
and get the same predictions from timm.

    python examples/back_to_pytorch.py WORKDIR

Runs offline on generated data (a few training steps on the CPU, about a minute in all). Each
step runs in its own process, as users run them: the `zoo convert` command, then the fine-tune and
the export with TensorFlow and Keras, then the check with torch and timm only.
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
LABELS = ["top left", "top right", "bottom left", "bottom right"]


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


def tune(work: Path) -> None:
    """A few steps of Keras training with a fresh 4-class head, then the export to timm from memory."""
    import keras

    import zoo
    from zoo.export import to_pytorch
    from zoo.preprocessing import Preprocessing

    keras.utils.set_random_seed(0)
    model = zoo.load(work / "converted", num_classes=CLASSES)  # the converted backbone, a fresh head
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = images(256, seed=0)
    model.fit(x, y, batch_size=16, epochs=2, verbose=2)
    x, _ = images(32, seed=1000)
    np.save(work / "keras_logits.npy", np.asarray(model.predict(x, verbose=0)))
    # what timm's config records: the inputs the fine-tune saw (96 px, no crop, ImageNet's mean and std)
    preprocessing = Preprocessing((SIZE, SIZE), crop_pct=1.0, mean=MEAN, std=STD)
    out = to_pytorch(model, "timm", out=work / "tuned.timm", labels=LABELS, preprocessing=preprocessing, echo=print)
    print(f"{out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


def check(work: Path) -> None:
    """timm's own loader on the export: the Keras model's top-1 on every held-out image, its logits."""
    import timm
    import torch

    model = timm.create_model(f"local-dir:{work / 'tuned.timm'}", pretrained=True).eval()
    x, y = images(32, seed=1000)
    with torch.inference_mode():
        timm_logits = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    keras_logits = np.load(work / "keras_logits.npy")
    timm_top1, keras_top1 = timm_logits.argmax(-1), keras_logits.argmax(-1)
    names = model.pretrained_cfg["label_names"]
    print(f"timm's classes (the export's config.json): {names}; first predictions: {[names[i] for i in timm_top1[:3]]}")
    print(
        f"top-1 accuracy: keras {np.mean(keras_top1 == y):.0%}, timm {np.mean(timm_top1 == y):.0%}; "
        f"top-1 agreement {np.mean(timm_top1 == keras_top1):.0%}, largest logit difference "
        f"{np.abs(timm_logits - keras_logits).max():.1e} ({len(x)} held-out images)"
    )
    if not (np.array_equal(timm_top1, keras_top1) and np.allclose(timm_logits, keras_logits, atol=1e-4, rtol=0)):
        sys.exit("timm and Keras disagree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--step", choices=["tune", "check"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "tune":
        return tune(args.work)
    if args.step == "check":
        return check(args.work)
    run = [sys.executable, __file__, str(args.work), "--step"]
    zoo = [sys.executable, "-m", "zoo.cli"]
    work = args.work
    for command in (
        zoo + ["convert", "convnext_atto", "--random-weights", "--out", work / "converted"],
        run + ["tune"],
        run + ["check"],
    ):
        subprocess.run([str(c) for c in command], check=True)


if __name__ == "__main__":
    main()
