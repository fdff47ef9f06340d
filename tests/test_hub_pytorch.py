"""`zoo publish --format timm|transformers`: a converted folder's PyTorch export on the Hub, loaded from there
by the framework's own loader.

Publishing runs in this process (click's runner) against a local Hub server over real HTTP that takes
writes only with the token; loading runs in a fresh process, as users load the repo
(`timm.create_model("hf-hub:ORG/NAME", pretrained=True)`, `AutoModelForImageClassification.from_pretrained`),
which also runs the card's snippet as it is. The default run shares one conversion and one timm export
(a converted folder published as transformers: the export made and proven by publish itself; the timm
export folder published as it is); the other two pairings run with -m slow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, ModelCard
from PIL import Image

import zoo
from tests.support.archs import SMALL_V1
from tests.support.cli import one_line_error, zoo_inline
from tests.support.converted import convert_small
from tests.support.hub import client_in_process, local_hub
from zoo.core.labels import label_names

TOKEN = "hf_zooPYTORCHtoken1234567890secret"
NAME = "convnext_tiny.fb_in1k"
ORG = "testorg"
FILES = {
    "timm": {"model.safetensors", "config.json"},
    "transformers": {"model.safetensors", "config.json", "preprocessor_config.json"},
}


def repo_of(framework: str) -> str:
    return f"{ORG}/{NAME}.{framework}"  # publish's default repo for a framework's export


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One small converted folder (random weights, real parity gate), which the tests only read."""
    return convert_small(tmp_path_factory.mktemp("conv") / NAME, SMALL_V1, seed=11, name=NAME)


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
    """`zoo export FOLDER --format F` of the converted folder, made once per framework when first asked for
    (the tests only read it, or copy it)."""
    made = {}

    def export(framework: str) -> Path:
        if framework not in made:
            out = tmp_path_factory.mktemp("export") / f"{NAME}.{framework}"
            result = zoo_inline("export", converted, "--format", framework, "--out", out)
            assert result.exit_code == 0, result.stderr[-3000:]
            made[framework] = out
        return made[framework]

    return export


@pytest.fixture(scope="module")
def keras_logits(converted):
    """A fixed NHWC batch and the Keras model's logits for it."""
    x = np.random.default_rng(7).standard_normal((2, 64, 64, 3)).astype(np.float32)
    return x, np.asarray(zoo.load(converted)(x))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh local Hub (writes need TOKEN; files >= 1 KiB through LFS) this process's client talks to."""
    with local_hub(tmp_path / "hub-root", lfs_threshold=1024, token=TOKEN) as url:
        client_in_process(monkeypatch, url, TOKEN, ORG)
        yield url


def api(url: str) -> HfApi:
    return HfApi(endpoint=url, token=TOKEN)


def publish(*args):
    """`zoo publish ARGS` in this process; the token never shows in its output."""
    result = zoo_inline("publish", *args)
    assert TOKEN not in result.stdout + result.stderr, "the token leaked into the output"
    return result


