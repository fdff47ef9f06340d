"""The files beside the weights (transformers' `config.json` and `preprocessor_config.json`, timm's
`config.json`) and `--labels` files: every value is checked where it is read. A bad one is one
error naming the file and the field, before any slow work; a good one gives a preprocessing that
applies to a real image and exactly one name per class. Fuzzed (hypothesis), and through `zoo
convert` (an odd but good config converting and predicting end to end: tests/test_own_checkpoints.py).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.numpy import save_file

from converters.images import natural_images
from converters.metadata import MAX_INPUT, MAX_RESIZE, MIN_INPUT, SourceMetadata, parse_metadata, read_metadata
from converters.reference import random_state_dict
from tests.support.archs import SMALL
from tests.support.cli import one_line_error, zoo_cli, zoo_inline
from zoo.core.errors import SourceError, ZooError
from zoo.core.labels import parse_label_file, read_label_file
from zoo.core.preprocessing import Preprocessing, preprocess

ARCH = SMALL["conv_mlp"]  # convnext_atto's form: timm's config.json names it
TRANSFORMERS = {
    "model_type": "convnext",
    "depths": list(ARCH.depths),
    "hidden_sizes": list(ARCH.dims),
    "id2label": {"0": "cat", "1": "dog", "2": "bird"},
    "layer_norm_eps": 1e-12,
}
PROCESSOR = {
    "size": {"shortest_edge": 224},
    "crop_pct": 0.875,
    "resample": 3,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_resize": True,
    "do_normalize": True,
}
TIMM = {
    "architecture": "convnext_atto",
    "num_classes": 3,
    "label_names": ["cat", "dog", "bird"],
    "pretrained_cfg": {
        "input_size": [3, 224, 224],
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    },
    "model_args": {"norm_eps": 1e-6},
}


def write(folder: Path, config: dict | str | None = None, processor: dict | str | None = None) -> Path:
    """The config files in `folder`, replacing those there (NaN and Infinity written as Python's
    json writes them); the path of the weights file they describe (not written: the files are
    read on their own)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("config.json", config), ("preprocessor_config.json", processor)):
        if data is not None:
            (folder / name).write_bytes((data if isinstance(data, str) else json.dumps(data)).encode())
        else:
            (folder / name).unlink(missing_ok=True)
    return folder / "model.safetensors"


def refused(weights: Path, file: str) -> str:
    """The one-line SourceError reading `weights`' configs gives, which names `file` first."""
    with pytest.raises(SourceError) as raised:
        read_metadata(weights)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{weights.parent / file}: "), message
    return message


# --- each bad value: one error naming the file and the field ------------------------------------

BAD_PROCESSOR = {  # case -> (field, value, what the message says)
    "crop_pct tiny": ("crop_pct", 0.003, "crop_pct must be a number in (0, 1] and at least 0.05469 for input size 224"),
    "crop_pct negative": ("crop_pct", -1, "crop_pct must be a number in (0, 1], got -1"),
    "crop_pct NaN": ("crop_pct", float("nan"), "crop_pct must be a number in (0, 1], got nan"),
    "resample 99": ("resample", 99, "resample must be 2 (bilinear) or 3 (bicubic)"),
    "resample lanczos": ("resample", 1, "got 1 (lanczos)"),
    "size huge": ("size", {"shortest_edge": 100000}, "size.shortest_edge must be a whole number of pixels"),
    "size text": ("size", "224", "size must be"),
    "mean of 2": ("image_mean", [0.5, 0.5], "image_mean must be 3 numbers"),
    "std zero": ("image_std", [0.2, 0.0, 0.2], "image_std must be 3 numbers in [1e-06, 1000]"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROCESSOR))
def test_bad_preprocessor_values_are_one_line_naming_the_field(case, tmp_path):
    field, value, said = BAD_PROCESSOR[case]
    message = refused(write(tmp_path, TRANSFORMERS, {**PROCESSOR, field: value}), "preprocessor_config.json")
    assert said in message, message


