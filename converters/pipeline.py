"""The whole conversion, top to bottom: name -> source -> port -> parity -> saved folder."""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checkpoints import store
from zoo.architectures import Architecture
from zoo.catalogue import Checkpoint, resolve
from zoo.errors import IntegrityError, SourceError
from zoo.steps import Echo, step

from . import mapping, parity, source

log = logging.getLogger(__name__)


def convert(name: str, *, out: str | Path | None = None, checkpoint: str | Path | None = None,
            random_seed: int | None = None, revision: str | None = None, from_url: bool = False,
            atol: float = parity.DEFAULT_ATOL, rtol: float = parity.DEFAULT_RTOL,
            echo: Echo = log.info) -> tuple[Path, parity.ParityReport]:
    """Convert one catalogued checkpoint and write it only if parity passes.

    Args:
        name: catalogue name, FB alias or bare architecture name.
        out: destination folder (default: the local store, `store_path(canonical name)`).
        checkpoint: a local source file instead of the Hub download.
        random_seed: use perturbed random weights in timm's layout (not pretrained) instead.
        revision: Hub revision of the source repo.
        from_url: download the original release (FB's `.pth`/`.pt`) instead of timm's Hub copy;
            the only source of checkpoints timm does not carry.
        atol, rtol: logits tolerances of the parity gate.
        echo: receives one line per step.

    Returns:
        The written folder and the parity report.

    Raises:
        ZooError: any failure; nothing is written then.
    """
    ckpt = resolve(name)
    arch = ckpt.arch
    out = store.check_destination(out if out else store.store_path(ckpt.name))  # before the slow work
    with store.work_dir("zoo-convert-") as work:
        with step(echo, "source weights"):
            src = _source(ckpt, arch, checkpoint, random_seed, revision, from_url, work)
        with parity.started(arch, src.path, num_classes=ckpt.num_classes, input_size=ckpt.input_size[-1],
                            mean=ckpt.mean, std=ckpt.std, head_norm_affine=ckpt.head_norm_affine) as pending:
            # timm imports, loads the source and runs the parity batch in its own process meanwhile
            with step(echo, f"read {src.path.name} and build {arch.name}"):
                state, src, model = _read_and_build(src, ckpt)
            with store.writing(out, model) as folder:
                with step(echo, f"write {store.WEIGHTS}"):
                    folder.save_weights(model, mapping.values(state, model))
                    del state
                with step(echo, "load the written weights"):
                    model.load_weights(folder.weights)  # parity judges the bytes written, as zoo.load reads them
                with step(echo, "parity against timm (separate process)"):
                    report = pending.check(model, atol=atol, rtol=rtol)
                echo(report.table())
                report.assert_passed()
                with step(echo, f"finish {folder.out}"):
                    folder.commit({**_config(ckpt, arch, src, random_seed), "params": model.count_params()},
                                  report.to_json())
    return folder.out, report


def _read_and_build(src: source.SourceFile, ckpt: Checkpoint):
    """(state dict, `src` with its sha256, model): the file is read and hashed on other
    threads while this one builds the Keras model (building is Python, reading and hashing
    release the GIL)."""
    with ThreadPoolExecutor(1) as reader:
        reading = reader.submit(source.read_source, src, conv_mlp=ckpt.arch.conv_mlp)
        model = build(ckpt.arch, ckpt.num_classes, ckpt.head_norm_affine)
        state, src = reading.result()
    return state, src, model


def verify(path: str | Path, *, checkpoint: str | Path | None = None,
           echo: Echo = log.info) -> parity.ParityReport:
    """Re-run parity on a converted folder against its recorded source weights.

    The folder's files are checked against the manifest, the source is fetched again (or
    taken from `checkpoint`) and must have the sha256 recorded at conversion, and the
    folder's Keras weights are compared with timm with the tolerances stored in its report.
    Writes nothing.

    Raises:
        ZooError: integrity or source problems (a failed comparison is in the report).
    """
    from zoo.loading import from_folder
    from zoo.model import dtype_policy

    with step(echo, f"check {path} against its manifest"):
        folder = store.open_folder(path)
    config = folder.config
    arch = Architecture.from_config(config["architecture"])
    with store.work_dir("zoo-verify-") as work:
        with step(echo, "source weights"):
            src = recorded_source(config, work, checkpoint)
        cfg = config["pretrained_cfg"]
        with parity.started(arch, src.path, num_classes=config["num_classes"], input_size=cfg["input_size"][-1],
                            mean=cfg["mean"], std=cfg["std"], head_norm_affine=config["head_norm_affine"]) as pending:
            with step(echo, "load the converted weights"), dtype_policy("float32"):
                model = from_folder(folder)
            stored = folder.parity
            with step(echo, "parity against timm (separate process)"):
                report = pending.check(model, atol=stored["atol"], rtol=stored["rtol"], stage_rtol=stored["stage_rtol"])
    echo(report.table())
    return report


