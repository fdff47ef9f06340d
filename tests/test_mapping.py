"""The converter's mapping is strict both ways and independent of key order and layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import weights
from converters import reading, source
from converters.reference import create, forward, random_state_dict
from tests.support import sources
from tests.support.archs import SMALL_V1
from tests.support.fb_layout import to_fb_layout
from tests.support.porting import expected_keys, port
from zoo.core.errors import MappingError, SourceError
from zoo.core.model import build_model


def weights_of(model) -> dict[str, np.ndarray]:
    return {v.path: np.asarray(v) for v in model.weights}


def test_port_fills_every_variable_with_the_right_values(small_arch):
    state = random_state_dict(small_arch, 10)
    model = build_model(small_arch, num_classes=10)
    assert port(state, model) == model.count_params()
    # spot-check each transpose against the torch layout
    layer = model.get_layer("stages.2.blocks.1.conv_dw")
    np.testing.assert_array_equal(np.asarray(layer.kernel)[:, :, 5, 0], state["stages.2.blocks.1.conv_dw.weight"][5, 0])
    fc1 = model.get_layer("stages.0.blocks.0.mlp.fc1")
    torch_fc1 = state["stages.0.blocks.0.mlp.fc1.weight"].reshape(fc1.kernel.shape[-1], -1)
    np.testing.assert_array_equal(np.asarray(fc1.kernel).reshape(-1, torch_fc1.shape[0]), torch_fc1.T)
    stem = model.get_layer("stem.0")
    np.testing.assert_array_equal(np.asarray(stem.kernel)[1, 2, :, 3], state["stem.0.weight"][3, :, 1, 2])
    if small_arch.layer_scale:
        np.testing.assert_array_equal(
            np.asarray(model.get_layer("stages.3.blocks.0.gamma").gamma), state["stages.3.blocks.0.gamma"]
        )
    if small_arch.use_grn:
        np.testing.assert_array_equal(
            np.asarray(model.get_layer("stages.3.blocks.0.mlp.grn").bias), state["stages.3.blocks.0.mlp.grn.bias"]
        )


def test_keras_forward_matches_timm_in_process(small_arch):
    """Fast numerical check of the whole mapping (the product runs timm in its own process)."""
    state = random_state_dict(small_arch, 10)
    model = build_model(small_arch, num_classes=10)
    port(state, model)
    reference = create(small_arch, 10)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(x)), forward(reference, x)["logits"], atol=1e-5, rtol=1e-5)


def test_every_problem_is_listed_at_once_and_nothing_is_assigned():
    state = random_state_dict(SMALL_V1, 10)
    del state["stages.1.blocks.0.gamma"]
    del state["head.fc.bias"]
    state["stages.9.blocks.0.extra.weight"] = np.zeros(3, np.float32)
    state["stages.2.blocks.1.mlp.fc2.weight"] = state["stages.2.blocks.1.mlp.fc2.weight"].T.copy()
    model = build_model(SMALL_V1, num_classes=10)
    before = weights_of(model)
    with pytest.raises(MappingError) as err:
        port(state, model)
    message = str(err.value)
    assert "2 missing, 1 unexpected, 1 shape mismatches" in message
    assert " - in model, not in checkpoint: stages.1.blocks.0.gamma" in message
    assert " - in model, not in checkpoint: head.fc.bias" in message
    assert " + in checkpoint, not in model: stages.9.blocks.0.extra.weight" in message
    assert " ~ shape mismatch: stages.2.blocks.1.mlp.fc2.weight: checkpoint (96, 24), model expects (24, 96)" in message
    after = weights_of(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_layer_or_variable_without_a_rule_is_refused():
    import keras

    from converters import mapping

    class DenseWithExtra(keras.layers.Dense):  # a Dense rule feeds kernel and bias, nothing feeds `extra`
        def build(self, input_shape):
            super().build(input_shape)
            self.extra = self.add_weight(shape=(3,), name="extra")

    inputs = keras.Input((8, 8, 3))
    odd = keras.Model(inputs, keras.layers.BatchNormalization(name="stem.bn")(inputs))
    with pytest.raises(MappingError, match="no mapping rule for layer 'stem.bn' of type BatchNormalization"):
        mapping.plan_assignments(odd)
    orphan = keras.Model(inputs, DenseWithExtra(4, name="head.fc")(inputs))
    with pytest.raises(MappingError, match="Keras variables without a mapping rule:.*extra"):
        mapping.plan_assignments(orphan)


def test_a_variable_fed_twice_is_refused(monkeypatch):
    from converters import mapping

    model = build_model(SMALL_V1, num_classes=10)
    state = random_state_dict(SMALL_V1, 10, seed=1)
    planned = mapping.plan_assignments(model)
    twice = [*planned, mapping.Assignment(planned[1].key, planned[0].variable, planned[0].rule)]
    monkeypatch.setattr(mapping, "plan_assignments", lambda m: twice)
    monkeypatch.setattr(mapping, "check", lambda s, a, *_: None)
    with pytest.raises(MappingError, match=f"variable {planned[0].variable.path} would be assigned twice"):
        mapping.values(state, model)


def test_wrong_head_width_is_a_shape_mismatch():
    state = random_state_dict(SMALL_V1, 21841)
    with pytest.raises(MappingError, match=r"head\.fc\.weight: checkpoint \(21841, 32\), model expects \(1000, 32\)"):
        port(state, build_model(SMALL_V1, num_classes=1000))


def test_another_architectures_checkpoint_is_refused():
    other = SMALL_V1.replace(dims=(16, 32, 48, 64))
    with pytest.raises(MappingError, match="shape mismatches"):
        port(random_state_dict(other, 10), build_model(SMALL_V1, num_classes=10))


def test_expected_keys_is_timms_state_dict(small_arch):
    timm_keys = {k: tuple(v.shape) for k, v in create(small_arch, 10).state_dict().items()}
    assert expected_keys(build_model(small_arch, num_classes=10)) == timm_keys


def test_fb_layout_converts_to_the_same_weights(small_arch, tmp_path):
    state = random_state_dict(small_arch, 10)
    fb = to_fb_layout(state)
    assert list(fb)[0].startswith("downsample_layers.")  # order differs from timm's
    torch.save({"model": {k: torch.from_numpy(v) for k, v in fb.items()}}, tmp_path / "fb.pth")
    from_fb = build_model(small_arch, num_classes=10)
    port(sources.load_source(tmp_path / "fb.pth", conv_mlp=small_arch.conv_mlp), from_fb)
    from_timm = build_model(small_arch, num_classes=10)
    port(state, from_timm)
    a, b = weights_of(from_fb), weights_of(from_timm)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_fb_grn_is_flattened():
    fb = {
        "downsample_layers.0.0.weight": np.zeros((8, 3, 4, 4), np.float32),
        "stages.0.0.grn.gamma": np.ones((1, 1, 1, 32), np.float32),
        "stages.0.0.grn.beta": np.ones((1, 1, 1, 32), np.float32),
    }
    out = sources.normalise_keys(fb)
    assert out["stages.0.blocks.0.mlp.grn.weight"].shape == (32,)
    assert out["stages.0.blocks.0.mlp.grn.bias"].shape == (32,)
    assert "stem.0.weight" in out


def test_half_precision_sources_are_widened(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.arange(4, dtype=np.float16)}, str(tmp_path / "h.safetensors"))
    out = reading.read_state_dict(tmp_path / "h.safetensors")
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"\xff" * 64])
def test_unreadable_files_are_source_errors(tmp_path, content):
    for suffix in (".safetensors", ".pth"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(SourceError):
            reading.read_state_dict(path)


def test_integer_tensors_are_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.arange(4, dtype=np.int64)}, str(tmp_path / "i.safetensors"))
    with pytest.raises(SourceError, match="dtype int64"):
        reading.read_state_dict(tmp_path / "i.safetensors")


def test_bfloat16_sources_are_widened_exactly(tmp_path):
    from safetensors.torch import save_file as save_torch

    values = torch.tensor([1.5, -2.25, 3e-3, 65504.0, -0.0], dtype=torch.bfloat16)
    save_torch({"b": values, "f": torch.arange(3, dtype=torch.float16)}, str(tmp_path / "bf.safetensors"))
    out = reading.read_state_dict(tmp_path / "bf.safetensors")
    assert out["b"].dtype == np.float32 and out["f"].dtype == np.float32
    np.testing.assert_array_equal(out["b"], values.float().numpy())
    np.testing.assert_array_equal(out["f"], [0, 1, 2])


def test_bfloat16_without_ml_dtypes_in_a_fresh_process(tmp_path):
    """The reference process imports no tensorflow, so numpy there does not know bfloat16."""
    import subprocess
    import sys

    from safetensors.torch import save_file as save_torch

    save_torch({"b": torch.tensor([1.5, -2.25], dtype=torch.bfloat16)}, str(tmp_path / "bf.safetensors"))
    code = (
        "import sys; from converters.reading import read_state_dict; "
        "print(read_state_dict(sys.argv[1])['b'].tolist(), 'ml_dtypes' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "bf.safetensors")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.split() == ["[1.5,", "-2.25]", "False"]


def _h5_contents(path) -> dict:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = dict(f.attrs)
        f.visititems(
            lambda name, obj: out.__setitem__(
                name, (dict(obj.attrs), obj[()] if isinstance(obj, h5py.Dataset) else None)
            )
        )
    return out


def _assert_same_h5(a, b):
    ca, cb = _h5_contents(a), _h5_contents(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        if name == "/":
            assert ca[name] == cb[name]
            continue
        (attrs_a, data_a), (attrs_b, data_b) = ca[name], cb[name]
        assert attrs_a == attrs_b, name
        assert (data_a is None) == (data_b is None), name
        if data_a is not None:
            assert data_a.dtype == data_b.dtype and np.array_equal(data_a, data_b), name


def test_weights_written_from_the_mapped_values_are_the_file_keras_writes(small_arch, tmp_path):
    """The converter writes `model.weights.h5` straight from the state dict: byte for byte the
    datasets, groups and attributes `save_weights` gives after porting, and the model it was
    laid out from is left untouched."""
    from converters.mapping import values

    state = random_state_dict(small_arch, 10)
    ported = build_model(small_arch, num_classes=10)
    port(state, ported)
    ported.save_weights(tmp_path / "keras.weights.h5")
    untouched = build_model(small_arch, num_classes=10)
    before = weights_of(untouched)
    weights.write_weights(tmp_path / "direct.weights.h5", untouched, values(state, untouched))
    _assert_same_h5(tmp_path / "keras.weights.h5", tmp_path / "direct.weights.h5")
    after = weights_of(untouched)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_keras_whose_saving_code_differs_gets_the_same_file_the_slow_way(tmp_path, monkeypatch):
    """Where Keras' saving code never hands the variables to the weights store (other versions
    are shaped otherwise), the direct write notices, removes its file, and the weights go
    through the variables and `save_weights` instead."""
    from keras.src.saving import saving_lib

    from converters.mapping import values

    state = random_state_dict(SMALL_V1, 10)
    ported = build_model(SMALL_V1, num_classes=10)
    port(state, ported)
    ported.save_weights(tmp_path / "keras.weights.h5")
    target = tmp_path / "fallback.weights.h5"
    real = saving_lib._save_state
    # Keras' own save_weights calls it with keywords and keeps working; the direct write's store gets nothing
    monkeypatch.setattr(saving_lib, "_save_state", lambda *args, **kwargs: real(*args, **kwargs) if kwargs else None)
    assert not weights._write_values(target, ported, values(state, ported)) and not target.exists()
    model = build_model(SMALL_V1, num_classes=10)
    weights.write_weights(target, model, values(state, model))
    _assert_same_h5(tmp_path / "keras.weights.h5", target)


def test_the_source_is_hashed_as_it_is_read(tmp_path):
    """One pass: the sha256 recorded is that of the very bytes converted, for both formats, and a
    file that no longer has the sha256 it was checked with is refused."""
    from dataclasses import replace

    from checkpoints.fs import sha256_file

    state = random_state_dict(SMALL_V1, 10)
    save_file_path = tmp_path / "w.safetensors"
    from safetensors.numpy import save_file

    save_file(state, str(save_file_path), metadata={"format": "pt"})
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "w.pth")
    for path in (save_file_path, tmp_path / "w.pth"):
        src = source.local(path, hashed=False)
        assert src.sha256 is None
        read, hashed = reading.read_source(src)
        assert hashed.sha256 == sha256_file(path) == source.local(path).sha256
        assert read.keys() == state.keys() and all(np.array_equal(read[k], state[k]) for k in state)
        with pytest.raises(SourceError, match="changed after it was checked"):
            reading.read_source(replace(src, sha256="0" * 64))
