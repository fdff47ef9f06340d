"""One side of a benchmark, in its own process; `benchmarks/run.py` drives it.

    python benchmarks/worker.py infer FRAMEWORK --threads N [--exports DIR]
        reads one JSON request per line on stdin ({"model": "tiny", "batch": 8, "size": 224,
        "iters": 5, "warmup": 2, "max_seconds": 60}) and answers one JSON line
        ({"times": [seconds, ...]}).
    python benchmarks/worker.py export MODEL SIZE --out DIR [--kinds savedmodel keras tflite tflite-fp16]
    python benchmarks/worker.py convert ARCH --source FILE --out DIR
    python benchmarks/worker.py load (zoo DIR | keras-apps ARCH FILE)
    python benchmarks/worker.py io --source FILE --out FILE
    python benchmarks/worker.py precision DIR
        each prints one JSON line: wall times of the steps and peak RSS.

Frameworks never share a process: torch+timm after tensorflow in one process crashes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FRAMEWORKS = (
    "zoo",
    "zoo-bf16",
    "zoo-model",
    "timm",
    "timm-bf16",
    "ort",
    "kimm",
    "keras-apps",
    "zoo-savedmodel",
    "zoo-keras",
    "zoo-tflite",
    "zoo-tflite-fp16",
)
# What each one runs (RESULTS.md's legend).
DESCRIPTIONS = {
    "zoo": "zoo.core.serving.serving_function(zoo.build(..., dtype='float32')): the serving path zoo predict, "
    "zoo eval and the exports run (every TensorFlow column with TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1, "
    "as the zoo commands run)",
    "zoo-bf16": "the same with dtype='bfloat16'",
    "zoo-model": "the trainable Keras model itself, zoo.build(..., dtype='float32').predict_on_batch",
    "timm": "timm eager fp32, torch.inference_mode",
    "timm-bf16": "timm eager under torch.autocast('cpu', bfloat16)",
    "keras-apps": "keras.applications ConvNeXt (weights=None), predict_on_batch",
    "ort": "ONNX Runtime (CPU provider, intra-op threads as the others, sequential) on timm's model exported "
    "by torch.onnx.export, opset 17, dynamic batch",
    "kimm": "kimm's ConvNeXt (Keras 3, weights=None, no preprocessing), predict_on_batch",
    "zoo-savedmodel": "the project's SavedModel export (zoo export --format savedmodel), tf.saved_model.load, "
    "its serving_default signature",
    "zoo-keras": "the project's .keras export reloaded by keras.saving.load_model, predict_on_batch "
    "(compared with zoo-model: both are the Keras model)",
    "zoo-tflite": "the project's TFLite export (fp32), tf.lite.Interpreter with num_threads, signature runner",
    "zoo-tflite-fp16": "the project's TFLite export with float16 weights, as zoo-tflite",
}
_KEPT = []  # temporary folders, kept while the worker lives
KERAS_APPS = {
    "atto": None,
    "tiny": "ConvNeXtTiny",
    "small": "ConvNeXtSmall",
    "base": "ConvNeXtBase",
    "large": "ConvNeXtLarge",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _set_tf_threads(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _realistic_keras(net):
    """Every weight moved off its initial value (seeded): zero biases and LayerNorm shifts, exact at
    initialisation, are what a graph optimiser may drop, and trained weights never have them."""
    import keras
    import numpy as np

    rng = np.random.default_rng(1)
    for v in net.weights:
        value = keras.ops.convert_to_numpy(v).astype(np.float32)
        v.assign((value + rng.standard_normal(v.shape).astype(np.float32) * 0.02).astype(v.dtype))
    return net


def _realistic_torch(net):
    """The same for a torch module (its initial biases are zeros too)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return net


