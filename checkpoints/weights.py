"""The Keras files of a converted folder: the weights (`model.weights.h5`), written straight from
the mapped values by Keras' own saving code and let go of cleanly when the disk fills up, and the
serialized model (`config.json`, `metadata.json`) as Keras' own directory save writes them.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zoo.core.folder_config import KERAS_CONFIG, KERAS_METADATA

Values = dict[int, Callable[[], Any]]  # id(variable) -> its value, made on demand


def write_weights(path: Path, model, values: Values | None = None) -> None:
    """`model.save_weights(path)`, or the same file holding `values` in place of the variables'.

    `values` maps `id(variable)` of every variable of `model` to a function returning its
    value (`converters.mapping.values`): the file is then written straight from them, and
    `model`'s variables are neither read nor changed (they may hold no values at all: Keras'
    deferred initialisation), where this Keras' saving code allows it; otherwise they are
    assigned the values first.
    """
    if values is not None and not _write_values(path, model, values):
        for variable in model.weights:  # this Keras saves otherwise: through the variables
            if getattr(variable, "_value", 0) is None:  # deferred: its storage first
                variable._deferred_initialize()
            variable.assign(values[id(variable)]())
        values = None
    if values is None:
        model.save_weights(path)


def _write_values(path: Path, model, values: Values) -> bool:
    """Write `values` in the layout `model.save_weights` gives, by Keras' own saving code.

    Keras walks the model and hands each variable to its weights store, which converts it to
    numpy and writes it; a store that writes the variable's value from `values` instead gives
    the same file without the copies into and out of the variables (for convnext_large
    0.9 s of assignments and 0.5 s of read-back). False, with `path` removed, where this
    Keras' saving code is not shaped so (a store that is never handed a variable).
    """
    try:
        from keras.src.saving import saving_lib

        save_state, base = saving_lib._save_state, saving_lib.H5IOStore
    except (ImportError, AttributeError):
        return False
    pending = dict(values)

    class ValueStore(base):
        def __setitem__(self, key, variable):
            value = pending.pop(id(variable), None)  # other state (none in ConvNeXt) is saved as is
            super().__setitem__(key, variable if value is None else value())

    store = ValueStore(path, mode="w")
    try:
        save_state(model, store, None, "", set())
    finally:
        store.close()
    if pending:
        path.unlink()
        return False
    return True


def keras_model_files(model, name: str) -> tuple[str, str]:
    """(`config.json`, `metadata.json`) of `model` named `name`, as `model.save(folder)` writes them.

    With those two beside the weights file, `keras.saving.load_model(folder)` (and
    `"hf://ORG/REPO"` for a published copy) rebuilds the model from the config and loads the
    weights: the folder is a Keras model folder.
    """
    import keras

    try:
        from keras.src.saving import saving_lib

        config, metadata = saving_lib._serialize_model_as_json(model)  # the very code model.save runs
    except (ImportError, AttributeError):  # a Keras shaped otherwise: its public pieces
        config = json.dumps(keras.saving.serialize_keras_object(model))
        metadata = json.dumps(
            {"keras_version": keras.__version__, "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")}
        )
    serialized = json.loads(config)
    serialized["config"]["name"] = name
    return json.dumps(serialized), metadata


def write_keras_files(folder: Path, model, name: str) -> None:
    """Write `config.json` and `metadata.json` of `model` named `name` into `folder` (`keras_model_files`)."""
    for file, text in zip((KERAS_CONFIG, KERAS_METADATA), keras_model_files(model, name), strict=False):
        (folder / file).write_text(text)


def load_keras_folder(folder: Path):
    """The model of a Keras model folder as `keras.saving.load_model` reads it (safe mode)."""
    import keras

    return keras.saving.load_model(folder, safe_mode=True)


def size_estimate(model) -> int:
    """About the size of `model`'s weights file: the weights plus HDF5's per-array overhead."""
    import numpy as np

    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize + 4096 for v in model.weights) + (1 << 20)


def release_failed(path: Path, error: OSError) -> None:
    """Let go of a weights file whose writing failed, so that the process can still exit cleanly.

    HDF5 keeps a file it could not write open and flushes it again at exit, where a full
    disk makes the interpreter crash (SIGSEGV) after the error was reported. Its descriptor
    is pointed at /dev/null, so that last flush goes nowhere (Linux); the exception's frames
    are released with the unraisable-exception reports they cause silenced (the same error,
    already reported).
    """
    fds = Path("/proc/self/fd")
    if fds.is_dir():
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd in fds.iterdir():
                with contextlib.suppress(OSError, ValueError):
                    if os.readlink(fd) == str(path):
                        os.dup2(null, int(fd.name))
        finally:
            os.close(null)
    hook, sys.unraisablehook = sys.unraisablehook, lambda *_: None
    try:
        error.__traceback__ = None
        gc.collect()
    finally:
        sys.unraisablehook = hook
