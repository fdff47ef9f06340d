"""Converted folders on the Hugging Face Hub: publish behind the parity gate, fetch back checked.

The Hub client does not check content on download, so every fetched file is compared with the
sha256 in the published manifest (itself pinned to one commit, and checked against the id the
Hub gave it); a file that does not match is evicted from the cache, never used, and a fetch
that fails part-way takes back the snapshot files it added. A publish that is run again finds
its files already on the branch and commits nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from zoo.core.errors import HubError, IntegrityError, StoreError
from zoo.core.folder_config import CONTENT_FILES, MANIFEST, RECORD, WEIGHTS, check_name
from zoo.core.reports import ParityReport

from . import converted
from .converted import ConvertedFolder
from .fs import sha256_file

log = logging.getLogger(__name__)

DEFAULT_ORG = "convnext-zoo"
CARD = "README.md"
DATASETS = {  # tag fragment -> Hub dataset id
    "in1k": "imagenet-1k",
    "in22k": "imagenet-22k",
    "in12k": "imagenet-12k",
    "laion2b": "laion-2b",
    "laiona": "laion-aesthetic",
    "lvd1689m": "lvd-1689m",
}


HF_SCHEME = "hf://"  # a repo on the Hub, as users name one: hf://ORG/REPO[@REVISION]


def parse_hf(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """(repo id, revision) of `hf://ORG/REPO[@REVISION]`; `revision`, one asked for besides (an
    argument, `--revision`), is the revision where the path names none.

    Raises:
        HubError: not of that form, or two different revisions asked for.
    """
    repo_id, at, pinned = spec[len(HF_SCHEME) :].partition("@")
    if not spec.startswith(HF_SCHEME) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) or (at and not pinned):
        raise HubError(f"{spec!r}: expected hf://ORG/REPO or hf://ORG/REPO@REVISION")
    if pinned and revision and pinned != revision:
        raise HubError(f"two revisions given: {spec!r} names {pinned!r}, and {revision!r} was asked for too; give one")
    return repo_id, pinned or revision


def hub_org(org: str | None = None) -> str:
    """The organisation converted checkpoints are published under (`ZOO_HUB_ORG`)."""
    return org or os.environ.get("ZOO_HUB_ORG") or DEFAULT_ORG


def repo_id_for(name: str, org: str | None = None) -> str:
    """Hub repo of a converted checkpoint: `<org>/<canonical name>`.

    Raises:
        InvalidNameError: `name` is not one folder name (`zoo.core.folder_config.check_name`).
    """
    return f"{hub_org(org)}/{check_name(name, 'the model name')}"


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub) gives a small file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def evict(path: Path) -> None:
    """Remove a cached file and the blob behind it."""
    blob = path.resolve()
    for p in (path, blob):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


# Without a network the Hub client retries each request for ~25 s (five retries, growing waits),
# twice per checkpoint (model.safetensors, then pytorch_model.bin): a minute before it says so.
# One TCP connection to the endpoint tells at once; the answer holds for a while.
_PROBE_TIMEOUT = 3.0
_PROBE_TTL = 60.0
_probes: dict[str, tuple[float, str | None]] = {}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
OFFLINE_REMEDY = (
    "set HF_HUB_OFFLINE=1 to work from the local Hub cache alone, run once with network access, "
    "or convert from a file (--checkpoint PATH) or offline (--random-weights)"
)


def unreachable() -> str | None:
    """Why the Hub endpoint cannot be reached from here, or None: it answered a TCP connection,
    the client is offline by choice (`HF_HUB_OFFLINE`), or a proxy is configured (the client's
    business). Asked at most once a minute per endpoint."""
    import socket
    import time
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    endpoint = constants.ENDPOINT
    now = time.monotonic()
    if endpoint in _probes and now - _probes[endpoint][0] < _PROBE_TTL:
        return _probes[endpoint][1]
    url = urlsplit(endpoint)
    why = None
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=_PROBE_TIMEOUT).close()
    except (OSError, ValueError) as e:  # DNS, refused, unreachable, timed out; a malformed endpoint
        why = f"{endpoint}: {getattr(e, 'strerror', None) or e}"
    _probes[endpoint] = (now, why)
    return why


def hf_download(repo_id: str, name: str, revision: str | None = None) -> str:
    """`hf_hub_download`, from the cache alone, at once, where the Hub cannot be reached
    (`unreachable`): its LocalEntryNotFoundError then carries the reason."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    why = unreachable()
    try:
        return hf_hub_download(repo_id, name, revision=revision, local_files_only=why is not None)
    except LocalEntryNotFoundError as e:
        e.unreachable = why  # the caller's message says why the Hub was not asked
        raise


