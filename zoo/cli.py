"""The `zoo` command line: list, convert, verify, publish, predict, eval, export."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path

import click

from checkpoints import hub, store
from checkpoints.converted import is_converted_folder, open_folder

from .core.catalogue import resolve, search
from .core.errors import ExportError, ParityError, ZooError
from .core.labels import read_label_file
from .core.reports import DEFAULT_ATOL, DEFAULT_RTOL
from .core.runtime import assume_frozen_weights, check_frozen_weights_value, import_tensorflow_quietly
from .core.text import printable, printable_lines
from .export.formats import check_options
from .prediction import DEFAULT_MODEL as DEFAULT_PREDICT_MODEL
from .prediction import classifier, classify

# Modules that import Keras (so TensorFlow: seconds) are imported in the commands that need
# them, once their arguments are known to be good: converters.pipeline, zoo.loading, zoo.export,
# zoo.evaluation.

# TensorFlow's C++ start-up chatter is not for users; set before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _echo(line: str) -> None:
    click.echo(printable_lines(line), err=True)  # names and paths from files: nothing a terminal acts on


class _Tolerance(click.FloatRange):
    """A positive, finite float: `nan` and `inf` would make the parity gate pass everything."""

    name = "positive finite float"

    def __init__(self):
        super().__init__(min=0, min_open=True)

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


TOLERANCE = _Tolerance()
PYTORCH_FORMATS = ("timm", "transformers", "torchvision")  # `zoo export`'s way back; timm and transformers publish


def _tolerances(what: str):
    """The --atol/--rtol options, defaulting to the parity gate's tolerances."""

    def decorate(fn):
        fn = click.option(
            "--rtol",
            type=TOLERANCE,
            default=DEFAULT_RTOL,
            show_default=True,
            help=f"{what}: max abs logit error / max |reference logit|.",
        )(fn)
        return click.option(
            "--atol", type=TOLERANCE, default=DEFAULT_ATOL, show_default=True, help=f"{what}: max abs logit error."
        )(fn)

    return decorate


def _user_errors(fn):
    """Turn project errors into one message and exit code 1, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZooError as e:
            message = str(e)
            if isinstance(e, ParityError) and e.report is not None:
                message = message.splitlines()[0]  # its table was shown as the parity step ended
            click.echo(f"error: {printable_lines(message)}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convnext-zoo")
def main():
    """Official PyTorch ConvNeXt checkpoints as Keras models, proven equal to the originals."""


def _tensorflow(fn=None, *, frozen: bool = True):
    """Import TensorFlow first, its start-up lines hidden unless `TF_CPP_MIN_LOG_LEVEL` < 2
    asks for them (runs once the arguments are parsed: `--help` and usage errors skip it).

    `frozen`: oneDNN keeps its packed weights (`zoo.core.runtime.assume_frozen_weights`), for the
    commands that run a model on batch after batch; `convert` and `verify` run each graph of their
    parity check four times, where the packed copies would hold the weights a second time beside
    the model and a third beside its serving path.
    """
    if fn is None:
        return functools.partial(_tensorflow, frozen=frozen)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _start_tensorflow(frozen)
        return fn(*args, **kwargs)

    return wrapper


def _start_tensorflow(frozen: bool) -> None:
    """What `_tensorflow` does before its command, for a command that needs TensorFlow for some of its
    arguments only (`publish --format timm`)."""
    check_frozen_weights_value()
    if frozen:
        assume_frozen_weights()  # the commands only run inference: oneDNN keeps its packed weights
    try:
        quiet = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")) >= 2
    except ValueError:
        quiet = True
    if quiet:
        import_tensorflow_quietly()
    else:
        import tensorflow  # noqa: F401  (its start-up lines shown, as asked, whatever the command reaches)


@main.command("list")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_user_errors
def list_command(pattern, as_json):
    """List catalogued checkpoints (PATTERN: glob or substring of names and aliases)."""
    rows = []
    for c in search(pattern):
        rows.append(
            {
                "name": c.name,
                "architecture": c.architecture,
                "tag": c.tag,
                "aliases": list(c.aliases),
                "default_for": c.architecture if c.default else None,
                "params": c.params,
                "classes": c.num_classes,
                "input": c.input_size[-1],
                "license": c.license,
                "top1": c.top1,
                "source": c.hf_hub_id or c.url,
                "converted": is_converted_folder(store.store_path(c.name)),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        raise ZooError(f"no checkpoint matches {pattern!r}; `zoo list` shows all")
    width = max(len(r["name"]) for r in rows)
    click.echo(
        f"{'name':<{width}} {'params':>7} {'classes':>7} {'input':>5} {'top-1':>5} {'license':<12} "
        f"{'local':<5} {'source':<8} aliases"
    )
    for r in rows:
        aliases = ", ".join(r["aliases"] + ([f"{r['default_for']} (default)"] if r["default_for"] else []))
        top1 = f"{r['top1']:.1f}" if r["top1"] else "-"
        where = "hub" if r["source"].startswith("timm/") else "url"
        click.echo(
            f"{r['name']:<{width}} {r['params'] / 1e6:>6.1f}M {r['classes']:>7} {r['input']:>5} {top1:>5} "
            f"{(r['license'] or '-')[:12]:<12} {'yes' if r['converted'] else '-':<5} {where:<8} {aliases}"
        )


def _floats(ctx, param, value):
    """N numbers, one per input channel of the network (how many the stem takes is checked later)."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.replace(",", " ").split())
    except ValueError:
        numbers = ()
    if not numbers or not all(math.isfinite(v) for v in numbers) or (param.name == "std" and min(numbers) <= 0):
        raise click.BadParameter(
            f"{value!r}: numbers{' > 0' if param.name == 'std' else ''}, one per input channel "
            "(e.g. 0.485,0.456,0.406 for RGB, 0.449 for grey)"
        )
    return numbers


