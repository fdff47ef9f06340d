"""A PyTorch export on the Hugging Face Hub: `zoo publish --format timm|transformers`.

What is published is an export `to_pytorch` wrote (here, from a converted folder, proven before it is
used; or a folder `zoo export --format timm|transformers` wrote), checked against its own report just
before it is sent: the report passed, every file is the one the report hashed, and the folder holds
nothing else. The commit holds the framework's files, the report and a model card for that library
(`timm.create_model("hf-hub:ORG/NAME", pretrained=True)`,
`AutoModelForImageClassification.from_pretrained("ORG/NAME")`): one commit guarded by its parent and
read back (`checkpoints.hub.commit_files`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from checkpoints import hub
from checkpoints.converted import open_folder
from checkpoints.fs import sha256_file

from ..core.errors import HubError
from ..core.folder_config import FolderConfig
from ..core.reports import ParityReport
from ..core.steps import Echo
from .pytorch import REPORT, REPORT_FORMAT, to_pytorch

log = logging.getLogger(__name__)

HUB_FRAMEWORKS = ("timm", "transformers")  # torchvision keeps no model description beside its weights


def export_framework(path: str | Path) -> str | None:
    """The framework of the PyTorch export at `path` (its report says it is one), or None: not an export.
    A report that names none gives `?` (`check_export` says what is wrong with it)."""
    try:
        _, report = _read_report(Path(path))
    except (OSError, ValueError):
        return None
    export = report.get("export")
    framework = export.get("framework") if isinstance(export, dict) else None
    return framework if isinstance(framework, str) else "?"


def publish_pytorch(
    path: str | Path,
    framework: str,
    repo_id: str | None = None,
    *,
    private: bool = False,
    revision: str | None = None,
    expect_parent: str | None = None,
    token: str | None = None,
    allow_random: bool = False,
    echo: Echo = log.info,
) -> tuple[str, str, bool]:
    """Publish a converted folder's `framework` export (made here and proven), or an export folder, as one commit.

    Args:
        path: a converted folder, or a folder `zoo export --format timm|transformers` wrote.
        framework: `timm` or `transformers`.
        repo_id: destination repo (default: `$ZOO_HUB_ORG/<name>.<framework>`).
        private, revision, expect_parent, token: as `checkpoints.hub.publish` takes them.
        allow_random: publish random (not pretrained) weights too.
        echo: receives one line per step of the export.

    Returns:
        (the repo, the commit holding the files, whether that commit is new).

    Raises:
        HubError: refused (random weights, a report that failed or is not these files', a folder holding
            other files, an export of another framework), or the upload failed: nothing was published.
        ExportError: a converted folder the framework cannot hold, or whose export failed its proof.
    """
    if framework not in HUB_FRAMEWORKS:
        raise HubError(f"{framework} has no way to load a model from the Hub; publish {' or '.join(HUB_FRAMEWORKS)}")
    path = Path(path).expanduser()
    upload = dict(private=private, revision=revision, expect_parent=expect_parent, token=token)
    if export_framework(path) is not None:
        return _publish_export(path, framework, repo_id, str(path), allow_random, upload)
    folder = open_folder(path)
    hub.check_publishable(folder, allow_random)  # the Keras weights themselves passed their gate
    with tempfile.TemporaryDirectory(prefix="zoo-publish-") as work:
        out = to_pytorch(
            folder.path, framework, Path(work) / f"{folder.config.name}.{framework}", convert=False, echo=echo
        )
        what = f"the {framework} export of {folder.path}"
        return _publish_export(out, framework, repo_id, what, allow_random, upload)


def _publish_export(
    path: Path, framework: str, repo_id: str | None, what: str, allow_random: bool, upload: dict
) -> tuple[str, str, bool]:
    """Check the export at `path` against its report, then commit its files, the report and its card."""
    report, expected = check_export(path, framework, allow_random, what)
    name = report["source"]["name"]
    repo_id = repo_id or hub.repo_id_for(f"{name}.{framework}")
    try:
        card = model_card(path, report, repo_id).encode()
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise HubError(f"refusing to publish {what}: its files cannot be described ({type(e).__name__}: {e})") from None
    sent = {**{n: path / n for n in report["export"]["files"]}, REPORT: path / REPORT, hub.CARD: card}
    commit, new = hub.commit_files(
        repo_id,
        sent,
        {**expected, hub.CARD: hashlib.sha256(card).hexdigest()},
        what=what,
        checked_against="the export's report",
        message=f"{name}: {framework} export, parity {ParityReport.from_json(report['parity']).summary()}",
        **upload,
    )
    return repo_id, commit, new


def _read_report(path: Path) -> tuple[bytes, dict]:
    """The bytes and content of the export report at `path`.

    Raises:
        OSError: none can be read.
        ValueError: it is not a PyTorch export's report.
    """
    data = (path / REPORT).read_bytes()
    report = json.loads(data)
    if not isinstance(report, dict) or report.get("report_format") != REPORT_FORMAT:
        raise ValueError(f"{path / REPORT} is not a convnext-zoo PyTorch export report")
    return data, report


def check_export(
    path: Path, framework: str, allow_random: bool = False, what: str | None = None
) -> tuple[dict, dict[str, str]]:
    """The export's report and {file: sha256} of what is to be sent (its files and the report), once the
    folder is shown to be what its report describes.

    Raises:
        HubError: naming what is wrong: an export of another framework, a report that is invalid or
            failed, random weights (unless `allow_random`), a file changed, missing or not listed.
    """
    what = what or str(path)

    def refuse(why: str) -> HubError:
        return HubError(f"refusing to publish {what}: {why}")

    try:
        data, report = _read_report(path)
    except (OSError, ValueError) as e:
        raise refuse(f"it has no readable PyTorch export report ({REPORT}: {e})") from None
    export, source = report.get("export"), report.get("source")
    try:
        files = {name: (meta["sha256"], meta["size"]) for name, meta in export["files"].items()}
        parity = ParityReport.from_json(report["parity"])
        name = source["name"]
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise refuse(f"its report is invalid ({type(e).__name__}: {e})") from None
    if export.get("framework") != framework:
        raise refuse(f"it is a {export.get('framework')} export, not a {framework} one; publish it as what it is")
    if report.get("passed") is not True or not parity.passed:
        raise refuse(f"its proof failed ({parity.failure or 'the report says it did not pass'}); export it again")
    if source.get("pretrained") is False and not allow_random:
        raise refuse(f"{name} holds random weights, not a pretrained model; pass --allow-random to publish it anyway")
    entries = {p.name for p in path.iterdir()}
    others = sorted(entries - set(files) - {REPORT})
    if others:
        raise refuse(f"it holds {', '.join(others)}, which its report does not list (an export is its files only)")
    missing = sorted(set(files) - entries)
    if missing:
        raise refuse(f"{', '.join(missing)} listed in its report missing")
    changed = []
    for file, (sha256, size) in files.items():
        where = path / file
        if where.is_symlink() or not where.is_file():
            raise refuse(f"{file} is not a regular file")
        if where.stat().st_size != size or sha256_file(where) != sha256:
            changed.append(file)
    if changed:
        raise refuse(f"{', '.join(changed)} changed since the export's report was written; export it again")
    expected = {file: sha256 for file, (sha256, _) in files.items()}
    return report, {**expected, REPORT: hashlib.sha256(data).hexdigest()}


# --- the model card -----------------------------------------------------------------------------


def model_card(path: Path, report: dict, repo_id: str) -> str:
    """The README.md published with a timm or transformers export: Hub metadata (the library, task,
    licence and base model when known, the parity figures) and a usage snippet of that library that
    runs as it is (the test suite runs it against a Hub server)."""
    framework, source, parity = report["export"]["framework"], report["source"], report["parity"]
    name = source["name"]
    facts = _timm_facts(path) if framework == "timm" else _transformers_facts(path)
    record = _record(source)
    classes = facts.classes
    task = hub.card_task(classes)
    front_matter = hub.card_front_matter(
        library=framework,
        task=task,
        name=name,
        license=(record.license if record else None) or facts.license,
        tags=[framework, "convnext", task, "convnext-zoo"],
        base_model=record.base_model if record else None,
        tag=record.tag if record else "",
        parity=parity,
        against="the Keras model",
    )
    gated = hub.gated_comparison(parity)
    if record:
        origin = f" (converted from `{record.base_model or record.source.url or 'a local file'}`)"
    elif source.get("keras_file"):
        origin = f" (from the Keras file `{Path(str(source['keras_file'])).name}`)"
    else:
        origin = " (a model in memory)" if source.get("keras_model") else ""
    head = f"{classes} classes" if classes else "no classifier: " + ("feature maps" if facts.maps else "features")
    gate = (
        f"gate: max abs <= {parity['atol']:g}, relative <= {parity['rtol']:g}; top-1 agreement "
        f"{parity['top1_agreement']:.0%}, top-5 {parity['top5_agreement']:.0%}"
        if parity["top1_agreement"] is not None
        else f"gate: every stage and feature map within relative error {parity['stage_rtol']:g}"
    )
    notes = "".join(f"\n- {note}" for note in report.get("notes") or [])
    notes = f"\n\nNotes:\n{notes}" if notes else ""
    files = ", ".join(f"`{file}`" for file in report["export"]["files"])
    return f"""{front_matter}
