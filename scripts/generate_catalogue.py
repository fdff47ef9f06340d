"""Regenerate checkpoints/catalogue.json from timm's pretrained configs.

Run from the repository root with the `convert` extra installed:

    python scripts/generate_catalogue.py            # rewrite checkpoints/catalogue.json
    python scripts/generate_catalogue.py --check    # exit 1 if the committed file is stale

The committed JSON is what users read: loading a model never needs timm.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import timm  # torch/timm before anything that may import tensorflow (see README)
from timm.models import get_pretrained_cfg
from timm.models._registry import _model_default_cfgs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from zoo.architectures import ARCHITECTURES  # noqa: E402  (pure data, no tensorflow)

OUT = ROOT / "checkpoints" / "catalogue.json"
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
    }


# Feature-only checkpoints (CLIP towers, DINOv3, EUPE) convert as backbones: not yet supported.
UNSUPPORTED_TAG_PREFIXES = ("clip_", "dinov3", "eupe")


def build() -> dict:
    entries = []
    for arch in ARCHITECTURES:
        tags = list(_model_default_cfgs[arch].tags)
        available = set(timm.list_pretrained(arch))
        pretrained = [t for t in tags if f"{arch}.{t}" in available
                      and not t.startswith(UNSUPPORTED_TAG_PREFIXES)]
        for tag in pretrained:
            entries.append(entry(f"{arch}.{tag}", is_default=tag == pretrained[0]))
    missing = set(OFFICIAL_TOP1) - {e["name"] for e in entries}
    if missing:
        raise SystemExit(f"top-1 given for unknown checkpoints: {sorted(missing)}")
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
