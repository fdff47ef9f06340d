"""The ConvNeXt architectures as data: one frozen row per timm architecture name."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UnknownModelError


@dataclass(frozen=True)
class Architecture:
    """Everything that fixes the shape of a ConvNeXt network (not its head size).

    Field names follow timm's `ConvNeXt.__init__` arguments so that the PyTorch reference can
    be built from the same row (`timm_kwargs`).

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

    def __post_init__(self):
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f"{self.name}: depths and dims need 4 stages")
        if self.stem_type != "patch":
            raise NotImplementedError(f"{self.name}: stem_type {self.stem_type!r} is not supported yet")
        if self.head_norm_first or self.head_hidden_size:
            raise NotImplementedError(f"{self.name}: this head layout is not supported yet")

    @property
    def num_features(self) -> int:
        """Channels of the last stage (the pooled feature width)."""
        return self.dims[-1]

    def replace(self, **changes) -> "Architecture":
        """A copy with some fields changed (small test variants, experiments)."""
        return dataclasses.replace(self, **changes)

    def timm_kwargs(self) -> dict:
        """Keyword arguments that make `timm.create_model(self.name, **kw)` this exact network."""
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
        }

    def to_config(self) -> dict:
        """JSON-ready fields, the inverse of `Architecture.from_config`."""
        config = dataclasses.asdict(self)
        config["depths"], config["dims"] = list(self.depths), list(self.dims)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Architecture":
        """Rebuild from `to_config` output (as stored in a converted folder's config.json)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}; upgrade convnext-zoo")
        values = dict(config)
        values["depths"], values["dims"] = tuple(values["depths"]), tuple(values["dims"])
        return cls(**values)


def _rows(*archs: Architecture) -> dict[str, Architecture]:
    return {a.name: a for a in archs}


_T, _S, _L = (3, 3, 9, 3), (3, 3, 27, 3), (2, 2, 6, 2)

ARCHITECTURES: dict[str, Architecture] = _rows(
    # timm's small variants run the MLP as 1x1 convs (conv_mlp)
    Architecture("convnext_atto", _L, (40, 80, 160, 320), conv_mlp=True),
    Architecture("convnext_femto", _L, (48, 96, 192, 384), conv_mlp=True),
    Architecture("convnext_pico", _L, (64, 128, 256, 512), conv_mlp=True),
    Architecture("convnext_nano", (2, 2, 8, 2), (80, 160, 320, 640), conv_mlp=True),
    # the FB family
    Architecture("convnext_tiny", _T, (96, 192, 384, 768)),
    Architecture("convnext_small", _S, (96, 192, 384, 768)),
    Architecture("convnext_base", _S, (128, 256, 512, 1024)),
    Architecture("convnext_large", _S, (192, 384, 768, 1536)),
    Architecture("convnext_xlarge", _S, (256, 512, 1024, 2048)),
)


def get_architecture(name: str) -> Architecture:
    """The architecture row for a timm architecture name.

    Raises:
        UnknownModelError: with the known names.
    """
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}"
        ) from None
