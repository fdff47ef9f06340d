"""Hub faults over real HTTP: 503s, truncated bodies, missing files, a repo that moves, retries.

The local Hub server (tests/support/hub_server.py) injects the faults; the real huggingface_hub
client talks to it from this process, with its back-off sleeps recorded instead of slept, so
the client's own retries run in full and fast. The CLI runs in-process through click's runner.
Every failure must end as one line of the project's own error, naming the repo, with nothing
half-done left behind: no partial file in the Hub cache, nothing in the store, no commit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi

import zoo
from checkpoints import hub as zoo_hub
from checkpoints import store
from checkpoints.converted import open_folder
from tests.support.archs import SMALL_V1
from tests.support.cli import zoo_inline
from tests.support.converted import convert_small
from tests.support.hub import client_in_process, faults, local_hub, set_faults
from zoo.core.errors import HubError, StoreError, ZooError
from zoo.core.folder_config import CONTENT_FILES, MANIFEST, PARITY, WEIGHTS

TOKEN = "hf_zooFAULTtoken1234567890secret"
NAME = "convnext_tiny.fb_in1k"
REPO = f"testorg/{NAME}"
PUBLISHED = {*CONTENT_FILES, MANIFEST, zoo_hub.CARD}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One small converted folder (random weights, real parity gate) shared by the module."""
    return convert_small(tmp_path_factory.mktemp("conv") / NAME, SMALL_V1, seed=13)


@pytest.fixture(scope="module")
def expected(converted):
    """The logits the converted folder gives on a fixed batch: a download must give the same."""
    x = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
    return x, np.asarray(zoo.load(converted)(x))


@pytest.fixture
def sleeps(monkeypatch):
    """The client's back-off waits, recorded rather than slept (its retries stay real)."""
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    return waits


@pytest.fixture(params=[None, 1024], ids=["regular", "lfs"])
def hub(request, tmp_path, monkeypatch, sleeps):
    """A fresh local Hub this process's client talks to (small files, or LFS for >= 1 KiB)."""
    with local_hub(tmp_path / "hub-root", lfs_threshold=request.param) as url:
        client_in_process(monkeypatch, url, TOKEN)
        yield url


@pytest.fixture
def published(hub, converted):
    """The converted folder published to the local Hub as REPO."""
    zoo_hub.publish(converted, REPO, allow_random=True)
    return hub


def api(url: str) -> HfApi:
    return HfApi(endpoint=url, token=TOKEN)


def commits(url: str) -> list[str]:
    return [c.commit_id for c in api(url).list_repo_commits(REPO)]


def cache_files(isolated_home: Path) -> list[Path]:
    """Every file (blob, snapshot link, partial download) in the Hub cache for REPO."""
    repo = isolated_home / "hub" / f"models--{REPO.replace('/', '--')}"
    return sorted(p for p in repo.rglob("*") if p.is_file() or p.is_symlink()) if repo.exists() else []


def snapshot_names(isolated_home: Path) -> set[str]:
    return {p.name for p in cache_files(isolated_home) if "snapshots" in p.parts}


def assert_one_line_naming_repo(error: Exception) -> None:
    assert isinstance(error, ZooError), repr(error)
    assert "\n" not in str(error) and REPO in str(error), str(error)
    assert TOKEN not in str(error)


def assert_loads_like_the_folder(expected) -> None:
    x, logits = expected
    np.testing.assert_array_equal(np.asarray(zoo.load(NAME, convert=False)(x)), logits)


def zoo_cli(*args: str):
    """`zoo ARGS` in this process; the token never shows in its output."""
    result = zoo_inline(*args)
    assert TOKEN not in result.output
    return result


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- downloads -------------------------------------------------------------------------------------


def test_download_rides_out_a_few_503s(published, expected, sleeps):
    set_faults(published, {"fail": [{"match": "/resolve/", "status": 503, "times": 3}]})
    assert_loads_like_the_folder(expected)
    assert faults(published)["fail"][0]["hits"] == 3
    assert sleeps, "the client did not back off"


