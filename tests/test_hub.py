"""Publishing and loading through a local Hub over real HTTP, with the real huggingface_hub client.

Clients run in child processes with the Hub environment set, as users run them; the loading
child blocks torch and timm from import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi
from safetensors.numpy import save as save_bytes

import zoo
from checkpoints import fs, store
from checkpoints import hub as hub_module
from checkpoints.converted import open_folder
from converters.reference import random_state_dict
from tests.support.archs import SMALL_V1
from tests.support.cli import BLOCK_TORCH, zoo_cli
from tests.support.converted import convert_small
from tests.support.hub import local_hub, set_faults
from tests.support.hub_cache import add_file
from tests.support.writing import write_converted
from zoo.core.folder_config import CONTENT_FILES

TOKEN = "hf_zooTESTtoken1234567890secret"
NAME = "convnext_tiny.fb_in1k"
REPO = f"testorg/{NAME}"


@pytest.fixture(autouse=True)
def online_in_process(monkeypatch):
    """The test's own HfApi calls talk to the local server (the autouse fixture sets offline)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One small converted folder (random weights, real parity gate) shared by the module's tests,
    which only read it."""
    return convert_small(tmp_path_factory.mktemp("conv") / NAME, SMALL_V1, seed=11, name=NAME)


LFS, REGULAR = 1024, 1 << 40  # server thresholds: the weights go through LFS, or every file is 'regular'


def client_env(url: str, home: Path, **extra) -> dict:
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)
    env.update(
        HF_ENDPOINT=url,
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_CACHE=str(home / "hub-cache"),
        ZOO_HOME=str(home / "store"),
        ZOO_HUB_ORG="testorg",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    env.update(extra)
    return env


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    assert TOKEN not in proc.stdout + proc.stderr, "the token leaked into the output"
    return proc


def zoo_hub(*args, env):
    """`zoo ARGS` in a child process; the token never shows in its output."""
    proc = zoo_cli(*args, env=env)
    assert TOKEN not in proc.stdout + proc.stderr, "the token leaked into the output"
    return proc


LOAD = BLOCK_TORCH + textwrap.dedent("""
    import json, sys  # loading from the store or the Hub must not need torch
    import numpy as np, zoo
    model = zoo.load(sys.argv[1], **json.loads(sys.argv[4]))
    np.save(sys.argv[2], np.asarray(model(np.load(sys.argv[3]))))
    assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "timm") and sys.modules[m] is not None]