# In a fresh process, as a user with torch and the framework but no token: the repo loaded by the
# framework's own Hub loader, its logits on the NHWC batch (as NCHW), then the card's Python blocks as
# they are (beside an image.jpg), printing what they print.
LOAD = textwrap.dedent("""
    import contextlib, io, json, sys
    import numpy as np, torch
    framework, repo, blocks = sys.argv[1], sys.argv[2], json.loads(sys.argv[5])
    x = torch.from_numpy(np.load(sys.argv[3]).transpose(0, 3, 1, 2).copy())
    if framework == "timm":
        import timm
        model = timm.create_model("hf-hub:" + repo, pretrained=True)
    else:
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained(repo)
    with torch.inference_mode():
        out = model.eval()(x)
    np.save(sys.argv[4], (out.logits if framework == "transformers" else out).numpy())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {})
    print(json.dumps({"card_output": printed.getvalue(), "zoo": "zoo" in sys.modules}))
""")


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def load_from_hub(framework: str, url: str, x: np.ndarray, card: str, work: Path) -> tuple[np.ndarray, dict]:
    """The published repo loaded in a fresh process (see LOAD): its logits on `x` and what the card printed."""
    work.mkdir()
    np.save(work / "x.npy", x)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), np.uint8)).save(work / "image.jpg")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(
        HF_ENDPOINT=url,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_CACHE=str(work / "hub-cache"),
        HF_HOME=str(work / "hf-home"),  # no stored login either: the repo is public
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    args = [framework, repo_of(framework), str(work / "x.npy"), str(work / "y.npy"), json.dumps(python_blocks(card))]
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return np.load(work / "y.npy"), json.loads(proc.stdout.strip().splitlines()[-1])


def check_published(framework: str, url: str, export_files: dict, keras_logits, tmp_path: Path) -> None:
    """The repo holds the export's files, parity.json and a card for the framework, in one commit, and
    loads from the Hub (with the card's snippet too) to the Keras model's logits."""
    repo = repo_of(framework)
    tree = {e.path: e for e in api(url).list_repo_tree(repo)}
    assert set(tree) - {".gitattributes"} == {*FILES[framework], "parity.json", "README.md"}
    weights = tree["model.safetensors"]  # through LFS: the Hub names it by its sha256
    assert weights.lfs is not None and weights.lfs.sha256 == export_files["model.safetensors"]["sha256"]
    assert len(api(url).list_repo_commits(repo)) == 2  # the repo's initial commit + ours
    card = Path(api(url).hf_hub_download(repo, "README.md", cache_dir=str(tmp_path / "peek"))).read_text()
    assert TOKEN not in card
    data = ModelCard(card).data.to_dict()
    assert data["library_name"] == framework and data["pipeline_tag"] == "image-classification"
    assert data["license"] == "apache-2.0" and data["base_model"] == "timm/convnext_tiny.fb_in1k"
    assert {framework, "convnext", "image-classification"} <= set(data["tags"])
    metrics = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics["max_abs_logit_error"] <= 1e-4 and metrics["relative_logit_error"] <= 1e-5
    assert "Not pretrained" in card and "| stages.3 |" in card and "| logits |" in card
    if framework == "timm":
        assert f'timm.create_model("hf-hub:{repo}", pretrained=True)' in card
        assert "resolve_data_config" in card and "create_transform(" in card
    else:
        assert f'AutoModelForImageClassification.from_pretrained("{repo}")' in card
        assert f'AutoImageProcessor.from_pretrained("{repo}")' in card

    x, expected = keras_logits
    logits, child = load_from_hub(framework, url, x, card, tmp_path / "child")
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    assert not child["zoo"]  # the framework alone loads it
    top, label = child["card_output"].strip().split(" ", 1)  # the card's snippet: the top class and its name
    assert label == label_names(1000)[int(top)]


# The default run publishes each framework once, by each way in: a converted folder (publish makes the
# export and proves it) and an export folder (publish checks it against its report). The two other pairings
# add ~25 s of export and proof: -m slow.
@pytest.mark.parametrize(
    "framework, given",
    [
        pytest.param("transformers", "converted", id="transformers-from-converted"),
        # the default run (10 minutes on 2 cores) publishes one; timm's Hub loading with the slow tests
        pytest.param("timm", "export", id="timm-from-export", marks=pytest.mark.slow),
        pytest.param("timm", "converted", id="timm-from-converted", marks=pytest.mark.slow),
        pytest.param("transformers", "export", id="transformers-from-export", marks=pytest.mark.slow),
    ],
)
def test_publish_then_load_with_the_framework_from_the_hub(
    framework, given, converted, exported, keras_logits, hub, tmp_path
):
    folder = converted if given == "converted" else exported(framework)
    result = publish(folder, "--format", framework)
    assert "random weights" in one_line_error(result)  # never by accident
    assert not api(hub).repo_exists(repo_of(framework))

    result = publish(folder, "--format", framework, "--allow-random")
    assert result.exit_code == 0, result.stderr[-3000:]
    commit = result.stdout.strip()
    assert api(hub).model_info(repo_of(framework)).sha == commit
    assert f"to {repo_of(framework)} at commit {commit}" in result.stderr
    remote = Path(api(hub).hf_hub_download(repo_of(framework), "parity.json", cache_dir=str(tmp_path / "report")))
    report = json.loads(remote.read_text())
    assert report["passed"] and report["export"]["framework"] == framework
    if given == "converted":
        assert f"load them with {framework}" in result.stderr  # the export was made and proven first
    else:
        assert remote.read_bytes() == (folder / "parity.json").read_bytes()
        again = publish(folder, "--format", framework, "--allow-random")  # nothing is committed twice
        assert again.exit_code == 0 and "already published these exact files" in again.stderr
        assert again.stdout.strip() == commit
    check_published(framework, hub, report["export"]["files"], keras_logits, tmp_path)


def _tamper(export: Path, where: Path, change) -> Path:
    copy = Path(shutil.copytree(export, where))
    change(copy)
    return copy


def _flip_a_byte(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-100] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))


