"""GPU inference, side by side: this project's model against timm on the same GPU.

    python benchmarks/gpu.py                         # tiny and base at 224, batches 1 32 128
    python benchmarks/gpu.py --models tiny --batches 1 8 --out gpu.md
    python benchmarks/gpu.py --allow-cpu --models atto --batches 1 --iters 2   # a smoke run without a GPU

Each framework runs in its own process (TensorFlow and torch never share one), one after the
other, every configuration timed for `--iters` passes after `--warmup` (the GPU synchronised
around each pass: torch.cuda.synchronize, a host copy of TensorFlow's output). Columns:

- `zoo fp32`: the serving path (`zoo.core.serving.serving_function`) in float32, TF32 off;
- `zoo fp16`: the same model built with dtype="float16" (Keras' mixed_float16);
- `zoo XLA fp16`: the mixed-precision Keras model called in a `tf.function(jit_compile=True)`;
- `timm fp32`: timm eager, channels_last, TF32 off (cuDNN and matmul);
- `timm AMP`: timm eager, channels_last, under torch.autocast("cuda", float16).

The TensorFlow side needs a CUDA build of TensorFlow (`pip install tensorflow[and-cuda]`),
the torch side a CUDA build of torch. Writes a Markdown table with the machine's GPU name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["zoo fp32", "zoo fp16", "zoo XLA fp16", "timm fp32", "timm AMP"]


def _timed(run, iters: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        sync(run())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tensorflow_side(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(False)
    if not tf.config.list_physical_devices("GPU") and not args.allow_cpu:
        raise SystemExit("TensorFlow sees no GPU (install tensorflow[and-cuda]); --allow-cpu runs anyway")
    import zoo
    from zoo.core.serving import serving_function

    out = {}
    for model in args.models:
        exact = serving_function(zoo.build(f"convnext_{model}", dtype="float32"))
        mixed = zoo.build(f"convnext_{model}", dtype="float16")
        xla = tf.function(lambda x, m=mixed: m(x, training=False), jit_compile=True)
        for batch in args.batches:
            x = tf.constant(np.random.default_rng(0).standard_normal((batch, args.size, args.size, 3)), tf.float32)
            for column, run in (
                ("zoo fp32", lambda: exact(x)),
                ("zoo fp16", lambda: mixed(x, training=False)),
                ("zoo XLA fp16", lambda: xla(x)),
            ):
                seconds = _timed(run, args.iters, args.warmup, lambda y: np.asarray(y))
                out[f"{model}/{batch}/{column}"] = batch / seconds
    out["device"] = (
        tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0]).get("device_name", "GPU")
        if tf.config.list_physical_devices("GPU")
        else "CPU"
    )
    return out


def torch_side(args) -> dict:
    import timm
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        raise SystemExit("torch sees no GPU; --allow-cpu runs anyway")
    device = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    sync = (lambda y: torch.cuda.synchronize()) if cuda else (lambda y: None)
    out = {}
    for model in args.models:
        net = timm.create_model(f"convnext_{model}", pretrained=False).eval()
        net = net.to(device, memory_format=torch.channels_last)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)

            def exact():
                with torch.inference_mode():
                    return net(x)

            def amp():
                with torch.inference_mode(), torch.autocast(device, dtype=torch.float16 if cuda else torch.bfloat16):
                    return net(x)

            out[f"{model}/{batch}/timm fp32"] = batch / _timed(exact, args.iters, args.warmup, sync)
            out[f"{model}/{batch}/timm AMP"] = batch / _timed(amp, args.iters, args.warmup, sync)
    out["torch_device"] = torch.cuda.get_device_name(0) if cuda else "CPU"
    return out


def report(args, results: dict) -> str:
    lines = [
        "# GPU benchmark",
        "",
        f"Command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`",
        f"Device: {results.get('device')} (torch: {results.get('torch_device')}); input {args.size}; "
        f"median of {args.iters} passes after {args.warmup} warm-up",
        "",
        "| model | batch | " + " | ".join(COLUMNS) + " | zoo fp32 / timm fp32 | best zoo / timm AMP |",
        "|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for model in args.models:
        for batch in args.batches:
            cells = [results.get(f"{model}/{batch}/{c}") for c in COLUMNS]
            best = max(c for c in cells[:3] if c)
            ratio = f"{cells[0] / cells[3]:.2f}x" if cells[0] and cells[3] else "-"
            amp = f"{best / cells[4]:.2f}x" if cells[4] else "-"
            lines.append(
                f"| convnext_{model} | {batch} | "
                + " | ".join(f"{c:.1f}" if c else "-" for c in cells)
                + f" | {ratio} | {amp} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--models", nargs="+", default=["tiny", "base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 128])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke test of the script)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("GPU_RESULTS.md"))
    parser.add_argument("--side", choices=("tensorflow", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(tensorflow_side(args) if args.side == "tensorflow" else torch_side(args)), flush=True)
        return 0
    results = {}
    for side in ("tensorflow", "torch"):
        done = subprocess.run(
            [sys.executable, __file__, "--side", side, *sys.argv[1:]],
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return done.returncode
        results.update(json.loads(done.stdout.strip().splitlines()[-1]))
    text = report(args, results)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
