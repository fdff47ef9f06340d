"""The serving path: a loaded ConvNeXt as one TensorFlow function for inference.

The Keras model is the trainable network; inference (`zoo predict`, `zoo eval`, the SavedModel
and TFLite exports, `serving_function(model)` for users) runs the same layers in the same
order with changes that are exact in real arithmetic and move float32 logits by rounding only
(the conversion's parity gate checks this path against PyTorch too):

- a LayerNorm's affine is folded into the linear layer that alone reads it (`fc1`, a downsample
  conv, the head's first dense): `(x_hat * g + b) W + c = x_hat (g W) + (b W + c)`, with no
  padding between the two for convolutions;
- a LayerScale is folded into the `fc2` before it: `gamma * (h W + c) = h (W gamma) + gamma c`.

Where TensorFlow runs oneDNN's fused LayerNorm kernel (`_MklLayerNorm`, which its graph optimiser
substitutes for the ops of `_fused_form`), each LayerNorm is written in the form it recognises,
affine kept, instead of being folded: that kernel always uses its own epsilon (1e-3) whatever the
graph says, so the norm's input is scaled by `k = sqrt(1e-3 / eps)`, exactly (LayerNorm(k x, k^2
eps) = LayerNorm(x, eps)), with `k` folded into the depthwise conv or stem conv that alone
feeds the norm. The graph computes the same function whether the optimiser fuses it or not (the
TFLite export and TensorFlow without oneDNN run its ops as written).

The weights stay variables. oneDNN packs a weight into its kernel's layout once and keeps it when
the weight is a graph constant, or when `TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1` (set by the `zoo`
commands, which only run inference; see `zoo.core.runtime.assume_frozen_weights`); otherwise it
repacks per call. Graph constants (`constant=True`) get that without the variable, at ~4x the
memory: TensorFlow's graph optimiser and function runtime hold several copies of a constant
(convnext_base: 9.8 GB peak against 2.6 GB).

Each norm normalises in float32 (as Keras' LayerNormalization; the fused kernel keeps float32
statistics for bfloat16 input) and each layer computes in its own compute dtype, so a bfloat16
model serves in bfloat16 with float32 statistics and logits.
Layers without a rule here run as their Keras layer (variables captured): any functional model
of these layers serves, folded where the rules apply.
"""

from __future__ import annotations

from collections import Counter

import keras
import numpy as np

from .model import DropPath, LayerScale

_NORM_LAYERS = (keras.layers.LayerNormalization,)


def _inputs(layer) -> list:
    x = layer.input
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _linear(layer) -> bool:
    """A layer whose input a norm's affine folds into exactly: dense, or an unpadded ungrouped conv."""
    if isinstance(layer, keras.layers.Dense):
        return True
    return (
        type(layer) is keras.layers.Conv2D
        and layer.padding == "valid"
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and tuple(layer.dilation_rate) == (1, 1)
    )


def _as_matmul(layer) -> bool:
    """A dense, or a 1x1 stride-1 conv: one 2-D matmul."""
    return isinstance(layer, keras.layers.Dense) or (
        tuple(layer.kernel.shape[:2]) == (1, 1) and tuple(layer.strides) == (1, 1)
    )


def _depthwise(layer) -> bool:
    return (
        isinstance(layer, keras.layers.DepthwiseConv2D)
        and layer.data_format == "channels_last"
        and tuple(layer.dilation_rate) == (1, 1)
    )


def _foldable_norm(layer) -> bool:
    return (
        isinstance(layer, _NORM_LAYERS)
        and layer.center
        and layer.scale
        and not layer.rms_scaling
        and list(layer.axis) in ([-1], [len(layer.input.shape) - 1])
    )


