"""Speed and memory, side by side: this project's Keras models and exports against timm, ONNX Runtime,
kimm and keras.applications.

    python benchmarks/run.py                      # everything, writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick              # tiny at 224, batch 8 and 1; conversion of atto
    python benchmarks/run.py --skip-convert --models tiny --batches 8
    python benchmarks/run.py --conversion-memory convnext_xxlarge.clip_laion2b_soup_ft_in1k convnext_tiny.fb_in1k

Inference: one long-lived worker process per framework (frameworks never share a process), all
given the same threads and the same inputs; for every configuration the frameworks take turns,
in a rotating order, for `--rounds` rounds of `--iters` timed passes (warm-up excluded; a turn
runs at least `--min-seconds`, so fast configurations get many samples), so that drifts of the
machine hit all of them alike. Every TensorFlow worker runs with TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1,
as the `zoo` commands do. Reported: the median images/s and the ratios in `RATIOS`
(RESULTS.md lists what each column runs). `zoo-bf16` is `zoo.load(..., dtype="bfloat16")`; `ort`
needs the `bench` extra (onnx, onnxruntime, kimm).

Conversion and loading: each measured in a fresh process. `zoo convert` of a local source file
(random weights in timm's layout: no download) with the time of every step, against the I/O
floor of reading the same safetensors and writing the tensors to one HDF5 file, the two
alternating for `--convert-rounds` rounds (the fastest of each reported: writing a new file
costs what the disk's state makes it). `zoo convert` starts the PyTorch reference first and
reads the source once it has ended (beside the model's build only); each round also converts
with the reference started at parity (`worker.py convert --alone`), which times the steps before
it on their own: the ratio to the floor is taken from these. Peak RSS above the framework import
baseline (the highest of the rounds; the converting process's only, not its PyTorch reference's:
`--conversion-memory` counts both), against the source size. `zoo.load` from a converted folder
against keras.applications loading the same size from its own weights file. For the
`--precision-archs`, the converted folder is also loaded in bfloat16 and float32: top-1
agreement and the largest logit difference on the parity image set and 96 more images.

Peak memory of a conversion (`--conversion-memory NAME...`, only that): `zoo convert NAME
--random-weights` as users run it, one at a time, while the resident memory of its process and
of the PyTorch reference process it starts is read from /proc every `--memory-interval` seconds
(`benchmarks/memory.py`): the peak of their sum against the size of the source file the
reference writes, and the peak of each step. Its table replaces only its own part of
RESULTS.md's conversion section; the other figures there stay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(Path(__file__).with_name("worker.py"))]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from memory import MB, run_sampled  # noqa: E402
from worker import DESCRIPTIONS, EXPORT_FILES, FRAMEWORKS, KERAS_APPS  # noqa: E402

# The ratios reported, where both sides ran: ours against what users pick instead, and what
# users deploy (the exports) against the in-process model.
RATIOS = [
    ("zoo", "ort"),
    ("zoo", "timm"),
    ("zoo", "kimm"),
    ("zoo", "keras-apps"),
    ("zoo-bf16", "timm-bf16"),
    ("zoo", "zoo-model"),
    ("zoo-savedmodel", "zoo"),
    ("zoo-keras", "zoo-model"),
    ("zoo-tflite", "zoo"),
    ("zoo-tflite-fp16", "zoo"),
    ("zoo-tflite", "ort"),
]


class Worker:
    """A framework's inference worker process, answering one request at a time."""

    def __init__(self, framework: str, threads: int, exports: Path | None = None):
        self.framework = framework
        # every TensorFlow side as the `zoo` commands run (and as README advises for inference-only
        # processes and SavedModel serving): oneDNN keeps its packed weights
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS": "1",
        }
        command = WORKER + ["infer", framework, "--threads", str(threads)]
        if exports is not None:
            command += ["--exports", str(exports)]
        self.log = tempfile.TemporaryFile("w+")  # its stderr: a pipe nobody reads could fill and block it
        self.proc = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.error = ""

    def run(self, **request) -> list[float] | None:
        """The request's pass times, or None when the worker refused or died (its error kept)."""
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if line:
            return json.loads(line)["times"]
        self.close()
        return None

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode and not self.error:
            why = "killed (out of memory?)" if self.proc.returncode == -9 else f"exit {self.proc.returncode}"
            self.log.seek(0)
            self.error = f"{why}: {self.log.read()[-1500:].strip()}"
        self.log.close()