def offline_reason(error: Exception) -> str:
    """The reason a cache-only download failed: the endpoint that did not answer, or offline mode."""
    return getattr(error, "unreachable", None) or "offline"


def http_errors() -> tuple[type[Exception], ...]:
    """Errors the Hub client lets through from its HTTP library (a reset connection, a body cut short).

    huggingface_hub 2.x sends with httpx2, 1.x with httpx, whose errors are no OSError; older
    releases use requests, whose errors are OSErrors.
    """
    import importlib

    errors: list[type[Exception]] = [OSError, ValueError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def download(repo_id: str, revision: str | None = None) -> ConvertedFolder:
    """Fetch a published folder into the Hub cache, pinned to one commit, every file checked.

    All or nothing: if any file cannot be had or is wrong, the snapshot files this call added
    are removed again, so the cache never holds a half-fetched folder that looks published.

    Raises:
        HubError: the repo or a file cannot be had (offline and not cached, not found, HTTP,
            a body cut short); the message names the repo and the file.
        IntegrityError: a file's sha256 differs from the manifest (the file is evicted).
    """
    added: list[Path] = []
    try:
        manifest_path = _fetch(repo_id, MANIFEST, revision, added)
        commit = manifest_path.parent.name  # snapshots/<commit>/manifest.json
        if not matches_cache_name(manifest_path):
            evict(manifest_path)
            raise IntegrityError(
                f"{repo_id}@{commit}: downloaded {MANIFEST} does not match the id the Hub "
                "gave it (corrupted in transit or in the cache); it was discarded, retry"
            )
        try:
            files = _published_files(repo_id, manifest_path)
        except HubError:
            evict(manifest_path)  # not kept: a later fetch of a repaired repo must not reuse it
            raise
        for name in CONTENT_FILES:
            path = _fetch(repo_id, name, commit, added)
            if sha256_file(path) != files[name]["sha256"]:
                evict(path)
                raise IntegrityError(
                    f"{repo_id}@{commit}: downloaded {name} does not match the published "
                    "sha256 (corrupted in transit or in the cache); it was discarded, retry"
                )
    except BaseException:
        for path in added:
            path.unlink(missing_ok=True)  # the link only: a blob that passed its check may serve a retry
        raise
    return converted.open_folder(manifest_path.parent, others_allowed=True)  # the repo's card is there too


def _fetch(repo_id: str, name: str, revision: str | None, added: list[Path]) -> Path:
    """One file of the repo into the Hub cache, noted in `added` if it was not there before.

    The client retries what it deems transient (a 503, a connection lost mid-body); what it
    still cannot fetch becomes a HubError naming the repo and the file.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    before = try_to_load_from_cache(repo_id, name, revision=revision)
    try:
        path = Path(hf_download(repo_id, name, revision=revision))
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError)
        if isinstance(e.__cause__, HfHubHTTPError):  # online, but the Hub kept failing
            raise HubError(f"cannot fetch {repo_id}: {name}: {_short(e.__cause__)}") from None
        raise HubError(
            f"{repo_id} is not in the local Hub cache and the Hub cannot be reached ({offline_reason(e)})"
        ) from None
    except EntryNotFoundError:
        raise HubError(f"cannot fetch {repo_id}: {name} is missing from the repo at {revision or 'main'}") from None
    except http_errors() as e:
        raise HubError(f"cannot fetch {repo_id}: {not_found(repo_id, revision, e) or f'{name}: {_short(e)}'}") from None
    if not (isinstance(before, str) and Path(before) == path):
        added.append(path)
    return path


def not_found(repo_id: str, revision: str | None, error: Exception) -> str | None:
    """What a Hub client error means when the repo or the revision is not there (else None):
    the Hub answers 401 for a repo that does not exist, as for a private one."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, RevisionNotFoundError):
        return f"the repo has no revision {revision!r}"
    if isinstance(error, RepositoryNotFoundError):
        return "no such repo on the Hub (or it is private and HF_TOKEN cannot read it)"
    return None


def matches_cache_name(path: Path, sha256: str | None = None) -> bool:
    """Whether a file in the Hub cache holds the bytes of the name the client filed them under:
    the Hub's ETag, the sha256 of an LFS file or the git blob id of a regular one (a name of
    another form, which this cannot check, passes). `sha256`: the file's, if already known."""
    etag = path.resolve().name
    if len(etag) == 64:
        return (sha256 or sha256_file(path)) == etag
    if len(etag) == 40:
        return _digests(path)[1] == etag
    return True


def _published_files(repo_id: str, manifest_path: Path) -> dict:
    """The manifest's {file: {sha256, size}}, if it describes a converted folder of our format."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise HubError(f"cannot fetch {repo_id}: {MANIFEST} is unreadable ({_short(e)})") from None
    try:
        return converted.listed_files(manifest, repo_id, "convert and publish it again")
    except (StoreError, IntegrityError) as e:  # not a converted folder of this format: no files are fetched
        raise HubError(str(e)) from None


def _short(error: Exception) -> str:
    """The first line of an error's message (the Hub client's run over several lines)."""
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


NOT_PRETRAINED = (
    "\n> **Not pretrained.** These are seeded random weights used to test the conversion "
    "pipeline; they carry no learned features.\n"
)


def card_task(num_classes: int) -> str:
    """The Hub's pipeline tag of a model with `num_classes` classes (0: it gives features)."""
    return "image-classification" if num_classes > 0 else "image-feature-extraction"