""")


def load_in_child(name, x_path, out_path, env, **kwargs):
    """`zoo.load(name, **kwargs)` in a process where torch and timm cannot be imported."""
    return run([sys.executable, "-c", LOAD, name, str(out_path), str(x_path), json.dumps(kwargs)], env)


def remote_head(url: str) -> str:
    return HfApi(endpoint=url, token=TOKEN).model_info(REPO).sha


# Through LFS by default; every file in "regular" mode with -m slow (the same path, the other upload mode).
@pytest.mark.parametrize(
    "threshold", [pytest.param(LFS, id="lfs"), pytest.param(REGULAR, id="regular", marks=pytest.mark.slow)]
)
def test_publish_then_load_by_name_without_torch(converted, threshold, tmp_path):
    """Round trip through a Hub that takes writes only with the token: LFS uploads (Xet
    disabled), or every file in 'regular' upload mode."""
    with local_hub(tmp_path / "hub-root", lfs_threshold=threshold, token=TOKEN) as hub:
        _publish_then_load(converted, hub, threshold == LFS, tmp_path)


def _publish_then_load(converted, hub, lfs, tmp_path):
    env = client_env(hub, tmp_path)
    proc = zoo_hub("publish", str(converted), env=env)
    assert proc.returncode == 1 and "random weights" in proc.stderr  # never by accident
    proc = zoo_hub("publish", str(converted), "--allow-random", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    commit = proc.stdout.strip()
    assert remote_head(hub) == commit

    api = HfApi(endpoint=hub, token=TOKEN)
    tree = {e.path: e for e in api.list_repo_tree(REPO)}
    assert set(tree) - {".gitattributes"} == {*CONTENT_FILES, "manifest.json", "README.md"}
    weights = tree["model.weights.h5"]
    assert (weights.lfs is not None) == lfs  # the upload path under test was the one taken
    if lfs:
        assert weights.lfs.sha256 == fs.sha256_file(converted / "model.weights.h5")
    assert len(api.list_repo_commits(REPO)) == 2  # the repo's initial commit + ours: one commit
    card = Path(api.hf_hub_download(REPO, "README.md", cache_dir=str(tmp_path / "peek"))).read_text()
    for field in (
        "library_name: keras",
        "license: apache-2.0",
        "- convnext",
        "- image-classification",
        "- timm",
        "base_model: timm/convnext_tiny.fb_in1k",
        "datasets:\n- imagenet-1k",
        "model-index",
        "max_abs_logit_error",
        "Not pretrained",
        f'zoo.load("hf://{REPO}")',
        f'keras.saving.load_model("hf://{REPO}")',
        "pipeline_tag: image-classification",
    ):
        assert field in card, field
    assert TOKEN not in card

    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = np.asarray(zoo.load(converted)(x))
    child = load_in_child(NAME, tmp_path / "x.npy", tmp_path / "y.npy", env)
    assert child.returncode == 0, child.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)

    # a warm cache works offline, still without torch
    offline = client_env(hub, tmp_path, HF_HUB_OFFLINE="1")
    child = load_in_child(NAME, tmp_path / "x.npy", tmp_path / "y2.npy", offline)
    assert child.returncode == 0, child.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y2.npy"), expected)

    for path in [*converted.iterdir(), *(tmp_path / "hub-cache").rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


# The weights through LFS by default; the manifest, the config and the weights in regular mode with
# -m slow (the comparison of a downloaded manifest with its cache name: test_matches_cache_name...).
@pytest.mark.parametrize(
    "name, threshold",
    [
        pytest.param("model.weights.h5", LFS, id="weights-lfs"),
        pytest.param("model.weights.h5", REGULAR, id="weights-regular", marks=pytest.mark.slow),
        pytest.param("manifest.json", REGULAR, id="manifest", marks=pytest.mark.slow),
        pytest.param("config.json", LFS, id="config", marks=pytest.mark.slow),
    ],
)
def test_corrupted_download_is_detected_and_discarded(converted, name, threshold, tmp_path):
    """The server flips one byte of `name`, same size and ETag: refused, nothing corrupt kept,
    and once the server is mended the same load succeeds (no poisoned cache)."""
    x = np.zeros((1, 64, 64, 3), np.float32)
    np.save(tmp_path / "x.npy", x)
    with local_hub(tmp_path / "hub-root", lfs_threshold=threshold) as url:
        env = client_env(url, tmp_path)
        assert zoo_hub("publish", str(converted), "--allow-random", env=env).returncode == 0
        set_faults(url, {"corrupt": [name]})
        child = load_in_child(NAME, tmp_path / "x.npy", tmp_path / "y.npy", env)
        assert child.returncode != 0 and "IntegrityError" in child.stderr and "does not match" in child.stderr
        assert name in child.stderr and "Traceback" in child.stderr  # the library raises; the CLI prints one line
        assert not (tmp_path / "y.npy").exists()
        cache = tmp_path / "hub-cache"
        assert not [p for p in cache.rglob(name)]  # no snapshot link to it
        for blob in cache.rglob("blobs/*"):  # and every blob kept is what the Hub said it is
            assert hub_module.matches_cache_name(blob), blob

        set_faults(url, {})
        child = load_in_child(NAME, tmp_path / "x.npy", tmp_path / "y.npy", env)
        assert child.returncode == 0, child.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(zoo.load(converted)(x)))


def test_matches_cache_name_checks_both_kinds_of_id(tmp_path):
    data = b"{}"
    for etag, ok in [
        (hub_module.git_blob_sha1(data), True),
        (hashlib.sha256(data).hexdigest(), True),
        (hub_module.git_blob_sha1(b"[]"), False),
        (hashlib.sha256(b"[]").hexdigest(), False),
    ]:
        (tmp_path / etag).write_bytes(data)
        assert hub_module.matches_cache_name(tmp_path / etag) is ok


def _resign(folder: Path) -> None:
    """Rewrite the manifest for the files as they are now (a consistent folder, old report)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": fs.sha256_file(folder / name), "size": (folder / name).stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_refusals_upload_nothing(converted, tmp_path):
    with local_hub(tmp_path / "hub-root") as url:
        env = client_env(url, tmp_path)
        assert zoo_hub("publish", str(converted), "--allow-random", env=env).returncode == 0
        head = remote_head(url)

        # 1. a folder whose parity failed
        failed = tmp_path / "failed"
        folder = open_folder(converted)
        report = dict(folder.parity)
        report["comparisons"] = [
            dict(c, max_abs=1.0, rel=0.1) if c["name"] == "logits" else c for c in report["comparisons"]
        ]
        report.update(passed=False, failure="logits: max abs error 1 (atol 0.0001), relative 0.1 (rtol 1e-05)")
        report.pop("weights_sha256")
        config = folder.config
        write_converted(failed, zoo.load(converted), config, report)
        proc = zoo_hub("publish", str(failed), "--allow-random", env=env)
        assert proc.returncode == 1 and "parity check failed" in proc.stderr and "Traceback" not in proc.stderr
        assert remote_head(url) == head

        # 2. weights changed after the report (manifest re-signed, report not)
        changed = tmp_path / "changed"
        model = zoo.load(converted)
        layer = model.get_layer("stages.0.blocks.0.mlp.fc1")
        layer.kernel.assign(np.asarray(layer.kernel) + 0.01)
        write_converted(changed, model, config, {k: v for k, v in folder.parity.items() if k != "weights_sha256"})
        parity = json.loads((changed / "parity.json").read_text())
        parity["weights_sha256"] = folder.parity["weights_sha256"]
        (changed / "parity.json").write_text(json.dumps(parity))
        _resign(changed)
        proc = zoo_hub("publish", str(changed), "--allow-random", env=env)
        assert proc.returncode == 1 and "weights changed after the parity report" in proc.stderr
        assert remote_head(url) == head

        # 2b. weights edited in place (the manifest no longer matches them)
        tampered = tmp_path / "tampered"
        shutil.copytree(converted, tampered)
        data = bytearray((tampered / "model.weights.h5").read_bytes())
        data[-100] ^= 1
        (tampered / "model.weights.h5").write_bytes(bytes(data))
        proc = zoo_hub("publish", str(tampered), "--allow-random", env=env)
        assert proc.returncode == 1 and "does not match its manifest" in proc.stderr
        assert remote_head(url) == head

        # 3. the repo moved under it (another commit landed after we looked); new weights to send
        newer = tmp_path / "newer"
        write_converted(newer, model, config, {k: v for k, v in folder.parity.items() if k != "weights_sha256"})
        HfApi(endpoint=url, token=TOKEN).upload_file(path_or_fileobj=b"x", path_in_repo="NOTES.md", repo_id=REPO)
        moved = remote_head(url)
        assert moved != head
        proc = zoo_hub("publish", str(newer), "--expect-parent", head, "--allow-random", env=env)
        assert proc.returncode == 1 and "moved while publishing" in proc.stderr
        assert remote_head(url) == moved  # nothing was published by any refusal

        # the same bytes again: nothing to publish, and nothing published twice
        proc = zoo_hub("publish", str(converted), "--allow-random", env=env)
        assert proc.returncode == 0 and "already published" in proc.stderr
        assert remote_head(url) == moved


