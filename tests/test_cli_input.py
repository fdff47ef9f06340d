"""Bad input to every `zoo` command: a short message on stderr, exit 2 for usage, 1 for failures.

Each case runs in-process through click's runner (an exception escaping the command is what
a user would see as a traceback), offline, with the test's empty store, in a working folder
holding a few decoys: `afile` (a file), `emptydir/` (a folder that is no converted checkpoint)
and `notimage.png` (text). Nothing may be written anywhere by any case.
"""

from __future__ import annotations

import pytest

from checkpoints import store
from tests.support.cli import zoo_cli, zoo_inline

DECOYS = {"afile", "emptydir", "notimage.png"}
TINY = "convnext_tiny_1k"

USAGE = [  # exit 2: click's "Usage:" and one "Error:" line
    ([], "Usage:"),
    (["--bogus"], "No such option"),
    (["frobnicate"], "No such command"),
    # list
    (["list", "--bogus"], "No such option"),
    (["list", "a", "b"], "unexpected extra argument"),
    # convert
    (["convert"], "missing NAME"),
    (["convert", TINY, "--atol", "-1"], "--atol"),
    (["convert", TINY, "--atol", "0"], "--atol"),
    (["convert", TINY, "--atol", "nan"], "not a finite number"),
    (["convert", TINY, "--rtol", "inf"], "not a finite number"),
    (["convert", TINY, "--rtol", "abc"], "--rtol"),
    (["convert", TINY, "--random-weights", "--seed", "-1"], "--seed"),
    (["convert", TINY, "--seed", "abc"], "--seed"),
    (["convert", TINY, "--checkpoint", "missing.safetensors"], "does not exist"),
    (["convert", "--checkpoint", "afile", "--name", "x", "--input-size", "8"], "--input-size"),
    (["convert", "--checkpoint", "afile", "--mean", "0.5,abc"], "one per input channel"),
    (["convert", "--checkpoint", "afile", "--mean", ","], "one per input channel"),
    (["convert", "--checkpoint", "afile", "--std", "1,0,1"], "numbers > 0, one per input channel"),
    (["convert", TINY, "--checkpoint", "afile", "--arch", "convnext_tiny"], "only for your own checkpoints"),
    (["convert", "hf://a/b", "--all"], "no --all"),
    (["convert", TINY, "--random-weights", "--out", "afile"], "is a file"),
    (["convert", TINY, "--random-weights", "--checkpoint", "afile"], "exclude each other"),
    (["convert", TINY, "--repo-id", "me/x"], "--publish"),
    (["convert", TINY, "--revision"], "requires an argument"),
    (["convert", "--all", "--publish"], "--publish"),
    (["convert", "--all", "--revision", "main"], "--revision"),
    # verify
    (["verify"], "Missing argument"),
    (["verify", "missing"], "does not exist"),
    (["verify", "afile"], "is a file"),
    (["verify", "emptydir", "--checkpoint", "missing"], "does not exist"),
    # publish
    (["publish"], "Missing argument"),
    (["publish", "emptydir", "--private", "yes"], "unexpected extra argument"),
    (["publish", "emptydir", "--expect-parent"], "requires an argument"),
    # predict
    (["predict"], "Missing argument"),
    (["predict", "notimage.png", "--top", "0"], "--top"),
    (["predict", "notimage.png", "--top", "-1"], "--top"),
    (["predict", "notimage.png", "--top", "x"], "--top"),
    (["predict", "notimage.png", "--wat"], "No such option"),
    (["predict", "notimage.png", "--dtype", "int8"], "--dtype"),
    # eval
    (["eval"], "Missing option '--data'"),
    (["eval", "--data", "missing"], "does not exist"),
    (["eval", "--data", "afile"], "is a file"),
    (["eval", "--data", "emptydir", "--limit", "0"], "--limit"),
    (["eval", "--data", "emptydir", "--limit", "abc"], "--limit"),
    (["eval", "--data", "emptydir", "--batch-size", "-3"], "--batch-size"),
    (["eval", "--data", "emptydir", "--labels", "missing"], "does not exist"),
    # export
    (["export"], "Missing argument"),
    (["export", TINY], "Missing option '--format'"),
    (["export", TINY, "--format", "onnx"], "--format"),
    (["export", TINY, "--format", "tflite", "--quantize", "int4"], "--quantize"),
    (["export", TINY, "--format", "keras", "--quantize", "fp16"], "tflite exports only"),
    (["export", TINY, "--format", "keras", "--pytorch", "maybe"], "--pytorch"),
    (["export", TINY, "--format", "keras", "--atol", "0"], "--atol"),
    (["export", TINY, "--format", "keras", "--rtol", "nan"], "not a finite number"),
    (["export", TINY, "--format", "keras", "--checkpoint", "missing"], "does not exist"),
]

