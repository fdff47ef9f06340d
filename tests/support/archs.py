"""Small rows of real architectures: every code path of the full network, a fraction of the cost."""

from __future__ import annotations

from zoo.core.architectures import ARCHITECTURES

SMALL_V1 = ARCHITECTURES["convnext_tiny"].replace(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
SMALL_CONV_MLP = ARCHITECTURES["convnext_atto"].replace(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
_SHAPE = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
SMALL = {
    "linear_mlp": SMALL_V1,
    "conv_mlp": SMALL_CONV_MLP,
    "v2_grn": ARCHITECTURES["convnextv2_tiny"].replace(**_SHAPE),
    "v2_grn_conv_mlp": ARCHITECTURES["convnextv2_atto"].replace(**_SHAPE),
    "simplenorm_overlap_act": ARCHITECTURES["convnext_zepto_rms_ols"].replace(**_SHAPE),
    "overlap_tiered": ARCHITECTURES["convnext_atto_ols"].replace(**_SHAPE),
    "overlap": ARCHITECTURES["convnext_nano_ols"].replace(**_SHAPE),
    "head_norm_first": ARCHITECTURES["convnext_tiny_hnf"].replace(**_SHAPE),
    "head_mlp": ARCHITECTURES["convnext_large_mlp"].replace(**_SHAPE, head_hidden_size=40),
    "eps_1e-5": ARCHITECTURES["convnext_xxlarge"].replace(**_SHAPE),
}
