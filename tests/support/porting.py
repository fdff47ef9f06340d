"""A timm state dict copied into a Keras model in place, and the state dict a model takes: the
mapping's table (`converters.mapping`) applied directly, for tests that need no converted folder."""

from __future__ import annotations

import keras
import numpy as np

from converters import mapping


def port(state_dict: dict[str, np.ndarray], model: keras.Model) -> int:
    """Copy every tensor of a timm-keyed state dict into `model`, or nothing at all.

    Every check runs before the first assignment (`mapping.values`): a mismatch leaves the model
    untouched.

    Returns:
        The number of scalars assigned (equals `model.count_params()`).

    Raises:
        MappingError: missing/unexpected keys or shape mismatches (all listed at once).
    """
    todo = mapping.values(state_dict, model)
    for variable in model.weights:
        variable.assign(todo.pop(id(variable))())
    return sum(int(np.prod(v.shape)) for v in model.weights)


def expected_keys(model: keras.Model) -> dict[str, tuple]:
    """The exact timm state dict this model takes: key -> torch shape."""
    return {a.key: a.rule.torch_shape(tuple(a.variable.shape)) for a in mapping.plan_assignments(model)}
