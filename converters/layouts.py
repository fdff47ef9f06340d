"""Key layouts of PyTorch ConvNeXt checkpoints, renamed to timm's module paths by name (never by position).

Numpy only (this module also runs inside the PyTorch reference process).
"""
from __future__ import annotations

import re

import numpy as np

from zoo.errors import SourceError

_FB_RULES = [  # official FB layout -> timm's module paths (order matters)
    (re.compile(r"^downsample_layers\.0\."), "stem."),
    (re.compile(r"^downsample_layers\.(\d+)\."), r"stages.\1.downsample."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"\.dwconv\."), ".conv_dw."),
    (re.compile(r"\.pwconv(\d)\."), r".mlp.fc\1."),
    (re.compile(r"\.grn\.gamma$"), ".mlp.grn.weight"),
    (re.compile(r"\.grn\.beta$"), ".mlp.grn.bias"),
    (re.compile(r"^norm\."), "head.norm."),
    (re.compile(r"^head\.(weight|bias)$"), r"head.fc.\1"),
]


def is_fb_layout(state_dict: dict) -> bool:
    """True for the official FB key layout (`downsample_layers.*`, `stages.i.j.*`)."""
    return any(k.startswith("downsample_layers.") for k in state_dict)


def normalise_keys(state_dict: dict[str, np.ndarray], conv_mlp: bool = False) -> dict[str, np.ndarray]:
    """Rename an official FB state dict to timm's keys, by name (never by position).

    timm-layout input is returned unchanged. GRN parameters, stored by FB as `(1, 1, 1, C)`,
    are flattened to timm's `(C,)`; with `conv_mlp` (timm holds the MLP as 1x1 convs) FB's
    linear MLP weights `(out, in)` become `(out, in, 1, 1)`.
    """
    if not is_fb_layout(state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _FB_RULES:
            new = pattern.sub(repl, new)
        if ".mlp.grn." in new:
            if value.ndim == 0 or value.size != value.shape[-1]:
                raise SourceError(f"{key}: a GRN parameter of shape {value.shape}; expected (C,) or (1, 1, 1, C)")
            value = value.reshape(value.shape[-1])
        elif conv_mlp and re.search(r"\.mlp\.fc\d\.weight$", new) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        if new in out:
            raise SourceError(f"two FB keys map to {new!r}")
        out[new] = value
    return out