def _runner(framework: str, model: str, batch: int, size: int, threads: int, exports: Path | None = None):
    """A zero-argument callable running one forward pass of `batch` fixed random images."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, 3)).astype("float32")
    if framework == "ort":
        return _onnx_runtime(model, x, threads)
    if framework.startswith("timm"):
        import timm
        import torch

        torch.set_num_threads(threads)
        net = _realistic_torch(timm.create_model(f"convnext_{model}", pretrained=False).eval())
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        if framework == "timm-bf16":

            def run():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    return net(xt)
        else:

            def run():
                with torch.inference_mode():
                    return net(xt)

        return run
    _set_tf_threads(threads)
    if framework == "keras-apps":
        import keras

        if not KERAS_APPS.get(model):
            raise SystemExit(f"keras.applications has no ConvNeXt {model}")
        net = _realistic_keras(
            getattr(keras.applications, KERAS_APPS[model])(
                weights=None, include_preprocessing=False, input_shape=(size, size, 3)
            )
        )
    elif framework == "kimm":
        import kimm

        net = _realistic_keras(
            getattr(kimm.models, KERAS_APPS[model] or "ConvNeXtAtto")(
                weights=None, include_preprocessing=False, input_shape=(size, size, 3), classifier_activation=None
            )
        )
    else:
        import zoo
        from zoo.core.serving import serving_function

        kind = framework[len("zoo-") :] if framework.startswith("zoo-") else ""
        if kind not in ("", "bf16", "model"):
            if exports is None:
                raise SystemExit(f"{framework} needs --exports: the folder `worker.py export` wrote")
            return _exported(kind, exports, x, threads)
        net = _realistic_keras(zoo.build(f"convnext_{model}", dtype="bfloat16" if kind == "bf16" else "float32"))
        if kind != "model":
            serve, xt = serving_function(net), _tf_constant(x)
            return lambda: serve(xt)
    return lambda: net.predict_on_batch(x)


def _tf_constant(x):
    import tensorflow as tf

    return tf.constant(x)


EXPORT_FILES = {
    "savedmodel": "savedmodel",
    "keras": "model.keras",
    "tflite": "model.tflite",
    "tflite-fp16": "model-fp16.tflite",
}


def export(model: str, size: int, kinds: list[str], out: Path) -> dict:
    """The project's exports of one model at one input size, written as `zoo export` writes them,
    into `out` (one export per model and size, whatever the batch; the inference workers load them)."""
    import zoo
    from zoo.export.formats import FORMATS

    net = _realistic_keras(zoo.build(f"convnext_{model}"))
    seconds = {}
    for kind in kinds:
        start = time.perf_counter()
        if kind == "savedmodel":
            FORMATS["savedmodel"].write(net, out / EXPORT_FILES[kind], size, "none")
        elif kind == "keras":
            net.save(out / EXPORT_FILES[kind])
        else:
            FORMATS["tflite"].write(net, out / EXPORT_FILES[kind], size, "fp16" if kind == "tflite-fp16" else "none")
        seconds[kind] = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def _exported(kind: str, exports: Path, x, threads: int):
    """A zero-argument callable running the export `kind` from `exports` on the batch `x`."""
    import tensorflow as tf

    from zoo.export.formats import INPUT_NAME, SIGNATURE

    path = exports / EXPORT_FILES[kind]
    if kind == "savedmodel":
        signature = tf.saved_model.load(str(path)).signatures[SIGNATURE]
        xt = tf.constant(x)
        return lambda: signature(**{INPUT_NAME: xt})
    if kind == "keras":
        import keras

        loaded = keras.saving.load_model(path, safe_mode=True)
        return lambda: loaded.predict_on_batch(x)
    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
    runner = interpreter.get_signature_runner(SIGNATURE)
    return lambda: runner(**{INPUT_NAME: x})


def _onnx_runtime(model: str, x, threads: int):
    """ONNX Runtime on timm's model exported to ONNX (opset 17, dynamic batch), the way deploying
    users export it (torch.onnx.export's TorchScript exporter)."""
    import warnings

    import numpy as np
    import onnxruntime as ort
    import timm
    import torch

    torch.set_num_threads(threads)
    net = _realistic_torch(timm.create_model(f"convnext_{model}", pretrained=False).eval())
    folder = tempfile.TemporaryDirectory(prefix="zoo-bench-onnx-")
    _KEPT.append(folder)  # removed when the worker ends
    path = Path(folder.name) / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, x.shape[1], x.shape[2]),),
            str(path),
            opset_version=17,
            input_names=["pixels"],
            output_names=["logits"],
            dynamo=False,
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    xn = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return lambda: session.run(None, {"pixels": xn})


def infer(framework: str, threads: int, exports: Path | None = None) -> None:
    if framework.startswith("timm") or framework == "ort":
        import timm  # noqa: F401
        import torch  # noqa: F401  (first, whatever else is imported later)
    key, run = None, None
    for line in sys.stdin:
        request = json.loads(line)
        if key != (request["model"], request["batch"], request["size"]):
            key, run = None, None  # one model at a time: the configurations come one after another
            if not (framework.startswith("timm") or framework == "ort"):
                import keras

                keras.backend.clear_session()
            gc.collect()
            key = (request["model"], request["batch"], request["size"])
            run = _runner(framework, *key, threads, exports)
        for _ in range(request.get("warmup", 0)):
            run()
        # at least `iters` passes and `min_seconds` (fast configurations get many samples), at
        # most `max_seconds` (slow ones get fewer), never fewer than one
        times, least, most = [], request.get("min_seconds", 0.0), request.get("max_seconds")
        while True:
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
            if most is not None and sum(times) > most:
                break
            if len(times) >= request["iters"] and sum(times) >= least:
                break
        print(json.dumps({"times": times, "peak_rss_mb": peak_rss_mb()}), flush=True)