BAD_TRANSFORMERS = {  # case -> (field, value, what the message says)
    "depths an int": ("depths", 3, "depths must be a list of 4 whole numbers > 0"),
    "hidden_sizes with a zero": ("hidden_sizes", [8, 0, 24, 32], "hidden_sizes must be"),
    "id2label keys not integers": ("id2label", {"0": "cat", "a": "dog"}, "id2label keys must be class indices"),
    "id2label a list": ("id2label", ["cat", "dog"], "id2label must be an object of class index -> name"),
    "id2label with a gap": ("id2label", {"0": "cat", "1": "dog", "7": "bird"}, "(no class 2), got [0, 1, 7]"),
    "id2label one index twice": ("id2label", {"0": "cat", "00": "dog"}, "each class index once"),
    "id2label a number as a name": ("id2label", {"0": "cat", "1": 5}, "id2label['1'] must be a class name"),
    "layer_norm_eps text": ("layer_norm_eps", "abc", "layer_norm_eps must be a finite number > 0, got 'abc'"),
    "layer_norm_eps Infinity": ("layer_norm_eps", float("inf"), "layer_norm_eps must be a finite number > 0, got inf"),
    "layer_norm_eps NaN": ("layer_norm_eps", float("nan"), "got nan"),
    "num_labels negative": ("num_labels", -3, "num_labels must be a whole number >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRANSFORMERS))
def test_bad_transformers_config_values_are_one_line_naming_the_field(case, tmp_path):
    field, value, said = BAD_TRANSFORMERS[case]
    message = refused(write(tmp_path, {**TRANSFORMERS, field: value}), "config.json")
    assert said in message, message


BAD_TIMM = {  # case -> (field: top level, or inside pretrained_cfg or model_args; value; what the message says)
    "input_size huge": ("pretrained_cfg.input_size", [3, 100000, 100000], "pretrained_cfg.input_size must be"),
    "input_size 0 channels": ("pretrained_cfg.input_size", [0, 224, 224], "input channels in [1, 1024]"),
    "mean of 2": ("pretrained_cfg.mean", [0.5, 0.5], "pretrained_cfg.mean must be 3 numbers"),
    "in_chans 0": ("model_args.in_chans", 0, "model_args.in_chans must be a whole number of input channels"),
    "interpolation with an escape": (
        "pretrained_cfg.interpolation",
        "bicubic\x1b[2J",
        r"interpolation must be one of 'bicubic', 'bilinear', got 'bicubic\x1b[2J'",
    ),
    "crop_mode border": ("pretrained_cfg.crop_mode", "border", "crop_mode must be one of 'center', 'squash'"),
    "crop_pct zero": ("pretrained_cfg.crop_pct", 0, "crop_pct must be a number in (0, 1], got 0"),
    "label_names a string": ("label_names", "cat", "label_names must be a list of class names"),
    "label_names keys not integers": (
        "label_names",
        {"0": "cat", "one": "dog", "2": "bird"},
        "label_names keys must be class indices",
    ),
    "label_names with a gap": ("label_names", {"0": "cat", "1": "dog", "3": "bird"}, "(no class 2)"),
    "label_names too few": ("label_names", ["cat", "dog"], "label_names has 2 names for num_classes 3"),
    "norm_eps NaN": ("model_args.norm_eps", float("nan"), "model_args.norm_eps must be a finite number > 0"),
    "num_classes a bool": ("num_classes", True, "num_classes must be a whole number >= 0"),
    "pretrained_cfg a list": ("pretrained_cfg", [], "pretrained_cfg must be an object"),
    "license a number": ("pretrained_cfg.license", 2, "pretrained_cfg.license must be a licence id ('apache-2.0'): "),
    "license empty": ("pretrained_cfg.license", "", "pretrained_cfg.license must be a licence id"),
    "license of two lines": ("pretrained_cfg.license", "mit\nerror: x", r"got 'mit\nerror: x'"),
    "tag a list": ("pretrained_cfg.tag", ["in1k"], "pretrained_cfg.tag must be timm's pretrained tag"),
    "test_input_size 2-D": ("pretrained_cfg.test_input_size", [288, 288], "pretrained_cfg.test_input_size must be"),
    "test_crop_pct 2": ("pretrained_cfg.test_crop_pct", 2, "test_crop_pct must be a number in (0, 1], got 2"),
}


def _set(config: dict, dotted: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *path, last = dotted.split(".")
    inner = config
    for key in path:
        inner = inner[key]
    inner[last] = value
    return config


@pytest.mark.parametrize("case", sorted(BAD_TIMM))
def test_bad_timm_config_values_are_one_line_naming_the_field(case, tmp_path):
    field, value, said = BAD_TIMM[case]
    message = refused(write(tmp_path, _set(TIMM, field, value)), "config.json")
    assert said in message, message


def test_unreadable_config_files_are_one_line(tmp_path):
    weights = write(tmp_path / "not-utf8", TRANSFORMERS)
    (tmp_path / "not-utf8" / "preprocessor_config.json").write_bytes(b'{"crop_pct": \xff}')
    assert "cannot be read" in refused(weights, "preprocessor_config.json")
    weights = write(tmp_path / "deep", "[" * 100000 + "]" * 100000)
    assert "cannot be read" in refused(weights, "config.json")
    weights = write(tmp_path / "array", TRANSFORMERS, [1, 2])
    assert "must hold a JSON object" in refused(weights, "preprocessor_config.json")


def test_label_maps_are_read_in_index_order_never_renumbered_or_dropped(tmp_path):
    """Keys "0".."N-1" in any order, as JSON writes integers; a name per class, exactly."""
    shuffled = {"2": "bird", "0": "cat", "1": "dog"}
    meta = read_metadata(write(tmp_path / "hf", {**TRANSFORMERS, "id2label": shuffled}))
    assert meta.labels == ("cat", "dog", "bird") and meta.num_classes == 3
    meta = read_metadata(write(tmp_path / "timm", {**TIMM, "label_names": shuffled}))
    assert meta.labels == ("cat", "dog", "bird") and meta.num_classes == 3


# --- --labels files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, said",
    [
        (b"cat\n\xff\xfedog\n", "not UTF-8 text"),
        (b"", "no class names"),
        (b"\n \n\r\n", "no class names"),
        (b"cat\n\ndog\n", "line 2 is empty"),
        (b"cat\x00dog\n", "not a text file"),
    ],
    ids=["not-utf8", "empty", "blank", "blank-line", "nul"],
)
def test_bad_label_files_are_one_clear_error(content, said, tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes(content)
    with pytest.raises(SourceError, match=said):
        read_label_file(path)
    result = zoo_inline("convert", "--checkpoint", tmp_path, "--labels", path)  # usage: exit 2 before any work
    assert result.exit_code == 2 and f"Invalid value for '--labels': {path}: {said}" in result.stderr, result.stderr
    assert "-> source weights" not in result.stderr


def test_label_files_keep_names_as_written(tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes("\ufeffcat \r\n  chat noir\r\n\u732b\r\n\r\n\n".encode())  # a BOM, CRLF, trailing blank lines
    assert read_label_file(path) == ["cat", "chat noir", "\u732b"]


def test_a_non_utf8_labels_file_of_eval_is_one_line(tmp_path):
    from zoo.core.errors import DatasetError
    from zoo.evaluation import samples

    (tmp_path / "data").mkdir()
    path = tmp_path / "labels.txt"
    path.write_bytes(b"a.png \xff\n")
    with pytest.raises(DatasetError, match="not UTF-8 text"):
        samples(tmp_path / "data", 10, labels_file=path)


# --- fuzzed: the readers give a usable result or one ZooError, nothing else ---------------------
#
# Each example is a config with plausible values (boundaries included), and then none, one or two
# of its fields replaced by a value drawn to be wrong: of the wrong type, out of range, or odd.

# Values of the wrong type or out of range, cheap to draw: NaN and +-Infinity (Python's json reads
# and writes them), integers past float's range, text with control characters and a lone
# surrogate (through JSON's escapes), empty and nested containers; and any number or short text.
ODD = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        2**63,
        10**400,
        0.5,
        -0.0,
        math.nan,
        math.inf,
        -math.inf,
        "",
        "abc",
        "1",
        "NaN",
        "\x1b[2J",
        "\ud800",
        [],
        [1, 2, 3],
        ["a"],
        [[1]],
        [None, 1.5],
        {},
        {"0": "x"},
        {"a": [None]},
    ]
)
ANY_JSON = ODD | st.integers() | st.floats() | st.text(max_size=8)
NAMES = st.text(max_size=8) | st.sampled_from(
    ["\x1b]0;title\x07", "\x1b[2J", "a\nerror: injected line", "", "\ud800", "\u202eevil", "LABEL_0", "  padded "]
)
INDEX_KEYS = st.integers(0, 8).map(str) | st.sampled_from(
    ["00", "01", "-1", "a", "", " 1", "1.0", "\u0663", "1_0", "9" * 30]
)
NAME_LISTS = st.lists(NAMES, max_size=8)
LABEL_MAPS = NAME_LISTS.map(lambda names: {str(i): names[i] for i in reversed(range(len(names)))})
BAD_LABEL_MAPS = st.dictionaries(INDEX_KEYS, NAMES | ODD, max_size=6) | NAME_LISTS | ANY_JSON
SIDES = st.integers(MIN_INPUT, 300) | st.sampled_from([MIN_INPUT, 384, MAX_INPUT])
BAD_SIDES = st.integers(-3, MIN_INPUT - 1) | st.integers(MAX_INPUT + 1, 10**30) | ANY_JSON
FRACTIONS = st.floats(MAX_INPUT / MAX_RESIZE, 1) | st.sampled_from([0.875, 1, 0.95, MIN_INPUT / MAX_RESIZE])
BAD_FRACTIONS = (
    st.sampled_from([0.003, 0, -1, 1.0000001, 10**400, "0.9"])
    | st.floats(max_value=0.05)
    | st.floats(min_value=1, exclude_min=True)
    | ANY_JSON
)
MEANS = st.lists(st.floats(-1000, 1000), min_size=3, max_size=3)
STDS = st.lists(st.floats(1e-6, 1000), min_size=3, max_size=3) | st.just([0.229, 0.224, 0.225])
BAD_CHANNELS = st.lists(st.floats() | st.integers(-2, 300) | ODD, max_size=4) | ANY_JSON
EPS = st.floats(1e-12, 1e-3) | st.sampled_from([1e-6, 1e-12, 1e-5])
BAD_EPS = st.sampled_from([0, -1e-6, "1e-6", 10**400, 2**2000]) | st.floats(max_value=0) | ANY_JSON
STAGES = st.lists(st.integers(1, 64), min_size=4, max_size=4)
BAD_STAGES = st.lists(st.integers(-1, 64), max_size=6) | ANY_JSON
INTERPOLATIONS = st.sampled_from(["bicubic", "bilinear"])
BAD_INTERPOLATIONS = st.sampled_from(["lanczos", "nearest", "bicubic\x1b", "BICUBIC", "random"]) | ANY_JSON
PROFILE = dict(deadline=None, suppress_health_check=list(HealthCheck))
IMAGE = Image.fromarray(natural_images(1, 64, seed=3)[0][:41, :57])  # odd sizes: both resize paths


def with_faults(data, config: dict, bad: dict) -> dict:
    """`config` with none, one or two of the fields of `bad` (field -> strategy; `a.b` a field
    inside another) set to a value drawn from it."""
    for field in data.draw(st.lists(st.sampled_from(sorted(bad)), max_size=2, unique=True)):
        outer = field.split(".")[0]
        if outer == field or isinstance(config.get(outer), dict):
            config = _set(config, field, data.draw(bad[field]))
    return config


@functools.cache
def _apply(preprocessing: Preprocessing) -> tuple:
    batch = preprocess(IMAGE, preprocessing)
    return batch.shape, bool(np.isfinite(batch).all())


def usable(preprocessing: dict | None) -> None:
    """What a conversion records can prepare a real image in bounded memory: the network's input,
    every value finite. (Applied where the resize stays under 640 pixels a side, to keep the run
    fast; above, its sizes are checked: `test_the_largest_preprocessing_allowed_applies` runs one.)"""
    if preprocessing is None:
        return
    p = Preprocessing.from_pretrained_cfg(preprocessing)
    assert max(p.input_size) <= MAX_INPUT and min(p.input_size) >= MIN_INPUT and max(p.scale_size) <= MAX_RESIZE
    if max(p.scale_size) <= 640:
        assert _apply(p) == ((1, *p.input_size, 3), True)


def test_the_largest_preprocessing_allowed_applies():
    p = Preprocessing((MAX_INPUT, MAX_INPUT), MAX_INPUT / MAX_RESIZE, "squash", "bilinear", (1000.0,) * 3, (1e-6,) * 3)
    out = preprocess(IMAGE, p)
    assert out.shape == (1, MAX_INPUT, MAX_INPUT, 3) and np.isfinite(out).all()


def _as_file(data, value) -> tuple[str, object]:
    """`value` as JSON text, or (one draw in eight) that text cut short with a few characters
    after the cut; and what the text holds (None: not JSON, the reader must refuse it)."""
    text = json.dumps(value)
    if data.draw(st.sampled_from(["json"] * 7 + ["damaged"])) == "damaged":
        text = text[: data.draw(st.integers(0, len(text)))] + data.draw(st.text(max_size=3))
    try:
        return text, json.loads(text)
    except ValueError:
        return text, None


FOLDER = Path("/fuzz/repo")  # where the fuzzed files are said to be (their contents are given: fast)


def _read(config: str | dict, processor: str | dict | None = None):
    """What config files of these contents (text, or a dict as JSON) say, or None where they were
    refused in one line naming a file."""
    files = {
        name: (text if isinstance(text, str) else json.dumps(text)).encode()
        for name, text in (("config.json", config), ("preprocessor_config.json", processor))
        if text is not None
    }
    try:
        meta = parse_metadata(FOLDER, files)
    except ZooError as e:
        assert "\n" not in str(e) and str(e).startswith(str(FOLDER) + "/"), str(e)
        event("refused")  # (--hypothesis-show-statistics: how often each outcome was met)
        return None
    event("read: preprocessing" if meta.preprocessing else "read: names" if meta.labels else "read")
    return meta


def _read_config(data, config: dict, ours) -> tuple[object, object]:
    """A config.json of `config` (maybe damaged) read: (what it says, what the file holds), or
    (None, ...) where it was refused in one line or is someone else's (`ours` false: nothing read)."""
    text, config = _as_file(data, config)
    meta = _read(text)
    if meta is None:
        return None, config
    assert config is not None  # not JSON: refused
    if not (isinstance(config, dict) and ours(config)):
        assert meta == SourceMetadata()  # someone else's config.json: nothing read from it
        return None, config
    return meta, config


def _index_order(mapping: dict) -> tuple[str, ...]:
    """An independent reading of a label map: names by the integer of each key."""
    return tuple(name for _, name in sorted((int(k), name) for k, name in mapping.items()))


@settings(max_examples=1000, **PROFILE)
@given(st.data())
def test_fuzz_transformers_config(data):
    """transformers' config.json: a checked reading or one error line. Class names are exactly the
    map's, in index order, one per class; epsilons finite and > 0; stage lists positive."""
    config = data.draw(
        st.fixed_dictionaries(
            {"model_type": st.sampled_from(["convnext", "convnextv2"])},
            optional={
                "id2label": LABEL_MAPS,
                "num_labels": st.integers(0, 20),
                "layer_norm_eps": EPS,
                "depths": STAGES,
                "hidden_sizes": STAGES,
                "patch_size": st.just(4),
                "num_channels": st.just(3),
                "hidden_act": st.just("gelu"),
                "num_stages": st.just(4),
                "label2id": ANY_JSON,
            },
        )
    )
    config = with_faults(
        data,
        config,
        {
            "id2label": BAD_LABEL_MAPS,
            "num_labels": st.integers(-3, -1) | ANY_JSON,
            "layer_norm_eps": BAD_EPS,
            "depths": BAD_STAGES,
            "hidden_sizes": BAD_STAGES,
            "patch_size": ANY_JSON,
            "num_channels": ANY_JSON,
            "hidden_act": ANY_JSON,
            "model_type": ANY_JSON,
        },
    )
    meta, config = _read_config(data, config, lambda c: c.get("model_type") in ("convnext", "convnextv2"))
    if meta is None:
        return
    assert meta.layout == "transformers" and meta.preprocessing is None
    assert math.isfinite(meta.head_norm_eps) and meta.head_norm_eps > 0
    assert all(isinstance(v, int) and v > 0 for part in meta.shape for v in part)
    id2label = config.get("id2label")
    if id2label:
        assert meta.num_classes == len(id2label)
        assert meta.labels is None or meta.labels == _index_order(id2label)
    assert meta.num_classes is None or (isinstance(meta.num_classes, int) and meta.num_classes >= 0)
    if meta.labels is not None:
        assert len(meta.labels) == meta.num_classes and all(isinstance(n, str) for n in meta.labels)


@settings(max_examples=1000, **PROFILE)
@given(st.data())
def test_fuzz_preprocessor_config(data):
    """transformers' preprocessor_config.json: a preprocessing that prepares a real image, or one
    error line."""
    processor = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "size": st.fixed_dictionaries({"shortest_edge": SIDES})
                | SIDES.map(lambda s: {"height": s, "width": s})
                | SIDES,
                "crop_pct": FRACTIONS | st.none(),
                "resample": st.sampled_from([2, 3, "bicubic", "bilinear"]),
                "image_mean": MEANS | st.floats(-1000, 1000),
                "image_std": STDS,
                "do_resize": ANY_JSON,
            },
        )
    )
    processor = with_faults(
        data,
        processor,
        {
            "size": BAD_SIDES.map(lambda s: {"shortest_edge": s}) | st.just({"height": 224, "width": 256}) | BAD_SIDES,
            "crop_pct": BAD_FRACTIONS,
            "resample": st.integers(-1, 6) | BAD_INTERPOLATIONS,
            "image_mean": BAD_CHANNELS,
            "image_std": BAD_CHANNELS,
        },
    )
    text, processor = _as_file(data, processor)
    meta = _read(TRANSFORMERS, text)
    if meta is not None:
        assert isinstance(processor, dict) and meta.preprocessing is not None
        usable(meta.preprocessing)