def gated_comparison(parity: dict) -> dict:
    """The comparison a parity report (`ParityReport.to_json`) is gated on: the logits, or a backbone's
    worst feature map (it stands where a classifier's logits do)."""
    gated = [c for c in parity["comparisons"] if c["name"] == "logits" or c["name"].startswith("features.")]
    return max(gated, key=lambda c: c["rel"])


def parity_table(parity: dict) -> str:
    """A parity report's comparisons as a Markdown table (output, shape, max abs and relative error)."""
    rows = [
        f"| {c['name']} | {tuple(c['shape'])} | {c['max_abs']:.2e} | {c['rel']:.2e} |" for c in parity["comparisons"]
    ]
    return "\n".join(["| output | shape | max abs error | relative error |", "|---|---|---|---|", *rows])


def card_front_matter(
    *,
    library: str,
    task: str,
    name: str,
    license: str | None,
    tags: list[str],
    base_model: str | None,
    tag: str,
    parity: dict,
    against: str,
) -> str:
    """A model card's YAML front matter (between `---` lines): the library that loads the repo, the task,
    the licence and base model when known, tags, the datasets the checkpoint's `tag` names, and the
    parity report's figures (`parity`, run against `against`) as evaluation results."""
    from huggingface_hub import EvalResult, ModelCardData

    gated = gated_comparison(parity)
    metrics = (
        [
            ("max_abs_logit_error", gated["max_abs"]),
            ("relative_logit_error", gated["rel"]),
            ("top1_agreement", parity["top1_agreement"]),
        ]
        if parity["top1_agreement"] is not None
        else [("max_abs_feature_error", gated["max_abs"]), ("relative_feature_error", gated["rel"])]
    )
    data = ModelCardData(
        library_name=library,
        pipeline_tag=task,
        license=license,
        tags=list(dict.fromkeys(tags)),
        base_model=base_model,
        datasets=sorted({v for k, v in DATASETS.items() if k in tag}) or None,
        model_name=name,
        eval_results=[
            EvalResult(
                task_type=task,
                dataset_type="convnext-zoo/parity",
                dataset_name=f"parity batch ({parity['num_images']} images, {parity['input_size']}px) vs {against}",
                metric_type=m,
                metric_value=v,
            )
            for m, v in metrics
        ],
    )
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(folder: ConvertedFolder, repo_id: str) -> str:
    """The README.md published with a converted checkpoint: Hub metadata (Keras library, task,
    licence, base model, datasets, the parity figures as evaluation results) and usage snippets
    that run as they are (the test suite runs them against a Hub server)."""
    config, report = folder.config, folder.parity
    name, cfg = config.name, config.pretrained_cfg
    base = config.base_model
    reference = report.get("versions", {}).get("reference", "timm")  # the framework the source came from
    classifier = config.num_classes > 0
    task = card_task(config.num_classes)
    front_matter = card_front_matter(
        library="keras",
        task=task,
        name=name,
        license=config.license or "other",
        tags=["convnext", task, reference, "keras", "convnext-zoo"],
        base_model=base,
        tag=config.tag,
        parity=report,
        against=reference,
    )
    warning = "" if config.pretrained else NOT_PRETRAINED
    path = f"hf://{repo_id}"
    channels = config.architecture.in_chans
    images = (
        f'images = zoo.preprocess(["image.jpg"], "{path}")' + ("  # decoded grey: 1 channel" if channels == 1 else "")
        if channels in (1, 3)
        else f"images = ...  # (N, H, W, {channels}) float32, normalised with the mean and std below"
    )
    gate = (
        f"logits max abs error\n<= {report['atol']:g}, relative <= {report['rtol']:g}"
        if report["top1_agreement"] is not None
        else f"every stage and feature map\nwithin relative error {report['stage_rtol']:g}"
    )
    agreement = (
        f"Top-1 agreement {report['top1_agreement']:.0%}, top-5 {report['top5_agreement']:.0%}."
        if report["top1_agreement"] is not None
        else f"Every feature map within relative error {report['stage_rtol']:g} of {reference}'s backbone."
    )
    if classifier:
        run = (
            f"logits = model.predict(images, verbose=0)  # (1, {config.num_classes}), no softmax\n"
            "print(logits.argmax(-1))"
        )
        cli = f"""
From the command line, the top classes of an image:

```bash
zoo predict --model {path} image.jpg
```
"""
    elif config.features:
        run = (
            "maps = model.predict(images, verbose=0)  # one normalised feature map per stage "
            f"{list(config.features)} (strides {[2 ** (i + 2) for i in config.features]})\n"
            "print([m.shape for m in maps])"
        )
        cli = ""
    else:
        run = (
            "features = model.predict(images, verbose=0)  # the pooled features (timm's pre-logits)\n"
            "print(features.shape)"
        )
        cli = ""
    return f"""{front_matter}
# {name} for Keras 3
{warning}
`{name}` ({config.architecture.name}, {config.params or 0:,} parameters) converted from
`{base or config.source.url or "a local file"}` by convnext-zoo. The Keras model was run
side by side with {reference} on the same weights and passed the parity gate ({gate}):

{parity_table(report)}

{agreement}
`parity.json` has the full report, `manifest.json` the sha256 of every file, and
`{RECORD}` the architecture, the source and its sha256, and the preprocessing.

## Use

The repo is a Keras model folder (`config.json`, `metadata.json`, `model.weights.h5`); its layers
are convnext-zoo's, registered with Keras by `import zoo` (`pip install convnext-zoo`). Plain Keras:

```python
import keras
import zoo  # registers the ConvNeXt layers with Keras

model = keras.saving.load_model("{path}")
```

With convnext-zoo (pinned to one commit, every file's sha256 checked against `manifest.json`),
and the images prepared exactly as {reference} evaluates the source checkpoint:

```python
import zoo

model = zoo.load("{path}")
{images}
{run}
```
{cli}
Without convnext-zoo installed (or imported), Keras stops at `Could not locate class 'ConvNeXt'`:
the model class and its layers are convnext-zoo's (`convnext_zoo>ConvNeXt`, ...), and `import zoo`
registers them. The model runs on Keras' TensorFlow and JAX backends (not on torch: its layer
names are timm's dotted module paths). SavedModel and TFLite exports:
`zoo export {path} --format tflite`.

Preprocessing: {channels} input channels, {config.input_size}px, crop_pct {cfg["crop_pct"]}, {cfg["crop_mode"]} crop,
{cfg["interpolation"]} interpolation, mean {list(config.mean)}, std {list(config.std)}.
"""