def _layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _sole_producers(model: keras.Model):
    """(layer, producer) for each layer with one input that it alone reads (a model output is read
    by the caller too), produced by another layer: the pairs a fold may merge."""
    layers = _layers(model)
    outputs = model.outputs if isinstance(model.outputs, (list, tuple)) else [model.outputs]
    readers = Counter(id(t) for layer in layers for t in _inputs(layer))
    readers.update(id(t) for t in outputs)
    producer = {id(layer.output): layer for layer in layers}
    for layer in layers:
        sources = _inputs(layer)
        if len(sources) == 1 and readers[id(sources[0])] == 1 and id(sources[0]) in producer:
            yield layer, producer[id(sources[0])]


def _input_scale(eps_kernel: float, norm) -> float:
    """k such that LayerNorm(k x, eps_kernel) = LayerNorm(x, norm.epsilon)."""
    return float(np.sqrt(eps_kernel / norm.epsilon))


def fused_norm_epsilon() -> float | None:
    """The epsilon of this TensorFlow's fused oneDNN LayerNorm kernel, None where it has none (no
    oneDNN build, oneDNN's rewrites off, or another backend)."""
    if keras.backend.backend() != "tensorflow":
        return None
    from tensorflow.python.framework import op_def_registry

    from .runtime import onednn_enabled

    op = op_def_registry.get("_MklLayerNorm")
    if op is None or not onednn_enabled():
        return None
    defaults = {a.name: a.default_value.f for a in op.attr if a.HasField("default_value")}
    return defaults.get("epsilon") or None


def plan_folds(model: keras.Model, *, fold_norms: bool = True) -> tuple[dict, dict]:
    """Which norms fold into which linear layers, and which LayerScales into which fc2.

    Args:
        fold_norms: False: no norm folds (they run fused, affine kept).

    Returns:
        (norm_into: {linear layer name: norm layer}, scale_into: {linear layer name: LayerScale layer}).
    """
    norm_into, scale_into = {}, {}
    for layer, before in _sole_producers(model):
        if fold_norms and _linear(layer) and _foldable_norm(before):
            norm_into[layer.name] = before
        elif isinstance(layer, LayerScale) and _linear(before) and before.activation is keras.activations.linear:
            scale_into[before.name] = layer
    return norm_into, scale_into


def _prescaled(model: keras.Model, eps_kernel: float) -> tuple[dict, set]:
    """For the fused norm form: which layers' outputs are multiplied by which `k` (a depthwise or
    linear conv, no activation, read only by the norm), and which norms then take their input as it is.

    Returns:
        ({producer layer name: k}, {names of norms whose input is already scaled}).
    """
    scales, ready = {}, set()
    for layer, before in _sole_producers(model):
        if (
            _foldable_norm(layer)
            and layer.epsilon > 0
            and (_depthwise(before) or _linear(before))
            and before.activation is keras.activations.linear
        ):
            scales[before.name] = _input_scale(eps_kernel, layer)
            ready.add(layer.name)
    return scales, ready


def _folded(layer, norm, scale) -> tuple[np.ndarray, np.ndarray]:
    """The linear layer's kernel and bias (float64) with the norm's affine and the scale folded in.

    One float64 copy of the kernel, multiplied in place (the largest MLP kernels are hundreds of MB
    in float64): the same products as new arrays would hold.
    """
    kernel = np.array(keras.ops.convert_to_numpy(layer.kernel), np.float64)  # a copy: never the variable's memory
    bias = _folded_bias(layer)
    if norm is not None:
        g = np.asarray(keras.ops.convert_to_numpy(norm.gamma), np.float64)
        b = np.asarray(keras.ops.convert_to_numpy(norm.beta), np.float64)
        bias = bias + np.tensordot(b, kernel, axes=([0], [kernel.ndim - 2])).sum(axis=tuple(range(kernel.ndim - 2)))
        kernel *= g[:, None]
    if scale is not None:
        gamma = np.asarray(keras.ops.convert_to_numpy(scale.gamma), np.float64)
        kernel *= gamma
        bias = bias * gamma
    return kernel, bias


def _folded_bias(layer) -> np.ndarray:
    """The linear layer's bias (float64, a copy), zeros where it has none."""
    if layer.use_bias:
        return np.array(keras.ops.convert_to_numpy(layer.bias), np.float64)
    return np.zeros(layer.kernel.shape[-1])