def test_download_503_that_persists_is_one_error_and_leaves_nothing(published, expected, isolated_home):
    set_faults(published, {"fail": [{"match": f"/resolve/main/{MANIFEST}", "status": 503}]})
    with pytest.raises(StoreError) as failure:
        zoo.load(NAME, convert=False)
    assert_one_line_naming_repo(failure.value)
    assert "503" in str(failure.value)
    assert snapshot_names(isolated_home) == set()

    # the weights fail instead: the files fetched before them are not left as a partial snapshot
    set_faults(published, {"fail": [{"match": f"/{WEIGHTS}", "status": 503}]})
    with pytest.raises(HubError) as failure:
        zoo_hub.download(REPO)
    assert_one_line_naming_repo(failure.value)
    assert WEIGHTS in str(failure.value)
    assert snapshot_names(isolated_home) == set()
    assert not any(store.store_root().rglob("*"))  # nothing in the local store either

    set_faults(published, {})
    assert_loads_like_the_folder(expected)


def test_cli_reports_a_hub_outage_in_one_line(published, tmp_path):
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    set_faults(published, {"fail": [{"match": "/resolve/", "status": 503}]})
    result = zoo_cli("predict", str(image), "--model", NAME)
    assert result.exit_code == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and REPO in errors[0], result.stderr


def test_truncated_download_is_detected_not_kept_and_a_later_one_works(published, expected, isolated_home):
    set_faults(published, {"truncate": [WEIGHTS]})  # every try cut short, Content-Length intact
    with pytest.raises(HubError) as failure:
        zoo_hub.download(REPO)
    assert_one_line_naming_repo(failure.value)
    assert WEIGHTS in str(failure.value)
    assert not [p for p in cache_files(isolated_home) if p.name.endswith(".incomplete")]
    assert snapshot_names(isolated_home) == set()

    set_faults(published, {})
    assert_loads_like_the_folder(expected)


def test_one_truncated_response_is_resumed_and_checked(published, expected):
    set_faults(published, {"truncate": {WEIGHTS: 1}})
    assert_loads_like_the_folder(expected)
    assert faults(published)["truncate"][WEIGHTS] == 0  # the fault did fire


@pytest.mark.parametrize("status", [404, 503])
def test_a_file_that_will_not_come_is_named_and_nothing_is_kept(published, expected, isolated_home, status):
    set_faults(published, {"status": {PARITY: status}})
    with pytest.raises(HubError) as failure:
        zoo_hub.download(REPO)
    assert_one_line_naming_repo(failure.value)
    assert PARITY in str(failure.value)
    assert snapshot_names(isolated_home) == set()
    set_faults(published, {})
    assert_loads_like_the_folder(expected)


def test_manifest_listing_a_file_the_repo_lacks(published, isolated_home):
    api(published).delete_file(WEIGHTS, REPO)
    with pytest.raises(StoreError) as failure:
        zoo.load(NAME, convert=False)
    assert_one_line_naming_repo(failure.value)
    assert f"{WEIGHTS} is missing from the repo" in str(failure.value)
    assert snapshot_names(isolated_home) == set()


# --- source weights from timm's repos ----------------------------------------------------------------

SOURCE = "timm/convnext_tiny.fb_in1k"


def host_source(url: str, filename: str = "model.safetensors", seed: int = 21) -> bytes:
    """Perturbed random weights of SMALL_V1 in timm's layout, uploaded as `SOURCE/filename`."""
    import torch
    from safetensors.numpy import save as save_bytes

    from converters.reference import random_state_dict

    state = random_state_dict(SMALL_V1, 1000, seed)
    if filename.endswith(".bin"):
        import io

        buffer = io.BytesIO()
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, buffer)
        data = buffer.getvalue()
    else:
        data = save_bytes(state)
    api(url).create_repo(SOURCE, exist_ok=True)
    api(url).upload_file(path_or_fileobj=data, path_in_repo=filename, repo_id=SOURCE)
    return data