def recorded_source(config: dict, work: Path, checkpoint: str | Path | None = None) -> source.SourceFile:
    """The source weights a converted folder was made from, checked against its recorded sha256.

    Fetched again from where the folder's config says (Hub commit, release URL, file, or the
    seed of random weights, regenerated under `work`), or taken from `checkpoint`.

    Raises:
        SourceError: the source cannot be fetched.
        IntegrityError: it is not the file the folder was converted from.
    """
    recorded = config["source"]
    if checkpoint is not None:
        src = source.local(checkpoint)
    elif recorded["kind"] == "random":
        src = random_source(Architecture.from_config(config["architecture"]), config["num_classes"],
                            recorded["seed"], work, config["head_norm_affine"])
    elif recorded["kind"] == "hub":
        src = source.fetch(recorded["repo_id"], recorded["filename"], revision=recorded["revision"])
    elif recorded["kind"] == "url":
        src = source.fetch_url(recorded["url"], expected_sha256=recorded["sha256"])
    else:
        src = source.local(recorded["path"])
    if src.sha256 != recorded["sha256"]:
        raise IntegrityError(f"the source weights changed since conversion (sha256 {src.sha256}, "
                             f"recorded {recorded['sha256']})")
    return src


def build(arch: Architecture, num_classes: int, head_norm_affine: bool = True):
    """The float32 Keras model for `arch`, whatever dtype policy is set globally.

    Its kernels start at zero, not random: every variable is assigned from the source next.
    """
    from zoo.model import build_model, dtype_policy

    with dtype_policy("float32"):
        return build_model(arch, num_classes=num_classes, head_norm_affine=head_norm_affine, initialize=False)


def _source(ckpt: Checkpoint, arch: Architecture, checkpoint, random_seed, revision, from_url, work: Path):
    if checkpoint is not None and random_seed is not None:
        raise SourceError("give either a checkpoint file or random weights, not both")
    if checkpoint is not None:
        return source.local(checkpoint, hashed=False)  # hashed as it is read
    if random_seed is not None:
        return random_source(arch, ckpt.num_classes, random_seed, work, ckpt.head_norm_affine, hashed=False)
    if from_url or not ckpt.hf_hub_id:
        if not ckpt.url:
            raise SourceError(f"{ckpt.name} has no original release URL; convert it from the Hub")
        return source.fetch_url(ckpt.url)
    return source.fetch(ckpt.hf_hub_id, ckpt.hf_hub_filename, revision=revision)


def random_source(arch: Architecture, num_classes: int, seed: int, work: Path,
                  head_norm_affine: bool = True, *, hashed: bool = True) -> source.SourceFile:
    """Perturbed random weights in timm's layout, written by timm itself (separate process).

    `hashed=False` leaves the sha256 to `source.read_source` (see `source.local`).
    """
    path = work / f"random-seed{seed}.safetensors"
    parity.run_reference_process(["random", "--arch", json.dumps(arch.to_config()),
                                  "--num-classes", str(num_classes), "--seed", str(seed), "--out", str(path)]
                                 + ([] if head_norm_affine else ["--no-head-norm"]))
    return source.local(path, hashed=hashed)