def _scale(array: np.ndarray, k: float) -> np.ndarray:
    """`array` (float64) times `k`, in place."""
    if k != 1.0:
        array *= k
    return array


def _unchanged(layer, norm, scale, k: float) -> bool:
    """Whether the serving path's kernel of a linear layer is the layer's own: nothing folds into
    it, it is used in its own shape and its own dtype is the one it computes in."""
    return (
        norm is None
        and scale is None
        and k == 1.0
        and layer.kernel.dtype == layer.compute_dtype
        and (not _as_matmul(layer) or len(layer.kernel.shape) == 2)
    )


class _Weights:
    """The folded weights: variables, or graph constants (`constant=True`)."""

    def __init__(self, constant: bool):
        import tensorflow as tf

        self.tf, self.constant, self.arrays, self.variables = tf, constant, {}, {}

    def share(self, key: str, variable) -> None:
        """Read `variable` (a model's own) where `key` is used: no copy."""
        self.variables[key] = variable.value if isinstance(variable, keras.Variable) else variable

    def add(self, key: str, value: np.ndarray, dtype: str, constant: bool | None = None) -> None:
        value = np.asarray(value, np.float32)
        # An all-zero bias as a constant is removed by the graph optimiser, and with it the
        # matmul + bias + GELU pattern oneDNN fuses (the GELU then runs as 5 separate ops): keep it a
        # variable, whose value the optimiser cannot see.
        if not (self.constant if constant is None else constant) or (key.endswith("/bias") and not value.any()):
            self.variables[key] = self.tf.Variable(self.tf.cast(value, dtype), trainable=False, name=key)
        else:
            self.arrays[key] = (value, dtype)

    def module(self):
        """The variables as one trackable module."""
        module = self.tf.Module(name="folded_weights")
        module.folded = list(self.variables.values())
        return module

    def __getitem__(self, key: str):
        if key in self.variables:
            return self.variables[key]
        value, dtype = self.arrays[key]
        return self.tf.constant(value, dtype=dtype)


