"""Sharded checkpoints convert as one checkpoint: transformers' `save_pretrained(max_shard_size=...)`
and huggingface_hub's `save_torch_state_dict` folders (`model.safetensors.index.json` and its
shards, or `pytorch_model.bin.index.json` and pickle shards), named by the folder, the index or any
shard, from disk or from a Hub repo.

The checkpoints are made by the frameworks themselves from perturbed models (tests/support/sources.py);
the parity reference loads them with the framework's own sharded loading, never the converter's reader.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from checkpoints.converted import open_folder
from converters import reading, source
from converters.source import SourceWeights
from tests.support import sources
from tests.support.archs import SMALL
from tests.support.cli import one_line_error, zoo_inline
from tests.support.hub import local_hub
from zoo.core.errors import SourceError
from zoo.core.folder_config import SourceRecord

V1, V1_CONV_MLP, V2 = SMALL["linear_mlp"], SMALL["conv_mlp"], SMALL["v2_grn"]
LABELS = ["cat", "dog", "bird"]
SHARD = "20KB"  # the small rows' tensors over 8 shards
INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


def models():
    """The source models, by the name of the folder each is saved in."""
    return {
        "hf": sources.transformers_model(V1, 3, seed=5, labels=LABELS),
        "timm": sources.timm_model(V1_CONV_MLP, 10, seed=1),
        "hf_bin": sources.transformers_model(V2, 3, seed=6, labels=LABELS),
    }


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """Each model saved sharded by its framework, and once as one file (`<name>_whole`): name -> folder."""
    from huggingface_hub import save_torch_state_dict

    root = tmp_path_factory.mktemp("sharded")
    made = models()
    made["hf"].save_pretrained(root / "hf", max_shard_size=SHARD)
    made["hf"].save_pretrained(root / "hf_whole")
    for name, safe in (("timm", True), ("hf_bin", False)):
        (root / name).mkdir()
        save_torch_state_dict(made[name].state_dict(), root / name, max_shard_size=SHARD, safe_serialization=safe)
    made["hf_bin"].config.save_pretrained(root / "hf_bin")  # transformers 5 saves safetensors only: its config
    return root


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_names(folder, index=INDEX) -> list[str]:
    return sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))


def test_the_folder_the_index_and_any_shard_name_the_whole_checkpoint(saved):
    folder = saved / "hf"
    shards = shard_names(folder)
    assert len(shards) == 8
    named = [source.local(folder), source.local(folder / INDEX), source.local(folder / shards[3], hashed=False)]
    assert {src.path for src in named} == {(folder / INDEX).resolve()}
    files = {INDEX: sha256(folder / INDEX), **{name: sha256(folder / name) for name in shards}}
    assert all(src.files == files and src.filename == INDEX for src in named)
    # what `sha256sum` prints for them, in name order, hashed
    listing = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    assert {src.sha256 for src in named} == {hashlib.sha256(listing.encode()).hexdigest()}
    assert source.local(saved / "hf_bin").path.name == BIN_INDEX  # transformers' order: no safetensors there
    # the converted model is named after the folder, whichever of them names it (not `model`)
    from converters.plan import name_from_checkpoint

    given = (folder, folder / INDEX, folder / shards[3])
    assert {name_from_checkpoint(path, src) for path, src in zip(given, named, strict=True)} == {"hf"}


def test_the_shards_read_as_the_one_file_they_were_split_from(saved):
    """Every tensor, bit for bit, one pass: the digest fed while reading is the sha256 `local` records."""
    digest = hashlib.sha256()
    sharded, key = reading.read_raw(saved / "hf" / INDEX, digest)
    whole, _ = reading.read_raw(saved / "hf_whole" / "model.safetensors")
    assert key is None and sharded.keys() == whole.keys()
    assert all(np.array_equal(sharded[k], whole[k]) for k in whole)
    assert digest.hexdigest() == source.local(saved / "hf").sha256
    pickled = reading.read_raw(saved / "hf_bin")[0]  # pickle shards: torch.load(weights_only=True) each
    expected = models()["hf_bin"].state_dict()
    assert pickled.keys() == expected.keys()
    assert all(np.array_equal(pickled[k], expected[k].numpy()) for k in expected)


def test_the_shards_are_read_one_at_a_time_never_as_bytes_beside_their_tensors(tmp_path):
    """At the peak, reading a sharded checkpoint holds what reading the same tensors from one file holds."""
    import timm
    from huggingface_hub import save_torch_state_dict

    state = timm.create_model("convnext_atto", pretrained=False).state_dict()  # 15 MB, over 8 shards
    (tmp_path / "sharded").mkdir()
    save_torch_state_dict(state, tmp_path / "sharded", max_shard_size="2MB")
    save_torch_state_dict(state, tmp_path, max_shard_size="1GB")  # one file: model.safetensors
    assert len(shard_names(tmp_path / "sharded")) >= 8

    def peak(path) -> tuple[int, int]:
        tracemalloc.start()
        try:
            tensors = reading.read_raw(path, hashlib.sha256())[0]
            return tracemalloc.get_traced_memory()[1], sum(t.nbytes for t in tensors.values())
        finally:
            tracemalloc.stop()

    (sharded, held), (whole, _) = peak(tmp_path / "sharded"), peak(tmp_path / "model.safetensors")
    assert sharded <= whole + (1 << 20) and sharded < 1.2 * held


def edit_index(folder, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def first_key(folder, shard: str) -> str:
    return sorted(load_file(folder / shard))[0]


def _missing_shard(folder, shards):
    (folder / shards[4]).unlink()
    return f"lists shard {shards[4]}, which is not in"


def _key_elsewhere(folder, shards):
    key = first_key(folder, shards[0])
    edit_index(folder, lambda m: m.__setitem__(key, shards[1]))
    return f"shard {shards[0]} holds tensor {key!r}, which the index puts in {shards[1]}"


def _key_unlisted(folder, shards):
    key = first_key(folder, shards[0])
    edit_index(folder, lambda m: m.pop(key))
    return f"shard {shards[0]} holds tensor {key!r}, which the index does not list"


def _tensor_in_two_shards(folder, shards):
    key = first_key(folder, shards[0])
    second = load_file(folder / shards[1])
    second[key] = load_file(folder / shards[0])[key]
    save_file(second, folder / shards[1], metadata={"format": "pt"})
    return f"tensor {key!r} is in two shards, {shards[0]} and {shards[1]}"


def _listed_but_absent(folder, shards):
    edit_index(folder, lambda m: m.__setitem__("classifier.extra", shards[2]))
    return f"puts tensor 'classifier.extra' in shard {shards[2]}, which does not hold it"


def _escaping_path(folder, shards):
    (folder.parent / "x.safetensors").write_bytes((folder / shards[0]).read_bytes())
    edit_index(folder, lambda m: m.update({k: "../x.safetensors" for k, v in m.items() if v == shards[0]}))
    return "names shard '../x.safetensors', which is not a file beside it"


def _malformed_json(folder, shards):
    (folder / INDEX).write_text('{"metadata": {}, "weight_map": {')
    return f"{INDEX} is not a sharded checkpoint's index: not JSON"


def _no_weight_map(folder, shards):
    (folder / INDEX).write_text('{"metadata": {}, "weights": {}}')
    return 'it needs a "weight_map" object'


FAULTS = {
    f.__name__[1:]: f
    for f in (
        _missing_shard,
        _key_elsewhere,
        _key_unlisted,
        _tensor_in_two_shards,
        _listed_but_absent,
        _escaping_path,
        _malformed_json,
        _no_weight_map,
    )
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_an_index_and_shards_that_disagree_are_refused_in_one_line(fault, saved, tmp_path):
    folder = shutil.copytree(saved / "hf", tmp_path / "case" / "hf")
    expected = FAULTS[fault](folder, shard_names(folder))
    for given in (folder, folder / INDEX):
        error = one_line_error(zoo_inline("convert", "--checkpoint", given, "--out", tmp_path / "out"))
        assert expected in error and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_a_shard_without_its_index_says_what_is_missing(saved, tmp_path):
    folder = shutil.copytree(saved / "hf", tmp_path / "hf")
    (folder / INDEX).unlink()
    for given, says in (
        (folder / "model-00002-of-00008.safetensors", f"whose index {INDEX} is not beside it"),
        (folder, "holds 8 shards of a checkpoint (model-00001-of-00008.safetensors, "),
    ):
        assert says in one_line_error(zoo_inline("convert", "--checkpoint", given, "--out", tmp_path / "out"))


def test_the_reference_loads_the_shards_with_the_framework_s_own_loader(saved, monkeypatch):
    """transformers' `from_pretrained` on the folder, huggingface_hub's `load_torch_model` for timm's keys:
    the logits of the model that was saved, exactly, with the converter's reader out of reach."""
    from converters import reference

    def refuse(*args, **kwargs):
        raise AssertionError("the reference read the shards with the converter's reader")

    monkeypatch.setattr(reference, "read_raw", refuse)
    monkeypatch.setattr(reading, "_read_sharded", refuse)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32))
    made = models()
    for name, arch, classes, framework in (("hf", V1, 3, "transformers"), ("timm", V1_CONV_MLP, 10, "timm")):
        index = saved / name / INDEX
        ref = reference.reference(arch, classes, index)
        assert ref.adapter.name == framework
        with torch.inference_mode():
            expected = made[name](x)
        expected = getattr(expected, "logits", expected)
        assert torch.equal(ref.logits(x), expected)


