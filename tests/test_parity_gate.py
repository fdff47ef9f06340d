"""The parity gate rejects broken conversions, names where they diverged, and writes nothing.

Each mutation breaks the converter's side only (the Keras model or what it reads); the PyTorch
reference still loads the true file in its own process, as in production.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import converters.mapping as mapping
import converters.pipeline as pipeline
import zoo.core.model
import zoo.core.serving
from converters import reading
from converters.parity import compare
from zoo.core.errors import MappingError, ParityError
from zoo.core.reports import Comparison, ParityReport


def converter_reads(monkeypatch, mutate):
    """Make the converter (not the reference) see a mutated state dict."""
    real = reading.read_source

    def read_source(src, **kwargs):
        state, src = real(src, **kwargs)
        return mutate(state), src

    monkeypatch.setattr(reading, "read_source", read_source)


def swap_fc(state):
    block = "stages.0.blocks.0.mlp"
    fc1, fc2 = state[f"{block}.fc1.weight"], state[f"{block}.fc2.weight"]
    state[f"{block}.fc1.weight"], state[f"{block}.fc2.weight"] = fc2.T.copy(), fc1.T.copy()
    return state


def drop_gamma(state):
    state["stages.1.blocks.0.gamma"] = np.ones_like(state["stages.1.blocks.0.gamma"])
    return state


def skip_head_norm(state):
    state["head.norm.weight"] = np.ones_like(state["head.norm.weight"])
    state["head.norm.bias"] = np.zeros_like(state["head.norm.bias"])
    return state


def swap_blocks(state):
    a, b = "stages.2.blocks.0.", "stages.2.blocks.1."
    moved = {k: v for k, v in state.items() if k.startswith((a, b))}
    for k, v in moved.items():
        state[k.replace(a, b) if k.startswith(a) else k.replace(b, a)] = v
    return state


def drop_key(state):
    del state["stages.0.blocks.0.gamma"]
    return state


def extra_key(state):
    state["head.extra.weight"] = np.zeros(4, np.float32)
    return state


def transposed_spatial_dw(monkeypatch):
    rules = dict(mapping.RULES)
    import keras

    kernel, bias = rules[keras.layers.DepthwiseConv2D]
    # (C, 1, kh, kw) -> (kw, kh, C, 1): same shape for a square kernel, wrong values
    rules[keras.layers.DepthwiseConv2D] = (mapping.Rule(kernel.attr, kernel.suffix, (3, 2, 0, 1)), bias)
    monkeypatch.setattr(mapping, "RULES", rules)


def skipped_linear_transpose(monkeypatch):
    import keras

    rules = dict(mapping.RULES)
    rules[keras.layers.Dense] = (mapping.Rule("kernel", ".weight"), mapping.Rule("bias", ".bias"))
    monkeypatch.setattr(mapping, "RULES", rules)


def keras_default_eps(monkeypatch):
    import keras

    monkeypatch.setattr(
        zoo.core.model,
        "_norm",
        lambda arch, name, affine=True, eps=None: keras.layers.LayerNormalization(
            name=name, center=affine, scale=affine
        ),
    )


def serving_drops_norm_shift(monkeypatch):
    """The serving path loses a LayerNorm's shift (the Keras model is right): folded into fc1 with
    the scale only, or run fused without it."""
    real_folded, real_fused = zoo.core.serving._folded, zoo.core.serving._fused_form

    def folded(layer, norm, scale):
        kernel, bias = real_folded(layer, None, scale)
        if norm is not None:
            kernel = kernel * np.asarray(norm.gamma.numpy(), np.float64)[:, None]
        return kernel, bias

    monkeypatch.setattr(zoo.core.serving, "_folded", folded)
    monkeypatch.setattr(
        zoo.core.serving, "_fused_form", lambda x, gamma, beta, eps: real_fused(x, gamma, beta * 0, eps)
    )


def serving_norm_input_unscaled(monkeypatch):
    """The fused norm form without the input scale that turns the kernel's epsilon (1e-3) into the
    model's (1e-6): every norm believes its producer scaled it."""
    if zoo.core.serving.fused_norm_epsilon() is None:
        pytest.skip("this TensorFlow has no fused oneDNN LayerNorm kernel: the serving path folds its norms")

    def prescaled(model, eps_kernel):
        return {}, {layer.name for layer in model.layers if zoo.core.serving._foldable_norm(layer)}

    monkeypatch.setattr(zoo.core.serving, "_prescaled", prescaled)


