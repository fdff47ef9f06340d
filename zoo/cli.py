"""The `zoo` command line: list, convert, verify."""
from __future__ import annotations

import functools
import json
import os
import sys

import click

from .errors import ZooError

# TensorFlow's C++ start-up chatter is not for users; set before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _echo(line: str) -> None:
    click.echo(line, err=True)


def _user_errors(fn):
    """Turn project errors into one message and exit code 1, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZooError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convnext-zoo")
def main():
    """Official PyTorch ConvNeXt checkpoints as Keras models, proven equal to the originals."""


@main.command("list")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_user_errors
def list_command(pattern, as_json):
    """List catalogued checkpoints (PATTERN: glob or substring of names and aliases)."""
    from checkpoints.store import is_converted_folder, store_path

    from .catalogue import search

    rows = []
    for c in search(pattern):
        rows.append({
            "name": c.name, "architecture": c.architecture, "tag": c.tag, "aliases": list(c.aliases),
            "default_for": c.architecture if c.default else None, "params": c.params,
            "classes": c.num_classes, "input": c.input_size[-1], "license": c.license, "top1": c.top1,
            "source": c.hf_hub_id or c.url, "converted": is_converted_folder(store_path(c.name)),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        raise ZooError(f"no checkpoint matches {pattern!r}; `zoo list` shows all")
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'name':<{width}} {'params':>7} {'classes':>7} {'input':>5} {'top-1':>5} {'license':<12} "
               f"{'local':<5} {'source':<8} aliases")
    for r in rows:
        aliases = ", ".join(r["aliases"] + ([f"{r['default_for']} (default)"] if r["default_for"] else []))
        top1 = f"{r['top1']:.1f}" if r["top1"] else "-"
        where = "hub" if r["source"].startswith("timm/") else "url"
        click.echo(f"{r['name']:<{width}} {r['params'] / 1e6:>6.1f}M {r['classes']:>7} {r['input']:>5} {top1:>5} "
                   f"{(r['license'] or '-')[:12]:<12} {'yes' if r['converted'] else '-':<5} {where:<8} {aliases}")


@main.command()
@click.argument("name", required=False)
@click.option("--all", "convert_all", is_flag=True,
              help="Convert every catalogue entry matching NAME as a pattern (all if omitted).")
@click.option("--force", is_flag=True, help="With --all: convert again entries already done.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder (default: the local store); with --all, the folder of folders.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Convert this local file (.safetensors, or .pth/.pt/.bin) instead of the Hub's.")
@click.option("--random-weights", is_flag=True,
              help="Use seeded, perturbed random weights in timm's layout: runs offline, NOT pretrained.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-weights.")
@click.option("--revision", help="Hub revision (branch, tag or commit) of the source repo.")
@click.option("--from-url", is_flag=True,
              help="Download the original release file (FB's .pth/.pt) instead of timm's Hub copy.")
@click.option("--atol", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Parity gate: max abs logit error.")
@click.option("--rtol", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True,
              help="Parity gate: max abs logit error / max |reference logit|.")
@click.option("--publish", "publish_after", is_flag=True, help="Publish to the Hub after parity passed.")
@click.option("--repo-id", help="With --publish: destination repo (default: $ZOO_HUB_ORG/<name>).")
@_user_errors
def convert(name, convert_all, force, out, checkpoint, random_weights, seed, revision, from_url, atol, rtol,
            publish_after, repo_id):
    """Convert checkpoint NAME, prove parity with timm, and save it.

    NAME is a catalogue name (convnext_tiny.fb_in1k), an official alias (convnext_tiny_1k)
    or an architecture (convnext_tiny: timm's default tag). With --all, NAME is an optional
    pattern (`zoo convert --all 'convnextv2_*'`).
    """
    if random_weights and checkpoint:
        raise click.UsageError("--random-weights and --checkpoint exclude each other")
    if random_weights:
        _echo("WARNING: --random-weights: the result is NOT a pretrained model (parity and pipeline demo)")
    if convert_all:
        if publish_after:
            raise click.UsageError("--publish takes one checkpoint; publish the folders of --all one by one")
        if checkpoint or revision:
            raise click.UsageError("--checkpoint and --revision name one checkpoint; they do not go with --all")
        _convert_many(name, out, force, seed if random_weights else None, from_url, atol, rtol)
        return
    if not name:
        raise click.UsageError("missing NAME (or --all)")
    from converters.pipeline import convert as run
    from .catalogue import resolve

    ckpt = resolve(name)
    if random_weights:
        out = out or f"{ckpt.name}.random-seed{seed}"
    path, report = run(ckpt.name, out=out, checkpoint=checkpoint, random_seed=seed if random_weights else None,
                       revision=revision, from_url=from_url, atol=atol, rtol=rtol, echo=_echo)
    _echo(f"parity passed: {report.summary()}")
    if publish_after:
        _publish(path, repo_id, private=False, branch=None, expect_parent=None, allow_random=random_weights)
    click.echo(str(path))


def _publish(path, repo_id, private, branch, expect_parent, allow_random=False):
    from checkpoints import hub, store

    name = store.open_folder(path).config["name"]
    repo_id = repo_id or hub.repo_id_for(name)
    commit, new = hub.publish(path, repo_id, private=private, revision=branch, expect_parent=expect_parent,
                              allow_random=allow_random)
    if not new:
        _echo(f"{repo_id} already published these exact files at commit {commit}: nothing to do")
    else:
        _echo(f"published {name} to {repo_id} at commit {commit}")
    return commit


def _convert_many(pattern, out, force, random_seed, from_url, atol, rtol):
    from converters.pipeline import convert_all, summary_table
    from .catalogue import search

    names = [c.name for c in search(pattern)]
    if not names:
        raise ZooError(f"no checkpoint matches {pattern!r}; `zoo list` shows all")
    if random_seed is not None:
        out = out or "convnext-zoo-random"
    rows, summary = convert_all(names, out_root=out, force=force, random_seed=random_seed, from_url=from_url,
                                atol=atol, rtol=rtol, echo=_echo)
    click.echo(summary_table(rows))
    click.echo(f"summary: {summary}")
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    if failed:
        raise ZooError(f"{len(failed)} of {len(rows)} conversions failed: {', '.join(failed)}")


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Compare against this local source file instead of re-fetching the recorded one.")
@_user_errors
def verify(folder, checkpoint):
    """Re-check a converted FOLDER: file hashes, then parity against timm."""
    from converters.pipeline import verify as run

    report = run(folder, checkpoint=checkpoint, echo=_echo)
    if not report.passed:
        raise ZooError(f"parity check failed at {report.failure}")
    click.echo(f"parity passed: {report.summary()}")


@main.command()
@click.argument("name_or_dir")
@click.option("--repo-id", help="Destination repo (default: $ZOO_HUB_ORG/<name>, org convnext-zoo).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to commit to (created if missing; default main).")
@click.option("--expect-parent", help="Refuse unless the branch is still at this commit.")
@click.option("--allow-random", is_flag=True, help="Publish a folder of random (not pretrained) weights too.")
@_user_errors
def publish(name_or_dir, repo_id, private, revision, expect_parent, allow_random):
    """Publish a converted folder (or NAME from the local store) to the Hub, as one commit.

    Refused unless its parity report passed for exactly the weights being uploaded. The token
    comes from HF_TOKEN or `hf auth login` and is never printed.
    """
    from pathlib import Path

    from checkpoints import store
    from .catalogue import resolve

    path = Path(name_or_dir)
    if not path.is_dir():
        path = store.store_path(resolve(name_or_dir).name)
        if not path.is_dir():
            raise ZooError(f"{name_or_dir} is not converted in the local store; run `zoo convert {name_or_dir}`")
    click.echo(_publish(path, repo_id, private, revision, expect_parent, allow_random))


if __name__ == "__main__":
    main()
