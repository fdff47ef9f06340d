"""The serving path: a loaded ConvNeXt as one TensorFlow function for inference.

The Keras model is the trainable network; inference (`zoo predict`, `zoo eval`, the SavedModel
and TFLite exports, `serving_function(model)` for users) runs the same layers in the same
order with three changes that are exact in real arithmetic and move float32 logits by rounding
only (the conversion's parity gate checks this path against PyTorch too):

- the weights are graph constants, not variables: oneDNN then runs its inference kernels with
  the weights packed once (with variables it picks its training kernels and repacks per call);
- a LayerNorm's affine is folded into the linear layer that alone reads it (`fc1`, a downsample
  conv, the head's first dense): `(x_hat * g + b) W + c = x_hat (g W) + (b W + c)`, with no
  padding between the two for convolutions;
- a LayerScale is folded into the `fc2` before it: `gamma * (h W + c) = h (W gamma) + gamma c`.

Each norm normalises in float32 (as Keras' LayerNormalization) and each layer computes in its
own compute dtype, so a bfloat16 model serves in bfloat16 with float32 statistics and logits.
Layers without a rule here run as their Keras layer (variables captured): any functional model
of these layers serves, folded where the rules apply.
"""
from __future__ import annotations

from collections import Counter

import keras
import numpy as np

from .model import DropPath, LayerScale

_NORM_LAYERS = (keras.layers.LayerNormalization,)
CONSTANT_BYTES = 1 << 30  # above this many bytes of weights, folded weights stay variables (GraphDef's 2 GB)


def _inputs(layer) -> list:
    x = layer.input
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _linear(layer) -> bool:
    """A layer whose input a norm's affine folds into exactly: dense, or an unpadded ungrouped conv."""
    if isinstance(layer, keras.layers.Dense):
        return True
    return (type(layer) is keras.layers.Conv2D and layer.padding == "valid" and layer.groups == 1
            and layer.data_format == "channels_last" and tuple(layer.dilation_rate) == (1, 1))


def _as_matmul(layer) -> bool:
    """A dense, or a 1x1 stride-1 conv: one 2-D matmul."""
    return isinstance(layer, keras.layers.Dense) or (tuple(layer.kernel.shape[:2]) == (1, 1)
                                                     and tuple(layer.strides) == (1, 1))


def _depthwise(layer) -> bool:
    return (isinstance(layer, keras.layers.DepthwiseConv2D) and layer.data_format == "channels_last"
            and tuple(layer.dilation_rate) == (1, 1))


def _foldable_norm(layer) -> bool:
    return (isinstance(layer, _NORM_LAYERS) and layer.center and layer.scale and not layer.rms_scaling
            and list(layer.axis) in ([-1], [len(layer.input.shape) - 1]))