def publish(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    expect_parent: str | None = None,
    token: str | None = None,
    allow_random: bool = False,
) -> tuple[str, bool]:
    """Upload a converted folder as one commit, only if its parity report passed for these bytes.

    Args:
        path: a converted folder.
        repo_id: destination repo (`org/name`), created if missing.
        private: create the repo private.
        revision: branch to commit to (created from main if missing).
        expect_parent: commit the branch must still be at (default: its head when we look);
            a repo that moved meanwhile refuses the commit.
        token: Hub token (default: `HF_TOKEN` or the stored login). Never logged.
        allow_random: publish a folder of random (not pretrained) weights too.

    Returns:
        The commit holding the files, and whether it is new (False: the branch head already
        held exactly these files, and no commit was made: re-running a publish is a no-op).

    Raises:
        HubError: refused (no passing report, weights changed since the report, stale parent)
            or the upload failed; nothing was published then. Once the commit has landed, a
            failure to read it back says so; the same publish run again checks it, committing
            nothing twice.
    """
    folder = converted.open_folder(path)
    report = check_publishable(folder, allow_random)
    card = model_card(folder, repo_id).encode()
    sent = {**{n: folder.path / n for n in CONTENT_FILES}, MANIFEST: folder.manifest, CARD: card}
    expected = {n: meta["sha256"] for n, meta in folder.files.items()}  # what parity was run on
    expected.update({n: hashlib.sha256(sent[n]).hexdigest() for n in (MANIFEST, CARD)})
    return commit_files(
        repo_id,
        sent,
        expected,
        what=str(folder.path),
        checked_against="the manifest",
        message=f"{folder.config.name}: parity {report.summary()}",
        private=private,
        revision=revision,
        expect_parent=expect_parent,
        token=token,
    )


