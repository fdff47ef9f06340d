"""Publishing and loading through a local Hub over real HTTP, with the real huggingface_hub client.

Clients run in child processes with the Hub environment set, as users run them; the loading
child blocks torch and timm from import.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi

import converters.pipeline as pipeline
import zoo
from checkpoints import store
from tests.support.hub import local_hub

TOKEN = "hf_zooTESTtoken1234567890secret"
NAME = "convnext_tiny.fb_in1k"
REPO = f"testorg/{NAME}"


@pytest.fixture(autouse=True)
def online_in_process(monkeypatch):
    """The test's own HfApi calls talk to the local server (the autouse fixture sets offline)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def converted(small_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / NAME
    pipeline.convert(NAME, out=out, random_seed=11)
    return out


@pytest.fixture(params=[None, 1 << 40], ids=["lfs", "regular"])
def hub(request, tmp_path):
    """A local Hub: LFS uploads (Xet disabled), or every file in 'regular' upload mode."""
    with local_hub(tmp_path / "hub-root", lfs_threshold=request.param) as url:
        yield url


def client_env(url: str, home: Path, **extra) -> dict:
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)
    env.update(HF_ENDPOINT=url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HUB_CACHE=str(home / "hub-cache"),
               ZOO_HOME=str(home / "store"), ZOO_HUB_ORG="testorg", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra)
    return env


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    assert TOKEN not in proc.stdout + proc.stderr, "the token leaked into the output"
    return proc


def zoo_cli(*args, env):
    return run([sys.executable, "-m", "zoo.cli", *args], env)


LOAD = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # loading from the store or the Hub must not need torch
    sys.modules["timm"] = None
    import numpy as np, zoo
    model = zoo.load(sys.argv[1])
    np.save(sys.argv[2], np.asarray(model(np.load(sys.argv[3]))))
    assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "timm") and sys.modules[m] is not None]
""")


def load_in_child(name, x_path, out_path, env):
    return run([sys.executable, "-c", LOAD, name, str(out_path), str(x_path)], env)


def remote_head(url: str) -> str:
    return HfApi(endpoint=url, token=TOKEN).model_info(REPO).sha


def test_publish_then_load_by_name_without_torch(converted, hub, tmp_path):
    env = client_env(hub, tmp_path)
    proc = zoo_cli("publish", str(converted), env=env)
    assert proc.returncode == 1 and "random weights" in proc.stderr  # never by accident
    proc = zoo_cli("publish", str(converted), "--allow-random", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    commit = proc.stdout.strip()
    assert remote_head(hub) == commit

    api = HfApi(endpoint=hub, token=TOKEN)
    assert set(api.list_repo_files(REPO)) >= {"model.weights.h5", "config.json", "parity.json",
                                                "manifest.json", "README.md"}
    assert len(api.list_repo_commits(REPO)) == 2  # the repo's initial commit + ours: one commit
    card = Path(api.hf_hub_download(REPO, "README.md", cache_dir=str(tmp_path / "peek"))).read_text()
    for field in ("library_name: keras", "license: apache-2.0", "- convnext", "- image-classification",
                  "- timm", "base_model: timm/convnext_tiny.fb_in1k", "model-index", "max_abs_logit_error",
                  "Not pretrained", 'zoo.load("convnext_tiny.fb_in1k")'):
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


def test_corrupted_download_is_detected_and_discarded(converted, tmp_path):
    with local_hub(tmp_path / "hub-root") as url:
        env = client_env(url, tmp_path)
        assert zoo_cli("publish", str(converted), "--allow-random", env=env).returncode == 0
        request = urllib.request.Request(f"{url}/__faults", data=json.dumps({"corrupt": ["model.weights.h5"]}).encode(),
                                         method="POST")
        urllib.request.urlopen(request).read()
        np.save(tmp_path / "x.npy", np.zeros((1, 64, 64, 3), np.float32))
        child = load_in_child(NAME, tmp_path / "x.npy", tmp_path / "y.npy", env)
    assert child.returncode != 0 and "IntegrityError" in child.stderr and "does not match" in child.stderr
    cached = [p for p in (tmp_path / "hub-cache").rglob("model.weights.h5")]
    assert cached == []  # the corrupt file is not kept
    assert not (tmp_path / "y.npy").exists()


def _resign(folder: Path) -> None:
    """Rewrite the manifest for the files as they are now (a consistent folder, old report)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": store.sha256_file(folder / name), "size": (folder / name).stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_refusals_upload_nothing(converted, tmp_path):
    with local_hub(tmp_path / "hub-root") as url:
        env = client_env(url, tmp_path)
        assert zoo_cli("publish", str(converted), "--allow-random", env=env).returncode == 0
        head = remote_head(url)

        # 1. a folder whose parity failed
        failed = tmp_path / "failed"
        folder = store.open_folder(converted)
        report = dict(folder.parity)
        report["comparisons"] = [dict(c, max_abs=1.0, rel=0.1) if c["name"] == "logits" else c
                                 for c in report["comparisons"]]
        report.update(passed=False, failure="logits: max abs error 1 (atol 0.0001), relative 0.1 (rtol 1e-05)")
        report.pop("weights_sha256")
        config = {k: v for k, v in folder.config.items() if k not in ("format", "weights")}
        store.write(failed, zoo.load(converted), config, report)
        proc = zoo_cli("publish", str(failed), "--allow-random", env=env)
        assert proc.returncode == 1 and "parity check failed" in proc.stderr and "Traceback" not in proc.stderr

        # 2. weights changed after the report (manifest re-signed, report not)
        changed = tmp_path / "changed"
        model = zoo.load(converted)
        layer = model.get_layer("stages.0.blocks.0.mlp.fc1")
        layer.kernel.assign(np.asarray(layer.kernel) + 0.01)
        store.write(changed, model, config, {k: v for k, v in folder.parity.items() if k != "weights_sha256"})
        parity = json.loads((changed / "parity.json").read_text())
        parity["weights_sha256"] = folder.parity["weights_sha256"]
        (changed / "parity.json").write_text(json.dumps(parity))
        _resign(changed)
        proc = zoo_cli("publish", str(changed), "--allow-random", env=env)
        assert proc.returncode == 1 and "weights changed after the parity report" in proc.stderr

        # 3. the repo moved under it (another commit landed after we looked); new weights to send
        newer = tmp_path / "newer"
        store.write(newer, model, config, {k: v for k, v in folder.parity.items() if k != "weights_sha256"})
        HfApi(endpoint=url, token=TOKEN).upload_file(path_or_fileobj=b"x", path_in_repo="NOTES.md", repo_id=REPO)
        moved = remote_head(url)
        assert moved != head
        proc = zoo_cli("publish", str(newer), "--expect-parent", head, "--allow-random", env=env)
        assert proc.returncode == 1 and "moved while publishing" in proc.stderr
        assert remote_head(url) == moved  # nothing was published by any refusal

        # the same bytes again: nothing to publish, and nothing published twice
        proc = zoo_cli("publish", str(converted), "--allow-random", env=env)
        assert proc.returncode == 0 and "already published" in proc.stderr
        assert remote_head(url) == moved