def _config(ckpt: Checkpoint, arch: Architecture, src: source.SourceFile, random_seed) -> dict:
    from zoo import __version__

    if random_seed is not None:
        origin = {"kind": "random", "seed": random_seed, "sha256": src.sha256,
                  "note": "perturbed random weights in timm's layout; NOT pretrained"}
    elif src.url is not None:
        origin = {"kind": "url", **src.to_json()}
    elif src.repo_id is None:
        origin = {"kind": "file", "path": str(src.path), **src.to_json()}
    else:
        origin = {"kind": "hub", **src.to_json(), "url": ckpt.url}
    return {
        "name": ckpt.name,
        "pretrained": random_seed is None,
        "architecture": arch.to_config(),
        "num_classes": ckpt.num_classes,
        "head_norm_affine": ckpt.head_norm_affine,
        "pretrained_cfg": ckpt.pretrained_cfg(),
        "top1": ckpt.top1,
        "source": origin,
        "converter": {"convnext_zoo": __version__},
    }


def convert_all(names: list[str], *, out_root: str | Path | None = None, force: bool = False,
                random_seed: int | None = None, from_url: bool = False,
                atol: float = parity.DEFAULT_ATOL, rtol: float = parity.DEFAULT_RTOL,
                keep_weights: bool = True, echo: Echo = log.info) -> tuple[list[dict], Path]:
    """Convert many checkpoints; one failure does not stop the rest.

    Already converted entries (a valid folder whose report passed) are skipped unless
    `force`. A `summary.json` with one row per entry (name, params, max abs / relative logit
    error, top-1 agreement, seconds, status) is written to `out_root` (default: the store).
    With `keep_weights=False` (parity sweeps) each folder keeps only its config, report and manifest,
    and an entry counts as done when its report passed.

    Returns:
        The rows and the summary file's path.
    """
    from tqdm.auto import tqdm

    from zoo.errors import ZooError

    root = Path(out_root) if out_root else store.store_root()
    store.check_writable(root)  # before the first conversion, not after it
    summary = root / "summary.json"
    rows = []
    for name in tqdm(names, desc="convert", unit="ckpt", disable=None):
        out = root / name
        row = {"name": name, "architecture": resolve(name).architecture}
        start = time.perf_counter()
        try:
            done = None if force else _passed(out, keep_weights)
            if done is not None:
                config, report = done
                row.update(status="skipped (done)", params=config.get("params"))
            else:
                path, report = convert(name, out=out, random_seed=random_seed, from_url=from_url,
                                       atol=atol, rtol=rtol, echo=echo)
                row.update(status="ok", params=json.loads((path / store.CONFIG).read_text()).get("params"))
                if not keep_weights:
                    (path / store.WEIGHTS).unlink()
            c = report.logits
            row.update(max_abs=c.max_abs, rel=c.rel, top1_agreement=report.top1_agreement)
        except ZooError as e:
            row.update(status="failed", error=str(e).splitlines()[0])
            echo(f"FAILED {name}: {row['error']}")
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        store.write_json_atomic(summary, {"rows": rows})  # a crash keeps the rows so far
    return rows, summary


def _passed(out: Path, whole: bool) -> tuple[dict, parity.ParityReport] | None:
    """(config, report) of the conversion at `out` if its report passed, else None.

    `whole`: the folder must also be intact against its manifest (weights included).
    """
    from zoo.errors import ZooError

    try:
        if whole:
            folder = store.open_folder(out)
            config, report = folder.config, folder.parity
        else:
            config = json.loads((out / store.CONFIG).read_text())
            report = json.loads((out / store.PARITY).read_text())
    except (ZooError, OSError, ValueError):
        return None
    return (config, parity.ParityReport.from_json(report)) if report.get("passed") else None


def summary_table(rows: list[dict]) -> str:
    """A fixed-width table of `convert_all` rows."""
    lines = [f"{'name':<52} {'params':>12} {'max abs':>9} {'relative':>9} {'top-1':>6} {'s':>7}  status"]
    for r in rows:
        figures = (f"{r['max_abs']:>9.2e} {r['rel']:>9.2e} {r['top1_agreement']:>6.0%}"
                   if "max_abs" in r else f"{'-':>9} {'-':>9} {'-':>6}")
        params = f"{r['params']:>12,}" if r.get("params") else f"{'-':>12}"
        lines.append(f"{r['name']:<52} {params} {figures} {r['seconds']:>7.1f}  {r['status']}"
                     + (f": {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)