@settings(max_examples=1200, **PROFILE)
@given(st.data())
def test_fuzz_timm_config(data):
    """timm's config.json: preprocessing that prepares a real image, names exactly one per class
    (a list as given, a map in index order), a finite epsilon, or one error line."""
    names = data.draw(NAME_LISTS)
    config = data.draw(
        st.fixed_dictionaries(
            {"architecture": st.sampled_from(["convnext_atto", "convnext_nano_x"])},
            optional={
                "num_classes": st.just(len(names)),
                "label_names": st.sampled_from([names, {str(i): names[i] for i in reversed(range(len(names)))}]),
                "pretrained_cfg": st.fixed_dictionaries(
                    {},
                    optional={
                        "input_size": st.tuples(st.just(3), SIDES, SIDES).map(list),
                        "crop_pct": FRACTIONS,
                        "crop_mode": st.sampled_from(["center", "squash"]),
                        "interpolation": INTERPOLATIONS,
                        "mean": MEANS,
                        "std": STDS,
                        "license": st.sampled_from(["apache-2.0", "cc-by-nc-4.0", "other"]),
                        "tag": st.sampled_from(["", "fb_in1k", "ft_pets"]),
                    },
                ),
                "model_args": st.fixed_dictionaries({}, optional={"norm_eps": EPS}),
            },
        )
    )
    config = with_faults(
        data,
        config,
        {
            "num_classes": st.integers(-3, 20) | ANY_JSON,
            "label_names": BAD_LABEL_MAPS | st.text(max_size=4),
            "pretrained_cfg": ANY_JSON,
            "model_args": ANY_JSON,
            "model_args.norm_eps": BAD_EPS,
            "pretrained_cfg.input_size": st.tuples(st.sampled_from([1, 4, 3]), BAD_SIDES, SIDES).map(list) | ANY_JSON,
            "pretrained_cfg.crop_pct": BAD_FRACTIONS,
            "pretrained_cfg.interpolation": BAD_INTERPOLATIONS,
            "pretrained_cfg.crop_mode": st.sampled_from(["border", "CENTER"]) | ANY_JSON,
            "pretrained_cfg.mean": BAD_CHANNELS,
            "pretrained_cfg.std": BAD_CHANNELS,
            "pretrained_cfg.license": ANY_JSON,
        },
    )
    meta, config = _read_config(data, config, lambda c: str(c.get("architecture")).startswith("convnext"))
    if meta is None:
        return
    assert meta.layout == "timm"
    assert meta.license is None or (isinstance(meta.license, str) and meta.license.isprintable() and meta.license)
    usable(meta.preprocessing)
    assert meta.norm_eps is None or (math.isfinite(meta.norm_eps) and meta.norm_eps > 0)
    given_names = config.get("label_names")
    if meta.labels is not None:
        assert meta.labels == (tuple(given_names) if isinstance(given_names, list) else _index_order(given_names))
        assert meta.num_classes in (None, len(meta.labels))
    else:
        assert not given_names