STATE_MUTATIONS = {  # name -> (mutation, expected error, expected message)
    "fc1_fc2_swapped": (swap_fc, ParityError, "failed at stages.0"),
    "gamma_dropped": (drop_gamma, ParityError, "failed at stages.1"),
    "head_norm_skipped": (skip_head_norm, ParityError, "failed at pre_logits"),
    "blocks_swapped": (swap_blocks, ParityError, "failed at stages.2"),
    "missing_key": (drop_key, MappingError, "- in model, not in checkpoint: stages.0.blocks.0.gamma"),
    "extra_key": (extra_key, MappingError, "+ in checkpoint, not in model: head.extra.weight"),
}
MODEL_MUTATIONS = {
    "depthwise_spatial_transpose": (transposed_spatial_dw, ParityError, "failed at stages.0"),
    "linear_transpose_skipped": (
        skipped_linear_transpose,
        MappingError,
        "shape mismatch: stages.0.blocks.0.mlp.fc1.weight",
    ),
    "keras_default_eps": (keras_default_eps, ParityError, "failed at stem"),
    "serving_norm_shift_dropped": (serving_drops_norm_shift, ParityError, "failed at serving"),
    "serving_norm_input_unscaled": (serving_norm_input_unscaled, ParityError, "failed at serving"),
}


@pytest.fixture
def tiny_source(small_tiny, small_weights):
    path, _ = small_weights(small_tiny, 1000)
    return path


def assert_nothing_written(out):
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_control_the_unbroken_conversion_passes(tiny_source, tmp_path):
    path, report = pipeline.convert("convnext_tiny_1k", out=tmp_path / "out", checkpoint=tiny_source)
    assert report.passed and path.is_dir()
    assert report.logits.max_abs <= 1e-4 and report.logits.rel <= 1e-5


@pytest.mark.parametrize("name", sorted(STATE_MUTATIONS))
def test_state_mutation_is_rejected(name, tiny_source, tmp_path, monkeypatch):
    mutate, error, message = STATE_MUTATIONS[name]
    converter_reads(monkeypatch, mutate)
    out = tmp_path / "out"
    with pytest.raises(error) as err:
        pipeline.convert("convnext_tiny_1k", out=out, checkpoint=tiny_source)
    assert message in str(err.value)
    assert_nothing_written(out)