def plan(model: keras.Model) -> tuple[dict, dict]:
    """Which norms fold into which linear layers, and which LayerScales into which fc2.

    Returns:
        (norm_into: {linear layer name: norm layer}, scale_into: {linear layer name: LayerScale layer}).
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    outputs = model.outputs if isinstance(model.outputs, (list, tuple)) else [model.outputs]
    readers = Counter(id(t) for layer in layers for t in _inputs(layer))
    readers.update(id(t) for t in outputs)  # a model output is read by the caller
    producer = {id(layer.output): layer for layer in layers}
    norm_into, scale_into = {}, {}
    for layer in layers:
        sources = _inputs(layer)
        if len(sources) != 1 or readers[id(sources[0])] != 1:
            continue
        before = producer.get(id(sources[0]))
        if _linear(layer) and before is not None and _foldable_norm(before):
            norm_into[layer.name] = before
        elif (isinstance(layer, LayerScale) and before is not None and _linear(before)
              and before.activation is keras.activations.linear):
            scale_into[before.name] = layer
    return norm_into, scale_into


def _folded(layer, norm, scale) -> tuple[np.ndarray, np.ndarray]:
    """The linear layer's kernel and bias (float64) with the norm's affine and the scale folded in."""
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float64)
    out = kernel.shape[-1]
    bias = (np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float64) if layer.use_bias
            else np.zeros(out))
    if norm is not None:
        g = np.asarray(keras.ops.convert_to_numpy(norm.gamma), np.float64)
        b = np.asarray(keras.ops.convert_to_numpy(norm.beta), np.float64)
        bias = bias + np.tensordot(b, kernel, axes=([0], [kernel.ndim - 2])).sum(
            axis=tuple(range(kernel.ndim - 2)))
        kernel = kernel * g[:, None]
    if scale is not None:
        gamma = np.asarray(keras.ops.convert_to_numpy(scale.gamma), np.float64)
        kernel, bias = kernel * gamma, bias * gamma
    return kernel, bias


class _Weights:
    """The folded weights: graph constants, or variables for models too large for a GraphDef."""

    def __init__(self, constant: bool):
        import tensorflow as tf

        self.tf, self.constant, self.arrays, self.variables = tf, constant, {}, {}

    def add(self, key: str, value: np.ndarray, dtype: str) -> None:
        value = np.asarray(value, np.float32)
        self.arrays[key] = (value, dtype)
        # An all-zero bias as a constant is removed by the graph optimiser, and with it the
        # matmul + bias + GELU pattern oneDNN fuses (the GELU then runs as 5 separate ops): keep it a
        # variable, whose value the optimiser cannot see.
        if not self.constant or (key.endswith("/bias") and not value.any()):
            self.variables[key] = self.tf.Variable(self.tf.cast(value, dtype), trainable=False, name=key)

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


def _weight_bytes(model: keras.Model) -> int:
    return sum(int(np.prod(v.shape)) * 4 for v in model.weights)


def serving_function(model: keras.Model, *, constant: bool | None = None):
    """A `tf.function` computing `model(x, training=False)` for inference, folded (see the module).

    Args:
        model: a functional ConvNeXt (`zoo.load`, `zoo.build`, a features or headless view).
        constant: weights as graph constants (default: unless they exceed `CONSTANT_BYTES`).

    Returns:
        A function of one float32 NHWC batch returning the model's output (float32 logits,
        or features in the compute precision). It traces once per input shape family.

    Raises:
        BackendError: Keras runs on another backend than TensorFlow.
    """
    from .errors import BackendError

    if keras.backend.backend() != "tensorflow":
        raise BackendError(f"the serving function is a TensorFlow graph, and Keras runs on {keras.backend.backend()} "
                           "here; call the model itself, or set KERAS_BACKEND=tensorflow")
    import tensorflow as tf

    if not isinstance(model.inputs, (list, tuple)) or len(model.inputs) != 1:
        raise ValueError("the serving function takes models with one input")
    norm_into, scale_into = plan(model)
    folded_away = {n.name for n in norm_into.values()} | {s.name for s in scale_into.values()}
    weights = _Weights(_weight_bytes(model) <= CONSTANT_BYTES if constant is None else constant)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    for layer in layers:
        if _linear(layer):
            kernel, bias = _folded(layer, norm_into.get(layer.name), scale_into.get(layer.name))
            if _as_matmul(layer):
                kernel = kernel.reshape(-1, kernel.shape[-1])
            weights.add(f"{layer.name}/kernel", kernel, layer.compute_dtype)
            weights.add(f"{layer.name}/bias", bias, layer.compute_dtype)
        elif _depthwise(layer):
            weights.add(f"{layer.name}/kernel", keras.ops.convert_to_numpy(layer.kernel), layer.compute_dtype)
            weights.add(f"{layer.name}/bias", keras.ops.convert_to_numpy(layer.bias) if layer.use_bias
                        else np.zeros(layer.kernel.shape[2] * layer.depth_multiplier), layer.compute_dtype)
        elif _foldable_norm(layer) and layer.name not in folded_away:
            weights.add(f"{layer.name}/gamma", keras.ops.convert_to_numpy(layer.gamma), "float32")
            weights.add(f"{layer.name}/beta", keras.ops.convert_to_numpy(layer.beta), "float32")
    steps = {layer.name: _step(layer, weights, layer.name in folded_away) for layer in layers}

    def serve(pixels):
        values = {id(model.inputs[0]): tf.convert_to_tensor(pixels, tf.float32)}
        for layer in layers:
            values[id(layer.output)] = steps[layer.name](*(values[id(t)] for t in _inputs(layer)))
        outs = [values[id(t)] for t in model.outputs]
        outs = [tf.cast(o, tf.float32) if o.dtype != tf.float32 and o.shape.rank == 2 else o for o in outs]
        return outs[0] if len(outs) == 1 else outs

    function = tf.function(serve, reduce_retracing=True)
    # what a SavedModel of the function must track: the variables it reads
    function.trackables = [layer for layer in layers if layer.weights and not (
        _linear(layer) or _depthwise(layer) or _foldable_norm(layer) or layer.name in folded_away)]
    if weights.variables:
        function.trackables.append(weights.module())
    return function


def runner(model: keras.Model, *, constant: bool | None = None):
    """How inference runs `model`: its serving function on TensorFlow (`constant` as there), else
    the model itself."""
    if keras.backend.backend() == "tensorflow":
        return serving_function(model, constant=constant)
    return lambda x: model.predict_on_batch(x)


def _static_or_dynamic(x, last: int) -> list:
    """`x`'s shape with its last axis replaced by `last`: static where known."""
    import tensorflow as tf

    dims = x.shape.as_list()
    dynamic = tf.shape(x)
    return [d if d is not None else dynamic[i] for i, d in enumerate(dims[:-1])] + [last]


def _step(layer, weights: _Weights, folded_away: bool):
    """How one layer runs in the serving function."""
    import tensorflow as tf

    dtype = layer.compute_dtype
    name = layer.name
    if folded_away and isinstance(layer, LayerScale):
        return lambda x: x
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


__all__ = ["CONSTANT_BYTES", "plan", "runner", "serving_function"]