def test_a_source_record_without_files_still_reads_and_writes_as_before():
    old = {"kind": "file", "sha256": "a" * 64, "repo_id": None, "revision": None, "filename": "m.safetensors",
           "path": "/x/m.safetensors", "layout": "timm"}  # fmt: skip
    record = SourceRecord.from_json(old)
    assert record.files is None and record.to_json() == old
    one_file = SourceWeights(__file__, "b" * 64, filename="m.safetensors").record("file", path="/x/m.safetensors")
    assert "files" not in one_file.to_json()
    with pytest.raises(ValueError):
        SourceRecord.from_json({**old, "files": {"m-00001-of-00002.safetensors": "not a sha256"}})


# One conversion through the CLI, as users run it, shared by the tests below (one worker: conftest.py).
@pytest.fixture(scope="module")
def converted(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "hf"
    result = zoo_inline("convert", "--checkpoint", saved / "hf", "--out", out)
    assert result.exit_code == 0, result.stderr[-3000:]
    return out, result.stderr


def test_a_transformers_sharded_folder_converts_with_every_shard_recorded(converted, saved):
    import zoo

    out, stderr = converted
    folder = open_folder(out)
    assert "parity against transformers (separate process)" in stderr
    report, recorded = folder.parity, folder.config.source
    assert report["passed"] and report["versions"]["reference"] == "transformers"
    logits = next(c for c in report["comparisons"] if c["name"] == "logits")
    assert logits["max_abs"] <= 1e-4 and logits["rel"] <= 1e-5
    assert report["versions"]["source_sha256"] == recorded.sha256 == source.local(saved / "hf").sha256
    assert (recorded.kind, recorded.filename, recorded.layout) == ("file", INDEX, "transformers")
    assert recorded.files == {name: sha256(saved / "hf" / name) for name in [INDEX, *shard_names(saved / "hf")]}
    assert folder.config.labels == tuple(LABELS) and folder.config.name == "hf"
    model = zoo.load(out)
    assert model.output_shape == (None, 3)


def test_a_shard_changed_after_the_conversion_fails_verify_naming_it(converted, saved, tmp_path):
    out, _ = converted
    copy = shutil.copytree(saved / "hf", tmp_path / "hf")
    changed = shard_names(copy)[2]
    tensors = load_file(copy / changed)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * np.float32(1.001)
    save_file(tensors, copy / changed, metadata={"format": "pt"})
    error = one_line_error(zoo_inline("verify", out, "--checkpoint", copy / INDEX))
    assert "the source weights changed since conversion" in error
    assert f"{changed} (sha256 {sha256(copy / changed)}, recorded {sha256(saved / 'hf' / changed)})" in error
    assert error.count("recorded") == 1  # that shard alone


@pytest.mark.slow
def test_verify_passes_on_the_shards_converted(converted):
    result = zoo_inline("verify", converted[0])
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "parity against transformers (separate process)" in result.stderr and "parity passed" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, given, framework, classes",
    [
        ("timm", "model-00003-of-00008.safetensors", "timm", 10),  # huggingface_hub's save of timm's state dict
        ("hf_bin", BIN_INDEX, "transformers", 3),  # pickle shards, named by their index
    ],
)
def test_other_sharded_saves_convert_against_their_framework(name, given, framework, classes, saved, tmp_path):
    out = tmp_path / "out"
    result = zoo_inline("convert", "--checkpoint", saved / name / given, "--out", out)
    assert result.exit_code == 0, result.stderr[-3000:]
    folder = open_folder(out)
    report, recorded = folder.parity, folder.config.source
    assert report["passed"] and report["versions"]["reference"] == framework
    logits = next(c for c in report["comparisons"] if c["name"] == "logits")
    assert logits["max_abs"] <= 1e-4 and logits["rel"] <= 1e-5
    index = BIN_INDEX if name == "hf_bin" else INDEX
    assert recorded.filename == index and set(recorded.files) == {index, *shard_names(saved / name, index)}
    assert folder.config.num_classes == classes