@pytest.mark.parametrize("name", sorted(MODEL_MUTATIONS))
def test_model_mutation_is_rejected(name, tiny_source, tmp_path, monkeypatch):
    mutate, error, message = MODEL_MUTATIONS[name]
    mutate(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(error) as err:
        pipeline.convert("convnext_tiny_1k", out=out, checkpoint=tiny_source)
    assert message in str(err.value)
    assert_nothing_written(out)


def test_grn_over_the_wrong_axes_is_rejected(small_weights, tmp_path, monkeypatch):
    """ConvNeXt-V2's GRN takes the L2 norm over H and W; over W alone (a wrong reshape of the
    map) the shapes still broadcast, only the values are wrong."""
    from keras import ops

    from tests.support.archs import SMALL

    arch = SMALL["v2_grn"]
    path, _ = small_weights(arch, 1000)

    def over_width_only(self, inputs):
        gx = ops.sqrt(ops.sum(ops.square(inputs), axis=(2,), keepdims=True))
        nx = gx / (ops.mean(gx, axis=-1, keepdims=True) + self.epsilon)
        return inputs + (self.bias + self.weight * (inputs * nx))

    monkeypatch.setattr(zoo.core.model.GlobalResponseNorm, "call", over_width_only)
    out = tmp_path / "out"
    with pytest.raises(ParityError, match="failed at stages.0"):
        pipeline.convert(zoo.resolve("convnextv2_tiny").with_architecture(arch), out=out, checkpoint=path)
    assert_nothing_written(out)


def _outputs(scale=1.0, noise=0.0):
    rng = np.random.default_rng(0)
    ref = {
        n: rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
        for n in ("stem", "stages.0", "stages.1", "stages.2", "stages.3")
    }
    ref["pre_logits"] = rng.standard_normal((2, 8)).astype(np.float32)
    ref["logits"] = scale * rng.standard_normal((2, 10)).astype(np.float32)
    ours = {k: v + noise for k, v in ref.items()}
    return ours, ref


def test_tolerances_are_both_absolute_and_relative():
    assert compare(*_outputs(noise=5e-7)).passed
    # within atol, but relative to small logits it is too much
    report = compare(*_outputs(scale=1e-2, noise=5e-6))
    assert not report.passed and report.failure.startswith("logits")
    # relative fine for huge logits, absolute error too big
    assert not compare(*_outputs(scale=1e6, noise=2e-4)).passed


def test_non_finite_outputs_fail():
    ours, ref = _outputs()
    ours["stages.1"][0, 0, 0, 0] = np.nan
    report = compare(ours, ref)
    assert not report.passed and report.failure == "stages.1: non-finite values"


def test_report_json_round_trip_and_tamper_detection():
    report = compare(*_outputs(noise=1e-7))
    data = json.loads(json.dumps(report.to_json()))
    assert ParityReport.from_json(data).passed
    data["comparisons"][-1]["max_abs"] = 1.0  # figures say fail, flag says pass
    with pytest.raises(ValueError, match="passed=True"):
        ParityReport.from_json(data)


def test_shape_mismatch_is_a_failure():
    c = Comparison.of("logits", np.zeros((2, 3)), np.zeros((2, 4)))
    assert c.max_abs == float("inf")


def test_an_error_beside_the_reference_process_ends_it_at_once(tmp_path, monkeypatch):
    """Parity runs timm in a child while the Keras model runs here: an error here kills the
    child (no orphan left computing) and is the error reported."""
    import signal
    import subprocess

    from converters import reference_process

    children = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        children.append(real_popen(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(reference_process.subprocess, "Popen", popen)
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    with pytest.raises(RuntimeError, match="the Keras side failed"):
        with reference_process.reference_process(["forward", str(spec)]):
            raise RuntimeError("the Keras side failed")
    assert len(children) == 1 and children[0].returncode == -signal.SIGKILL


# --- a network that cannot be a trained one ------------------------------------------------------


def test_outputs_that_do_not_depend_on_the_input_fail_on_either_side():
    """A dead network (all-zero logits, or one row for every image) agrees with itself perfectly:
    the gate must refuse it for what it is, not pass it for agreeing."""
    ours, ref = _outputs()
    for name in ("logits", "stages.2"):
        for side in ("reference's", "converted model's"):
            dead_ours, dead_ref = {k: v.copy() for k, v in ours.items()}, {k: v.copy() for k, v in ref.items()}
            target = dead_ref if side == "reference's" else dead_ours
            target[name][:] = target[name][:1]  # every image gives the first image's output
            report = compare(dead_ours, dead_ref)
            assert not report.passed and report.failure.startswith(f"{name}: the {side} output is identical"), (
                report.failure
            )
    zeros = {k: np.zeros_like(v) for k, v in ref.items()}
    assert "identical for every input image" in compare(zeros, zeros).failure
    # a spread above rounding, below anything a network's inputs make, is as dead
    ours, ref = _outputs()
    ref["logits"][1:] = ref["logits"][:1] * np.float32(1 + 4e-7)  # float32 steps of ~1.2e-7
    ours["logits"] = ref["logits"].copy()
    assert "the same for every input image (relative spread" in compare(ours, ref).failure


def test_reports_written_before_the_spread_was_measured_still_read():
    data = compare(*_outputs(noise=1e-7)).to_json()
    for c in data["comparisons"]:
        c.pop("spread"), c.pop("ref_spread")
    assert ParityReport.from_json(json.loads(json.dumps(data))).passed


def test_a_checkpoint_whose_logits_ignore_the_image_is_refused(small_tiny, small_weights, tmp_path):
    """A head whose weights are all zero gives its bias for every image, in timm as in Keras."""
    from safetensors.numpy import load_file, save_file

    path, _ = small_weights(small_tiny, 10)
    state = load_file(str(path))
    state["head.fc.weight"] = np.zeros_like(state["head.fc.weight"])
    save_file(state, str(path))
    out = tmp_path / "out"
    with pytest.raises(ParityError, match="failed at logits: the reference's output is identical for every input"):
        pipeline.convert_checkpoint(path, out=out)
    assert_nothing_written(out)


def test_an_infinite_layer_norm_epsilon_is_refused_before_anything_runs(tmp_path):
    """transformers builds a network from `layer_norm_eps: Infinity` (Python's json reads it) whose
    every logit is 0 for every input; the conversion must refuse it in one line, writing nothing."""
    from tests.support import sources
    from tests.support.archs import SMALL
    from tests.support.cli import one_line_error, zoo_cli

    folder = tmp_path / "hf"
    sources.transformers_model(SMALL["linear_mlp"], 3, seed=5, labels=["a", "b", "c"]).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_eps"] = float("inf")
    (folder / "config.json").write_text(json.dumps(config))  # writes the token Infinity
    assert "Infinity" in (folder / "config.json").read_text()
    out = tmp_path / "out"
    message = one_line_error(zoo_cli("convert", "--checkpoint", folder, "--out", out))
    assert "layer_norm_eps" in message or "head_norm_eps" in message, message
    assert_nothing_written(out)


def test_a_source_that_changes_between_the_reference_and_the_converter_is_refused(
    small_tiny, small_weights, tmp_path, monkeypatch
):
    """The PyTorch side reads the file first and ends; a file replaced before the converter reads it
    would pass parity against bytes other than those converted. The two digests must agree."""
    from safetensors.numpy import save_file

    from zoo.core.errors import IntegrityError

    path, _ = small_weights(small_tiny, 1000)
    _, other = small_weights(small_tiny, 1000, seed=5, name="other.safetensors")
    real = reading.read_source

    def replaced_then_read(src, **kwargs):
        save_file(other, str(path))  # after the reference ran, before the converter reads
        return real(src, **kwargs)

    monkeypatch.setattr(reading, "read_source", replaced_then_read)
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match="the source changed during the conversion"):
        pipeline.convert("convnext_tiny_1k", out=out, checkpoint=path)
    assert_nothing_written(out)
