"""A Keras fine-tune goes back to timm with its accuracy: a small converted ConvNeXt given a fresh
10-class head, fine-tuned on real images (the UCI handwritten digits scikit-learn ships, kept in
tests/data/digits), exported to timm from memory, and run by timm alone in a process of its own,
which prepares the images itself from the exported config: every held-out image gets the Keras top-1.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.support.archs import SMALL_V1
from tests.support.converted import convert_small

SIZE = 32  # the 8x8 digits, upsampled by the preprocessing both frameworks run
HELD_OUT = 360
DIGITS = [str(d) for d in range(10)]

# torch and timm only, never beside TensorFlow: timm's own loader on the export, timm's own transform
# from the config it wrote, the logits of every held-out image
TIMM_RUN = """
import sys
import numpy as np
import timm
import torch
from PIL import Image

folder, images, out = sys.argv[1:]
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
x = torch.stack([transform(Image.fromarray(image)) for image in np.load(images)])
with torch.inference_mode():
    logits = model(x).numpy()
np.savez(out, logits=logits, inputs=x.permute(0, 2, 3, 1).numpy(), labels=np.array(model.pretrained_cfg["label_names"]))
"""


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 handwritten digits as uint8 RGB images (8x8, NHWC) and their classes."""
    from pathlib import Path

    table = np.loadtxt(Path(__file__).parent / "data" / "digits" / "digits.csv.gz", delimiter=",")
    grey = np.round(table[:, :64].reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), table[:, 64].astype(np.int64)


def test_a_keras_fine_tune_gives_timm_its_top1_on_real_images(tmp_path, live_weights):
    import keras

    import zoo
    from zoo.export import to_pytorch
    from zoo.preprocessing import Preprocessing

    images, classes = _digits()
    order = np.random.default_rng(0).permutation(len(images))
    train, held = order[HELD_OUT:], order[:HELD_OUT]
    preprocessing = Preprocessing((SIZE, SIZE), crop_pct=1.0, interpolation="bilinear")
    x = zoo.preprocess(images, preprocessing)

    keras.utils.set_random_seed(0)
    model = zoo.load(convert_small(tmp_path / "converted", SMALL_V1, seed=5), num_classes=10)
    model.compile(
        optimizer=keras.optimizers.AdamW(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x[train], classes[train], batch_size=32, epochs=2, verbose=0)
    keras_logits = np.asarray(model.predict(x[held], verbose=0))
    keras_top1 = keras_logits.argmax(-1)
    accuracy = float(np.mean(keras_top1 == classes[held]))
    assert accuracy > 0.8, f"the fine-tune reached {accuracy:.0%} held-out top-1"

    out = to_pytorch(model, "timm", out=tmp_path / "digits.timm", labels=DIGITS, preprocessing=preprocessing)

    np.save(tmp_path / "held.npy", images[held])
    done = subprocess.run(
        [sys.executable, "-c", TIMM_RUN, str(out), str(tmp_path / "held.npy"), str(tmp_path / "timm.npz")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ran = np.load(tmp_path / "timm.npz")
    assert list(ran["labels"]) == DIGITS
    np.testing.assert_array_equal(ran["inputs"], x[held])  # timm prepares the digits as the fine-tune saw them
    timm_top1 = ran["logits"].argmax(-1)
    np.testing.assert_array_equal(timm_top1, keras_top1)
    assert float(np.mean(timm_top1 == classes[held])) == accuracy
    np.testing.assert_allclose(ran["logits"], keras_logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_worked_example_gets_the_keras_predictions_from_timm(tmp_path):
    """README's worked example: convert, fine-tune in Keras with a fresh head, export to timm, run timm alone."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "back_to_pytorch.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "work")], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top-1 agreement 100%" in proc.stdout
    assert (tmp_path / "work" / "tuned.timm" / "model.safetensors").is_file()
