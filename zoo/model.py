"""The Keras 3 ConvNeXt: a functional model whose layer names are timm's module paths."""
from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from .architectures import Architecture

PACKAGE = "convnext_zoo"


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


def drop_path_rates(rate: float, depths) -> list[list[float]]:
    """Per-block rates rising linearly from 0 to `rate` over the whole network (as timm)."""
    flat = np.linspace(0.0, rate, sum(depths)).tolist()
    out, start = [], 0
    for depth in depths:
        out.append(flat[start:start + depth])
        start += depth
    return out


def _norm(arch: Architecture, name: str) -> layers.Layer:
    # Keras' LayerNormalization default eps is 1e-3; ConvNeXt uses 1e-6 (1e-5 for xxlarge).
    return layers.LayerNormalization(epsilon=arch.norm_eps, name=name)


def _pointwise(arch: Architecture, units: int, name: str) -> layers.Layer:
    # timm's conv_mlp variants hold the MLP as 1x1 convs: mirror the layer type so the
    # mapping table transposes (out, in, 1, 1) like any other conv.
    if arch.conv_mlp:
        return layers.Conv2D(units, 1, use_bias=arch.conv_bias, name=name)
    return layers.Dense(units, use_bias=arch.conv_bias, name=name)


def _block(x, arch: Architecture, dim: int, path: str, drop_rate: float):
    shortcut = x
    x = layers.DepthwiseConv2D(
        arch.kernel_size, padding="same", use_bias=arch.conv_bias, name=f"{path}.conv_dw"
    )(x)
    x = _norm(arch, f"{path}.norm")(x)
    x = _pointwise(arch, arch.mlp_ratio * dim, f"{path}.mlp.fc1")(x)
    x = layers.Activation(keras.activations.gelu, name=f"{path}.mlp.act")(x)  # exact (erf) GELU
    x = _pointwise(arch, dim, f"{path}.mlp.fc2")(x)
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
    input_shape: tuple = (None, None, 3),
    name: str | None = None,
) -> keras.Model:
    """Build an uninitialised ConvNeXt.

    Args:
        arch: the architecture row.
        num_classes: classifier width (ignored without the top).
        include_top: end with `head.fc` logits. Without it the model ends at the pooled,
            head-normalised features (`pooling="avg"`) or at the last stage's feature map
            (`pooling=None`).
        pooling: `"avg"` or `None`, only used when `include_top=False`.
        drop_path_rate: stochastic depth rate of the last block (linear from 0), training only.
        input_shape: NHWC input shape without the batch; spatial size is free by default.
        name: model name (defaults to the architecture name).

    Returns:
        A functional `keras.Model` taking NHWC float inputs (already normalised) and
        returning logits (timm's convention: no softmax).
    """
    if pooling not in ("avg", None):
        raise ValueError(f"pooling must be 'avg' or None, got {pooling!r}")
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = layers.Conv2D(arch.dims[0], 4, strides=4, use_bias=arch.conv_bias, name="stem.0")(inputs)
    x = _norm(arch, "stem.1")(x)
    rates = drop_path_rates(drop_path_rate, arch.depths)
    for i, (depth, dim) in enumerate(zip(arch.depths, arch.dims)):
        if i > 0:
            x = _norm(arch, f"stages.{i}.downsample.0")(x)
            x = layers.Conv2D(dim, 2, strides=2, use_bias=arch.conv_bias, name=f"stages.{i}.downsample.1")(x)
        for j in range(depth):
            x = _block(x, arch, dim, f"stages.{i}.blocks.{j}", rates[i][j])
    if include_top or pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="head.global_pool")(x)
        x = _norm(arch, "head.norm")(x)
    if include_top:
        x = layers.Dense(num_classes, name="head.fc")(x)
    return keras.Model(inputs, x, name=name or arch.name)


def stage_names(arch: Architecture) -> list[str]:
    """Names of the layers whose outputs the parity check compares, stem first."""
    return ["stem.1"] + [f"stages.{i}.blocks.{d - 1}" for i, d in enumerate(arch.depths)]


def probe_model(model: keras.Model, arch: Architecture) -> keras.Model:
    """A view of `model` returning every compared tensor: stem, stages, pre-logits, logits."""
    outputs = {f"stages.{i - 1}" if i else "stem": model.get_layer(n).output
               for i, n in enumerate(stage_names(arch))}
    outputs["pre_logits"] = model.get_layer("head.fc").input
    outputs["logits"] = model.output
    return keras.Model(model.input, outputs, name=f"{model.name}_probe")