def test_convert_and_publish_in_one_go(tmp_path):
    with local_hub(tmp_path / "hub-root") as url:
        env = client_env(url, tmp_path)
        proc = zoo_cli("convert", "convnext_zepto_rms", "--random-weights", "--out", str(tmp_path / "z"),
                       "--publish", "--repo-id", "testorg/zepto", env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "published convnext_zepto_rms.ra4_e3600_r224_in1k to testorg/zepto" in proc.stderr
        assert "manifest.json" in HfApi(endpoint=url, token=TOKEN).list_repo_files("testorg/zepto")


def test_load_reports_every_step_when_nothing_has_the_model(tmp_path):
    env = client_env("http://127.0.0.1:9", tmp_path, HF_HUB_OFFLINE="1")
    code = "import sys; sys.modules['torch'] = None; import zoo; zoo.load('convnext_tiny_1k')"
    proc = run([sys.executable, "-c", code], env)
    assert proc.returncode != 0
    for step in ("local store: no", "Hub: testorg/convnext_tiny.fb_in1k is not in the local Hub cache",
                 "conversion: needs torch and timm", "zoo convert"):
        assert step in proc.stderr, step


def test_new_head_and_headless_loading(converted):
    full = zoo.load(converted)
    x = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    features = zoo.load(converted, include_top=False)
    np.testing.assert_array_equal(np.asarray(features(x)), np.asarray(
        __import__("keras").Model(full.input, full.get_layer("head.fc").input)(x)))
    five = zoo.load(converted, num_classes=5)
    assert five.output_shape == (None, 5)
    np.testing.assert_array_equal(np.asarray(five.get_layer("head.norm").gamma), np.asarray(full.get_layer("head.norm").gamma))
    fixed = zoo.load(converted, input_shape=(64, 64, 3))
    assert fixed.input_shape == (None, 64, 64, 3)
    np.testing.assert_array_equal(np.asarray(fixed(x)), np.asarray(full(x)))
