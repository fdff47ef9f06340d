"""The Keras 3 ConvNeXt: a functional model whose layer names are timm's module paths."""

from __future__ import annotations

import contextlib

import keras
import numpy as np
from keras import layers, ops

from .architectures import Architecture, check_features, make_divisible
from .errors import BackendError
from .runtime import FROZEN_VAR, check_onednn, frozen_weights

PACKAGE = "convnext_zoo"  # the registered names are `convnext_zoo>LayerScale`, ...


def check_backend() -> None:
    """Refuse Keras' torch backend in one line, before torch fails somewhere inside.

    Keras on torch keeps each layer's variables as torch parameters named after their paths,
    and torch refuses a parameter name with a dot: this model's layers carry timm's module
    paths (`stages.0.blocks.0.conv_dw`) as their names, so that every weight maps by name.
    """
    if keras.backend.backend() == "torch":
        raise BackendError(
            "convnext-zoo models run on Keras' TensorFlow or JAX backend, not torch: their layer "
            "names are timm's dotted module paths, which torch parameters cannot carry; "
            "set KERAS_BACKEND=tensorflow (or jax)"
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvNeXt(keras.Model):
    """The functional ConvNeXt `build_model` returns: a `keras.Model` like any functional one,
    whose class is registered as `convnext_zoo>ConvNeXt`, so that `keras.saving.load_model`
    can refuse a backend the model cannot run on before it builds any layer.

    Where oneDNN keeps packed weights (`TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1`, `zoo.core.runtime`), an
    eager call runs the model as a graph of its own instead, made again after `load_weights` or
    `set_weights`: eagerly, every convolution of one shape shares one kernel and so the first
    layer's packed weights. Training is refused there: each graph kernel keeps the weights of its
    first step.
    """

    @classmethod
    def from_config(cls, config, custom_objects=None):
        check_backend()
        return super().from_config(config, custom_objects)

    def call(self, inputs, training=None, mask=None, **kwargs):
        if keras.backend.backend() == "tensorflow" and frozen_weights():
            if training:
                raise BackendError(
                    f"{FROZEN_VAR}=1 is set: oneDNN keeps the first weights each kernel sees, so "
                    f"training would compute with stale weights; train in a process without it "
                    f"(unset {FROZEN_VAR} before TensorFlow starts)"
                )
            import tensorflow as tf

            if tf.executing_eagerly():
                return self._graph()(inputs)
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def _graph(self):
        graph = self.__dict__.get("_frozen_graph")
        if graph is None:
            import tensorflow as tf

            call = super().call  # the functional model's own
            graph = tf.function(lambda x: call(x, training=False), reduce_retracing=True, autograph=False)
            object.__setattr__(self, "_frozen_graph", graph)  # not a tracked attribute of the model
        return graph

    def _weights_changed(self) -> None:
        """Forget every graph that ran the old weights: their kernels hold packed copies of them."""
        object.__setattr__(self, "_frozen_graph", None)
        for name in ("predict_function", "test_function", "train_function"):
            if getattr(self, name, None) is not None:
                setattr(self, name, None)

    def load_weights(self, *args, **kwargs):
        try:
            return super().load_weights(*args, **kwargs)
        finally:
            self._weights_changed()

    def set_weights(self, weights):
        try:
            return super().set_weights(weights)
        finally:
            self._weights_changed()


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerScale(keras.layers.Layer):
    """Per-channel scale of a residual branch (timm's block `gamma`).

    A layer of its own so that the model owns the weight (it is saved, loaded and counted)
    and so that it follows the dtype policy: the variable stays float32, the product is
    computed in the layer's compute dtype.
    """

    def __init__(self, init_value: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.init_value = init_value

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma",
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value),
        )

    def call(self, inputs):
        return inputs * ops.cast(self.gamma, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


@keras.saving.register_keras_serializable(package=PACKAGE)
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops a whole residual branch per sample, only in training."""

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        mask = ops.floor(keep + keras.random.uniform(shape, seed=self.seed_generator, dtype=inputs.dtype))
        return inputs / keep * mask

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class GlobalResponseNorm(keras.layers.Layer):
    """ConvNeXt-V2's GRN on NHWC: `x + bias + weight * (x * N(x))`.

    `N(x) = ||x||_2 over H,W / (mean over channels of it + eps)`, as timm's
    `GlobalResponseNorm` (weights start at zero: the layer starts as an identity).
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = (input_shape[-1],)
        self.weight = self.add_weight(name="weight", shape=channels, initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=channels, initializer="zeros")

    def call(self, inputs):
        # The L2 norm over H, W in float32: in float16 the sum of squares of a 56x56 map overflows.
        x = ops.cast(inputs, "float32")
        gx = ops.sqrt(ops.sum(ops.square(x), axis=(1, 2), keepdims=True))
        nx = gx / (ops.mean(gx, axis=-1, keepdims=True) + self.epsilon)
        # variables are read in the compute dtype under mixed precision: cast them back
        weight, bias = ops.cast(self.weight, "float32"), ops.cast(self.bias, "float32")
        out = x + (bias + weight * (x * nx))
        return ops.cast(out, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SimpleNorm(keras.layers.Layer):
    """timm's SimpleNorm over the channel axis: `x * rsqrt(var(x) + eps) * weight`.

    No centring of the output and no bias; the variance is the unbiased one (torch.var).
    """

    def __init__(self, epsilon: float = 1e-6, scale: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.scale = scale

    def build(self, input_shape):
        self.weight = (
            self.add_weight(name="weight", shape=(input_shape[-1],), initializer="ones") if self.scale else None
        )

    def call(self, inputs):
        x = ops.cast(inputs, "float32")  # statistics in float32 under mixed precision, as LayerNormalization
        channels = x.shape[-1]
        centred = x - ops.mean(x, axis=-1, keepdims=True)
        variance = ops.sum(ops.square(centred), axis=-1, keepdims=True) / (channels - 1)
        out = x * ops.rsqrt(variance + self.epsilon)
        return ops.cast(out * ops.cast(self.weight, "float32") if self.scale else out, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "scale": self.scale}


@contextlib.contextmanager
def dtype_policy(name: str):
    """Build models under the Keras dtype policy `name`, then restore the global one.

    Conversion and parity always run in float32, whatever policy the user has set.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PointwiseDense(layers.Dense):
    """A `Dense` over the channel axis of NHWC maps, computed as one 2-D matmul.

    TensorFlow's graph optimiser fuses a 2-D MatMul + BiasAdd + exact GELU into one oneDNN
    call; the same `Dense` applied to the 4-D map gets no such fusion, and a standalone exact
    GELU costs as much as the matmul. Same variables, same names, same mapping as `Dense`.
    """

    def call(self, inputs, training=None):
        if keras.backend.backend() != "tensorflow":
            return super().call(inputs)
        import tensorflow as tf

        spatial = inputs.shape[1:-1]
        if all(d is not None for d in spatial):  # static where known: no shape ops in exported graphs
            out_shape = [-1, *spatial, self.units]
        else:
            out_shape = tf.concat([tf.shape(inputs)[:-1], [self.units]], axis=0)
        x = tf.reshape(inputs, [-1, inputs.shape[-1]])
        y = tf.matmul(x, ops.cast(self.kernel, x.dtype))
        if self.use_bias:
            y = tf.nn.bias_add(y, ops.cast(self.bias, y.dtype))
        if self.activation is not None:
            y = self.activation(y)
        return tf.reshape(y, out_shape)


def drop_path_rates(rate: float, depths) -> list[list[float]]:
    """Per-block rates rising linearly from 0 to `rate` over the whole network (as timm)."""
    flat = np.linspace(0.0, rate, sum(depths)).tolist()
    out, start = [], 0
    for depth in depths:
        out.append(flat[start : start + depth])
        start += depth
    return out


def _norm(arch: Architecture, name: str, affine: bool = True, eps: float | None = None) -> layers.Layer:
    eps = arch.norm_eps if eps is None else eps
    if arch.norm == "simplenorm":
        return SimpleNorm(eps, scale=affine, name=name)
    # Keras' LayerNormalization default eps is 1e-3; ConvNeXt uses 1e-6 (1e-5 for xxlarge).
    return layers.LayerNormalization(epsilon=eps, center=affine, scale=affine, name=name)


def _kernel_init(initialize: bool) -> dict:
    """Keras' default initialisers, or zeros for a model whose weights are loaded right after:
    drawing random kernels for a large model costs more than reading its weights (2.2 s vs
    1.0 s to build convnext_large here). A converted folder's `config.json` keeps the zeros, so
    `keras.saving.load_model` skips the draw too (on JAX, 0.35 s instead of 6.6 s for atto)."""
    return {} if initialize else {"kernel_initializer": "zeros"}


def _conv(filters: int, size: int, stride: int, padding: int, bias: bool, name: str, init: dict):
    # torch pads symmetrically; Keras' "same" pads the bottom/right more at stride 2
    def apply(x):
        if padding:
            x = layers.ZeroPadding2D(padding, name=f"{name}.pad")(x)
        return layers.Conv2D(filters, size, strides=stride, use_bias=bias, name=name, **init)(x)

    return apply


def _stem(x, arch: Architecture, init: dict):
    """timm's stems, with their Sequential indices as layer names."""
    dim, bias = arch.dims[0], arch.conv_bias
    if arch.stem_type == "patch":
        x = _conv(dim, 4, 4, 0, bias, "stem.0", init)(x)
        return _norm(arch, "stem.1")(x)
    mid = make_divisible(dim // 2) if arch.stem_type == "overlap_tiered" else dim
    x = _conv(mid, 3, 2, 1, bias, "stem.0", init)(x)
    index = 1
    if arch.stem_type == "overlap_act":
        x = layers.Activation(keras.activations.gelu, name="stem.1")(x)
        index = 2
    x = _conv(dim, 3, 2, 1, bias, f"stem.{index}", init)(x)
    return _norm(arch, f"stem.{index + 1}")(x)


def stem_output(arch: Architecture) -> str:
    """Name of the stem's last layer."""
    return {"patch": "stem.1", "overlap": "stem.2", "overlap_tiered": "stem.2", "overlap_act": "stem.3"}[arch.stem_type]


def _pointwise(arch: Architecture, units: int, name: str, init: dict, activation=None) -> layers.Layer:
    # timm's conv_mlp variants hold the MLP as 1x1 convs: mirror the layer type so the
    # mapping table transposes (out, in, 1, 1) like any other conv.
    if arch.conv_mlp:
        return layers.Conv2D(units, 1, use_bias=arch.conv_bias, activation=activation, name=name, **init)
    return PointwiseDense(units, use_bias=arch.conv_bias, activation=activation, name=name, **init)


def _block(x, arch: Architecture, dim: int, path: str, drop_rate: float, init: dict):
    shortcut = x
    depthwise_init = {"depthwise_initializer": init["kernel_initializer"]} if init else {}
    x = layers.DepthwiseConv2D(
        arch.kernel_size, padding="same", use_bias=arch.conv_bias, name=f"{path}.conv_dw", **depthwise_init
    )(x)
    x = _norm(arch, f"{path}.norm")(x)
    # timm's mlp.act, exact (erf) GELU, inside fc1: one fused call with the matmul
    x = _pointwise(arch, arch.mlp_ratio * dim, f"{path}.mlp.fc1", init, activation=keras.activations.gelu)(x)
    if arch.use_grn:
        x = GlobalResponseNorm(name=f"{path}.mlp.grn")(x)
    x = _pointwise(arch, dim, f"{path}.mlp.fc2", init)(x)
    if arch.layer_scale:
        x = LayerScale(name=f"{path}.gamma")(x)
    if drop_rate > 0.0:
        x = DropPath(drop_rate, name=f"{path}.drop_path")(x)
    # The block's output carries the block's own module path: stage outputs are found by name.
    return layers.Add(name=path)([shortcut, x])


def build_model(
    arch: Architecture,
    *,
    num_classes: int = 1000,
    include_top: bool = True,
    pooling: str | None = "avg",
    drop_path_rate: float = 0.0,
    head_norm_affine: bool = True,
    input_shape: tuple | None = None,
    name: str | None = None,
    initialize: bool = True,
    features: tuple[int, ...] = (),
) -> keras.Model:
    """Build an uninitialised ConvNeXt.

    Args:
        arch: the architecture row.
        num_classes: classifier width; 0 for a backbone whose output is the pre-logits
            (timm's `num_classes=0`).
        include_top: end with timm's full output. Without it the model ends at the pooled
            pre-logits (`pooling="avg"`, timm's `forward_head(pre_logits=True)`: pool, the
            trained head norm, the head MLP if any) or at the feature map (`pooling=None`,
            timm's `forward_features`).
        pooling: `"avg"` or `None`, only used when `include_top=False`.
        drop_path_rate: stochastic depth rate of the last block (linear from 0), training only.
        head_norm_affine: the head norm has weights (False for checkpoints that ship none,
            FCMAE's, which timm then runs with its identity initialisation).
        input_shape: NHWC input shape without the batch; default `(None, None, arch.in_chans)`
            (any size).
        name: model name (defaults to the architecture name).
        initialize: draw Keras' random initial kernels; False starts them at zero, for a
            model whose weights are loaded next (much faster for large models).
        features: a dense-prediction backbone's out_indices: the model returns the list of
            these stages' outputs, each through a LayerNorm of its own (`norm{i}`, FB's
            segmentation and detection backbones, transformers' `ConvNextBackbone`), and has
            no head (`num_classes`, `include_top` and `pooling` are not used).

    Returns:
        A functional `keras.Model` taking NHWC float inputs (already normalised) and
        returning logits (timm's convention: no softmax), or the feature maps of `features`.
    """
    if pooling not in ("avg", None):
        raise ValueError(f"pooling must be 'avg' or None, got {pooling!r}")
    features = check_features(features)
    check_backend()
    check_onednn()
    inputs = keras.Input(shape=input_shape or (None, None, arch.in_chans), name="pixels")
    init = _kernel_init(initialize)
    x = _stem(inputs, arch, init)
    rates = drop_path_rates(drop_path_rate, arch.depths)
    outputs = []
    for i, (depth, dim) in enumerate(zip(arch.depths, arch.dims, strict=False)):
        if i > 0:
            x = _norm(arch, f"stages.{i}.downsample.0")(x)
            x = layers.Conv2D(dim, 2, strides=2, use_bias=arch.conv_bias, name=f"stages.{i}.downsample.1", **init)(x)
        for j in range(depth):
            x = _block(x, arch, dim, f"stages.{i}.blocks.{j}", rates[i][j], init)
        if i in features:  # a LayerNorm over channels, whatever the blocks' norm (as FB and transformers)
            outputs.append(layers.LayerNormalization(epsilon=arch.norm_eps, name=f"norm{i}")(x))
    if features:
        return ConvNeXt(inputs, outputs, name=name or arch.name)
    if arch.head_norm_first:
        x = _norm(arch, "norm_pre")(x)
    if include_top or pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="head.global_pool")(x)
        if not arch.head_norm_first:
            x = _norm(arch, "head.norm", affine=head_norm_affine, eps=arch.head_eps)(x)
        if arch.head_hidden_size:
            x = layers.Dense(arch.head_hidden_size, use_bias=True, name="head.pre_logits.fc", **init)(x)
            x = layers.Activation(keras.activations.gelu, name="head.pre_logits.act")(x)
    if include_top and num_classes > 0:
        x = classifier(num_classes, init)(x)
    return ConvNeXt(inputs, x, name=name or arch.name)


def classifier(num_classes: int, init: dict | None = None) -> layers.Dense:
    """The `head.fc` layer; float32 under a 16-bit or mixed policy (stable logits and losses)."""
    reduced = keras.config.dtype_policy().compute_dtype != "float32"
    return layers.Dense(num_classes, name="head.fc", dtype="float32" if reduced else None, **(init or {}))


def freeze_stages(model: keras.Model, num_stages: int) -> keras.Model:
    """Freeze the stem and the first `num_stages` stages (0 freezes only the stem) for fine-tuning.

    Layers are found by their timm module paths; everything after them stays trainable.
    Returns the same model.
    """
    if not 0 <= num_stages <= 4:
        raise ValueError(f"num_stages must be 0..4, got {num_stages}")
    frozen = ("stem.",) + tuple(f"stages.{i}." for i in range(num_stages))
    for layer in model.layers:
        if layer.name.startswith(frozen):
            layer.trainable = False
    return model


def stage_names(arch: Architecture) -> list[str]:
    """Names of the layers whose outputs the parity check compares, stem first."""
    return [stem_output(arch)] + [f"stages.{i}.blocks.{d - 1}" for i, d in enumerate(arch.depths)]


def feature_names(arch: Architecture, out_indices=(0, 1, 2, 3)) -> list[str]:
    """Layers giving timm's `features_only` outputs: stage i's output, stride 2**(i + 2)."""
    names = stage_names(arch)[1:]
    try:
        return [names[i] for i in out_indices]
    except (IndexError, TypeError):
        raise ValueError(f"out_indices must be stage indices in -4..3, got {out_indices!r}") from None


def features_layer(arch: Architecture) -> str:
    """The layer ending timm's `forward_features` (the unpooled feature map)."""
    return "norm_pre" if arch.head_norm_first else f"stages.3.blocks.{arch.depths[3] - 1}"


def pre_logits(model: keras.Model):
    """The tensor timm calls pre-logits: the classifier's input (the output without one)."""
    names = {layer.name for layer in model.layers}
    return model.get_layer("head.fc").input if "head.fc" in names else model.output


def probe_model(model: keras.Model, arch: Architecture, features: tuple[int, ...] = ()) -> keras.Model:
    """A view of `model` returning every compared tensor: stem, stages, then pre-logits and logits,
    or a backbone's normalised feature maps (`features.{i}`, its `features`)."""
    outputs = {f"stages.{i - 1}" if i else "stem": model.get_layer(n).output for i, n in enumerate(stage_names(arch))}
    if features:
        outputs.update({f"features.{i}": model.get_layer(f"norm{i}").output for i in features})
    else:
        outputs["pre_logits"] = pre_logits(model)
        outputs["logits"] = model.output
    return keras.Model(model.input, outputs, name=f"{model.name}_probe")
