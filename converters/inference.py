"""The network a timm-keyed state dict holds: architecture and head, read from the tensors' names and shapes.

Numpy only (this module also runs inside the PyTorch reference process).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from zoo.core.architectures import ARCHITECTURES, Architecture, make_divisible
from zoo.core.errors import SourceError

_BLOCK = re.compile(r"^stages\.(\d)\.blocks\.(\d+)\.")
_FEATURE_NORM = re.compile(r"^norm([0-3])\.(weight|bias)$")
_HEAD = ("head.norm.weight", "head.norm.bias", "head.fc.weight", "norm_pre.weight", "head.pre_logits.fc.weight")


@dataclass(frozen=True)
class Inferred:
    """What the tensors say: the architecture and the head.

    A record of its own because the tensors say nothing of the input but its channel count (the
    stem's, `arch.in_chans`), not its size or normalisation: the config files beside them
    and the user's choices add it (`converters.plan.for_checkpoint`), and only then is there a
    `Network` to check.

    Attributes:
        arch: the architecture row (named after the closest timm architecture; its fields are
            the tensors' own).
        num_classes: classifier width; 0 without a classifier.
        head_norm_affine: the head norm has weights (FCMAE and backbone saves have none).
        features: the stages whose outputs a dense-prediction backbone normalises and returns
            (`norm0`..`norm3`; its out_indices), in order; empty for a network that ends in its head.
    """

    arch: Architecture
    num_classes: int
    head_norm_affine: bool
    features: tuple[int, ...] = ()


def infer(
    state: dict[str, np.ndarray],
    *,
    mlp_form_known: bool = True,
    norm_eps: float | None = None,
    head_norm_eps: float | None = None,
) -> Inferred:
    """Read depths, widths, V1/V2, MLP form, stem, norms and head from a timm-keyed state dict.

    Args:
        state: tensors under timm's keys (`converters.layouts.to_timm`).
        mlp_form_known: the tensors say whether the MLP runs as 1x1 convs (timm's layout);
            other layouts always store linears, and the closest timm row decides.
        norm_eps, head_norm_eps: LayerNorm epsilons when a config says them (tensors cannot);
            otherwise the closest timm row's.

    Raises:
        SourceError: the tensors are not a ConvNeXt this project can build.
    """
    depths = [0, 0, 0, 0]
    for key in state:
        m = _BLOCK.match(key)
        if m and int(m[1]) < 4:
            depths[int(m[1])] = max(depths[int(m[1])], int(m[2]) + 1)
    if not all(depths):
        empty = [i for i, d in enumerate(depths) if not d]
        raise SourceError(f"not a four-stage ConvNeXt: no blocks in stage(s) {empty}")

    def tensor(key: str, *ndims: int) -> np.ndarray:
        if key not in state:
            raise SourceError(f"not a ConvNeXt this project can build: no {key}")
        if state[key].ndim not in ndims:
            raise SourceError(
                f"{key} has shape {list(state[key].shape)}; a ConvNeXt's has {' or '.join(map(str, ndims))} dimensions"
            )
        return state[key]

    dw = [tensor(f"stages.{i}.blocks.0.conv_dw.weight", 4) for i in range(4)]
    dims = tuple(int(w.shape[0]) for w in dw)
    if any(w.ndim != 4 or w.shape[1] != 1 or w.shape[2] != w.shape[3] for w in dw):
        raise SourceError(f"stages.*.blocks.0.conv_dw.weight: shapes {[w.shape for w in dw]} are not depthwise kernels")
    fc1 = tensor("stages.0.blocks.0.mlp.fc1.weight", 2, 4)
    stem = _stem_type(state, dims[0])
    fields = dict(
        depths=tuple(depths),
        dims=dims,
        kernel_size=int(dw[0].shape[-1]),
        use_grn="stages.0.blocks.0.mlp.grn.weight" in state,
        layer_scale="stages.0.blocks.0.gamma" in state,
        conv_mlp=fc1.ndim == 4,
        mlp_ratio=int(fc1.shape[0]) // dims[0],
        norm="layernorm" if "stages.0.blocks.0.norm.bias" in state else "simplenorm",
        conv_bias="stages.0.blocks.0.conv_dw.bias" in state,
        stem_type=stem,
        in_chans=int(state["stem.0.weight"].shape[1]),  # the first conv's input channels, in every stem
        head_norm_first="norm_pre.weight" in state,
        head_hidden_size=int(tensor("head.pre_logits.fc.weight", 2).shape[0])
        if "head.pre_logits.fc.weight" in state
        else None,
    )
    if len({int(w.shape[-1]) for w in dw}) != 1:
        raise SourceError("stages with different depthwise kernel sizes are not supported")
    if int(fc1.shape[0]) % dims[0]:
        raise SourceError(f"stages.0.blocks.0.mlp.fc1.weight {fc1.shape}: width not a multiple of {dims[0]}")
    row = _closest_row(fields)
    tiered_as_wide = make_divisible(dims[0] // 2) == dims[0]  # timm's tiered stem's first conv at this width
    if fields["stem_type"] == "overlap" and row.stem_type == "overlap_tiered" and tiered_as_wide:
        fields["stem_type"] = row.stem_type  # the same network
    if not mlp_form_known and row.depths == fields["depths"] and row.dims == fields["dims"]:
        fields["conv_mlp"] = row.conv_mlp  # the same numbers either way (`layouts.fit_mlp`)
    arch = row.replace(**fields, **({"norm_eps": norm_eps} if norm_eps is not None else {}))
    if head_norm_eps is not None and head_norm_eps != arch.norm_eps:
        arch = arch.replace(head_norm_eps=head_norm_eps)
    fc = tensor("head.fc.weight", 2) if "head.fc.weight" in state else None
    num_classes = int(fc.shape[0]) if fc is not None else 0
    head_norm = "norm_pre.weight" if fields["head_norm_first"] else "head.norm.weight"
    return Inferred(arch, num_classes, head_norm in state, _features(state, dims))


def _features(state: dict, dims: tuple[int, ...]) -> tuple[int, ...]:
    """The stages a backbone's per-output norms (`norm{i}`) follow: a features model has no head."""
    found = sorted({int(m[1]) for key in state if (m := _FEATURE_NORM.match(key))})
    if not found:
        return ()
    head = [key for key in _HEAD if key in state]
    if head:
        raise SourceError(
            f"the checkpoint holds per-output norms (norm{found[0]}, a dense-prediction backbone's) and a "
            f"classifier head ({head[0]}): a ConvNeXt has one or the other"
        )
    for i in found:
        for part in ("weight", "bias"):
            value = state.get(f"norm{i}.{part}")
            if value is None or value.shape != (dims[i],):
                shape = "missing" if value is None else f"of shape {list(value.shape)}"
                raise SourceError(
                    f"norm{i}.{part} is {shape}: the norm of stage {i}'s output has {dims[i]} weights and biases"
                )
    return tuple(found)


def _stem_type(state: dict, width: int) -> str:
    """timm's stems: `patch` (conv 4x4/4, norm), `overlap` (two 3x3/2 convs, norm), `overlap_tiered`
    (the first conv half as wide), `overlap_act` (a GELU between the convs: the norm is stem.3)."""
    first = state.get("stem.0.weight")
    if first is None or first.ndim != 4:
        raise SourceError("not a ConvNeXt this project can build: no stem convolution (stem.0.weight)")
    if "stem.3.weight" in state:
        return "overlap_act"
    if "stem.2.weight" in state:
        return "overlap" if first.shape[0] == width else "overlap_tiered"
    if first.shape[2:] != (4, 4):
        raise SourceError(
            f"stem.0.weight {first.shape}: only 4x4 patch stems (or timm's overlapping stems) are supported"
        )
    return "patch"


def _closest_row(fields: dict) -> Architecture:
    """The timm architecture that agrees with the most fields (same shape first): its name
    builds the PyTorch reference (timm takes every field as an argument)."""

    def score(row: Architecture) -> tuple:
        same_shape = row.depths == fields["depths"] and row.dims == fields["dims"]
        return (same_shape, row.use_grn == fields["use_grn"], sum(getattr(row, k) == v for k, v in fields.items()))

    return max(ARCHITECTURES.values(), key=score)


def check_named(named: Architecture, inferred: Architecture, mlp_form_known: bool = True) -> None:
    """A named architecture (`--arch`) must be what the tensors hold.

    Raises:
        SourceError: listing every field that differs.
    """
    # not in the tensors; in_chans is, but it is timm's `in_chans` argument to any architecture name
    skip = {"name", "norm_eps", "head_norm_eps", "in_chans"} | (set() if mlp_form_known else {"conv_mlp"})
    diffs = [
        f"{f.name}: {getattr(named, f.name)} named, {getattr(inferred, f.name)} in the checkpoint"
        for f in dataclasses.fields(Architecture)
        if f.name not in skip and getattr(named, f.name) != getattr(inferred, f.name)
    ]
    if diffs:
        raise SourceError(f"the checkpoint is not a {named.name}:\n  " + "\n  ".join(diffs))