def test_publish_reads_back_what_landed(converted, tmp_path):
    with local_hub(tmp_path / "hub-root", lfs_threshold=REGULAR) as url:
        set_faults(url, {"corrupt_upload": ["model.weights.h5"]})
        proc = zoo_hub("publish", str(converted), "--allow-random", env=client_env(url, tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the remote model.weights.h5 missing or different from the manifest; do not use that commit" in proc.stderr


def test_publish_needs_a_token_with_write_access(converted, tmp_path):
    with local_hub(tmp_path / "hub-root", token=TOKEN) as url:
        for token in ("", "hf_wrongTOKEN000"):
            env = client_env(url, tmp_path, HF_TOKEN=token, HF_HOME=str(tmp_path / "no-login"))
            proc = zoo_hub("publish", str(converted), "--allow-random", env=env)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert "HF_TOKEN" in proc.stderr and "run the same publish again" not in proc.stderr
            assert token == "" or token not in proc.stderr
        assert not HfApi(endpoint=url, token=TOKEN).repo_exists(REPO)  # nothing was published


@pytest.mark.slow  # with -m slow: the default run keeps to its 10 minutes
def test_publish_to_a_branch_of_a_private_repo(converted, tmp_path):
    with local_hub(tmp_path / "hub-root", token=TOKEN) as url:
        env = client_env(url, tmp_path)
        proc = zoo_hub("publish", str(converted), "--allow-random", "--revision", "dev", "--private", env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        api = HfApi(endpoint=url, token=TOKEN)
        assert api.model_info(REPO).private
        assert "model.weights.h5" not in api.list_repo_files(REPO)  # main is untouched
        assert api.model_info(REPO, revision="dev").sha == proc.stdout.strip()

        x = np.random.default_rng(2).standard_normal((1, 64, 64, 3)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        child = load_in_child(NAME, tmp_path / "x.npy", tmp_path / "y.npy", env, revision="dev")
        assert child.returncode == 0, child.stderr[-2000:]
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(zoo.load(converted)(x)))
        child = load_in_child(NAME, tmp_path / "x.npy", tmp_path / "y2.npy", client_env(url, tmp_path / "other"))
        assert (
            child.returncode != 0 and "manifest.json is missing from the repo at main" in child.stderr
        )  # main has none


def test_load_by_name_from_the_store_without_torch(converted, tmp_path):
    env = client_env("http://127.0.0.1:9", tmp_path, HF_HUB_OFFLINE="1")
    shutil.copytree(converted, tmp_path / "store" / NAME)
    x = np.random.default_rng(3).standard_normal((1, 64, 64, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    child = load_in_child("convnext_tiny_1k", tmp_path / "x.npy", tmp_path / "y.npy", env)
    assert child.returncode == 0, child.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(zoo.load(converted)(x)))


@pytest.mark.slow  # with -m slow: the default run keeps to its 10 minutes
def test_convert_and_publish_in_one_go(tmp_path):
    with local_hub(tmp_path / "hub-root") as url:
        env = client_env(url, tmp_path)
        proc = zoo_hub(
            "convert",
            "convnext_zepto_rms",
            "--random-weights",
            "--out",
            str(tmp_path / "z"),
            "--publish",
            "--repo-id",
            "testorg/zepto",
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "published convnext_zepto_rms.ra4_e3600_r224_in1k to testorg/zepto" in proc.stderr
        assert "manifest.json" in HfApi(endpoint=url, token=TOKEN).list_repo_files("testorg/zepto")


def test_load_reports_every_step_when_nothing_has_the_model(tmp_path):
    env = client_env("http://127.0.0.1:9", tmp_path, HF_HUB_OFFLINE="1")
    code = BLOCK_TORCH + "import zoo; zoo.load('convnext_tiny_1k')"
    proc = run([sys.executable, "-c", code], env)
    assert proc.returncode != 0
    for step in (
        "local store: no",
        "Hub: testorg/convnext_tiny.fb_in1k is not in the local Hub cache",
        "conversion: needs torch and timm",
        "zoo convert",
    ):
        assert step in proc.stderr, step


def test_load_converts_what_neither_the_store_nor_the_hub_has_and_keeps_it(
    small_tiny, isolated_home, caplog, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    ckpt = zoo.resolve("convnext_tiny_1k")
    source = save_bytes(random_state_dict(small_tiny, ckpt.num_classes, seed=5))
    add_file(isolated_home / "hub", ckpt.hf_hub_id, "model.safetensors", source)
    with local_hub(tmp_path / "hub-root") as url, caplog.at_level("WARNING"):  # a Hub without the repo
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        model = zoo.load("convnext_tiny_1k")
    assert f"{NAME}: not in the store nor on the Hub; converting from {ckpt.hf_hub_id}" in caplog.text
    folder = open_folder(store.store_path(NAME))
    assert folder.parity["passed"] and folder.config.source.sha256 == hashlib.sha256(source).hexdigest()
    caplog.clear()
    again = zoo.load("convnext_tiny_1k")  # from the store this time
    assert "converting" not in caplog.text
    x = np.random.default_rng(4).standard_normal((1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(model(x)))


def test_new_head_and_headless_loading(converted, small_tiny, caplog, tmp_path):
    with caplog.at_level("WARNING"):
        full = zoo.load(converted)
    assert "holds seeded random weights (converted with --random-weights), not a pretrained model" in caplog.text
    x = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    features = zoo.load(converted, include_top=False)
    np.testing.assert_array_equal(
        np.asarray(features(x)), np.asarray(__import__("keras").Model(full.input, full.get_layer("head.fc").input)(x))
    )
    with caplog.at_level("WARNING"):
        five = zoo.load(converted, num_classes=5)
    assert "new 5-class head initialised fresh (the checkpoint's has 1000 classes)" in caplog.text
    assert five.output_shape == (None, 5)
    np.testing.assert_array_equal(
        np.asarray(five.get_layer("head.norm").gamma), np.asarray(full.get_layer("head.norm").gamma)
    )
    caplog.clear()
    none = zoo.load(converted, num_classes=0)  # timm's num_classes=0: the pooled features, no new head
    assert "head" not in caplog.text
    np.testing.assert_array_equal(np.asarray(none(x)), np.asarray(features(x)))
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="num_classes must be a non-negative integer"):
            zoo.load(converted, num_classes=bad)
    assert zoo.build("convnext_tiny_1k", num_classes=0).output_shape == features.output_shape
    full.save(tmp_path / "m.keras")
    with pytest.raises(zoo.StoreError, match="whole saved Keras model.*keras.saving.load_model"):
        zoo.load(tmp_path / "m.keras")
    fixed = zoo.load(converted, input_shape=(64, 64, 3))
    assert fixed.input_shape == (None, 64, 64, 3)
    np.testing.assert_array_equal(np.asarray(fixed(x)), np.asarray(full(x)))