def _label_file(ctx, param, value):
    if value is None:
        return None
    try:
        return read_label_file(value)
    except ZooError as e:
        raise click.BadParameter(printable(str(e))) from None


_OWN_OPTIONS = (  # `zoo convert`'s options for your own checkpoints only, in --help's order
    click.option("--name", "model_name", help="Name of the converted model (default: the file's, folder's or repo's)."),
    click.option("--arch", help="timm architecture the checkpoint must be (checked against its tensors)."),
    click.option("--input-size", type=click.IntRange(min=32), help="Input resolution, where the source does not say."),
    click.option(
        "--mean",
        callback=_floats,
        help="Normalisation mean, N values for N input channels (0.485,0.456,0.406 for RGB), where the source "
        "does not say.",
    ),
    click.option(
        "--std",
        callback=_floats,
        help="Normalisation std, N values for N input channels (0.229,0.224,0.225 for RGB), where the source "
        "does not say.",
    ),
    click.option(
        "--labels",
        type=click.Path(exists=True, dir_okay=False),
        callback=_label_file,
        help="Class names, one per line in index order, where the source does not name them.",
    ),
    click.option("--no-ema", is_flag=True, help="Of a training checkpoint, take the plain weights, not the EMA ones."),
    click.option(
        "--verbose", is_flag=True, help="List every key of a checkpoint that does not match, not the first few."
    ),
)
_OWN_NAMES = {
    "model_name": "name",
    "arch": "arch",
    "input_size": "input_size",
    "mean": "mean",
    "std": "std",
    "labels": "labels",
    "no_ema": "no_ema",
    "verbose": "verbose",
}  # parameter -> key of `own`


