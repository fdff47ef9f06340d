"""The catalogue: complete, fresh, and resolving names the way users (and timm) do."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import pytest
import timm
from timm.models import get_pretrained_cfg

import zoo
from zoo.core.catalogue import catalogue, resolve, search

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "small", "base", "large")


def test_committed_catalogue_is_what_the_generator_makes():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import generate_catalogue
    finally:
        sys.path.pop(0)
    committed = json.loads(resources.files("zoo.core").joinpath("catalogue.json").read_text())
    assert generate_catalogue.build() == committed


def test_every_timm_tag_and_the_fb_only_releases_are_catalogued():
    tags = set(timm.list_pretrained("convnext*"))
    assert len(tags) == 98 and tags <= set(catalogue())
    torchvision = {n for n in catalogue() if n.endswith(".tv_in1k")}  # tests/test_own_checkpoints.py
    assert len(torchvision) == 4
    fb_only = set(catalogue()) - tags - torchvision
    assert fb_only == {"convnext_base.fb_in1k_384", "convnext_large.fb_in1k_384"}
    for name in fb_only:
        entry = catalogue()[name]
        assert entry.hf_hub_id is None and entry.url.startswith("https://dl.fbaipublicfiles.com/convnext/")
        assert entry.input_size == (3, 384, 384) and entry.crop_pct == 1.0


def test_fb_only_aliases_and_top1():
    assert resolve("convnext_base_1k_384").name == "convnext_base.fb_in1k_384"
    assert resolve("convnext_large_1k_384").top1 == 85.5
    with pytest.raises(zoo.UnknownModelError):
        resolve("timm/convnext_base.fb_in1k_384")  # not on the Hub under timm/


def test_v2_and_feature_checkpoints():
    assert resolve("convnextv2_tiny").name == "convnextv2_tiny.fcmae_ft_in22k_in1k"
    fcmae = resolve("convnextv2_atto.fcmae")
    assert fcmae.num_classes == 0 and not fcmae.head_norm_affine
    assert resolve("convnext_tiny.dinov3_lvd1689m").head_norm_affine
    assert resolve("convnextv2_huge.fcmae_ft_in22k_in1k_512").input_size == (3, 512, 512)
    assert resolve("convnextv2_atto_1k").name == "convnextv2_atto.fcmae_ft_in1k"


@pytest.mark.parametrize("size", SIZES + ("xlarge",))
def test_fb_aliases(size):
    expected = {
        f"convnext_{size}_22k": f"convnext_{size}.fb_in22k",
        f"convnext_{size}_22k_1k": f"convnext_{size}.fb_in22k_ft_in1k",
        f"convnext_{size}_22k_1k_384": f"convnext_{size}.fb_in22k_ft_in1k_384",
    }
    if size != "xlarge":  # FB released no ImageNet-1k-only xlarge
        expected[f"convnext_{size}_1k"] = f"convnext_{size}.fb_in1k"
    for alias, name in expected.items():
        assert resolve(alias).name == name


@pytest.mark.parametrize("arch", sorted({c.architecture for c in catalogue().values()}))
def test_bare_name_is_timms_default(arch):
    assert resolve(arch).hf_hub_id == get_pretrained_cfg(arch).hf_hub_id


@pytest.mark.parametrize("name", sorted(n for n, c in catalogue().items() if c.hf_hub_id))
def test_entry_matches_timm_pretrained_cfg(name):
    entry, cfg = catalogue()[name], get_pretrained_cfg(name)
    assert entry.hf_hub_id == f"timm/{name}"
    assert (entry.num_classes, entry.input_size, entry.crop_pct, entry.crop_mode, entry.interpolation) == (
        cfg.num_classes,
        tuple(cfg.input_size),
        cfg.crop_pct,
        cfg.crop_mode,
        cfg.interpolation,
    )
    assert (entry.mean, entry.std, entry.license) == (tuple(cfg.mean), tuple(cfg.std), cfg.license)


def test_fb_urls_and_published_top1():
    tiny = resolve("convnext_tiny_1k")
    assert tiny.url == "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth"
    assert tiny.top1 == 82.1
    assert resolve("convnext_xlarge_22k_1k_384").top1 == 87.8
    assert resolve("convnext_base_22k").num_classes == 21841


def test_unknown_name_suggests_the_closest():
    with pytest.raises(zoo.UnknownModelError, match=r"did you mean 'convnext_tiny_1k'.*zoo list"):
        resolve("convnext_tny_1k")
    with pytest.raises(zoo.UnknownModelError, match="zoo list"):
        resolve("resnet50")


def test_resolution_accepts_canonical_and_hub_names():
    assert resolve("convnext_tiny.fb_in1k").name == "convnext_tiny.fb_in1k"
    assert resolve("timm/convnext_tiny.fb_in1k").name == "convnext_tiny.fb_in1k"
    assert resolve("convnext_base").name == "convnext_base.fb_in22k_ft_in1k"


def test_search_globs_and_substrings():
    assert {c.name for c in search("convnext_tiny_1k")} == {"convnext_tiny.fb_in1k"}
    names = {c.name for c in search("*_384")}
    assert names and all(n.endswith("_384") for n in names)
    assert search("no_such_model") == []