def commit_files(
    repo_id: str,
    sent: dict[str, Path | bytes],
    expected: dict[str, str],
    *,
    what: str,
    checked_against: str,
    message: str,
    private: bool = False,
    revision: str | None = None,
    expect_parent: str | None = None,
    token: str | None = None,
) -> tuple[str, bool]:
    """Upload checked files as one commit guarded by its parent, then read the remote tree back.

    Args:
        repo_id: destination repo (`org/name`), created if missing.
        sent: {name in the repo: a file, or bytes (a model card)}.
        expected: {name: sha256} of every file sent, as the caller checked it (against a manifest
            or a report): a file that changed since is refused, and the remote must hold these.
        what: the folder being published, as messages name it.
        checked_against: what `expected` comes from, as messages name it (`the manifest`).
        message: the commit message.
        private, revision, expect_parent, token: as `publish` takes them.

    Returns:
        The commit holding the files, and whether it is new (False: the branch head already
        held exactly these files, and no commit was made).

    Raises:
        HubError: a file changed since it was checked, a stale parent, a token without write access,
            or the upload failed (nothing was published then); or the commit landed but reads back
            other than `expected`, or cannot be read back.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    branch = revision or "main"
    parent = expect_parent
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.model_info(repo_id, revision=branch, files_metadata=True)
        parent = parent or head.sha
        if head.sha.startswith(parent) and not _differences(
            {s.rfilename: s for s in head.siblings or []}, sent, expected
        ):
            return head.sha, False  # already there (a re-run, or a retry after a commit that landed)
        operations = [
            CommitOperationAdd(name, source if isinstance(source, bytes) else str(source))
            for name, source in sent.items()
        ]
        changed = [op.path_in_repo for op in operations if op.upload_info.sha256.hex() != expected[op.path_in_repo]]
        if changed:  # the client uploads what it hashed here (the Hub checks LFS content against it)
            raise HubError(
                f"refusing to publish {what}: {', '.join(changed)} changed after it was "
                f"checked against {checked_against}; nothing was published"
            )
        info = api.create_commit(repo_id, operations, revision=branch, parent_commit=parent, commit_message=message)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status == 412:
            raise HubError(
                f"{repo_id}@{branch} moved while publishing (expected parent {str(parent)[:12]}); "
                "nothing was published, retry"
            ) from None
        if status in (401, 403):
            raise HubError(
                f"the Hub refused to let this token write to {repo_id} ({_short(e)}); set HF_TOKEN "
                "to a token with write access (or run `hf auth login`)"
            ) from None
        raise HubError(f"publishing to {repo_id} failed: {_short(e)}; {RETRY}") from None
    except (RuntimeError, *http_errors()) as e:  # an LFS upload that failed is a RuntimeError
        raise HubError(f"publishing to {repo_id} failed: {_cause(e)}; {RETRY}") from None
    try:
        _check_remote(api, repo_id, info.oid, sent, expected, checked_against)
    except http_errors() as e:
        raise HubError(
            f"{repo_id}@{info.oid[:12]}: committed, but reading it back failed ({_short(e)}); {RETRY}"
        ) from None
    return info.oid, info.oid != parent  # the client also skips a commit that would change nothing


RETRY = "run the same publish again (files already there are not committed twice)"


def check_publishable(folder: ConvertedFolder, allow_random: bool) -> ParityReport:
    """The folder's parity report, if it passed for exactly these weights and they are pretrained
    (or `allow_random`).

    Raises:
        HubError: they are random weights, or the report is invalid, failed, or not these weights'.
    """
    if not folder.config.pretrained and not allow_random:
        raise HubError(
            f"refusing to publish {folder.path}: it holds random weights, not a pretrained model; "
            "pass --allow-random to publish it anyway"
        )
    try:
        report = ParityReport.from_json(folder.parity)
    except (TypeError, ValueError, KeyError) as e:
        raise HubError(f"refusing to publish {folder.path}: its parity report is invalid ({e})") from None
    if not report.passed:
        raise HubError(f"refusing to publish {folder.path}: its parity check failed ({report.failure})")
    if folder.parity.get("weights_sha256") != folder.files[WEIGHTS]["sha256"]:
        raise HubError(
            f"refusing to publish {folder.path}: the weights changed after the parity report; "
            "run `zoo verify` or convert again"
        )
    return report


def _cause(error: Exception) -> str:
    """An error's first line, with its cause's (the client wraps an upload's HTTP error)."""
    cause = error.__cause__
    return f"{_short(error)} ({_short(cause)})" if cause is not None else _short(error)


def _check_remote(api, repo_id: str, commit: str, sent: dict, expected: dict, checked_against: str) -> None:
    """Re-read the remote tree at `commit` and compare every file with what it was checked against."""
    remote = {e.path: e for e in api.list_repo_tree(repo_id, revision=commit, recursive=True)}
    wrong = _differences(remote, sent, expected)
    if wrong:
        raise HubError(
            f"{repo_id}@{commit}: after the upload, the remote {', '.join(wrong)} "
            f"missing or different from {checked_against}; do not use that commit"
        )


def _differences(remote: dict, sent: dict, expected: dict) -> list[str]:
    """Names of the files sent ({name: path or bytes}) that `remote` ({name: tree entry or
    sibling, with blob_id and lfs}) lacks or holds with other content than `expected`
    ({name: sha256}).

    The Hub names an LFS file by its sha256, compared as it is; a regular file only by its git
    blob id, compared with that of the local bytes, once those are shown to be the expected ones.
    """
    wrong = []
    for name, source in sent.items():
        entry = remote.get(name)
        lfs = getattr(entry, "lfs", None)
        if entry is None:
            ok = False
        elif lfs is not None:
            ok = getattr(lfs, "sha256", None) == expected[name]
        else:
            sha256, blob_id = _digests(source)
            ok = sha256 == expected[name] and entry.blob_id == blob_id
        if not ok:
            wrong.append(name)
    return wrong


def _digests(source: Path | bytes, chunk: int = 1 << 22) -> tuple[str, str]:
    """(sha256, git blob id) of a file or of bytes, in one reading."""
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest(), git_blob_sha1(source)
    with open(source, "rb") as f:
        sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % os.fstat(f.fileno()).st_size)
        while block := f.read(chunk):
            sha256.update(block)
            sha1.update(block)
    return sha256.hexdigest(), sha1.hexdigest()
