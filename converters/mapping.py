"""Step 2 of a conversion: port a timm state dict onto the Keras layers, strictly.

Keras layers are named after timm's module paths, so the whole mapping is one table keyed by
Keras layer type: which variable takes which `<layer name><suffix>` tensor, and how it is
transposed. Nothing is picked by position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np

from zoo.errors import MappingError
from zoo.model import GlobalResponseNorm, LayerScale, SimpleNorm


@dataclass(frozen=True)
class Rule:
    """One Keras variable fed from one timm tensor.

    Attributes:
        attr: attribute of the Keras layer holding the variable (`kernel`).
        suffix: appended to the layer name to form the timm key (`.weight`; `""` when the
            layer name is itself the parameter path, as for `gamma`).
        to_keras: torch layout -> Keras layout.
        torch_shape: Keras variable shape -> the torch shape expected in the state dict.
    """

    attr: str
    suffix: str
    to_keras: Callable[[np.ndarray], np.ndarray] = lambda a: a
    torch_shape: Callable[[tuple], tuple] = lambda s: s


# torch conv (out, in, kh, kw) -> keras (kh, kw, in, out)
_CONV = dict(to_keras=lambda a: a.transpose(2, 3, 1, 0), torch_shape=lambda s: (s[3], s[2], s[0], s[1]))
# torch depthwise (C, 1, kh, kw) -> keras DepthwiseConv2D (kh, kw, C, 1)
_DEPTHWISE = dict(to_keras=lambda a: a.transpose(2, 3, 0, 1), torch_shape=lambda s: (s[2], s[3], s[0], s[1]))
# torch linear (out, in) -> keras Dense (in, out)
_LINEAR = dict(to_keras=lambda a: a.T, torch_shape=lambda s: (s[1], s[0]))

RULES: dict[type, tuple[Rule, ...]] = {
    keras.layers.Conv2D: (Rule("kernel", ".weight", **_CONV), Rule("bias", ".bias")),
    keras.layers.DepthwiseConv2D: (Rule("kernel", ".weight", **_DEPTHWISE), Rule("bias", ".bias")),
    keras.layers.Dense: (Rule("kernel", ".weight", **_LINEAR), Rule("bias", ".bias")),
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


def plan(model: keras.Model) -> list[Assignment]:
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


def expected_keys(model: keras.Model) -> dict[str, tuple]:
    """The exact timm state dict this model takes: key -> torch shape."""
    return {a.key: a.rule.torch_shape(tuple(a.variable.shape)) for a in plan(model)}


def check(state_dict: dict[str, np.ndarray], assignments: list[Assignment]) -> None:
    """Raise one error listing every missing key, unexpected key and shape mismatch."""
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
        lines = [f"the checkpoint does not match the model ({len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(mismatched)} shape mismatches):"]
        lines += [f" - in model, not in checkpoint: {k}" for k in missing]
        lines += [f" + in checkpoint, not in model: {k}" for k in unexpected]
        lines += [f" ~ shape mismatch: {m}" for m in mismatched]
        raise MappingError("\n".join(lines))


def port(state_dict: dict[str, np.ndarray], model: keras.Model) -> int:
    """Copy every tensor of a timm-keyed state dict into `model`, or nothing at all.

    Every check runs before the first assignment: a mismatch leaves the model untouched.

    Returns:
        The number of scalars assigned (equals `model.count_params()`).

    Raises:
        MappingError: missing/unexpected keys or shape mismatches (all listed at once).
    """
    assignments = plan(model)
    check(state_dict, assignments)
    assigned: set[int] = set()
    total = 0
    for a in assignments:
        if id(a.variable) in assigned:
            raise MappingError(f"variable {a.variable.path} would be assigned twice")
        value = a.rule.to_keras(state_dict[a.key])
        a.variable.assign(value.astype(a.variable.dtype, copy=False))
        assigned.add(id(a.variable))
        total += value.size
    if len(assigned) != len(model.weights):
        raise MappingError(f"{len(model.weights) - len(assigned)} Keras variables were not assigned")
    return total