# each file type in each upload mode; the other two pairings take the same paths (-m slow)
@pytest.mark.parametrize(
    "hub, filename",
    [
        pytest.param(None, "model.safetensors", marks=pytest.mark.slow, id="regular-model.safetensors"),
        pytest.param(None, "pytorch_model.bin", id="regular-pytorch_model.bin"),
        pytest.param(1024, "model.safetensors", id="lfs-model.safetensors"),
        pytest.param(1024, "pytorch_model.bin", marks=pytest.mark.slow, id="lfs-pytorch_model.bin"),
    ],
    indirect=["hub"],
)
def test_convert_downloads_the_source_from_timms_repo(hub, small_tiny, tmp_path, filename):
    import hashlib

    from converters import pipeline

    data = host_source(hub, filename)
    out, report = pipeline.convert("convnext_tiny_1k", out=tmp_path / "out")
    assert report.passed
    source = open_folder(out).config.source.to_json()
    assert {k: source[k] for k in ("repo_id", "revision", "filename", "sha256")} == {
        "repo_id": SOURCE,
        "revision": api(hub).model_info(SOURCE).sha,
        "filename": filename,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_corrupted_source_download_is_refused_not_kept_and_a_later_one_works(hub, small_tiny, tmp_path, isolated_home):
    from converters import pipeline
    from zoo.core.errors import SourceError

    host_source(hub)
    set_faults(hub, {"corrupt": ["model.safetensors"]})  # one byte flipped, same size and ETag
    with pytest.raises(SourceError, match="does not match the id the Hub gave it") as failure:
        pipeline.convert("convnext_tiny_1k", out=tmp_path / "out")
    assert SOURCE in str(failure.value) and "\n" not in str(failure.value)
    assert not (tmp_path / "out").exists()
    blobs = list((isolated_home / "hub").rglob("blobs/*"))
    assert all(zoo_hub.matches_cache_name(b) for b in blobs), blobs  # the corrupt bytes are not kept

    set_faults(hub, {})
    out, report = pipeline.convert("convnext_tiny_1k", out=tmp_path / "out")
    assert report.passed


# a short body is caught by its length in either upload mode: LFS by default, regular with -m slow
@pytest.mark.parametrize(
    "hub", [pytest.param(None, marks=pytest.mark.slow, id="regular"), pytest.param(1024, id="lfs")], indirect=True
)
def test_truncated_source_download_is_one_error_and_a_later_one_works(hub, small_tiny, tmp_path, isolated_home):
    from converters import pipeline
    from zoo.core.errors import SourceError

    host_source(hub)
    set_faults(hub, {"truncate": ["model.safetensors"]})  # every try cut short, Content-Length intact
    with pytest.raises(SourceError, match=f"cannot download {SOURCE}/model.safetensors") as failure:
        pipeline.convert("convnext_tiny_1k", out=tmp_path / "out")
    assert "\n" not in str(failure.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in (isolated_home / "hub").rglob("*") if p.name.endswith(".incomplete")]

    set_faults(hub, {})
    out, report = pipeline.convert("convnext_tiny_1k", out=tmp_path / "out")
    assert report.passed


# --- publishing -----------------------------------------------------------------------------------


def remote_files(url: str, revision: str | None = None) -> set[str]:
    return set(api(url).list_repo_files(REPO, revision=revision))


@pytest.mark.parametrize(
    "where", ["/api/repos/create", "/preupload/", "/commit/", "/__lfs_upload/", "/info/lfs/objects/batch"]
)
def test_publish_503_is_one_error_and_publishes_nothing(hub, converted, where):
    api(hub).create_repo(REPO)
    before = commits(hub)
    set_faults(hub, {"fail": [{"match": where, "status": 503}]})
    result = zoo_cli("publish", str(converted), "--allow-random", "--repo-id", REPO)
    if faults(hub)["fail"][0]["hits"] == 0:  # only the LFS requests go unmade, by a Hub without LFS
        assert "lfs" in where and result.exit_code == 0, result.stderr
        return
    assert result.exit_code == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and REPO in errors[0], result.stderr
    assert commits(hub) == before  # not even a partial commit


def test_publish_retried_after_a_failure_mid_way_makes_one_commit(hub, converted):
    """The commit lands but reading it back fails: a retry checks it, and commits nothing more."""
    api(hub).create_repo(REPO)
    before = commits(hub)
    set_faults(hub, {"fail": [{"match": "/tree/", "status": 503}]})
    result = zoo_cli("publish", str(converted), "--allow-random", "--repo-id", REPO)
    assert result.exit_code == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and REPO in errors[0] and "again" in errors[0], result.stderr

    set_faults(hub, {})
    result = zoo_cli("publish", str(converted), "--allow-random", "--repo-id", REPO)
    assert result.exit_code == 0, result.stderr
    assert "already published" in result.stderr
    after = commits(hub)
    assert len(after) == len(before) + 1 and after[0] == result.stdout.strip()
    assert remote_files(hub) >= PUBLISHED


def test_publish_after_a_failed_try_makes_exactly_one_commit(hub, converted):
    api(hub).create_repo(REPO)
    before = commits(hub)
    set_faults(hub, {"fail": [{"match": "/commit/", "status": 503}]})
    assert zoo_cli("publish", str(converted), "--allow-random", "--repo-id", REPO).exit_code == 1
    set_faults(hub, {})
    result = zoo_cli("publish", str(converted), "--allow-random", "--repo-id", REPO)
    assert result.exit_code == 0, result.stderr
    assert len(commits(hub)) == len(before) + 1 and remote_files(hub) >= PUBLISHED

    # and once more: nothing new
    again = zoo_cli("publish", str(converted), "--allow-random", "--repo-id", REPO)
    assert again.exit_code == 0 and "already published" in again.stderr
    assert again.stdout.strip() == result.stdout.strip()
    assert len(commits(hub)) == len(before) + 1


def test_repo_that_moves_between_look_and_commit_refuses(hub, converted, monkeypatch):
    """Without --expect-parent the parent is the head when we look; a commit landing after that wins."""
    api(hub).create_repo(REPO)
    look, raced = HfApi.model_info, []

    def look_then_someone_commits(self, repo_id, **kwargs):
        info = look(self, repo_id, **kwargs)
        if not raced:
            raced.append(api(hub).upload_file(path_or_fileobj=b"someone else", path_in_repo="NOTES.md", repo_id=REPO))
        return info

    monkeypatch.setattr(HfApi, "model_info", look_then_someone_commits)
    result = zoo_cli("publish", str(converted), "--allow-random", "--repo-id", REPO)
    assert result.exit_code == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "moved while publishing" in errors[0] and REPO in errors[0], result.stderr
    assert remote_files(hub) == {".gitattributes", "NOTES.md"}  # none of ours


def test_weights_edited_while_publishing_are_not_committed(hub, converted, tmp_path, monkeypatch):
    """The folder is checked against its manifest, then its weights change before the upload:
    what the client would send is compared with the manifest, and nothing is committed."""
    import shutil

    folder = tmp_path / "folder"
    shutil.copytree(converted, folder)
    card = zoo_hub.model_card

    def card_while_someone_edits_the_weights(*args, **kwargs):  # runs after the check, before the upload
        data = bytearray((folder / WEIGHTS).read_bytes())
        data[-100] ^= 1
        (folder / WEIGHTS).write_bytes(bytes(data))
        return card(*args, **kwargs)

    monkeypatch.setattr(zoo_hub, "model_card", card_while_someone_edits_the_weights)
    with pytest.raises(HubError, match=f"{WEIGHTS} changed after it was checked against the manifest") as e:
        zoo_hub.publish(folder, REPO, allow_random=True)
    assert "\n" not in str(e.value)
    assert remote_files(hub) == {".gitattributes"}  # the repo was created, none of ours committed


def test_a_missing_repo_or_revision_is_named(published, small_tiny, tmp_path):
    from converters import pipeline
    from zoo.core.errors import SourceError

    with pytest.raises(
        StoreError,
        match=r"testorg/convnext_atto\.d2_in1k: no such repo on the Hub \(or it is "
        r"private and HF_TOKEN cannot read it\)",
    ):
        zoo.load("convnext_atto", convert=False)
    with pytest.raises(StoreError, match=f"{REPO}: the repo has no revision 'nope'"):
        zoo.load(NAME, revision="nope", convert=False)
    host_source(published)
    with pytest.raises(SourceError, match=f"{SOURCE}/model.safetensors: the repo has no revision 'nope'"):
        pipeline.convert("convnext_tiny_1k", revision="nope", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command", [("convert", "convnext_atto"), ("predict", "examples/scene.jpg")], ids=["convert", "predict"]
)
def test_an_unreachable_hub_fails_at_once_saying_what_to_do(command, tmp_path):
    """Without a network the Hub client retries every request for ~25 s, twice per checkpoint; a
    user without Hub access must hear at once what to do instead, not after a minute."""
    import os
    import socket

    from tests.support.cli import one_line_error, zoo_cli

    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed}"
    start = time.monotonic()
    message = one_line_error(zoo_cli(*command, env=env, cwd=Path(__file__).parents[1]))
    seconds = time.monotonic() - start
    assert "cannot be reached" in message and f"127.0.0.1:{closed}" in message, message
    assert "HF_HUB_OFFLINE=1" in message and "--random-weights" in message, message
    assert seconds < 30, f"{seconds:.0f} s before failing"  # the client's retries alone take ~50 s
