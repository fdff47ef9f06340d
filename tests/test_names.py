"""Names that become folders (`--name`, catalogue names, default names, Hub repo names): one path
component each, a bad one refused in one line before anything is done or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints import hub, store
from converters import plan
from converters.source import SourceWeights
from tests.support.archs import SMALL_V1
from tests.support.cli import one_line_error, zoo_cli, zoo_inline
from tests.support.folders import PARITY, folder_config, small_model
from tests.support.writing import write_converted
from zoo.core.catalogue import catalogue
from zoo.core.errors import HubError, InvalidNameError
from zoo.core.folder_config import check_name

# What must never name a folder: the folder itself, the one above, nothing, a path, a terminal
# escape, a line break (as the CLI takes them: one argument each).
REFUSED = [".", "..", "", "a/b", "a\x1bb", "a\nb"]
IDS = ["dot", "dotdot", "empty", "slash", "escape", "newline"]


def tree(root: Path) -> dict[str, bytes | None]:
    """Everything under `root`: {relative path: a file's bytes, None for a folder}."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def store_of_two() -> dict[str, bytes | None]:
    """The local store holding two converted folders; returns all of its content."""
    for seed, name in enumerate(("convnext_tiny.fb_in1k", "convnext_small.fb_in1k")):
        write_converted(store.store_path(name), small_model(seed), folder_config(name), dict(PARITY))
    return tree(store.store_root())


@pytest.mark.parametrize(
    "name",
    [*REFUSED, "a\\b", "a\u202eb", ".hidden", "x" * 201],
    ids=[*IDS, "backslash", "bidi-override", "hidden", "too-long"],
)
def test_a_bad_name_is_refused_in_one_line_naming_it(name):
    with pytest.raises(InvalidNameError) as raised:
        check_name(name)
    message = str(raised.value)
    assert repr(name) in message and "\n" not in message and "one folder name" in message, message
    # everywhere a name becomes a path: a folder of the store, the default Hub repo
    with pytest.raises(InvalidNameError):
        store.store_path(name)
    with pytest.raises(InvalidNameError):
        hub.repo_id_for(name)


@pytest.mark.parametrize("name", ["convnext_tiny.fb_in1k", "my model v2", "fine-tune_3", "a..b"])
def test_a_good_name_is_kept_as_it_is(name):
    assert check_name(name) == name
    assert store.store_path(name) == store.store_root() / name


def test_every_catalogue_name_is_a_folder_name():
    for name in catalogue():
        assert check_name(name) == name


@pytest.mark.parametrize("spec", ["hf://org/..", "hf://org/.", "hf://org/.hidden", "hf://org/..weird"])
def test_a_default_name_from_a_repo_is_one_folder_name(spec):
    name = plan.name_from_checkpoint(spec, None)
    assert check_name(name) == name


@pytest.mark.parametrize("spec", ["hf://org/repo@", "hf://org", "hf://org/repo/sub", "hf://my org/repo", "hf:///repo"])
def test_a_malformed_hub_path_is_refused_alike_everywhere(spec):
    """A published model (`zoo.load`, `zoo predict`) and a source (`zoo convert`) read `hf://` paths
    the same way, before any download."""
    from converters.source import open_checkpoint
    from zoo.locating import locate

    for read in (hub.parse_hf, locate, open_checkpoint):
        with pytest.raises(HubError, match="expected hf://ORG/REPO or hf://ORG/REPO@REVISION"):
            read(spec)


def test_a_hub_path_and_a_revision_asked_for_must_agree():
    assert hub.parse_hf("hf://org/repo") == ("org/repo", None)
    assert hub.parse_hf("hf://org/repo", "v2") == hub.parse_hf("hf://org/repo@v2", "v2") == ("org/repo", "v2")
    assert hub.parse_hf("hf://org/..") == ("org/..", None)  # the repo may be named so; its folder is not
    with pytest.raises(HubError, match="two revisions given: 'hf://org/repo@v1' names 'v1', and 'v2'"):
        hub.parse_hf("hf://org/repo@v1", "v2")


def test_a_default_name_from_a_folder_or_a_file_is_one_folder_name(tmp_path):
    hidden = tmp_path / ".hidden-model"
    hidden.mkdir()
    assert plan.name_from_checkpoint(hidden, None) == "hidden-model"
    dots = tmp_path / "..pth"
    assert plan.name_from_checkpoint(dots, SourceWeights(dots, None)) == "converted"
    long_file = tmp_path / ("x" * 230 + ".pth")
    with pytest.raises(InvalidNameError, match="--name"):
        plan.name_from_checkpoint(long_file, SourceWeights(long_file, None))


@pytest.mark.parametrize("name", REFUSED, ids=IDS)
def test_convert_refuses_a_bad_name_before_any_work(name, isolated_home, small_weights):
    """`zoo convert --checkpoint FILE --name BAD`: exit 1, one line naming the value, no step
    started, nothing written; the store's two models as they were."""
    src, _ = small_weights(SMALL_V1, num_classes=10)
    before, home = store_of_two(), tree(isolated_home)
    result = zoo_inline("convert", "--checkpoint", src, "--name", name)
    line = one_line_error(result)
    assert repr(name) in line and "one folder name" in line, line
    assert "-> source weights" not in result.stderr
    assert tree(store.store_root()) == before and tree(isolated_home) == home


def test_a_store_survives_conversions_named_dot(isolated_home, small_weights):
    """`--name .` once made the store itself a converted folder, and the next one swapped the
    whole store out, models and all. Both are refused, as users run them: an empty store
    stays empty, and a store of two models keeps both."""
    src, _ = small_weights(SMALL_V1, num_classes=10)
    one_line_error(zoo_cli("convert", "--checkpoint", src, "--name", "."))
    assert not store.store_root().exists()
    before = store_of_two()
    line = one_line_error(zoo_cli("convert", "--checkpoint", src, "--name", "."))
    assert "'.'" in line, line
    assert tree(store.store_root()) == before
