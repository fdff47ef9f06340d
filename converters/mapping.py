"""Step 2 of a conversion: port a timm state dict onto the Keras layers, strictly.

Keras layers are named after timm's module paths, so the whole mapping is one table keyed by
Keras layer type: which variable takes which `<layer name><suffix>` tensor, and how it is
transposed. Nothing is picked by position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from zoo.core.errors import MappingError
from zoo.core.model import GlobalResponseNorm, LayerScale, SimpleNorm


@dataclass(frozen=True)
class Rule:
    """One Keras variable fed from one timm tensor.

    Attributes:
        attr: attribute of the Keras layer holding the variable (`kernel`).
        suffix: appended to the layer name to form the timm key (`.weight`; `""` when the
            layer name is itself the parameter path, as for `gamma`).
        perm: the transpose from the torch layout to the Keras layout (Keras axis i is torch
            axis `perm[i]`); None when the layouts agree.
    """

    attr: str
    suffix: str
    perm: tuple[int, ...] | None = None

    def torch_shape(self, keras_shape: tuple) -> tuple:
        """The shape the state dict must hold for a Keras variable of `keras_shape`."""
        if self.perm is None:
            return tuple(keras_shape)
        return tuple(keras_shape[self.perm.index(axis)] for axis in range(len(self.perm)))

    def to_keras(self, array: np.ndarray) -> np.ndarray:
        """`array` (torch layout) in the Keras layout, C-contiguous."""
        if self.perm is None:
            return array
        # tf.transpose is blocked and threaded: 2-3x numpy's strided copy on the MLP kernels
        return np.asarray(keras.ops.transpose(array, self.perm))


_CONV = (2, 3, 1, 0)  # torch conv (out, in, kh, kw) -> keras (kh, kw, in, out)
_DEPTHWISE = (2, 3, 0, 1)  # torch depthwise (C, 1, kh, kw) -> keras DepthwiseConv2D (kh, kw, C, 1)
_LINEAR = (1, 0)  # torch linear (out, in) -> keras Dense (in, out)

RULES: dict[type, tuple[Rule, ...]] = {
    keras.layers.Conv2D: (Rule("kernel", ".weight", _CONV), Rule("bias", ".bias")),
    keras.layers.DepthwiseConv2D: (Rule("kernel", ".weight", _DEPTHWISE), Rule("bias", ".bias")),
    keras.layers.Dense: (Rule("kernel", ".weight", _LINEAR), Rule("bias", ".bias")),
    keras.layers.LayerNormalization: (Rule("gamma", ".weight"), Rule("beta", ".bias")),
    LayerScale: (Rule("gamma", ""),),
    GlobalResponseNorm: (Rule("weight", ".weight"), Rule("bias", ".bias")),
    SimpleNorm: (Rule("weight", ".weight"),),
}


@dataclass(frozen=True)
class Assignment:
    """A planned copy of one timm tensor into one Keras variable."""

    key: str
    variable: keras.Variable
    rule: Rule


def _rules_for(layer: keras.layers.Layer) -> tuple[Rule, ...]:
    # exact type first: DepthwiseConv2D must not fall back to its Conv2D base
    for cls in type(layer).__mro__:
        if cls in RULES:
            return RULES[cls]
    raise MappingError(f"no mapping rule for layer {layer.name!r} of type {type(layer).__name__}")


def plan_assignments(model: keras.Model) -> list[Assignment]:
    """Every Keras variable of `model` with the timm key and rule that feeds it."""
    assignments = []
    for layer in model.layers:
        if not layer.weights:
            continue
        for rule in _rules_for(layer):
            variable = getattr(layer, rule.attr, None)
            if variable is None:  # e.g. use_bias=False
                continue
            assignments.append(Assignment(layer.name + rule.suffix, variable, rule))
    planned = {id(a.variable) for a in assignments}
    orphans = [v.path for v in model.weights if id(v) not in planned]
    if orphans:
        raise MappingError(f"Keras variables without a mapping rule: {orphans}")
    return assignments


LISTED = 12  # differences an error lists by default: a wrong layout would list hundreds


def check(state_dict: dict[str, np.ndarray], assignments: list[Assignment], listed: int | None = LISTED) -> None:
    """Raise one error naming the missing keys, unexpected keys and shape mismatches (every one
    of them with `listed=None`, else the first `listed` and how many more)."""
    wanted = {a.key: a for a in assignments}
    missing = sorted(set(wanted) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(wanted))
    mismatched = []
    for key in sorted(set(wanted) & set(state_dict)):
        a = wanted[key]
        expected = a.rule.torch_shape(tuple(a.variable.shape))
        if tuple(state_dict[key].shape) != expected:
            mismatched.append(f"{key}: checkpoint {tuple(state_dict[key].shape)}, model expects {expected}")
    if missing or unexpected or mismatched:
        lines = [
            f"the checkpoint does not match the model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} shape mismatches):"
        ]
        found = [f" - in model, not in checkpoint: {k}" for k in missing]
        found += [f" + in checkpoint, not in model: {k}" for k in unexpected]
        found += [f" ~ shape mismatch: {m}" for m in mismatched]
        if listed is not None and len(found) > listed:
            found = found[:listed] + [f" ... and {len(found) - listed} more (--verbose lists them all)"]
        raise MappingError("\n".join(lines + found))


def values(
    state_dict: dict[str, np.ndarray], model: keras.Model, listed: int | None = LISTED
) -> dict[int, Callable[[], np.ndarray]]:
    """The value of every Keras variable of `model` in the Keras layout, keyed by `id(variable)`.

    Every check runs first: a mismatch raises before any value exists. Each value is computed
    when it is called (one transposed tensor at a time, not a second copy of the model), for
    `checkpoints.store` to write straight into the weights file.

    Raises:
        MappingError: missing/unexpected keys or shape mismatches (all listed at once), or a
            variable fed twice.
    """
    assignments = plan_assignments(model)
    check(state_dict, assignments, listed)
    out: dict[int, Callable[[], np.ndarray]] = {}
    for a in assignments:
        if id(a.variable) in out:
            raise MappingError(f"variable {a.variable.path} would be assigned twice")
        out[id(a.variable)] = functools.partial(_keras_value, a.rule, state_dict[a.key], a.variable.dtype)
    return out


def _keras_value(rule: Rule, array: np.ndarray, dtype: str) -> np.ndarray:
    return rule.to_keras(array).astype(dtype, copy=False)


def timm_state(model: keras.Model, *, shapes_only: bool = False) -> dict[str, np.ndarray]:
    """The way back: every Keras variable of `model` as the timm tensor it was mapped from (float32,
    torch layout), keyed by `<layer name><suffix>` through the same table (`RULES`), each transpose inverted.

    Only transposes (exact): a converted model gives back its timm tensors bit for bit. With
    `shapes_only`, each tensor is a read-only zero of its shape that holds no memory (what the
    names and shapes say, `converters.inference`, without a copy of the weights).

    Raises:
        MappingError: a layer no rule holds (its name), a variable reached twice, or a key that is
            not a timm ConvNeXt's (an added or renamed layer), all listed at once.
    """
    from .layouts import TIMM_KEY

    assignments = plan_assignments(model)
    unplaced = sorted({a.key for a in assignments if not TIMM_KEY.match(a.key)})
    if unplaced:
        raise MappingError(
            f"{len(unplaced)} weights of the Keras model have no place in a timm ConvNeXt (layers added or "
            "renamed since it was built; the way back keeps the layers by their timm names):\n"
            + "\n".join(f"  {key}" for key in unplaced)
        )
    out: dict[str, np.ndarray] = {}
    for a in assignments:
        if a.key in out:
            raise MappingError(f"two Keras variables map to {a.key!r}")
        if shapes_only:
            out[a.key] = np.broadcast_to(np.float32(0), a.rule.torch_shape(tuple(a.variable.shape)))
            continue
        value = np.asarray(keras.ops.convert_to_numpy(a.variable), dtype=np.float32)
        out[a.key] = value if a.rule.perm is None else np.ascontiguousarray(value.transpose(_inverse(a.rule.perm)))
    return out


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation undoing `perm` (torch axis i is Keras axis `result[i]`)."""
    return tuple(perm.index(axis) for axis in range(len(perm)))