def serving_function(
    model: keras.Model, *, constant: bool = False, fused_norms: bool | None = None, shared: bool = False
):
    """A `tf.function` computing `model(x, training=False)` for inference, folded (see the module).

    Args:
        model: a functional ConvNeXt (`zoo.load`, `zoo.build`, a features or headless view).
        constant: weights as graph constants instead of variables (see the module; small models
            only: a GraphDef holds at most 2 GB).
        fused_norms: LayerNorms in the form oneDNN's fused kernel replaces (default: where this
            TensorFlow has that kernel); False: folded into the next linear layer, as for TFLite.
        shared: the kernels no fold changes (with fused norms: each `fc1`, the downsample convs and
            the classifier, about half the weights) are read from the model's own variables
            instead of copies holding the same values; the function then sees later changes of
            those variables but not of the folded ones, so only for a model whose weights stay as
            they are (the parity check). Not with `constant`.

    Returns:
        A function of one float32 NHWC batch returning the model's output (float32 logits,
        or features in the compute precision). It traces once per input shape family.

    Raises:
        BackendError: Keras runs on another backend than TensorFlow.
    """
    from .errors import BackendError

    if keras.backend.backend() != "tensorflow":
        raise BackendError(
            f"the serving function is a TensorFlow graph, and Keras runs on {keras.backend.backend()} "
            "here; call the model itself, or set KERAS_BACKEND=tensorflow"
        )
    import tensorflow as tf

    if not isinstance(model.inputs, (list, tuple)) or len(model.inputs) != 1:
        raise ValueError("the serving function takes models with one input")
    eps_kernel = None if fused_norms is False else fused_norm_epsilon()
    if fused_norms and eps_kernel is None:
        raise ValueError("this TensorFlow has no fused oneDNN LayerNorm kernel (fused_norms=True)")
    norm_into, scale_into = plan_folds(model, fold_norms=eps_kernel is None)
    prescale, ready = _prescaled(model, eps_kernel) if eps_kernel is not None else ({}, set())
    folded_away = {n.name for n in norm_into.values()} | {s.name for s in scale_into.values()}
    weights = _Weights(constant)
    layers = _layers(model)
    for layer in layers:
        k = prescale.get(layer.name, 1.0)
        if _linear(layer):
            norm, scale = norm_into.get(layer.name), scale_into.get(layer.name)
            if shared and not constant and _unchanged(layer, norm, scale, k):
                weights.share(f"{layer.name}/kernel", layer.kernel)
                bias = _folded_bias(layer)
            else:
                kernel, bias = _folded(layer, norm, scale)
                if _as_matmul(layer):
                    kernel = kernel.reshape(-1, kernel.shape[-1])
                kernel = _scale(kernel, k).astype(np.float32)  # rounded once; the float64 copy goes
                weights.add(f"{layer.name}/kernel", kernel, layer.compute_dtype)
            weights.add(f"{layer.name}/bias", _scale(bias, k), layer.compute_dtype)
        elif _depthwise(layer):
            kernel = np.array(keras.ops.convert_to_numpy(layer.kernel), np.float64)
            bias = (
                np.array(keras.ops.convert_to_numpy(layer.bias), np.float64)
                if layer.use_bias
                else np.zeros(layer.kernel.shape[2] * layer.depth_multiplier)
            )
            weights.add(f"{layer.name}/kernel", _scale(kernel, k), layer.compute_dtype)
            weights.add(f"{layer.name}/bias", _scale(bias, k), layer.compute_dtype)
        elif _foldable_norm(layer) and layer.name not in folded_away:
            # constants whatever `constant` says: the fused kernel's pattern needs them (C floats each)
            weights.add(f"{layer.name}/gamma", keras.ops.convert_to_numpy(layer.gamma), "float32", constant=True)
            weights.add(f"{layer.name}/beta", keras.ops.convert_to_numpy(layer.beta), "float32", constant=True)
    steps = {
        layer.name: _step(layer, weights, layer.name in folded_away, eps_kernel, layer.name in ready)
        for layer in layers
    }

    def serve(pixels):
        values = {id(model.inputs[0]): tf.convert_to_tensor(pixels, tf.float32)}
        for layer in layers:
            values[id(layer.output)] = steps[layer.name](*(values[id(t)] for t in _inputs(layer)))
        outs = [values[id(t)] for t in model.outputs]
        outs = [tf.cast(o, tf.float32) if o.dtype != tf.float32 and o.shape.rank == 2 else o for o in outs]
        return outs[0] if len(outs) == 1 else outs

    function = tf.function(serve, reduce_retracing=True)
    # what a SavedModel of the function must track: the variables it reads
    function.trackables = [
        layer
        for layer in layers
        if layer.weights
        and not (_linear(layer) or _depthwise(layer) or _foldable_norm(layer) or layer.name in folded_away)
    ]
    if weights.variables:
        function.trackables.append(weights.module())
    return function


def runner(model: keras.Model, *, constant: bool = False, shared: bool = False):
    """How inference runs `model`: its serving function on TensorFlow (`constant` and `shared` as
    there), else the model itself."""
    if keras.backend.backend() == "tensorflow":
        return serving_function(model, constant=constant, shared=shared)
    return lambda x: model.predict_on_batch(x)


def _static_or_dynamic(x, last: int) -> list:
    """`x`'s shape with its last axis replaced by `last`: static where known."""
    import tensorflow as tf

    dims = x.shape.as_list()
    dynamic = tf.shape(x)
    return [d if d is not None else dynamic[i] for i, d in enumerate(dims[:-1])] + [last]


