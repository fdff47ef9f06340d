"""The inverse of the converter's FB renaming: timm state dict -> official FB layout."""

from __future__ import annotations

import re

import numpy as np

_TO_FB = [
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"\.conv_dw\.", ".dwconv."),
    (r"\.mlp\.fc(\d)\.", r".pwconv\1."),
    (r"\.mlp\.grn\.weight$", ".grn.gamma"),
    (r"\.mlp\.grn\.bias$", ".grn.beta"),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]


def to_fb_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FB's keys and shapes (linear MLP weights, GRN as (1,1,1,C)), downsample layers first."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _TO_FB:
            new = re.sub(pattern, repl, new)
        if ".pwconv" in new and new.endswith(".weight") and value.ndim == 4:
            value = value.reshape(value.shape[:2])
        if ".grn." in new:
            value = value.reshape(1, 1, 1, -1)
        out[new] = value
    # FB lists every downsample layer before the stages: pairing tensors by position breaks
    return dict(sorted(out.items(), key=lambda kv: not kv[0].startswith("downsample_layers.")))
