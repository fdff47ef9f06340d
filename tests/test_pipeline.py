"""The real pipeline end to end: Hub cache -> `zoo convert` (its own process) -> `zoo.load`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
import timm
import torch
from safetensors.numpy import save as save_bytes

import converters.pipeline as pipeline
import zoo
from checkpoints import converted
from converters import recorded
from converters.images import parity_batch
from converters.reference import create, forward, random_state_dict
from converters.reference_process import Network
from converters.verify import verify
from tests.support.archs import SMALL_V1
from tests.support.cli import zoo_cli, zoo_inline
from tests.support.converted import convert_small
from tests.support.hub_cache import add_file
from tests.support.writing import write_converted
from zoo.core.architectures import ARCHITECTURES
from zoo.core.catalogue import representatives
from zoo.core.errors import IntegrityError
from zoo.core.folder_config import PARITY, RECORD, WEIGHTS
from zoo.core.reports import ParityReport


# atto by default (a third of tiny's time), the README's convnext_tiny_1k with -m slow: the same path
@pytest.mark.parametrize(
    "name, canonical",
    [
        pytest.param("convnext_tiny_1k", "convnext_tiny.fb_in1k", marks=pytest.mark.slow),
        ("convnext_atto", "convnext_atto.d2_in1k"),
    ],
)
def test_convert_from_offline_hub_cache_then_load(name, canonical, tmp_path):
    ckpt = zoo.resolve(name)
    assert ckpt.name == canonical
    arch = ARCHITECTURES[ckpt.architecture]
    state = random_state_dict(arch, ckpt.num_classes, seed=7)
    add_file(Path(os.environ["HF_HUB_CACHE"]), ckpt.hf_hub_id, "model.safetensors", save_bytes(state))

    out = tmp_path / "converted"
    proc = zoo_cli("convert", name, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)

    report = json.loads((out / "parity.json").read_text())
    logits = next(c for c in report["comparisons"] if c["name"] == "logits")
    assert report["passed"] and logits["max_abs"] <= 1e-4 and logits["rel"] <= 1e-5
    assert report["top1_agreement"] == 1.0
    assert report["versions"] == {
        "keras": keras.__version__,
        "tensorflow": tf.__version__,  # both sides named
        "torch": torch.__version__,
        "timm": timm.__version__,
        "reference": "timm",
        "layout": "timm",
        "source_sha256": json.loads((out / RECORD).read_text())["source"]["sha256"],
    }
    config = json.loads((out / RECORD).read_text())
    assert config["source"]["repo_id"] == ckpt.hf_hub_id and config["pretrained"] is True
    assert len(config["source"]["revision"]) == 40

    # what users get back equals timm on the same weights (in this process: torch came first)
    model = zoo.load(out)
    reference = create(arch, ckpt.num_classes)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = parity_batch(224, ckpt.mean, ckpt.std, natural=2, noise=1, seed=3)
    ours, theirs = np.asarray(model(x)), forward(reference, x)["logits"]
    assert np.max(np.abs(ours - theirs)) <= 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.fixture(scope="module")
def small_converted(tmp_path_factory):
    """A small convnext_tiny.fb_in1k converted once (random weights, seed 3); tests edit copies."""
    return convert_small(tmp_path_factory.mktemp("verify") / "converted", SMALL_V1, seed=3)


def test_verify_passes_then_catches_changed_weights(small_converted, tmp_path):
    out = Path(shutil.copytree(small_converted, tmp_path / "converted"))
    assert zoo_inline("verify", out).exit_code == 0

    # a re-signed folder with different weights: integrity holds, parity must not
    model = zoo.load(out)
    layer = model.get_layer("stages.1.blocks.0.mlp.fc2")
    layer.kernel.assign(np.asarray(layer.kernel) * 1.01)
    folder = converted.open_folder(out)
    write_converted(out, model, folder.config, {k: v for k, v in folder.parity.items() if k != "weights_sha256"})
    proc = zoo_inline("verify", out)
    assert proc.exit_code == 1 and "failed at stages.1" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_detects_an_edited_file(small_converted, tmp_path):
    out = Path(shutil.copytree(small_converted, tmp_path / "converted"))
    data = bytearray((out / "model.weights.h5").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "model.weights.h5").write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        verify(out)
    proc = zoo_inline("verify", out)
    assert proc.exit_code == 1 and "manifest" in proc.stderr


def test_random_weights_are_labelled_and_reproducible(small_tiny, tmp_path):
    a, report = pipeline.convert("convnext_tiny_1k", out=tmp_path / "a", random_seed=5)
    config = json.loads((a / RECORD).read_text())
    assert config["pretrained"] is False and "NOT pretrained" in config["source"]["note"]
    # the same seed gives the same bytes again (as `verify` regenerates them)
    again = recorded.random_source(Network.of_entry(zoo.resolve("convnext_tiny_1k")), 5, tmp_path)
    assert again.sha256 == config["source"]["sha256"]


@pytest.mark.parametrize(
    "name, arch, filename",
    [
        ("convnext_tiny_1k", "convnext_tiny", "convnext_tiny_1k_224_ema.pth"),
        # official V2 files: GRN stored as (1, 1, 1, 4C), linear MLP weights where timm has 1x1 convs
        ("convnextv2_atto_1k", "convnextv2_atto", "convnextv2_atto_1k_224_ema.pt"),
    ],
)
def test_fb_checkpoint_file_converts_through_timms_own_remapping(name, arch, filename, tmp_path, monkeypatch):
    from tests.support.archs import SMALL
    from tests.support.fb_layout import to_fb_layout

    small = ARCHITECTURES[arch].replace(**{k: SMALL["linear_mlp"].__dict__[k] for k in ("depths", "dims")})
    state = random_state_dict(small, 1000, seed=2)
    fb = to_fb_layout(state)
    assert any(k.endswith(".grn.gamma") and v.shape[:3] == (1, 1, 1) for k, v in fb.items()) == small.use_grn
    path = tmp_path / filename
    torch.save({"model": {k: torch.from_numpy(v) for k, v in fb.items()}}, path)
    out, report = pipeline.convert(zoo.resolve(name).with_architecture(small), out=tmp_path / "out", checkpoint=path)
    assert report.passed
    assert json.loads((out / RECORD).read_text())["source"]["kind"] == "file"


# One full-size network per family runs by default: V1 with a patch stem + conv MLP (convnext_atto.d2_in1k,
# through the CLI in test_convert_from_offline_hub_cache_then_load), V2 with GRN and no head-norm weights.
# Every other stem, norm and head runs against timm at a small width in tests/test_mapping.py (and here
# at full size with -m slow).
DEFAULT_RUN = {"convnextv2_atto.fcmae"}
HEAVY_PARAMS = 150_000_000  # convnext_large and up: GBs at the conversion's peak


def _sweep_cases():
    """Every distinct architecture + head of the catalogue; a few small ones run by default."""
    cases = []
    for c in representatives():
        fast = c.name in DEFAULT_RUN
        marks = () if fast else (pytest.mark.slow,) + ((pytest.mark.heavy,) if c.params > HEAVY_PARAMS else ())
        cases.append(pytest.param(c.name, marks=marks, id=c.name))
    return cases


@pytest.mark.parametrize("name", _sweep_cases())
def test_catalogue_converts_with_parity(name, tmp_path):
    """`zoo convert NAME --random-weights` in a process of its own, as users run it (the largest
    networks' GBs go with that process, not with the test worker that runs the next one)."""
    ckpt = zoo.resolve(name)
    out = tmp_path / "out"
    proc = zoo_cli("convert", name, "--random-weights", "--seed", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = ParityReport.from_json(json.loads((out / PARITY).read_text()))
    assert report.passed and report.logits.max_abs <= 1e-4 and report.logits.rel <= 1e-5
    config = json.loads((out / RECORD).read_text())
    with h5py.File(out / WEIGHTS, "r") as weights:  # every value the weights file holds, counted
        held = []
        weights.visititems(lambda _, item: held.append(item.size) if isinstance(item, h5py.Dataset) else None)
    assert config["params"] == sum(held) == ckpt.params
    width = ckpt.num_classes or (ckpt.arch.head_hidden_size or ckpt.arch.num_features)
    assert report.by_name("logits").shape == [8, width]
    assert report.input_size == ckpt.input_size[-1]