@settings(max_examples=800, **PROFILE)
@given(st.data())
def test_fuzz_label_file(data):
    """`--labels` files: names exactly as the lines say (stripped, trailing blank lines ignored), or
    one error line: never another exception, never a name split or lost."""
    lines = data.draw(st.lists(NAMES.filter(lambda n: "\ud800" not in n), max_size=8))
    text = data.draw(st.sampled_from(["\n", "\r\n"])).join(lines) + data.draw(st.sampled_from(["", "\n", "\n\n"]))
    encoding = data.draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "bytes"]))
    blob = data.draw(st.binary(max_size=64)) if encoding == "bytes" else text.encode(encoding, "replace")
    path = FOLDER / "names.txt"
    try:
        names = parse_label_file(blob, path)
    except ZooError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        names = None
    event("refused" if names is None else "read")
    if names is not None:
        assert names and all(isinstance(n, str) and n and n == n.strip() for n in names)
        assert not any("\n" in n for n in names)
    if encoding.startswith("utf-8"):
        expected = [line.strip() for line in (text.removeprefix("\ufeff") if encoding == "utf-8" else text).split("\n")]
        while expected and not expected[-1]:
            expected.pop()
        good = expected and all(expected) and "\0" not in text
        assert names == (expected if good else None)


# --- end to end: `zoo convert` and `zoo predict` as users run them -------------------------------


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    """A timm repo folder's weights (3 classes), to put config files beside."""
    root = tmp_path_factory.mktemp("weights")
    save_file(
        {k: np.ascontiguousarray(v) for k, v in random_state_dict(ARCH, 3, seed=2).items()},
        str(root / "model.safetensors"),
    )
    return root / "model.safetensors"


