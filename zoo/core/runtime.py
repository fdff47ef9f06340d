"""How TensorFlow runs the models: oneDNN's fused CPU kernels and the precision of the compute.

TensorFlow turns oneDNN's graph rewrites (MatMul + BiasAdd + GELU in one call, fused
depthwise convolutions, ...) on by default only on CPUs with AVX-512 VNNI/BF16 or AMX. The
ConvNeXt MLP is ~85% of the work, and without the fused GELU every block writes and re-reads
its 4x-wide hidden activations several times: on an AVX2 CPU the model then runs at about
0.9x timm's speed instead of 1.3x (`benchmarks/`). `import zoo` therefore sets
`TF_ENABLE_ONEDNN_OPTS=1` unless the user chose a value; TensorFlow reads it once, at its own
import, so it only takes effect when zoo is imported first.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys

ONEDNN_VAR = "TF_ENABLE_ONEDNN_OPTS"
FROZEN_VAR = "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS"
_USER_CHOICE = os.environ.get(ONEDNN_VAR)  # as found at `import zoo`, before our default
_TF_FIRST = "tensorflow" in sys.modules
_warned = False

log = logging.getLogger("zoo")

# Names accepted by `dtype=` and the Keras dtype policy each one builds the model under.
# "bfloat16" is for inference: weights held in bfloat16 too, so no layer casts its float32
# weights on every call (at batch 1 those casts cost a third of the forward pass); the
# normalisation statistics and the classifier stay float32 (see `zoo.core.model`). Fine-tuning
# wants float32 weights: set Keras' global "mixed_bfloat16" policy instead.
PRECISIONS = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "mixed_float16",
    "mixed_bfloat16": "mixed_bfloat16",
    "mixed_float16": "mixed_float16",
}


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS says, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def installed(module: str) -> bool:
    """Whether `module` can be imported here (found, and not blocked in `sys.modules`)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        return False


def after_import(name: str, callback) -> None:
    """Call `callback()` once the top-level module `name` is imported: now if it already is,
    else right after its first import has run (a one-shot finder on `sys.meta_path`, which only
    wraps the loader the other finders give; looking the module up without importing it, as
    `importlib.util.find_spec` does, leaves the finder in place)."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in [f for f in sys.meta_path if f is not self]:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenCall(spec.loader, self)
                return spec
        return None


class _ThenCall(importlib.abc.Loader):
    """`loader`, then the finder's callback (once), the finder removed."""

    def __init__(self, loader, finder: _AfterImport):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # as if nothing had come between
        self.loader.exec_module(module)
        if self.finder not in sys.meta_path:
            return  # already called
        sys.meta_path.remove(self.finder)
        try:
            self.finder.callback()
        except Exception as e:  # never break the user's import of the module
            log.warning("after importing %s: %s: %s", self.finder.name, type(e).__name__, e)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def prefer_onednn() -> None:
    """Ask TensorFlow for oneDNN's fused kernels unless the user set `TF_ENABLE_ONEDNN_OPTS`."""
    os.environ.setdefault(ONEDNN_VAR, "1")


def assume_frozen_weights() -> None:
    """Let oneDNN treat every weight as constant, for a `zoo` command (inference only): it then
    reorders each weight into its kernel's layout once and keeps that copy, as it does for graph
    constants, at a fraction of their memory (convnext_base peaks at 2.6 GB instead of 9.8 GB,
    `benchmarks/`); without it, each call repacks the weights (bfloat16 runs ~1.6x slower).

    What oneDNN keeps is bound to a kernel, not to a weight: every eager call of a convolution of
    one shape runs one kernel (TensorFlow caches eager kernels by op and attributes), so it would
    reuse the first layer's weights for all of them, and a graph's kernel keeps the weights of its
    first run. The commands therefore run models only as graphs made after their weights are
    final, and `zoo.core.model.ConvNeXt` turns its own eager calls into such graphs whenever
    `frozen_weights()` is on, so the variable changes no number. TensorFlow reads it once, when it
    first makes a oneDNN kernel: it is set only before TensorFlow's import and only where the user
    chose no value."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault(FROZEN_VAR, "1")


_BOOLEANS = {"1": True, "true": True, "0": False, "false": False}  # TensorFlow's ReadBoolFromEnvVar


def frozen_weights() -> bool:
    """Whether oneDNN in this process treats weights as constant (`TF_ONEDNN_ASSUME_FROZEN_WEIGHTS`
    true, read as TensorFlow reads it, with oneDNN's kernels on)."""
    value = os.environ.get(FROZEN_VAR)
    if value is None or not _BOOLEANS.get(value.lower(), False):
        return False
    return "tensorflow" not in sys.modules or onednn_enabled() is not False


def check_frozen_weights_value() -> None:
    """Refuse a `TF_ONEDNN_ASSUME_FROZEN_WEIGHTS` TensorFlow cannot read: it aborts the process with
    a C++ stack trace at its first oneDNN kernel (an empty value and ` 1` included).

    Raises:
        BackendError: naming the variable and the values it takes.
    """
    value = os.environ.get(FROZEN_VAR)
    if value is not None and value.lower() not in _BOOLEANS:
        from .errors import BackendError

        raise BackendError(
            f"{FROZEN_VAR}={value!r}: TensorFlow reads only 1, 0, true or false there "
            "(anything else aborts it); set one of those or unset it"
        )


@contextlib.contextmanager
def native_stderr_held():
    """Keep what native code writes to file descriptor 2 during the block (TensorFlow's start-up
    lines, TFLite's "Created TensorFlow Lite XNNPACK delegate"), off the terminal, between the
    command's own lines; shown only if the block fails. Python's own stderr is flushed first."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            sys.stderr.write(caught.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and let it look for devices with its native start-up lines kept off stderr.

    TensorFlow logs those lines (oneDNN on, no CUDA driver, ...) before its logging reads
    `TF_CPP_MIN_LOG_LEVEL`, so the variable cannot hide them; they are caught on file
    descriptor 2 and shown only if the import fails. For the command line, before any work.
    """
    if "tensorflow" in sys.modules:
        return
    with native_stderr_held():
        import tensorflow as tf

        tf.config.list_physical_devices()  # the device probe logs too (a missing CUDA driver)


def onednn_enabled() -> bool | None:
    """Whether this TensorFlow runs with oneDNN's rewrites (None where it cannot tell)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # pragma: no cover - other TensorFlow builds
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def check_onednn() -> None:
    """Warn once when TensorFlow was imported before zoo with oneDNN off and no user choice."""
    global _warned
    if _warned or not _TF_FIRST or _USER_CHOICE is not None:
        return
    _warned = True
    if onednn_enabled() is False:
        log.warning(
            "TensorFlow was imported before zoo, with oneDNN's fused CPU kernels off: ConvNeXt "
            "runs ~1.4x slower on this CPU. Import zoo first, or set %s=1 before TensorFlow.",
            ONEDNN_VAR,
        )


def policy_name(dtype: str | None) -> str:
    """The Keras dtype policy for a `dtype=` argument; None: the global policy."""
    if dtype is None:
        import keras

        return keras.config.dtype_policy().name
    try:
        return PRECISIONS[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(PRECISIONS)}; got {dtype!r}") from None