def _fail_the_report(folder: Path) -> None:
    report = json.loads((folder / "parity.json").read_text())
    report["passed"] = False
    (folder / "parity.json").write_text(json.dumps(report))


def test_a_changed_export_folder_is_refused_and_nothing_is_uploaded(exported, hub, tmp_path):
    export = exported("timm")
    cases = {
        "weights": (_flip_a_byte, "model.safetensors changed since the export's report was written"),
        "extra": (lambda f: (f / "notes.txt").write_text("x"), "it holds notes.txt, which its report does not list"),
        "missing": (lambda f: (f / "config.json").unlink(), "config.json listed in its report missing"),
        "failed": (_fail_the_report, "its proof failed"),
    }
    for case, (change, says) in cases.items():
        folder = _tamper(export, tmp_path / case, change)
        error = one_line_error(publish(folder, "--format", "timm", "--allow-random"))
        assert f"refusing to publish {folder}" in error and says in error, error
    error = one_line_error(publish(export, "--format", "transformers", "--allow-random"))
    assert "it is a timm export, not a transformers one" in error
    error = one_line_error(publish(export, "--allow-random"))  # the default, --format keras
    assert "is a timm export, not a converted folder: publish it with --format timm" in error
    for framework in ("timm", "transformers"):
        assert not api(hub).repo_exists(repo_of(framework))
    assert not api(hub).repo_exists(f"{ORG}/{NAME}")


def test_torchvision_has_no_hub_format(converted):
    result = zoo_inline("publish", converted, "--format", "torchvision")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "torchvision has no way to load a model from the Hub" in errors[0], result.stderr


def test_publish_to_a_branch_of_a_private_repo_guarded_by_its_parent(exported, hub):
    """--revision, --private and --expect-parent hold for an export as for a converted folder."""
    export, repo = exported("timm"), repo_of("timm")
    result = publish(export, "--format", "timm", "--allow-random", "--revision", "dev", "--private")
    assert result.exit_code == 0, result.stderr[-3000:]
    commit = result.stdout.strip()
    assert api(hub).model_info(repo).private
    assert api(hub).model_info(repo, revision="dev").sha == commit
    assert "model.safetensors" not in api(hub).list_repo_files(repo)  # main is untouched
    api(hub).upload_file(path_or_fileobj=b"x", path_in_repo="NOTES.md", repo_id=repo, revision="dev")
    moved = api(hub).model_info(repo, revision="dev").sha
    args = ("--format", "timm", "--allow-random", "--revision", "dev", "--expect-parent", commit)
    error = one_line_error(publish(export, *args))
    assert f"{repo}@dev moved while publishing" in error
    assert api(hub).model_info(repo, revision="dev").sha == moved


def test_card_of_an_export_without_a_classifier_from_a_keras_file(exported, tmp_path):
    """Without a classifier the card's task is feature extraction and its snippet gives the pooled features;
    an export of a .keras file names it, and has no base model (its licence is the one timm's config records)."""
    from zoo.export.publishing import model_card

    folder = Path(shutil.copytree(exported("timm"), tmp_path / "features"))
    config = json.loads((folder / "config.json").read_text())
    config["num_classes"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    report = json.loads((folder / "parity.json").read_text())
    report["source"] = {"name": "flowers", "keras_file": "/data/flowers.keras", "sha256": "0" * 64}
    card = model_card(folder, report, f"{ORG}/features")
    assert "library_name: timm" in card and "pipeline_tag: image-feature-extraction" in card
    assert "features = model(image)" in python_blocks(card)[0] and "no classifier" in card
    assert "from the Keras file `flowers.keras`" in card, card
    data = ModelCard(card).data.to_dict()
    assert "base_model" not in data and data["license"] == "apache-2.0"  # the licence timm's config records


def test_token_never_printed_and_a_token_without_write_access_is_named(exported, hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTOKEN000")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    error = one_line_error(publish(exported("timm"), "--format", "timm", "--allow-random"))
    assert "HF_TOKEN" in error and "hf_wrongTOKEN000" not in error
    assert not api(hub).repo_exists(repo_of("timm"))