def _own_checkpoint_options(fn):
    """Add the options only your own checkpoints take; the command gets them as one dict, `own`,
    of those given (a flag not set and an option left out are not given), keyed as `convert_checkpoint`
    names them (`name`, `arch`, ...; and `no_ema`, `verbose`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        own = {key: kwargs.pop(parameter) for parameter, key in _OWN_NAMES.items()}
        return fn(*args, own={key: value for key, value in own.items() if value not in (None, False)}, **kwargs)

    for option in reversed(_OWN_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


@main.command()
@click.argument("name", required=False)
@click.option(
    "--all",
    "convert_all",
    is_flag=True,
    help="Convert every catalogue entry matching NAME as a pattern (all if omitted).",
)
@click.option("--force", is_flag=True, help="With --all: convert again entries already done.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Output folder (default: the local store); with --all, the folder of folders.",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True),
    help="A PyTorch ConvNeXt file or folder to convert: timm, FB, transformers or torchvision layout; "
    ".safetensors, .pth/.pt/.bin/.pth.tar/.ckpt, or a save_pretrained folder. With NAME: that "
    "catalogue checkpoint's weights from this file.",
)
@click.option(
    "--random-weights",
    is_flag=True,
    help="Use seeded, perturbed random weights in timm's layout: runs offline, NOT pretrained.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for --random-weights.")
@click.option("--revision", help="Hub revision (branch, tag or commit) of the source repo.")
@click.option(
    "--from-url", is_flag=True, help="Download the original release file (FB's .pth/.pt) instead of timm's Hub copy."
)
@_own_checkpoint_options
@_tolerances("Parity gate")
@click.option("--publish", "publish_after", is_flag=True, help="Publish to the Hub after parity passed.")
@click.option("--repo-id", help="With --publish: destination repo (default: $ZOO_HUB_ORG/<name>).")
@_user_errors
@_tensorflow(frozen=False)
def convert(
    name,
    convert_all,
    force,
    out,
    checkpoint,
    random_weights,
    seed,
    revision,
    from_url,
    own,
    atol,
    rtol,
    publish_after,
    repo_id,
):
    """Convert a checkpoint, prove parity with its PyTorch framework, and save it.

    NAME is a catalogue name (convnext_tiny.fb_in1k), an official alias (convnext_tiny_1k)
    or an architecture (convnext_tiny: timm's default tag). With --all, NAME is an optional
    pattern (`zoo convert --all 'convnextv2_*'`).

    Your own ConvNeXt: `zoo convert --checkpoint FILE_OR_FOLDER --out DIR`, or
    `zoo convert hf://ORG/REPO[@REVISION] --out DIR`. The architecture, head and layout are read
    from the tensors, and parity runs against the framework the checkpoint came from.
    """
    if random_weights and checkpoint:
        raise click.UsageError("--random-weights and --checkpoint exclude each other")
    if repo_id and not publish_after:
        raise click.UsageError("--repo-id names where --publish sends the result; add --publish or drop it")
    is_own = bool(name and name.startswith("hf://")) or (checkpoint is not None and not name)
    if own and not is_own:
        given = ", ".join("--" + key.replace("_", "-") for key in own)  # (`name` is --name)
        raise click.UsageError(f"{given}: only for your own checkpoints (--checkpoint FILE without NAME, or hf://...)")
    if is_own and (convert_all or random_weights or from_url or (checkpoint and name)):
        raise click.UsageError(
            "hf://... and --checkpoint name one checkpoint: no --all, --random-weights, --from-url, or a second source"
        )
    if random_weights:
        _echo("WARNING: --random-weights: the result is NOT a pretrained model (parity and pipeline demo)")
    if convert_all:
        if publish_after:
            raise click.UsageError("--publish takes one checkpoint; publish the folders of --all one by one")
        if checkpoint or revision:
            raise click.UsageError("--checkpoint and --revision name one checkpoint; they do not go with --all")
        _convert_many(name, out, force, seed if random_weights else None, from_url, atol, rtol)
        return
    if is_own:
        from converters.pipeline import Options, convert_checkpoint  # imports Keras: once the arguments are good

        verbose, use_ema = own.pop("verbose", False), not own.pop("no_ema", False)
        path, report = convert_checkpoint(
            checkpoint or name,
            out=out,
            options=Options(atol, rtol, verbose, _echo),
            use_ema=use_ema,
            revision=revision,
            **own,
        )
    else:
        if not name:
            raise click.UsageError("missing NAME, --checkpoint FILE, hf://ORG/REPO or --all")
        from converters.pipeline import Options  # imports Keras: once the arguments are good
        from converters.pipeline import convert as run

        ckpt = resolve(name)
        if random_weights:
            out = out or f"{ckpt.name}.random-seed{seed}"
        path, report = run(
            ckpt.name,
            out=out,
            checkpoint=checkpoint,
            random_seed=seed if random_weights else None,
            revision=revision,
            from_url=from_url,
            options=Options(atol, rtol, echo=_echo),
        )
    _echo(f"parity passed: {report.summary()}")
    if publish_after:
        _publish(path, repo_id, private=False, branch=None, expect_parent=None, allow_random=random_weights)
    click.echo(str(path))


def _publish(path, repo_id, private, branch, expect_parent, allow_random=False):
    name = open_folder(path).config.name
    repo_id = repo_id or hub.repo_id_for(name)
    commit, new = hub.publish(
        path, repo_id, private=private, revision=branch, expect_parent=expect_parent, allow_random=allow_random
    )
    return _published(name, repo_id, commit, new)


def _published(name: str, repo_id: str, commit: str, new: bool) -> str:
    if not new:
        _echo(f"{repo_id} already published these exact files at commit {commit}: nothing to do")
    else:
        _echo(f"published {name} to {repo_id} at commit {commit}")
    return commit


def _convert_many(pattern, out, force, random_seed, from_url, atol, rtol):
    from converters.batch import convert_all, summary_table
    from converters.plan import Options

    names = [c.name for c in search(pattern)]
    if not names:
        raise ZooError(f"no checkpoint matches {pattern!r}; `zoo list` shows all")
    if random_seed is not None:
        out = out or "convnext-zoo-random"
    rows, summary = convert_all(
        names,
        out_root=out,
        force=force,
        random_seed=random_seed,
        from_url=from_url,
        options=Options(atol, rtol, echo=_echo),
    )
    click.echo(summary_table(rows))
    click.echo(f"summary: {summary}")
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    if failed:
        raise ZooError(f"{len(failed)} of {len(rows)} conversions failed: {', '.join(failed)}")


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False),
    help="Compare against this local source file instead of re-fetching the recorded one.",
)
@_user_errors
@_tensorflow(frozen=False)
def verify(folder, checkpoint):
    """Re-check a converted FOLDER: file hashes, then parity against the framework its source came from
    (timm, transformers or torchvision), on the recorded source weights."""
    from converters.verify import verify as run

    report = run(folder, checkpoint=checkpoint, echo=_echo)
    if not report.passed:
        raise ZooError(f"parity check failed at {report.failure}")
    click.echo(f"parity passed: {report.summary()}")


@main.command()
@click.argument("name_or_dir")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["keras", *PYTORCH_FORMATS]),
    default="keras",
    show_default=True,
    help="keras: the converted folder; timm, transformers: its PyTorch export with that library's model card "
    "(made and proven here from a converted folder, or a folder `zoo export --format timm|transformers` wrote); "
    "torchvision is refused (it cannot load from the Hub).",
)
@click.option(
    "--repo-id",
    help="Destination repo (default: $ZOO_HUB_ORG/<name>, org convnext-zoo; <name>.timm or <name>.transformers "
    "for those formats).",
)
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to commit to (created if missing; default main).")
@click.option("--expect-parent", help="Refuse unless the branch is still at this commit.")
@click.option("--allow-random", is_flag=True, help="Publish a folder of random (not pretrained) weights too.")
@_user_errors
def publish(name_or_dir, fmt, repo_id, private, revision, expect_parent, allow_random):
    """Publish a converted folder (or NAME from the local store) to the Hub, as one commit.

    Refused unless its parity report passed for exactly the weights being uploaded. With --format timm
    or transformers, its PyTorch export (loaded by `timm.create_model("hf-hub:ORG/NAME", pretrained=True)`
    or `AutoModelForImageClassification.from_pretrained("ORG/NAME")`), refused unless the export's report
    passed for exactly the files being uploaded. The token comes from HF_TOKEN or `hf auth login` and is
    never printed.
    """
    if fmt == "torchvision":
        raise click.UsageError(
            "torchvision has no way to load a model from the Hub: publish --format timm or transformers "
            "(or share the folder `zoo export --format torchvision` writes)"
        )
    path = Path(name_or_dir)
    if not path.is_dir():
        path = store.store_path(resolve(name_or_dir, or_folder=True).name)
        if not path.is_dir():
            raise ZooError(f"{name_or_dir} is not converted in the local store; run `zoo convert {name_or_dir}`")
    if fmt == "keras":
        if not is_converted_folder(path) and (path / "parity.json").is_file():
            _refuse_pytorch_export(path)
        click.echo(_publish(path, repo_id, private, revision, expect_parent, allow_random))
        return
    _start_tensorflow(frozen=False)  # the export is proven as a conversion is
    from .export.publishing import publish_pytorch

    repo_id, commit, new = publish_pytorch(
        path,
        fmt,
        repo_id,
        private=private,
        revision=revision,
        expect_parent=expect_parent,
        allow_random=allow_random,
        echo=_echo,
    )
    click.echo(_published(f"{path.name} as {fmt}", repo_id, commit, new))


def _refuse_pytorch_export(path: Path) -> None:
    """A PyTorch export given to the Keras publish: say how it is published (or that it is not)."""
    _start_tensorflow(frozen=False)
    from .export.publishing import HUB_FRAMEWORKS, export_framework

    framework = export_framework(path)
    if framework is None:
        return  # not one: the Keras publish says what the folder lacks
    how = (
        f"publish it with --format {framework}"
        if framework in HUB_FRAMEWORKS
        else "only timm and transformers exports are published"
    )
    raise ZooError(f"{path} is a {framework} export, not a converted folder: {how}")


_DTYPE = click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Compute precision (bfloat16: ~2x faster on CPUs with AVX-512 BF16 or AMX; float16 for GPUs).",
)


@main.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option(
    "--model",
    "model_name",
    default=DEFAULT_PREDICT_MODEL,
    show_default=True,
    help="Checkpoint name or alias (local store, else the Hub, else converted), a converted folder, "
    "or a published repo hf://ORG/NAME.",
)
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Classes shown per image.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Machine-readable output: a list of {image, predictions: [{index, label, probability}]}.",
)
@_DTYPE
@_user_errors
@_tensorflow
def predict(images, model_name, top, as_json, dtype):
    """Classify IMAGE files: the top classes and their probabilities.

    Each image is prepared exactly as the checkpoint's source evaluates it (its size, crop and
    normalisation: timm's eval transform, a transformers folder's image processor, torchvision's
    transform for its weights). The default model, convnext_tiny.fb_in1k, has the ImageNet-1k classes;
    heads of 11821 (ImageNet-12k) and 21841 (ImageNet-22k) classes are named too, other heads
    show class indices. Feature checkpoints (0 classes) cannot predict.
    """
    found = classifier(model_name)
    predictions = classify(found, list(images), top=top, dtype=dtype)
    names = found.labels
    if names is None:
        _echo(
            f"note: {printable(found.name)} has a {found.num_classes}-way head without class names (the 1000-, "
            f"11821- and 21841-class ImageNet heads are named, and conversions given names); showing class indices"
        )
    if as_json:
        click.echo(
            json.dumps(
                [
                    {"image": image, "predictions": [p.to_json() for p in best]}
                    for image, best in zip(images, predictions, strict=False)
                ],
                indent=1,
            )
        )
        return
    for n, (image, best) in enumerate(
        zip(images, predictions, strict=False)
    ):  # names escaped: one row each, no terminal codes
        click.echo(("\n" if n else "") + printable(image))
        click.echo(f"  {'rank':>4}  {'probability':>11}  {'index':>5}" + ("  label" if names else ""))
        for rank, p in enumerate(best, 1):
            label = f"  {printable(p.label)}" if names else ""
            click.echo(f"  {rank:>4}  {p.probability:>11.2%}  {p.index:>5}{label}")


@main.command("eval")
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="ImageFolder: one sub-folder per class, all named by WordNet id (n01440764), by class index, "
    "or by the model's label name (as `zoo predict` prints it).",
)
@click.option(
    "--model",
    "model_name",
    default=DEFAULT_PREDICT_MODEL,
    show_default=True,
    help="Checkpoint name or alias, or a converted folder.",
)
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Instead of sub-folders: lines of `relative/path label` (index, WordNet id or label name).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate a fixed random sample of N images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--compare-torch",
    is_flag=True,
    help="Also run the source's framework (timm, transformers or torchvision) on the source weights, "
    "with timm's eval transform, and report its accuracy and the "
    "agreement of the two (needs the convert extra).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    help="Threads decoding and preparing images while the model runs (default: one per CPU; "
    "0: before each batch, in one thread).",
)
@click.option(
    "--devices",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run the model on N devices (GPUs, else CPU devices) with tf.distribute.MirroredStrategy, "
    "each batch split between them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_DTYPE
@_user_errors
@_tensorflow
def eval_command(data, model_name, labels_file, limit, batch_size, compare_torch, workers, devices, as_json, dtype):
    """Top-1/top-5 accuracy on a labelled image folder with the checkpoint's official preprocessing."""
    from .evaluation import evaluate

    report = evaluate(
        model_name,
        data,
        labels_file=labels_file,
        limit=limit,
        batch_size=batch_size,
        compare_torch=compare_torch,
        dtype=dtype,
        workers=workers,
        devices=devices,
    )
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else printable_lines(report.table()))


