"""The ConvNeXt architectures as data: one frozen row per timm architecture name."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ArchitectureError, UnknownModelError

STEM_TYPES = ("patch", "overlap", "overlap_tiered", "overlap_act")
NORMS = ("layernorm", "simplenorm")
MAX_IN_CHANS = 1024  # input channels: grey (1), RGB (3), multispectral bands (4, 13, ...)


def check_features(features) -> tuple[int, ...]:
    """A dense-prediction backbone's out_indices (`features`: the stages whose normalised maps it
    returns), as a tuple: increasing stage indices in 0..3, each once (empty: a classifier).

    Raises:
        ValueError: anything else.
    """
    features = tuple(features)
    if features and (list(features) != sorted(set(features)) or not set(features) <= {0, 1, 2, 3}):
        raise ValueError(f"features must be increasing stage indices in 0..3, got {list(features)}")
    return features


@dataclass(frozen=True)
class Architecture:
    """Everything that fixes the shape of a ConvNeXt network (not its head size).

    Field names follow timm's `ConvNeXt.__init__` arguments so that the PyTorch reference can
    be built from the same row (`timm_kwargs`). A record of its own: one row serves every
    checkpoint of that network (`CatalogueEntry`), what a checkpoint's tensors turn out to be
    (`converters.inference`) and every converted folder (`FolderConfig`).

    Attributes:
        name: timm architecture name (`convnext_tiny`).
        depths: blocks per stage.
        dims: channels per stage.
        layer_scale: blocks carry a LayerScale `gamma` (V1); V2 uses GRN instead.
        use_grn: Global Response Norm in the MLP (ConvNeXt-V2).
        conv_mlp: timm runs the MLP as 1x1 convolutions; weights are `(4C, C, 1, 1)`.
        norm_eps: LayerNorm epsilon (1e-6; 1e-5 for xxlarge). Keras' default is 1e-3.
        kernel_size: depthwise kernel size.
        stem_type: `patch` (4x4/4 conv), or timm's overlapping stems.
        head_norm_first: norm before pooling (`norm_pre`), timm's `_hnf`.
        head_hidden_size: width of the pre-logits MLP in the head (`head.pre_logits.fc`).
        conv_bias: convolutions and linears carry a bias.
        mlp_ratio: MLP expansion.
        norm: `layernorm`, or timm's `simplenorm` (RMS-style: no centring, no bias).
        head_norm_eps: the head norm's epsilon when it differs from `norm_eps` (transformers'
            final LayerNorm uses its config's `layer_norm_eps`, 1e-12 by default); timm cannot
            build such a network, transformers can.
        in_chans: input channels (timm's `in_chans`: 3 for RGB, 1 for grey, more for
            multispectral images); the stem's first convolution says it.
    """

    name: str
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    layer_scale: bool = True
    use_grn: bool = False
    conv_mlp: bool = False
    norm_eps: float = 1e-6
    kernel_size: int = 7
    stem_type: str = "patch"
    head_norm_first: bool = False
    head_hidden_size: int | None = None
    conv_bias: bool = True
    mlp_ratio: int = 4
    norm: str = "layernorm"
    head_norm_eps: float | None = None
    in_chans: int = 3

    def __post_init__(self):
        """Refuse a row no trained network can have: a non-finite or non-positive epsilon makes every
        output a constant (each norm's input is divided by sqrt(x^2 + eps)), whatever the weights."""

        def fail(why: str):
            raise ArchitectureError(f"architecture {self.name!r}: {why}")

        if not isinstance(self.name, str) or not self.name:
            fail("the name must be a non-empty string")
        for field_name in ("depths", "dims"):
            value = getattr(self, field_name)
            if not isinstance(value, tuple) or len(value) != 4 or not all(_positive_int(v) for v in value):
                fail(f"{field_name} must be 4 positive integers (one per stage), got {value!r}")
        if self.stem_type not in STEM_TYPES:
            fail(f"stem_type must be one of {STEM_TYPES}, got {self.stem_type!r}")
        if self.norm not in NORMS:
            fail(f"norm must be one of {NORMS}, got {self.norm!r}")
        for field_name in ("norm_eps", "head_norm_eps"):
            value = getattr(self, field_name)
            if value is None and field_name == "head_norm_eps":
                continue
            if not _real(value) or not math.isfinite(value) or value <= 0:
                fail(f"{field_name} must be a finite number > 0, got {value!r}")
        if not _positive_int(self.kernel_size) or self.kernel_size % 2 == 0:
            fail(f"kernel_size must be a positive odd integer, got {self.kernel_size!r}")
        if not _positive_int(self.mlp_ratio):
            fail(f"mlp_ratio must be a positive integer, got {self.mlp_ratio!r}")
        if not _positive_int(self.in_chans) or self.in_chans > MAX_IN_CHANS:
            fail(f"in_chans must be a whole number of input channels in 1..{MAX_IN_CHANS}, got {self.in_chans!r}")
        if self.head_hidden_size is not None and not _positive_int(self.head_hidden_size):
            fail(f"head_hidden_size must be a positive integer or None, got {self.head_hidden_size!r}")
        for field_name in ("layer_scale", "use_grn", "conv_mlp", "head_norm_first", "conv_bias"):
            if not isinstance(getattr(self, field_name), bool):
                fail(f"{field_name} must be true or false, got {getattr(self, field_name)!r}")
        if self.head_norm_first and self.head_hidden_size:
            fail("timm has no pre-logits MLP with head_norm_first")

    @property
    def num_features(self) -> int:
        """Channels of the last stage (the pooled feature width)."""
        return self.dims[-1]

    def replace(self, **changes) -> Architecture:
        """A copy with some fields changed (small test variants, experiments)."""
        return dataclasses.replace(self, **changes)

    @property
    def head_eps(self) -> float:
        """The head norm's epsilon."""
        return self.norm_eps if self.head_norm_eps is None else self.head_norm_eps

    def timm_kwargs(self) -> dict:
        """Keyword arguments that make `timm.create_model(self.name, **kw)` this exact network.

        Raises:
            ValueError: timm cannot build it (a head-norm epsilon of its own).
        """
        if self.head_norm_eps is not None:
            raise ValueError(
                f"timm has no ConvNeXt with a head-norm epsilon ({self.head_norm_eps}) "
                f"other than the blocks' ({self.norm_eps})"
            )
        return {
            "depths": list(self.depths),
            "dims": list(self.dims),
            "ls_init_value": 1e-6 if self.layer_scale else None,
            "use_grn": self.use_grn,
            "conv_mlp": self.conv_mlp,
            "norm_eps": self.norm_eps,
            "kernel_sizes": self.kernel_size,
            "stem_type": self.stem_type,
            "head_norm_first": self.head_norm_first,
            "head_hidden_size": self.head_hidden_size,
            "conv_bias": self.conv_bias,
            "norm_layer": self.norm,
            "in_chans": self.in_chans,
        }

    def to_config(self) -> dict:
        """JSON-ready fields, the inverse of `Architecture.from_config`."""
        config = dataclasses.asdict(self)
        config["depths"], config["dims"] = list(self.depths), list(self.dims)
        if self.head_norm_eps is None:  # folders of timm's networks keep their fields
            del config["head_norm_eps"]
        if self.in_chans == 3:  # and RGB networks theirs (folders written before have no in_chans: 3)
            del config["in_chans"]
        return config

    @classmethod
    def from_config(cls, config: dict) -> Architecture:
        """Rebuild from `to_config` output (as stored in a converted folder's config.json)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}; upgrade convnext-zoo")
        values = dict(config)
        for field_name in ("depths", "dims"):
            if isinstance(values.get(field_name), list):
                values[field_name] = tuple(values[field_name])
        try:
            return cls(**values)
        except TypeError as e:  # a required field missing
            raise ArchitectureError(f"architecture fields: {e}") from None


def make_divisible(value: float, divisor: int = 8) -> int:
    """timm's `make_divisible` (round to a multiple of 8, never down by more than 10%): the width of
    the first conv of its tiered stem is `make_divisible(dims[0] // 2)`."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rows(*archs: Architecture) -> dict[str, Architecture]:
    return {a.name: a for a in archs}


_T, _S, _L = (3, 3, 9, 3), (3, 3, 27, 3), (2, 2, 6, 2)
_ATTO, _FEMTO, _PICO, _NANO = (40, 80, 160, 320), (48, 96, 192, 384), (64, 128, 256, 512), (80, 160, 320, 640)
_TINY, _BASE, _LARGE = (96, 192, 384, 768), (128, 256, 512, 1024), (192, 384, 768, 1536)
_V2 = dict(use_grn=True, layer_scale=False)

ARCHITECTURES: dict[str, Architecture] = _rows(
    # timm's small variants run the MLP as 1x1 convs (conv_mlp)
    Architecture("convnext_zepto_rms", (2, 2, 4, 2), (32, 64, 128, 256), conv_mlp=True, norm="simplenorm"),
    Architecture(
        "convnext_zepto_rms_ols",
        (2, 2, 4, 2),
        (32, 64, 128, 256),
        conv_mlp=True,
        norm="simplenorm",
        stem_type="overlap_act",
    ),
    Architecture("convnext_atto", _L, _ATTO, conv_mlp=True),
    Architecture("convnext_atto_ols", _L, _ATTO, conv_mlp=True, stem_type="overlap_tiered"),
    Architecture("convnext_femto", _L, _FEMTO, conv_mlp=True),
    Architecture("convnext_femto_ols", _L, _FEMTO, conv_mlp=True, stem_type="overlap_tiered"),
    Architecture("convnext_pico", _L, _PICO, conv_mlp=True),
    Architecture("convnext_pico_ols", _L, _PICO, conv_mlp=True, stem_type="overlap_tiered"),
    Architecture("convnext_nano", (2, 2, 8, 2), _NANO, conv_mlp=True),
    Architecture("convnext_nano_ols", (2, 2, 8, 2), _NANO, conv_mlp=True, stem_type="overlap"),
    Architecture("convnext_tiny_hnf", _T, _TINY, conv_mlp=True, head_norm_first=True),
    # the FB family
    Architecture("convnext_tiny", _T, _TINY),
    Architecture("convnext_small", _S, _TINY),
    Architecture("convnext_base", _S, _BASE),
    Architecture("convnext_large", _S, _LARGE),
    Architecture("convnext_large_mlp", _S, _LARGE, head_hidden_size=1536),
    Architecture("convnext_xlarge", _S, (256, 512, 1024, 2048)),
    Architecture("convnext_xxlarge", (3, 4, 30, 3), (384, 768, 1536, 3072), norm_eps=1e-5),
    # ConvNeXt-V2: GRN in the MLP instead of LayerScale
    Architecture("convnextv2_atto", _L, _ATTO, conv_mlp=True, **_V2),
    Architecture("convnextv2_femto", _L, _FEMTO, conv_mlp=True, **_V2),
    Architecture("convnextv2_pico", _L, _PICO, conv_mlp=True, **_V2),
    Architecture("convnextv2_nano", (2, 2, 8, 2), _NANO, conv_mlp=True, **_V2),
    Architecture("convnextv2_tiny", _T, _TINY, **_V2),
    Architecture("convnextv2_base", _S, _BASE, **_V2),
    Architecture("convnextv2_large", _S, _LARGE, **_V2),
    Architecture("convnextv2_huge", _S, (352, 704, 1408, 2816), **_V2),
)


def get_architecture(name: str) -> Architecture:
    """The architecture row for a timm architecture name.

    Raises:
        UnknownModelError: with the known names.
    """
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownModelError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None