@pytest.mark.slow
def test_a_hub_repo_holding_only_a_sharded_save_converts_and_verifies(saved, tmp_path, monkeypatch):
    """`zoo convert hf://ORG/REPO` downloads the index and every shard it lists at one commit (the local
    Hub server, over HTTP); `zoo verify` fetches them again and checks each."""
    from huggingface_hub import HfApi, constants

    with local_hub(tmp_path / "server", lfs_threshold=1024) as url:
        for attr, value in (
            ("ENDPOINT", url),
            ("HF_HUB_OFFLINE", False),
            ("HF_HUB_DISABLE_XET", True),
            ("HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
        ):
            monkeypatch.setattr(constants, attr, value)
        monkeypatch.delenv("HF_HUB_OFFLINE")
        api = HfApi(endpoint=url, token="hf_test")
        api.create_repo("someone/sharded-finetune")
        commit = api.upload_folder(repo_id="someone/sharded-finetune", folder_path=saved / "hf").oid
        out = tmp_path / "out"
        result = zoo_inline("convert", "hf://someone/sharded-finetune", "--out", out)
        assert result.exit_code == 0, result.stderr[-3000:]
        verified = zoo_inline("verify", out)
        assert verified.exit_code == 0, verified.stderr[-3000:]
    recorded = open_folder(out).config.source
    assert (recorded.kind, recorded.repo_id, recorded.revision, recorded.filename) == (
        "hub",
        "someone/sharded-finetune",
        commit,
        INDEX,
    )
    assert recorded.files == {name: sha256(saved / "hf" / name) for name in [INDEX, *shard_names(saved / "hf")]}
    assert recorded.sha256 == source.local(saved / "hf").sha256


def test_a_hub_repo_missing_a_shard_is_refused_naming_it(saved, isolated_home):
    """From the Hub cache (offline): the index is there, one shard it lists is not."""
    from tests.support.hub_cache import add_file

    cache = isolated_home / "hub"  # the test's own Hub cache (conftest.py)
    commit = "c" * 40
    shards = shard_names(saved / "hf")
    for name in [INDEX, "config.json", *shards[:-1]]:
        add_file(cache, "someone/sharded", name, (saved / "hf" / name).read_bytes(), commit=commit)
    with pytest.raises(SourceError, match=f"someone/sharded/{shards[-1]}, a shard {INDEX} lists, is not in the local"):
        source.fetch_repo("someone/sharded")
    add_file(cache, "someone/sharded", shards[-1], (saved / "hf" / shards[-1]).read_bytes(), commit=commit)
    fetched = source.fetch_repo("someone/sharded")
    assert fetched.revision == commit and fetched.files == source.local(saved / "hf").files