@main.command("export")
@click.argument("name_or_dir")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["savedmodel", "tflite", "keras", *PYTORCH_FORMATS]),
    required=True,
    help="savedmodel: a TF SavedModel folder; tflite: a LiteRT file; keras: a .keras file; "
    "timm, transformers, torchvision: back to PyTorch, a folder that framework's own loader reads.",
)
@click.option("--out", type=click.Path(), help="Destination (default: <name>.<format> in the current folder).")
@click.option(
    "--quantize",
    type=click.Choice(["none", "fp16", "dynamic"]),
    default="none",
    show_default=True,
    help="tflite only: float16 weights, or dynamic-range int8 weights (looser, stated bounds).",
)
@click.option(
    "--pytorch",
    type=click.Choice(["auto", "require", "skip"]),
    default="auto",
    show_default=True,
    help="Compare with the source's framework (timm, transformers or torchvision) on the recorded source "
    "weights: when possible, always, or never.",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False),
    help="Local source file for the PyTorch comparison instead of fetching the recorded one.",
)
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(exists=True, dir_okay=False),
    help="timm/transformers/torchvision: one class name per line (default: the folder's own, ImageNet's).",
)
@click.option(
    "--preprocessing",
    help="timm/transformers/torchvision from a .keras file: the name or converted folder whose "
    "preprocessing the framework's config records (default: timm's ImageNet defaults at 224).",
)
@_tolerances("fp32 bound")
@_user_errors
@_tensorflow
def export_command(name_or_dir, fmt, out, quantize, pytorch, checkpoint, labels_file, preprocessing, atol, rtol):
    """Export a converted NAME_OR_DIR as a SavedModel, a TFLite file or a .keras file, or back to
    PyTorch as timm, transformers or torchvision weights (NAME_OR_DIR may then be a .keras file).

    The export runs on the parity images and is compared with the Keras model and with PyTorch
    (the source's framework, timm, transformers or torchvision, on the recorded source weights); it
    is kept, with its report beside it, only if it meets its bounds. A PyTorch export is loaded by
    its framework's own loader in a separate process and compared with the Keras model at the stem,
    every stage and the logits. Prints the export's path; the report table goes to stderr.
    """
    if fmt in PYTORCH_FORMATS:
        given = [
            f"--{o}"
            for o, v in (("quantize", quantize != "none"), ("pytorch", pytorch != "auto"), ("checkpoint", checkpoint))
            if v
        ]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} applies to savedmodel, tflite and keras exports; drop it for {fmt}"
            )
        from .export.pytorch import REPORT, to_pytorch

        path = to_pytorch(
            name_or_dir, fmt, out=out, labels=labels_file, preprocessing=preprocessing, atol=atol, rtol=rtol, echo=_echo
        )
        _echo(f"report: {path / REPORT}")
        click.echo(str(path))
        return
    if labels_file or preprocessing:
        raise click.UsageError(
            f"--labels and --preprocessing apply to timm, transformers and torchvision exports; drop them for {fmt}"
        )
    try:
        check_options(fmt, quantize)
    except ExportError as e:
        raise click.UsageError(str(e)) from None
    from .export import export, report_path

    path = export(
        name_or_dir,
        fmt,
        out=out,
        quantize=quantize,
        pytorch=pytorch,
        checkpoint=checkpoint,
        atol=atol,
        rtol=rtol,
        echo=_echo,
    )  # the steps and the report table go to stderr
    _echo(f"report: {report_path(path)}")
    click.echo(str(path))


if __name__ == "__main__":
    main()
