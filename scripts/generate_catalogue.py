"""Regenerate zoo/core/catalogue.json from timm's pretrained configs.

Run from the repository root with the `convert` extra installed:

    python scripts/generate_catalogue.py            # rewrite zoo/core/catalogue.json
    python scripts/generate_catalogue.py --check    # exit 1 if the committed file is stale

The committed JSON is what users read: loading a model never needs timm.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path

import timm  # torch/timm before anything that may import tensorflow (see README)
from timm.models import get_pretrained_cfg
from timm.models._registry import _model_default_cfgs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from zoo.core.architectures import ARCHITECTURES  # noqa: E402  (pure data, no tensorflow)

OUT = ROOT / "zoo" / "core" / "catalogue.json"
FB_PREFIX = "https://dl.fbaipublicfiles.com/convnext/"

# ImageNet-1k top-1 (%) published with the official checkpoints: ConvNeXt paper (arXiv
# 2201.03545) tables 1 and 12, and the facebookresearch/ConvNeXt README.
OFFICIAL_TOP1 = {
    "convnext_tiny.fb_in1k": 82.1,
    "convnext_small.fb_in1k": 83.1,
    "convnext_base.fb_in1k": 83.8,
    "convnext_large.fb_in1k": 84.3,
    "convnext_tiny.fb_in22k_ft_in1k": 82.9,
    "convnext_small.fb_in22k_ft_in1k": 84.6,
    "convnext_base.fb_in22k_ft_in1k": 85.8,
    "convnext_large.fb_in22k_ft_in1k": 86.6,
    "convnext_xlarge.fb_in22k_ft_in1k": 87.0,
    "convnext_tiny.fb_in22k_ft_in1k_384": 84.1,
    "convnext_small.fb_in22k_ft_in1k_384": 85.8,
    "convnext_base.fb_in22k_ft_in1k_384": 86.8,
    "convnext_large.fb_in22k_ft_in1k_384": 87.5,
    "convnext_xlarge.fb_in22k_ft_in1k_384": 87.8,
    "convnext_base.fb_in1k_384": 85.1,
    "convnext_large.fb_in1k_384": 85.5,
    # ConvNeXt V2 paper (arXiv 2301.00808) and the facebookresearch/ConvNeXt-V2 README
    "convnextv2_atto.fcmae_ft_in1k": 76.7,
    "convnextv2_femto.fcmae_ft_in1k": 78.5,
    "convnextv2_pico.fcmae_ft_in1k": 80.3,
    "convnextv2_nano.fcmae_ft_in1k": 81.9,
    "convnextv2_tiny.fcmae_ft_in1k": 83.0,
    "convnextv2_base.fcmae_ft_in1k": 84.9,
    "convnextv2_large.fcmae_ft_in1k": 85.8,
    "convnextv2_huge.fcmae_ft_in1k": 86.3,
    "convnextv2_nano.fcmae_ft_in22k_in1k": 82.1,
    "convnextv2_nano.fcmae_ft_in22k_in1k_384": 83.4,
    "convnextv2_tiny.fcmae_ft_in22k_in1k": 83.9,
    "convnextv2_tiny.fcmae_ft_in22k_in1k_384": 85.1,
    "convnextv2_base.fcmae_ft_in22k_in1k": 86.8,
    "convnextv2_base.fcmae_ft_in22k_in1k_384": 87.7,
    "convnextv2_large.fcmae_ft_in22k_in1k": 87.3,
    "convnextv2_large.fcmae_ft_in22k_in1k_384": 88.2,
    "convnextv2_huge.fcmae_ft_in22k_in1k_384": 88.7,
    "convnextv2_huge.fcmae_ft_in22k_in1k_512": 88.9,
}


def fb_aliases(url: str) -> list[str]:
    """FB's own names for a checkpoint: the file stem and its short form.

    `convnext_tiny_1k_224_ema.pth` -> [`convnext_tiny_1k`, `convnext_tiny_1k_224_ema`].
    """
    if not url.startswith(FB_PREFIX):
        return []
    stem = url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    short = stem.removesuffix("_ema").removesuffix("_224")
    return [short] if short == stem else [short, stem]


@functools.cache
def count_params(arch: str, num_classes: int, head_norm_affine: bool) -> int:
    model = timm.create_model(arch, num_classes=num_classes, device="meta")
    return sum(
        p.numel() for key, p in model.state_dict().items() if head_norm_affine or not key.startswith("head.norm.")
    )


def entry(name: str, is_default: bool) -> dict:
    cfg = get_pretrained_cfg(name)
    repo_id = cfg.hf_hub_id if cfg.hf_hub_id and cfg.hf_hub_id != "timm/" else f"timm/{name}"
    return {
        "name": name,
        "architecture": cfg.architecture,
        "tag": cfg.tag,
        "default": is_default,
        "aliases": fb_aliases(cfg.url or ""),
        "hf_hub_id": repo_id,
        "hf_hub_filename": cfg.hf_hub_filename or "model.safetensors",
        "url": cfg.url or None,
        "num_classes": cfg.num_classes,
        "input_size": list(cfg.input_size),
        "test_input_size": list(cfg.test_input_size) if cfg.test_input_size else None,
        "crop_pct": cfg.crop_pct,
        "test_crop_pct": cfg.test_crop_pct,
        "crop_mode": cfg.crop_mode,
        "interpolation": cfg.interpolation,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "license": cfg.license,
        "top1": OFFICIAL_TOP1.get(name),
        "origin_url": cfg.origin_url,
        # FCMAE pre-training ships no head norm; timm runs its identity initialisation
        "head_norm_affine": cfg.tag != "fcmae",
        "params": count_params(cfg.architecture, cfg.num_classes, cfg.tag != "fcmae"),
    }


# Official FB releases that timm carries no tag for: converted from FB's file (FB key layout).
# Preprocessing as FB evaluates at 384: resize to 384x384, no crop.
FB_ONLY = {
    "convnext_base.fb_in1k_384": ("convnext_base.fb_in1k", "convnext_base_1k_384.pth", 85.1),
    "convnext_large.fb_in1k_384": ("convnext_large.fb_in1k", "convnext_large_1k_384.pth", 85.5),
}


def fb_only_entry(name: str) -> dict:
    base, filename, top1 = FB_ONLY[name]
    row = entry(base, is_default=False)
    arch, tag = name.split(".")
    row.update(
        name=name,
        tag=tag,
        aliases=fb_aliases(FB_PREFIX + filename),
        hf_hub_id=None,
        hf_hub_filename=None,
        url=FB_PREFIX + filename,
        input_size=[3, 384, 384],
        test_input_size=None,
        crop_pct=1.0,
        test_crop_pct=None,
        crop_mode="squash",
        top1=top1,
    )
    return row


# torchvision's own ImageNet-1k training of ConvNeXt (not FB's weights): timm has no tag for them,
# so they take timm's name for torchvision weights, `ARCH.tv_in1k`. Their eval transform resizes
# the shorter side to `resize_size` (bilinear, antialiased) and crops `crop_size`.
TORCHVISION = {
    "convnext_tiny": "ConvNeXt_Tiny_Weights",
    "convnext_small": "ConvNeXt_Small_Weights",
    "convnext_base": "ConvNeXt_Base_Weights",
    "convnext_large": "ConvNeXt_Large_Weights",
}
TORCHVISION_RECIPE = "https://github.com/pytorch/vision/tree/main/references/classification#convnext"


def crop_pct_for(resize: int, crop: int) -> float:
    """The crop fraction whose `floor(crop / crop_pct)` is exactly `resize` (timm's preprocessing
    takes the fraction, torchvision states the resize size)."""
    pct = crop / resize
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def torchvision_entry(arch: str) -> dict:
    import torchvision.models as tvm

    weights = getattr(tvm, TORCHVISION[arch]).IMAGENET1K_V1
    transform = weights.transforms()
    resize, crop = transform.resize_size[0], transform.crop_size[0]
    row = entry(next(n for n in timm.list_pretrained(arch) if n.endswith("fb_in1k")), is_default=False)
    row.update(
        name=f"{arch}.tv_in1k",
        tag="tv_in1k",
        aliases=[],
        hf_hub_id=None,
        hf_hub_filename=None,
        url=weights.url,
        input_size=[3, crop, crop],
        test_input_size=None,
        crop_pct=crop_pct_for(resize, crop),
        test_crop_pct=None,
        crop_mode="center",
        interpolation=transform.interpolation.value,
        mean=list(transform.mean),
        std=list(transform.std),
        license="bsd-3-clause",
        top1=weights.meta["_metrics"]["ImageNet-1K"]["acc@1"],
        origin_url=TORCHVISION_RECIPE,
        params=weights.meta["num_params"],
    )
    return row


def build() -> dict:
    entries = []
    for arch in ARCHITECTURES:
        tags = list(_model_default_cfgs[arch].tags)
        available = set(timm.list_pretrained(arch))
        pretrained = [t for t in tags if f"{arch}.{t}" in available]
        for tag in pretrained:
            entries.append(entry(f"{arch}.{tag}", is_default=tag == pretrained[0]))
        entries += [fb_only_entry(n) for n in FB_ONLY if n.split(".")[0] == arch]
        if arch in TORCHVISION:
            entries.append(torchvision_entry(arch))
    for e in entries:
        if not e["name"].endswith(".tv_in1k"):  # torchvision's weights state their own
            e["top1"] = OFFICIAL_TOP1.get(e["name"])
    missing = set(OFFICIAL_TOP1) - {e["name"] for e in entries}
    if missing:
        raise SystemExit(f"top-1 given for unknown checkpoints: {sorted(missing)}")
    spellings = [s for e in entries for s in (e["name"], *e["aliases"])]
    if len(spellings) != len(set(spellings)):
        raise SystemExit("an alias names two checkpoints")
    uncovered = set(timm.list_pretrained("convnext*")) - {e["name"] for e in entries}
    if uncovered:
        raise SystemExit(f"pretrained tags without an architecture row: {sorted(uncovered)}")
    return {
        "generated_by": "scripts/generate_catalogue.py",
        "timm_version": timm.__version__,
        "checkpoints": entries,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file differs")
    args = parser.parse_args()
    text = json.dumps(build(), indent=1) + "\n"
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/generate_catalogue.py", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, OUT)
    print(f"wrote {len(json.loads(text)['checkpoints'])} checkpoints to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