# {name} for {framework}
{"" if source.get("pretrained", True) else hub.NOT_PRETRAINED}
`{name}` as {framework}{"'" if framework.endswith("s") else "'s"} own files ({files}): {facts.arch},
{_parameters(path):,} parameters, {head}. These are convnext-zoo's Keras model of `{name}`{origin},
written back to PyTorch.

{framework} loaded these files with its own loader in a separate process, and its outputs were
compared with the Keras model's on the parity batch ({parity["num_images"]} images, {parity["input_size"]}px):
{gated["name"]} max abs error {gated["max_abs"]:.2e}, relative {gated["rel"]:.2e} ({gate}).
Outputs compared: {", ".join(c["name"] for c in parity["comparisons"])}.

{hub.parity_table(parity)}

`{REPORT}` has the full report, with the sha256 and size of every file.

## Use

```python
{facts.snippet(repo_id)}
```

Preprocessing: {facts.preprocessing}{notes}
"""


def _parameters(path: Path) -> int:
    """How many numbers the export's weights hold (read from the safetensors header)."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "numpy") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


def _record(source: dict) -> FolderConfig | None:
    """The record of the converted folder the export was made from, if it is still there with these weights."""
    folder = source.get("folder")
    try:
        record = FolderConfig.read(folder) if folder else None
    except (OSError, ValueError, TypeError):
        return None
    return record if record is not None and record.weights_sha256 == source.get("weights_sha256") else None