def _fused_form(x, gamma, beta, eps: float):
    """LayerNorm over the last axis of a 2-D float32 `x` in the ops TensorFlow's graph optimiser
    replaces with oneDNN's fused kernel (its "common norm" pattern: positive reduction axis, kept
    dims, constant gamma and beta)."""
    import tensorflow as tf

    mean = tf.reduce_mean(x, axis=1, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=1, keepdims=True)
    inv = tf.math.rsqrt(variance + eps) * gamma
    return x * inv + (beta - inv * mean)


def _step(layer, weights: _Weights, folded_away: bool, eps_kernel: float | None = None, ready: bool = False):
    """How one layer runs in the serving function. `eps_kernel`: a norm runs in the fused form with
    this epsilon, on its input scaled by sqrt(eps_kernel / eps) (already, when `ready`)."""
    import tensorflow as tf

    dtype = layer.compute_dtype
    name = layer.name
    if folded_away and isinstance(layer, LayerScale):
        return lambda x: x
    if _foldable_norm(layer) and eps_kernel is not None and layer.epsilon > 0 and not folded_away:
        k = _input_scale(eps_kernel, layer)

        # bfloat16 runs the fused kernel in bfloat16 (oneDNN keeps its statistics in float32): no
        # casts around each norm; other dtypes normalise in float32
        work = tf.bfloat16 if dtype == "bfloat16" else tf.float32

        def fused(x):
            x2 = tf.cast(x, work)
            if not ready:  # before the reshape: the optimiser would otherwise merge it into the norm's ops
                x2 = x2 * tf.constant(k, work)
            x2 = tf.reshape(x2, [-1, x.shape[-1]])
            gamma, beta = (tf.cast(weights[f"{name}/{w}"], work) for w in ("gamma", "beta"))
            y = _fused_form(x2, gamma, beta, eps_kernel)
            return tf.reshape(tf.cast(y, dtype), _static_or_dynamic(x, x.shape[-1]))

        return fused
    if _foldable_norm(layer):
        eps = layer.epsilon

        def normalise(x):
            # over rows of a 2-D view: the reductions over the last axis run faster than on 4-D
            x32 = tf.reshape(tf.cast(x, tf.float32), [-1, x.shape[-1]])
            mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
            y = (x32 - mean) * tf.math.rsqrt(variance + eps)
            if not folded_away:
                y = y * weights[f"{name}/gamma"] + weights[f"{name}/beta"]
            return tf.reshape(tf.cast(y, dtype), _static_or_dynamic(x, x.shape[-1]))

        return normalise
    if _depthwise(layer):
        strides, padding, activation = (1, *layer.strides, 1), layer.padding.upper(), layer.activation

        def depthwise(x):
            y = tf.nn.depthwise_conv2d(tf.cast(x, dtype), weights[f"{name}/kernel"], strides, padding)
            return activation(tf.nn.bias_add(y, weights[f"{name}/bias"]))

        return depthwise
    if _linear(layer):
        activation = layer.activation
        if _as_matmul(layer):
            # a dense, or a 1x1 conv, as one 2-D matmul: oneDNN fuses its bias and GELU
            def linear(x):
                x = tf.cast(x, dtype)
                kernel = weights[f"{name}/kernel"]
                units = kernel.shape[-1]
                y = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), kernel)
                y = activation(tf.nn.bias_add(y, weights[f"{name}/bias"]))
                return tf.reshape(y, _static_or_dynamic(x, units)) if x.shape.rank != 2 else y

            return linear
        strides = layer.strides

        def conv(x):
            y = tf.nn.conv2d(tf.cast(x, dtype), weights[f"{name}/kernel"], strides, "VALID")
            return activation(tf.nn.bias_add(y, weights[f"{name}/bias"]))

        return conv
    if isinstance(layer, DropPath):
        return lambda x: x
    if isinstance(layer, keras.layers.Add):
        return lambda *xs: tf.add_n([tf.cast(x, dtype) for x in xs])
    return lambda *xs: layer(xs[0] if len(xs) == 1 else list(xs), training=False)


__all__ = ["fused_norm_epsilon", "plan_folds", "runner", "serving_function"]