def convert(arch: str, source: Path, out: Path, alone: bool = False) -> dict:
    """`zoo convert` of a local source file, in this process, with the time of every step.

    `alone`: the PyTorch reference starts only when parity begins, instead of beside the
    steps before it, so that those steps are timed on their own.
    """
    from converters import parity, pipeline

    if alone:
        parity.started = _started_at_check(parity.started)
    steps, last = {}, {}

    def echo(line: str) -> None:
        line = line.strip()
        if line.startswith("-> "):
            last["step"] = line[3:].split(" ")[0]
        elif line.startswith("done in") and "step" in last:
            steps[last.pop("step")] = float(line.split()[2])

    baseline = peak_rss_mb()
    import keras  # noqa: F401  (the framework import baseline)
    import tensorflow  # noqa: F401

    imported = peak_rss_mb()
    start = time.perf_counter()
    pipeline.convert(arch, checkpoint=source, out=out, options=pipeline.Options(echo=echo))
    total = time.perf_counter() - start
    return {
        "steps": steps,
        "total_s": total,
        "peak_rss_mb": peak_rss_mb(),
        "import_rss_mb": imported,
        "start_rss_mb": baseline,
    }


def _started_at_check(started):
    """`parity.started` whose reference process starts when `check` is called."""
    import contextlib

    class Deferred:
        def __init__(self, args, kwargs):
            self.args, self.kwargs = args, kwargs

        def wait_for_reference(self):
            pass  # it starts at `check`

        def check(self, model, **tolerances):
            with started(*self.args, **self.kwargs) as pending:
                return pending.check(model, **tolerances)

    @contextlib.contextmanager
    def deferred(*args, **kwargs):
        yield Deferred(args, kwargs)

    return deferred


def io_floor(source: Path, out: Path) -> dict:
    """The floor for a conversion: read the safetensors into numpy, write them to one HDF5 file."""
    import h5py
    import keras  # noqa: F401  (same import baseline as `convert`)
    import tensorflow  # noqa: F401
    from safetensors.numpy import load_file

    imported = peak_rss_mb()
    start = time.perf_counter()
    state = load_file(source)
    read = time.perf_counter() - start
    with h5py.File(out, "w") as f:
        for name, value in state.items():
            f.create_dataset(name, data=value)
    total = time.perf_counter() - start
    return {"read_s": read, "total_s": total, "peak_rss_mb": peak_rss_mb(), "import_rss_mb": imported}


def load(kind: str, args: list[str]) -> dict:
    import keras

    start = time.perf_counter()
    if kind == "zoo":
        import zoo

        model = zoo.load(args[0])
    else:
        model = getattr(keras.applications, KERAS_APPS[args[0]])(weights=args[1], include_preprocessing=False)
    return {"load_s": time.perf_counter() - start, "params": model.count_params(), "peak_rss_mb": peak_rss_mb()}


def precision(folder: Path) -> dict:
    """bfloat16 against float32 for one converted folder: top-1 agreement and logit differences.

    On the parity image set (natural-looking images and noise) and on 96 more natural images,
    each dtype through the serving path (what the inference benchmark times).
    """
    import numpy as np

    import zoo
    from converters.images import parity_batch
    from zoo.core.folder_config import FolderConfig
    from zoo.core.reports import topk_hits
    from zoo.core.serving import runner

    config = FolderConfig.read(folder)
    sets = {
        "parity": parity_batch(config.input_size, config.mean, config.std),
        "natural": parity_batch(config.input_size, config.mean, config.std, natural=96, noise=0, seed=11),
    }
    # the serving path, as `zoo predict`/`zoo eval` and the inference benchmark run each dtype
    runs = {dtype: runner(zoo.load(folder, dtype=dtype)) for dtype in ("float32", "bfloat16")}
    out = {}
    for name, x in sets.items():
        exact, low = (
            np.concatenate([np.asarray(runs[d](x[i : i + 8]), np.float32) for i in range(0, len(x), 8)])
            for d in ("float32", "bfloat16")
        )
        out[name] = {
            "images": len(x),
            "top1_agree": topk_hits(low, exact, 1),
            "max_abs": float(np.abs(exact - low).max()),
            "max_ref": float(np.abs(exact).max()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("infer")
    p.add_argument("framework", choices=FRAMEWORKS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exports", type=Path, help="the folder `export` wrote (zoo-savedmodel, zoo-keras, zoo-tflite)")
    p = sub.add_parser("export")
    p.add_argument("model")
    p.add_argument("size", type=int)
    p.add_argument("--kinds", nargs="+", choices=tuple(EXPORT_FILES), default=list(EXPORT_FILES))
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("convert")
    p.add_argument("arch")
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--alone", action="store_true", help="start the PyTorch reference only when parity begins")
    p = sub.add_parser("io")
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("precision")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("load")
    p.add_argument("kind", choices=("zoo", "keras-apps"))
    p.add_argument("args", nargs="+")
    args = parser.parse_args()
    if args.command == "infer":
        infer(args.framework, args.threads, args.exports)
        return
    if args.command == "export":
        result = export(args.model, args.size, args.kinds, args.out)
    elif args.command == "convert":
        result = convert(args.arch, args.source, args.out, args.alone)
    elif args.command == "io":
        result = io_floor(args.source, args.out)
    elif args.command == "precision":
        result = precision(args.folder)
    else:
        result = load(args.kind, args.args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