def _beside(weights: Path, folder: Path, config: dict) -> Path:
    folder.mkdir()
    shutil.copyfile(weights, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_bad_config_fails_convert_in_one_line_before_any_work(timm_folder, tmp_path):
    folder = _beside(timm_folder, tmp_path / "repo", _set(TIMM, "pretrained_cfg.crop_pct", 0.003))
    proc = zoo_cli("convert", "--checkpoint", folder, "--out", tmp_path / "out")
    line = one_line_error(proc)
    assert line.startswith(f"error: {folder / 'config.json'}: pretrained_cfg.crop_pct must be a number in (0, 1]")
    assert line.endswith("got 0.003"), line
    assert "-> read" not in proc.stderr and "-> build" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field, value",
    [("label_names", "abc"), ("pretrained_cfg.input_size", [3, 100000, 100000]), ("model_args.norm_eps", "abc")],
)
def test_more_bad_configs_fail_convert_in_one_line(field, value, timm_folder, tmp_path):
    folder = _beside(timm_folder, tmp_path / "repo", _set(TIMM, field, value))
    line = one_line_error(zoo_inline("convert", "--checkpoint", folder, "--out", tmp_path / "out"))
    assert f"{folder / 'config.json'}: {field} must be" in line, line


@pytest.mark.parametrize(
    "options, said",
    [
        (["--input-size", "4000"], "input_size must be [channels, height, width]"),
        (["--std", "1e-300,1,1"], "std must be 3 numbers in [1e-06, 1000]"),
    ],
)
def test_options_out_of_range_fail_convert_in_one_line_before_any_work(options, said, timm_folder, tmp_path):
    folder = _beside(timm_folder, tmp_path / "repo", TIMM)
    result = zoo_inline("convert", "--checkpoint", folder, "--out", tmp_path / "out", *options)
    assert said in one_line_error(result) and "-> read" not in result.stderr, result.stderr
