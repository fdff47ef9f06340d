"""The `zoo` command line, run as users run it (a subprocess), without converting anything; the
refusals of arguments run in-process (click's runner).

Every command runs with the test's isolated store and Hub cache (`isolated_home`) and offline,
in an empty working directory (`--random-weights` writes its default `--out` there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import converted, store
from tests.support.cli import assert_no_traceback, error_lines, zoo_cli, zoo_inline

TIMEOUT = 120


def store_is_empty(root: Path | None = None) -> bool:
    root = root or store.store_root()
    return not root.exists() or not any(root.iterdir())


# --- list -------------------------------------------------------------------------------------


def test_list_json():
    result = zoo_cli("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    by_name = {row["name"]: row for row in rows}
    assert "convnext_tiny.fb_in1k" in by_name
    tiny = by_name["convnext_tiny.fb_in1k"]
    assert "convnext_tiny_1k" in tiny["aliases"]
    assert tiny["classes"] == 1000 and tiny["input"] == 224 and tiny["converted"] is False
    assert len(rows) == len(set(by_name)) > 10
    # a bare architecture name means timm's default tag, which is not always fb_in1k
    assert by_name["convnext_tiny.in12k_ft_in1k"]["default_for"] == "convnext_tiny"
    assert by_name["convnext_tiny.fb_in1k"]["default_for"] is None


def test_list_pattern_filters():
    result = zoo_cli("list", "22k_1k_384", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows
    for row in rows:
        assert any("22k_1k_384" in n for n in [row["name"], *row["aliases"]]), row
    assert {row["name"] for row in rows} >= {"convnext_tiny.fb_in22k_ft_in1k_384", "convnext_base.fb_in22k_ft_in1k_384"}
    assert "convnext_tiny.fb_in1k" not in {row["name"] for row in rows}
    # the table form lists the same checkpoints, one per line after the header
    table = zoo_cli("list", "22k_1k_384")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].startswith("name")
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(row["name"] for row in rows)


def test_list_no_match_exits_1():
    result = zoo_cli("list", "nosuchthing")
    assert result.returncode == 1
    assert len(error_lines(result.stderr)) == 1
    assert_no_traceback(result)


def test_list_marks_converted_checkpoints():
    folder = store.store_path("convnext_tiny.fb_in1k")
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": converted.FORMAT, "files": {}}))
    rows = {row["name"]: row for row in json.loads(zoo_cli("list", "convnext_tiny", "--json").stdout)}
    assert rows["convnext_tiny.fb_in1k"]["converted"] is True
    assert rows["convnext_tiny.fb_in22k"]["converted"] is False


# --- convert: bad input ------------------------------------------------------------------------------


def test_convert_unknown_name_suggests_the_close_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = zoo_inline("convert", "convnext_tny_1k")
    assert result.exit_code == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "convnext_tny_1k" in errors[0] and "convnext_tiny_1k" in errors[0]
    assert_no_traceback(result)
    assert store_is_empty()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "convnext_tiny_1k", "--atol", "-1"],
        ["convert", "convnext_tiny_1k", "--atol", "0"],
        ["convert", "convnext_tiny_1k", "--rtol", "abc"],
        ["convert", "--bogus"],
        ["convert"],
        ["frobnicate"],
    ],
    ids=["negative-atol", "zero-atol", "text-rtol", "bogus-flag", "no-name", "no-command"],
)
def test_usage_errors_exit_2(args):
    result = zoo_inline(*args)
    assert result.exit_code == 2, result.stderr
    assert "Usage:" in result.stderr
    assert_no_traceback(result)
    assert store_is_empty()


def test_convert_missing_checkpoint_file_exits_2(tmp_path):
    result = zoo_inline("convert", "convnext_tiny_1k", "--checkpoint", str(tmp_path / "nonexistent.safetensors"))
    assert result.exit_code == 2
    assert "nonexistent.safetensors" in result.stderr
    assert_no_traceback(result)
    assert store_is_empty()


def test_random_weights_and_checkpoint_exclude_each_other(tmp_path, monkeypatch):
    existing = tmp_path / "weights.safetensors"
    existing.write_bytes(b"not really weights")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = zoo_inline("convert", "convnext_tiny_1k", "--random-weights", "--checkpoint", str(existing))
    assert result.exit_code != 0
    assert "--random-weights" in result.stderr and "--checkpoint" in result.stderr
    assert_no_traceback(result)
    assert store_is_empty()
    assert list(cwd.iterdir()) == []  # not even the --random-weights default --out folder


def test_convert_offline_without_cache_says_so(isolated_home, tmp_path):
    hub = isolated_home / "empty-hub"
    hub.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    result = zoo_cli("convert", "convnext_tiny_1k", env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "timm/convnext_tiny.fb_in1k" in errors[0]
    assert_no_traceback(result)
    assert store_is_empty()
    assert not store.store_path("convnext_tiny.fb_in1k").exists()
    assert list(tmp_path.iterdir()) == [] and list(hub.iterdir()) == []
    assert "local Hub cache" in errors[0], errors[0]


def test_convert_that_fails_parity_exits_1_shows_the_table_once_and_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    result = zoo_inline(
        "convert", "convnext_atto", "--random-weights", "--out", str(out), "--atol", "1e-9", "--rtol", "1e-12"
    )
    assert result.exit_code == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: parity check failed at logits: max abs error"), errors
    assert result.stderr.count("\npre_logits ") == 1  # the comparison table, once
    assert_no_traceback(result)
    assert list(tmp_path.iterdir()) == [] and store_is_empty()


def test_installed_entry_point():
    script = Path(sys.executable).with_name("zoo")
    assert script.exists(), "the project is not installed (pip install '.[dev]')"
    result = subprocess.run(
        [str(script), "list", "convnext_atto", "--json"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["convnext_atto.d2_in1k"]["default_for"] == "convnext_atto"


# --- verify -------------------------------------------------------------------------------------------


def test_verify_an_empty_folder_exits_1(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(tmp_path)
    result = zoo_inline("verify", str(empty))
    assert result.exit_code == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "manifest" in errors[0], result.stderr
    assert_no_traceback(result)
    assert list(tmp_path.iterdir()) == [empty] and list(empty.iterdir()) == []
    assert store_is_empty()


def test_tensorflow_start_up_lines_are_hidden_unless_asked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    quiet = zoo_cli("verify", str(tmp_path / "empty"))
    assert quiet.returncode == 1 and quiet.stderr.splitlines() == [
        f"-> check {tmp_path / 'empty'} against its manifest ...",
        f"error: {tmp_path / 'empty'} has no manifest.json: not a converted checkpoint folder",
    ], quiet.stderr
    loud = zoo_cli("verify", str(tmp_path / "empty"), env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert loud.returncode == 1 and "oneDNN" in loud.stderr  # the user's choice is honoured


def test_verify_a_missing_folder_exits_2(tmp_path):
    result = zoo_cli("verify", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert_no_traceback(result)


def test_help_names_every_source_framework_not_timm_alone():
    """verify, export and eval compare with the source's own framework; predict prepares images as
    the source does: their help says so, not "timm" for every source."""
    for command in ("verify", "export", "eval"):
        text = " ".join(zoo_inline(command, "--help").output.split())
        assert "timm, transformers or torchvision" in text, (command, text)
    text = " ".join(zoo_inline("predict", "--help").output.split())
    assert "as the checkpoint's source evaluates it" in text and "transformers" in text, text