FAILURES = [  # exit 1: one "error: ..." line
    (["list", "nosuchthing"], "no checkpoint matches"),
    (["convert", "nosuch_model"], "unknown model 'nosuch_model'"),
    (["convert", "--all", "nosuch"], "no checkpoint matches"),
    (["convert", "--all", "[zz"], "no checkpoint matches"),
    (["convert", TINY, "--checkpoint", "notimage.png"], "unsupported checkpoint type"),
    (["convert", TINY, "--checkpoint", "emptydir"], "holds no checkpoint file"),
    (["convert", "--checkpoint", "emptydir"], "holds no checkpoint file"),
    (["convert", "--checkpoint", "afile"], "unsupported checkpoint type"),
    (["convert", "hf://nobody/x@"], "expected hf://ORG/REPO"),
    (["verify", "emptydir"], "no manifest.json"),
    (["publish", "nosuch"], "unknown model 'nosuch'"),
    (["publish", "afile"], "no folder 'afile'"),
    (["publish", TINY], "not converted in the local store"),
    (["publish", "emptydir"], "no manifest.json"),
    (["predict", "missing.png"], "missing.png"),
    (["predict", "notimage.png"], "notimage.png"),
    (["predict", "notimage.png", "--model", "nosuch"], "unknown model 'nosuch'"),
    (["predict", "notimage.png", "--model", "emptydir"], "no manifest.json"),
    (["eval", "--data", "emptydir", "--model", "nosuch"], "unknown model 'nosuch'"),
    (["eval", "--data", "emptydir", "--model", "emptydir"], "no manifest.json"),
    (["export", "nosuch", "--format", "keras"], "unknown model 'nosuch'"),
    (["export", "emptydir", "--format", "keras"], "no manifest.json"),
    (["export", "../missing/", "--format", "keras"], "no such converted checkpoint folder"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder but for the decoys the cases name."""
    (tmp_path / "afile").write_text("not a checkpoint")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "notimage.png").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_nothing_written(workdir) -> None:
    assert {p.name for p in workdir.iterdir()} == DECOYS
    assert not any((workdir / "emptydir").iterdir())
    root = store.store_root()
    assert not root.exists() or not any(root.iterdir())


def case_id(case) -> str:
    return " ".join(case[0]) or "(no arguments)"


@pytest.mark.parametrize("args, says", USAGE, ids=[case_id(c) for c in USAGE])
def test_usage_errors_exit_2_with_a_short_message(workdir, args, says):
    result = zoo_inline(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert says in result.stderr, result.stderr
    if args:  # a bare `zoo` prints its help instead of one error line
        assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1
        assert len(result.stderr.splitlines()) <= 12, result.stderr
    assert_nothing_written(workdir)


@pytest.mark.parametrize("args, says", FAILURES, ids=[case_id(c) for c in FAILURES])
def test_failures_exit_1_with_one_error_line(workdir, args, says):
    result = zoo_inline(*args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert_nothing_written(workdir)


def test_the_installed_command_shows_no_traceback_for_a_bad_value(workdir):
    """The real entry point, once: a negative seed used to escape as a ValueError traceback."""
    proc = zoo_cli("convert", TINY, "--random-weights", "--seed", "-1")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "--seed" in proc.stderr
    assert_nothing_written(workdir)