def bench_inference(args) -> list[dict]:
    """Every configuration, the frameworks side by side. Workers live for one model and input size
    (its batches one after another) and are then replaced, so that no process carries an earlier
    model's memory; the exports of that model and size are written first, by one process."""
    rows = []
    export_kinds = [fw[len("zoo-") :] for fw in args.frameworks if fw[len("zoo-") :] in EXPORT_FILES]
    for model in args.models:
        for size in args.sizes:
            with tempfile.TemporaryDirectory(prefix="zoo-bench-exports-") as exports:
                if export_kinds:
                    written = _one_shot(["export", model, str(size), "--out", exports, "--kinds", *export_kinds])
                    print(
                        f"convnext_{model} {size}: exports written in "
                        + ", ".join(f"{k} {v:.0f} s" for k, v in written["seconds"].items()),
                        file=sys.stderr,
                    )
                rows += _side_by_side(args, model, size, Path(exports))
    return rows


def _side_by_side(args, model: str, size: int, exports: Path) -> list[dict]:
    rows = []
    workers = {fw: Worker(fw, args.threads, exports) for fw in args.frameworks}
    try:
        for batch in args.batches if size <= 224 else args.batches_large:
            times = {fw: [] for fw in workers}
            for r in range(args.rounds):
                order = list(workers)[r % len(workers) :] + list(workers)[: r % len(workers)]
                for fw in order:
                    if times[fw] is None:
                        continue
                    got = workers[fw].run(
                        model=model,
                        batch=batch,
                        size=size,
                        iters=args.iters,
                        warmup=args.warmup if r == 0 else 0,
                        min_seconds=args.min_seconds,
                        max_seconds=args.max_seconds,
                    )
                    if got is None:  # keep going without it, with a new worker for the next batch
                        print(f"{fw} convnext_{model} {size} b{batch} failed: {workers[fw].error}", file=sys.stderr)
                        times[fw] = None
                        workers[fw] = Worker(fw, args.threads, exports)
                    else:
                        times[fw] += got
            row = {"model": model, "size": size, "batch": batch}
            for fw, t in times.items():
                row[fw] = batch / statistics.median(t) if t else None
            rows.append(row)
            print(_inference_line(row, args.frameworks), file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()
    return rows


def _ratio(row: dict, fw: str, base: str) -> str:
    return f"{row[fw] / row[base]:.2f}x" if row.get(fw) and row.get(base) else "-"


def _inference_line(row: dict, frameworks) -> str:
    cells = [f"{fw} {row[fw]:.1f}" if row[fw] else f"{fw} -" for fw in frameworks]
    return f"convnext_{row['model']} {row['size']} b{row['batch']}: " + ", ".join(cells) + " img/s"


def _one_shot(args: list[str]) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(WORKER + args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _without_parity(steps: dict) -> float:
    return sum(v for k, v in steps.items() if k != "parity")


def bench_convert_and_load(args) -> list[dict]:
    from converters.recorded import random_source
    from converters.reference_process import Network
    from zoo.core.catalogue import resolve

    rows = []
    for arch_name in args.convert_archs:
        ckpt = resolve(f"convnext_{arch_name}")
        with tempfile.TemporaryDirectory(prefix="zoo-bench-") as tmp:
            tmp = Path(tmp)
            src = random_source(Network.of_entry(ckpt), 0, tmp)  # stands in for the download
            size_mb = src.path.stat().st_size / 2**20
            floors, convs, alones = [], [], []
            for turn in range(args.convert_rounds):  # alternating, new files each time: the disk's state drifts
                floors.append(_one_shot(["io", "--source", str(src.path), "--out", str(tmp / f"floor{turn}.h5")]))
                convs.append(
                    _one_shot(["convert", ckpt.name, "--source", str(src.path), "--out", str(tmp / f"converted{turn}")])
                )
                alones.append(
                    _one_shot(
                        ["convert", ckpt.name, "--source", str(src.path), "--alone", "--out", str(tmp / f"alone{turn}")]
                    )
                )
            floor = min(floors, key=lambda r: r["total_s"])
            conv = min(convs, key=lambda r: r["total_s"])
            conv["peak_rss_mb"] = max(c["peak_rss_mb"] for c in convs + alones)
            alone = min(alones, key=lambda r: _without_parity(r["steps"]))
            loaded = _one_shot(["load", "zoo", str(tmp / "converted0")])
            agreement = _one_shot(["precision", str(tmp / "converted0")]) if arch_name in args.precision_archs else None
            apps = None
            if KERAS_APPS.get(arch_name):
                weights = tmp / "apps.weights.h5"
                subprocess.run(
                    WORKER[:1] + ["-c", _SAVE_APPS.format(cls=KERAS_APPS[arch_name], path=weights)],
                    check=True,
                    capture_output=True,
                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                )
                apps = _one_shot(["load", "keras-apps", arch_name, str(weights)])
        without_parity = _without_parity(alone["steps"])
        row = {
            "arch": f"convnext_{arch_name}",
            "source_mb": size_mb,
            "steps": conv["steps"],
            "alone_steps": alone["steps"],
            "convert_s": conv["total_s"],
            "beside_timm_s": _without_parity(conv["steps"]),
            "convert_no_parity_s": without_parity,
            "floor_s": floor["total_s"],
            "time_ratio": without_parity / floor["total_s"],
            "rss_above_import_mb": conv["peak_rss_mb"] - conv["import_rss_mb"],
            "floor_rss_above_import_mb": floor["peak_rss_mb"] - floor["import_rss_mb"],
            "load_s": loaded["load_s"],
            "apps_load_s": apps["load_s"] if apps else None,
            "precision": agreement,
        }
        row["rss_ratio"] = row["rss_above_import_mb"] / size_mb
        rows.append(row)
        print(
            f"{row['arch']}: convert {row['convert_s']:.1f} s ({without_parity:.1f} s without parity alone, "
            f"floor {row['floor_s']:.1f} s, {row['time_ratio']:.2f}x), peak RSS +{row['rss_above_import_mb']:.0f} MB "
            f"({row['rss_ratio']:.2f}x the {size_mb:.0f} MB source); load {row['load_s']:.2f} s"
            + (f" vs keras.applications {row['apps_load_s']:.2f} s" if apps else ""),
            file=sys.stderr,
            flush=True,
        )
    return rows


def bench_conversion_memory(names: list[str], interval: float) -> list[dict]:
    """`zoo convert NAME --random-weights` for each name, one at a time, with the peak memory of
    its process and its PyTorch reference process together (`memory.run_sampled`)."""
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix="zoo-bench-memory-") as tmp:
            tmp = Path(tmp)
            (tmp / "work").mkdir()
            env = {
                **os.environ,
                "TMPDIR": str(tmp / "work"),
                "ZOO_HOME": str(tmp / "home"),
                "HF_HUB_OFFLINE": "1",
                "TF_CPP_MIN_LOG_LEVEL": "3",
            }
            command = [sys.executable, "-m", "zoo.cli", "convert", name, "--random-weights", "--out", str(tmp / "out")]
            run = run_sampled(
                command,
                env=env,
                cwd=ROOT,
                interval=interval,
                watch=(tmp / "work", "zoo-convert-*/random-seed*.safetensors"),
            )
            out = str(tmp / "out")
        if run.returncode != 0:
            tail = "\n".join(line for _, line in run.lines[-15:])
            raise RuntimeError(f"zoo convert {name} --random-weights failed (exit {run.returncode}):\n{tail}")
        source = max(run.found.values(), default=0)
        peak = run.peak()
        row = {
            "name": name,
            "source_mb": source / MB,
            "peak_mb": peak / MB,
            "ratio": peak / source if source else None,
            "seconds": run.seconds,
            "parent_mb": run.peak("parent") / MB,
            "reference_mb": run.peak("reference") / MB,
            "high_water_mb": sum(run.high_water.values()) / MB,
            "interval": interval,
            "steps": [
                {
                    "step": step.replace(out, "OUT"),
                    "seconds": end - start,
                    "peak_mb": run.peak(None, start, end) / MB,
                    "parent_mb": run.peak("parent", start, end) / MB,
                    "reference_mb": run.peak("reference", start, end) / MB,
                }
                for step, start, end in run.steps()
                if run.peak(None, start, end)
            ],
        }  # no sample: too short
        rows.append(row)
        print(
            f"{name}: peak {row['peak_mb']:.0f} MB, both processes ({row['ratio']:.2f}x the "
            f"{row['source_mb']:.0f} MB source; converting process {row['parent_mb']:.0f} MB, reference "
            f"{row['reference_mb']:.0f} MB), {row['seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return rows


CONVERSION = "Conversion and loading"
MEMORY_TITLE = "### Peak memory of a conversion: the converting and the reference process together"


def memory_report(rows: list[dict]) -> str:
    """The `--conversion-memory` part of RESULTS.md's conversion section."""
    interval = rows[0]["interval"]
    lines = [
        MEMORY_TITLE,
        "",
        f"Command: `{' '.join(['python benchmarks/run.py', *sys.argv[1:]])}`",
        f"Machine: {cpu()}, {os.cpu_count()} logical CPUs. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"`zoo convert NAME --random-weights`: the resident memory (RSS) of its process and of the PyTorch "
        f"reference process it starts, read from /proc every {interval * 1000:.0f} ms and summed (`peak`), "
        "against the source file the reference writes; each process's own peak besides (not at the same "
        "moment), and the sum of the peaks the kernel recorded for each (`VmHWM`: a bound no sample can miss). "
        "Seconds: the whole command, imports included.",
        "",
        "| checkpoint | source MB | peak MB, both processes | / source | converting process MB | "
        "reference process MB | sum of VmHWM MB | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['source_mb']:.0f} | {r['peak_mb']:.0f} | {r['ratio']:.2f}x | "
            f"{r['parent_mb']:.0f} | {r['reference_mb']:.0f} | {r['high_water_mb']:.0f} | "
            f"{r['seconds']:.0f} |"
        )
    lines += [
        "",
        "Each step as `zoo convert` names it: its seconds, then the peak of both processes together, "
        "MB (in brackets the peak of each, converting / reference):",
        "",
    ]
    for r in rows:
        lines.append(
            f"- {r['name']}: "
            + "; ".join(
                f"{s['step']} {s['seconds']:.1f} s, {s['peak_mb']:.0f} ({s['parent_mb']:.0f} / {s['reference_mb']:.0f})"
                for s in r["steps"]
            )
        )
    return "\n".join(lines + [""])


def part_of(text: str, title: str) -> str | None:
    """The `### ` subsection of `text` titled `title`, None if it has none."""
    lines = text.split("\n")
    if title not in lines:
        return None
    start = lines.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("## ", "### "))), len(lines))
    return "\n".join(lines[start:end])


