"""A conversion holds the weights as few times as it can: the model a weights file is written for
has no storage, the PyTorch reference has ended before the converter reads the source, and the
serving path checked by the parity gate reads the kernels no fold changes from the model itself.
Each without changing a number. (`benchmarks/run.py --conversion-memory` measures the peaks.)
"""

from __future__ import annotations

import contextlib

import h5py
import numpy as np
import pytest

import converters.pipeline as pipeline
from checkpoints.weights import write_weights
from converters import mapping, parity, reading
from converters.reference_process import Network
from tests.support.archs import SMALL_V1
from tests.support.porting import expected_keys
from zoo.core.serving import fused_norm_epsilon, serving_function


def network(arch=SMALL_V1) -> Network:
    return Network(arch, 10, True, 64, (0.5,) * 3, (0.25,) * 3)


def datasets(path) -> dict[str, bytes]:
    found = {}
    with h5py.File(path) as f:
        f.visititems(
            lambda name, item: found.__setitem__(name, item[()].tobytes()) if isinstance(item, h5py.Dataset) else None
        )
    return found


def test_a_model_built_without_storage_writes_the_same_weights_file_and_stays_without(tmp_path):
    stored, unstored = pipeline.empty_model(network()), pipeline.empty_model(network(), storage=False)
    assert all(v._value is None for v in unstored.weights)
    state = {
        k: np.random.default_rng(1).standard_normal(s).astype(np.float32) for k, s in expected_keys(stored).items()
    }
    write_weights(tmp_path / "a.weights.h5", stored, mapping.values(state, stored))
    write_weights(tmp_path / "b.weights.h5", unstored, mapping.values(state, unstored))
    assert datasets(tmp_path / "a.weights.h5") == datasets(tmp_path / "b.weights.h5")
    pipeline.empty_model(network())  # Keras initialises the variables it deferred when its next such scope ends
    assert all(v._value is None for v in unstored.weights)
    assert unstored.count_params() == stored.count_params()


def test_the_source_is_read_once_the_reference_process_has_ended(small_tiny, small_weights, tmp_path, monkeypatch):
    path, _ = small_weights(small_tiny, 1000)
    runs, ended_at_read = [], []
    real_started, real_read = parity.started, reading.read_source

    @contextlib.contextmanager
    def started(*args, **kwargs):
        with real_started(*args, **kwargs) as pending:
            runs.append(pending.run)
            yield pending

    def read_source(*args, **kwargs):
        ended_at_read.append(runs[-1]._proc.poll() is not None)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(pipeline.parity, "started", started)
    monkeypatch.setattr(reading, "read_source", read_source)
    _, report = pipeline.convert("convnext_tiny_1k", out=tmp_path / "out", checkpoint=path)
    assert report.passed and ended_at_read == [True]


@pytest.mark.parametrize("fused", [False, None], ids=["folded-norms", "fused-norms-where-there"])
def test_the_shared_serving_path_gives_the_same_logits_and_copies_less(fused):
    model = pipeline.empty_model(network())
    rng = np.random.default_rng(2)
    for v in model.weights:
        v.assign(rng.standard_normal(v.shape).astype(np.float32) * 0.3 + (1.0 if "gamma" in v.path else 0.0))
    x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
    copied, shared = (serving_function(model, fused_norms=fused, shared=s) for s in (False, True))
    np.testing.assert_array_equal(shared(x).numpy(), copied(x).numpy())
    own = {id(v.value) for v in model.weights}
    assert all(id(v) not in own for v in copied.trackables[-1].folded)
    if fused is None and fused_norm_epsilon() is not None:  # norms run fused: nothing folds into fc1
        fc1 = model.get_layer("stages.0.blocks.0.mlp.fc1").kernel.value
        assert any(v is fc1 for v in shared.trackables[-1].folded)