def _stand_in(channels: int, size: int) -> str:
    """What a snippet passes for images PIL cannot open as the model takes them (other channel counts)."""
    return f"torch.randn(1, {channels}, {size}, {size})"


_STAND_IN = "  # stands for your images, normalised as below"


@dataclass(frozen=True)
class _Facts:
    """What a card says of an export, read from its framework's own config files.

    Attributes:
        classes: classifier width (0: features or feature maps).
        maps: a dense-prediction backbone (feature maps out).
        arch: the model class or architecture, as the card names it.
        license: the licence the files record, if any.
        preprocessing: how images are prepared, as the card says it.
        imports, load, prepare, run, show: the snippet's lines: its imports, loading from the repo
            (`{repo}` stands for it), preparing image.jpg, running the model, printing the result.
    """

    classes: int
    maps: bool
    arch: str
    license: str | None
    preprocessing: str
    imports: str
    load: str
    prepare: str
    run: str
    show: str

    def snippet(self, repo_id: str) -> str:
        load = self.load.replace("{repo}", repo_id)
        return f"{self.imports}\n\n{load}\n{self.prepare}\nwith torch.inference_mode():\n    {self.run}\n{self.show}"


def _timm_facts(path: Path) -> _Facts:
    config = json.loads((path / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    classes, channels, size = config["num_classes"], cfg["input_size"][0], cfg["input_size"][-1]
    args = ", ".join(f"{k}={v}" for k, v in (config.get("model_args") or {}).items())
    if not classes:
        run, show = "features = model(image)  # the pooled features (timm's pre-logits)", "print(features.shape)"
    elif config.get("label_names"):
        run = f"logits = model(image)  # (1, {classes}), no softmax"
        show = 'top = logits.argmax(-1).item()\nprint(top, model.pretrained_cfg["label_names"][top])'
    else:
        run, show = f"logits = model(image)  # (1, {classes}), no softmax", "print(logits.argmax(-1).item())"
    return _Facts(
        classes=classes,
        maps=False,
        arch=f"timm's `{config['architecture']}`" + (f" ({args})" if args else ""),
        license=cfg.get("license"),
        preprocessing=(
            f"{channels} input channels, {size}px, crop_pct {cfg.get('crop_pct')}, {cfg.get('crop_mode')} crop, "
            f"{cfg.get('interpolation')} interpolation, mean {cfg['mean']}, std {cfg['std']} (the `pretrained_cfg` "
            "of `config.json`, which `resolve_data_config` reads)."
        ),
        imports=(
            "import timm\nimport torch\nfrom PIL import Image\n"
            "from timm.data import create_transform, resolve_data_config"
        ),
        load='model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
        prepare=(
            "transform = create_transform(**resolve_data_config({}, model=model))\n"
            f'image = transform(Image.open("image.jpg").convert("{"RGB" if channels == 3 else "L"}")).unsqueeze(0)'
            if channels in (1, 3)
            else f"image = {_stand_in(channels, size)}{_STAND_IN}"
        ),
        run=run,
        show=show,
    )


def _transformers_facts(path: Path) -> _Facts:
    config = json.loads((path / "config.json").read_text())
    processor = json.loads((path / "preprocessor_config.json").read_text())
    cls = config["architectures"][0]
    maps = cls.endswith("Backbone")
    classes = len(config.get("id2label") or {}) if cls.endswith("ForImageClassification") else 0
    channels, size = config.get("num_channels", 3), config.get("image_size", 224)
    auto = "AutoModelForImageClassification" if classes else "AutoBackbone" if maps else "AutoModel"
    if classes:
        run = f"logits = model(**inputs).logits  # (1, {classes}), no softmax"
        show = "top = logits.argmax(-1).item()\nprint(top, model.config.id2label[top])"
    elif maps:
        run, show = "maps = model(**inputs).feature_maps", "print([m.shape for m in maps])"
    else:
        run = "features = model(**inputs).pooler_output  # the pooled features (timm's pre-logits)"
        show = "print(features.shape)"
    return _Facts(
        classes=classes,
        maps=maps,
        arch=f"transformers' `{cls}` (depths {config['depths']}, widths {config['hidden_sizes']})",
        license=None,
        preprocessing=(
            f"{channels} input channels; `preprocessor_config.json` ({processor.get('image_processor_type')}, which "
            f"`AutoImageProcessor` reads): shortest edge {processor['size'].get('shortest_edge')}, crop_pct "
            f"{processor.get('crop_pct')}, mean {processor['image_mean']}, std {processor['image_std']}."
        ),
        imports=f"import torch\nfrom PIL import Image\nfrom transformers import AutoImageProcessor, {auto}",
        load=(
            'processor = AutoImageProcessor.from_pretrained("{repo}")\n'
            f'model = {auto}.from_pretrained("{{repo}}").eval()'
        ),
        prepare=(
            'inputs = processor(images=Image.open("image.jpg").convert("RGB"), return_tensors="pt")'
            if channels == 3
            else f"inputs = dict(pixel_values={_stand_in(channels, size)}){_STAND_IN}"
        ),
        run=run,
        show=show,
    )


__all__ = ["HUB_FRAMEWORKS", "check_export", "export_framework", "model_card", "publish_pytorch"]