def replace_part(text: str, section: str, part: str) -> str:
    """`text` (RESULTS.md) with `part`, a `### ` subsection, in the `## ` section titled `section`:
    in place of its earlier version, else at the section's end (the section is added if missing)."""
    title = part.splitlines()[0]
    lines = text.rstrip("\n").split("\n") if text.strip() else ["# Benchmark results"]
    new = part.rstrip("\n").split("\n")
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("## ", "### "))), len(lines))
        return "\n".join(lines[:start] + new + [""] + lines[end:]).rstrip("\n") + "\n"
    heading = next((i for i, line in enumerate(lines) if line.startswith("## " + section)), None)
    if heading is None:
        return "\n".join(lines + ["", "## " + section, ""] + new).rstrip("\n") + "\n"
    end = next((i for i in range(heading + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body, rest = lines[:end], lines[end:]
    while body and not body[-1].strip():
        body.pop()
    return "\n".join(body + [""] + new + [""] + rest).rstrip("\n") + "\n"


_SAVE_APPS = "import keras; keras.applications.{cls}(weights=None, include_preprocessing=False).save_weights('{path}')"


def cpu() -> str:
    """The CPU's model name and the vector extensions that decide TensorFlow's and oneDNN's kernels."""
    try:
        cpuinfo = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        cpuinfo = {}
    cpuinfo = {k.strip(): v.strip() for k, v in cpuinfo.items()}  # the last CPU's lines: all alike here
    flags = set(cpuinfo.get("flags", "").split())
    isa = "/".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "no AVX2"
    return f"{cpuinfo.get('model name', 'unknown CPU')} ({isa})"


def _printed(code: str, quiet_tensorflow: bool = False) -> str:
    """What `code` prints, run by this Python in a process of its own (from the checkout)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"} if quiet_tensorflow else None
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    ).stdout.strip()


def machine() -> str:
    onednn = _printed(
        "import zoo.core.runtime as r; r.prefer_onednn(); import tensorflow; print(r.onednn_enabled())", True
    )
    versions = _printed("import torch, timm; print(f'torch {torch.__version__}, timm {timm.__version__}')")
    tf_versions = _printed(
        "import tensorflow as tf, keras; print(f'tensorflow {tf.__version__}, keras {keras.__version__}')", True
    )
    return (
        f"{cpu()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; {tf_versions} "
        f"(oneDNN rewrites: {onednn}); {versions}"
    )


def report(args, inference: list[dict], conversion: list[dict]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{' '.join(['python benchmarks/run.py', *sys.argv[1:]])}`",
        f"Machine: {machine()}; {args.threads} threads per framework.",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
    ]
    if inference:
        ratios = [(a, b) for a, b in RATIOS if a in args.frameworks and b in args.frameworks]
        lines += [
            "## Inference (images/s, medians, and ratios)",
            "",
            "| model | size | batch | "
            + " | ".join(args.frameworks)
            + " | "
            + " | ".join(f"{a} / {b}" for a, b in ratios)
            + " |",
            "|---|---|---|" + "---|" * (len(args.frameworks) + len(ratios)),
        ]
        for row in inference:
            cells = [f"{row[fw]:.1f}" if row.get(fw) else "-" for fw in args.frameworks]
            cells += [_ratio(row, a, b) for a, b in ratios]
            lines.append(f"| convnext_{row['model']} | {row['size']} | {row['batch']} | " + " | ".join(cells) + " |")
        lines += ["", "What each column runs:", ""]
        lines += [f"- `{fw}`: {DESCRIPTIONS[fw]}" for fw in args.frameworks]
        lines.append("")
    if conversion:
        lines += [
            f"## {CONVERSION}",
            "",
            "`without parity`: every step but the parity check, with the PyTorch reference started at "
            "parity (`alone`) and as `zoo convert` runs it, started first (`timm beside`); the "
            "ratio is `alone` to the I/O floor.",
            "",
            "| architecture | source MB | convert s | without parity s, alone | timm beside | I/O floor s | ratio "
            "| peak RSS above import MB (converting process) | / source | load s | keras.applications load s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in conversion:
            apps = f"{r['apps_load_s']:.2f}" if r["apps_load_s"] is not None else "-"
            lines.append(
                f"| {r['arch']} | {r['source_mb']:.0f} | {r['convert_s']:.1f} | {r['convert_no_parity_s']:.1f} | "
                f"{r['beside_timm_s']:.1f} | {r['floor_s']:.1f} | {r['time_ratio']:.2f}x | "
                f"{r['rss_above_import_mb']:.0f} | {r['rss_ratio']:.2f}x | {r['load_s']:.2f} | {apps} |"
            )
        for title, key in (
            ("Steps of each conversion (s)", "steps"),
            ("The same, reference started at parity", "alone_steps"),
        ):
            lines += [
                "",
                f"{title}: "
                + "; ".join(
                    f"{r['arch']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r[key].items()) for r in conversion
                ),
            ]
        lines.append("")
        checked = [r for r in conversion if r["precision"]]
        if checked:
            lines += [
                "## bfloat16 against float32 (same converted weights)",
                "",
                "| architecture | image set | images | top-1 agreement | max abs logit difference | max abs logit |",
                "|---|---|---|---|---|---|",
            ]
            for r in checked:
                for name, p in r["precision"].items():
                    lines.append(
                        f"| {r['arch']} | {name} | {p['images']} | {p['top1_agree']}/{p['images']} "
                        f"({p['top1_agree'] / p['images']:.1%}) | {p['max_abs']:.3g} | {p['max_ref']:.3g} |"
                    )
            lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--models", nargs="+", default=["tiny", "base"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 384])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument(
        "--batches-large",
        nargs="+",
        type=int,
        default=[1, 8],
        help="batches at sizes above 224 (a batch of 32 at 384 takes minutes a turn)",
    )
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="keep a turn's timed passes going until this long (fast configurations)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=12.0, help="stop a turn's timed passes after this long (at least one pass)"
    )
    parser.add_argument("--convert-archs", nargs="+", default=["atto", "tiny", "base", "large"])
    parser.add_argument(
        "--convert-rounds",
        type=int,
        default=2,
        help="conversions and I/O floors per architecture, alternating; the fastest of each is reported",
    )
    parser.add_argument(
        "--precision-archs",
        nargs="*",
        default=["tiny", "base"],
        help="converted architectures also compared in bfloat16 and float32",
    )
    parser.add_argument("--skip-infer", action="store_true")
    parser.add_argument("--skip-convert", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny at 224, batches 1 and 8, conversion of atto")
    parser.add_argument(
        "--conversion-memory",
        nargs="+",
        metavar="NAME",
        help="only this: the peak memory of `zoo convert NAME --random-weights`, its process and the "
        "PyTorch reference's together, for each NAME in turn",
    )
    parser.add_argument(
        "--memory-interval", type=float, default=0.05, help="seconds between two readings of the processes' memory"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.sizes, args.batches, args.convert_archs = ["tiny"], [224], [1, 8], ["atto"]
        args.precision_archs = ["atto"]
    earlier = args.out.read_text() if args.out.exists() else ""
    if args.conversion_memory:
        part = memory_report(bench_conversion_memory(args.conversion_memory, args.memory_interval))
        args.out.write_text(replace_part(earlier, CONVERSION, part))
        print(part)
        return 0
    inference = [] if args.skip_infer else bench_inference(args)
    conversion = [] if args.skip_convert else bench_convert_and_load(args)
    text = report(args, inference, conversion) + "\n"
    kept = part_of(earlier, MEMORY_TITLE)  # measured by --conversion-memory only: kept as it was
    args.out.write_text(replace_part(text, CONVERSION, kept) if kept else text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
