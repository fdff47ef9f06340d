"""Key layouts of PyTorch ConvNeXt checkpoints, renamed to timm's module paths by name (never by position).

Each layout is data: a key that only it has, the framework that runs it, an ordered table of
renames to timm's keys, and the keys of another model its checkpoints may hold beside the ConvNeXt.
Numpy only (this module also runs inside the PyTorch reference process).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from zoo.core.errors import SourceError


def _rules(*pairs: tuple[str, str | Callable[[re.Match], str]]) -> tuple[tuple[re.Pattern, str], ...]:
    return tuple((re.compile(pattern), repl) for pattern, repl in pairs)


def patterns(*regexes: str) -> tuple[re.Pattern, ...]:
    """`Layout.foreign` from regexes, each matched at the start of a key."""
    return tuple(re.compile(regex) for regex in regexes)


@dataclass(frozen=True)
class Layout:
    """One way PyTorch code names a ConvNeXt's tensors.

    Attributes:
        name: `timm`, `fb`, `transformers` or `torchvision`.
        framework: the library whose own model class runs checkpoints of this layout (the
            parity reference): timm, transformers or torchvision.
        signature: matches a key that only this layout has.
        rules: renames to timm's keys, applied in order to every key (`re.sub`).
        foreign: match the keys of another model that checkpoints of this layout hold beside the
            ConvNeXt (a segmentation model's decode and auxiliary heads): left out when read, never
            converted and never refused (`patterns`); the ConvNeXt's own keys may then share a
            prefix of their own (`backbone.`), removed as a wrapper's.
        back: the way back, renames from timm's keys to this layout's (`from_timm`), applied in
            order; empty for a layout nothing is written in (FB's: its framework, timm, reads it).
        unit_axes: how this layout stores timm's `(C,)` vector parameters (`_VECTORS`): a regex
            on the timm key and the shape with C in place of -1 (torchvision's LayerScale
            `(C, 1, 1)`, transformers' GRN `(1, 1, 1, C)`).
    """

    name: str
    framework: str
    signature: re.Pattern
    rules: tuple[tuple[re.Pattern, str], ...]
    foreign: tuple[re.Pattern, ...] = ()
    back: tuple[tuple[re.Pattern, str], ...] = ()
    unit_axes: tuple[tuple[re.Pattern, tuple[int, ...]], ...] = ()

    def timm_key(self, key: str) -> str:
        for pattern, repl in self.rules:
            key = pattern.sub(repl, key)
        return key

    def own_key(self, key: str) -> str:
        """A timm key as this layout names it (`back`)."""
        for pattern, repl in self.back:
            key = pattern.sub(repl, key)
        return key

    def is_foreign(self, key: str) -> bool:
        """True for a key of another model (`foreign`)."""
        return any(pattern.match(key) for pattern in self.foreign)

    def places(self, key: str) -> bool:
        """True for a key this layout renames to a timm ConvNeXt's, or leaves as another model's."""
        return self.is_foreign(key) or bool(TIMM_KEY.match(self.timm_key(key)))


# The modules a dense-prediction model holds beside its ConvNeXt backbone: mmsegmentation's and
# transformers' UperNet heads, mmdetection's necks and heads (Mask R-CNN, Cascade, FPN).
DENSE_HEADS = patterns(
    r"decode_head\.",
    r"auxiliary_head\.",
    r"neck\.",
    r"rpn_head\.",
    r"roi_head\.",
    r"bbox_head\.",
    r"mask_head\.",
)

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("timm", "timm", re.compile(r"^stem\.\d+\.weight$"), (), DENSE_HEADS, back=()),
        # the official releases (facebookresearch/ConvNeXt, ConvNeXt-V2)
        Layout(
            "fb",
            "timm",
            re.compile(r"^downsample_layers\.0\.0\.weight$"),
            _rules(
                (r"^downsample_layers\.0\.", "stem."),
                (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
                (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
                (r"\.dwconv\.", ".conv_dw."),
                (r"\.pwconv(\d)\.", r".mlp.fc\1."),
                (r"\.grn\.gamma$", ".mlp.grn.weight"),
                (r"\.grn\.beta$", ".mlp.grn.bias"),
                (r"^norm\.", "head.norm."),
                (r"^head\.(weight|bias)$", r"head.fc.\1"),
            ),
            # the segmentation and detection releases: `norm0`..`norm3` normalise each output (timm's name too)
            DENSE_HEADS,
        ),
        # Hugging Face transformers ConvNext/ConvNextV2 (ForImageClassification, or the bare Model
        # without the `convnext.` prefix); its final LayerNorm's eps is the config's layer_norm_eps
        Layout(
            "transformers",
            "transformers",
            re.compile(r"^(convnext(v2)?\.)?embeddings\.patch_embeddings\.weight$"),
            _rules(
                (r"^convnext(v2)?\.", ""),
                (r"^embeddings\.patch_embeddings\.", "stem.0."),
                (r"^embeddings\.layernorm\.", "stem.1."),
                (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
                (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
                (r"\.dwconv\.", ".conv_dw."),
                (r"\.blocks\.(\d+)\.layernorm\.", r".blocks.\1.norm."),
                (r"\.pwconv(\d)\.", r".mlp.fc\1."),
                (r"\.layer_scale_parameter$", ".gamma"),
                (r"\.grn\.", ".mlp.grn."),
                (r"^layernorm\.", "head.norm."),
                (r"^classifier\.", "head.fc."),
                # ConvNextBackbone's per-output norms, by stage name (stage1..stage4: stage index + 1)
                (r"^hidden_states_norms\.stage([1-4])\.", lambda m: f"norm{int(m[1]) - 1}."),
            ),
            DENSE_HEADS,  # UperNetForSemanticSegmentation: the backbone under `backbone.`
            # ConvNextModel's keys (ForImageClassification's put `convnext.`/`convnextv2.` before all but `classifier.`)
            back=_rules(
                (r"^stem\.0\.", "embeddings.patch_embeddings."),
                (r"^stem\.1\.", "embeddings.layernorm."),
                (r"^stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
                (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2."),
                (r"\.conv_dw\.", ".dwconv."),
                (r"(\.layers\.\d+)\.norm\.", r"\1.layernorm."),
                (r"\.mlp\.fc(\d)\.", r".pwconv\1."),
                (r"\.gamma$", ".layer_scale_parameter"),
                (r"\.mlp\.grn\.", ".grn."),
                (r"^head\.norm\.", "layernorm."),
                (r"^head\.fc\.", "classifier."),
                (r"^norm([0-3])\.", lambda m: f"hidden_states_norms.stage{int(m[1]) + 1}."),
            ),
            unit_axes=((re.compile(r"\.mlp\.grn\."), (1, 1, 1, -1)),),
        ),
        # torchvision.models.convnext_*: features.0 stem, odd features stages, even ones downsample
        Layout(
            "torchvision",
            "torchvision",
            re.compile(r"^features\.0\.0\.weight$"),
            _rules(
                (r"^features\.0\.", "stem."),
                (r"^features\.1\.(\d+)\.", r"stages.0.blocks.\1."),
                (r"^features\.2\.", "stages.1.downsample."),
                (r"^features\.3\.(\d+)\.", r"stages.1.blocks.\1."),
                (r"^features\.4\.", "stages.2.downsample."),
                (r"^features\.5\.(\d+)\.", r"stages.2.blocks.\1."),
                (r"^features\.6\.", "stages.3.downsample."),
                (r"^features\.7\.(\d+)\.", r"stages.3.blocks.\1."),
                (r"\.block\.0\.", ".conv_dw."),
                (r"\.block\.2\.", ".norm."),
                (r"\.block\.3\.", ".mlp.fc1."),
                (r"\.block\.5\.", ".mlp.fc2."),
                (r"\.layer_scale$", ".gamma"),
                (r"^classifier\.0\.", "head.norm."),
                (r"^classifier\.2\.", "head.fc."),
            ),
            back=_rules(
                (r"^stem\.", "features.0."),
                (r"^stages\.0\.blocks\.(\d+)\.", r"features.1.\1."),
                (r"^stages\.1\.downsample\.", "features.2."),
                (r"^stages\.1\.blocks\.(\d+)\.", r"features.3.\1."),
                (r"^stages\.2\.downsample\.", "features.4."),
                (r"^stages\.2\.blocks\.(\d+)\.", r"features.5.\1."),
                (r"^stages\.3\.downsample\.", "features.6."),
                (r"^stages\.3\.blocks\.(\d+)\.", r"features.7.\1."),
                (r"\.conv_dw\.", ".block.0."),
                (r"^(features\.\d\.\d+)\.norm\.", r"\1.block.2."),
                (r"\.mlp\.fc1\.", ".block.3."),
                (r"\.mlp\.fc2\.", ".block.5."),
                (r"\.gamma$", ".layer_scale"),
                (r"^head\.norm\.", "classifier.0."),
                (r"^head\.fc\.", "classifier.2."),
            ),
            unit_axes=((re.compile(r"\.gamma$"), (-1, 1, 1)),),
        ),
    )
}

# Every key a timm ConvNeXt can hold, and a backbone's per-output norms (`norm0`..`norm3`, stage
# index): what a layout must rename a key into.
TIMM_KEY = re.compile(
    r"^(stem\.\d+|stages\.\d+\.downsample\.\d+|norm_pre|norm[0-3]|head\.(norm|fc|pre_logits\.fc)"
    r"|stages\.\d+\.blocks\.\d+\.(conv_dw|norm|mlp\.fc[12]|mlp\.grn))\.(weight|bias)$"
    r"|^stages\.\d+\.blocks\.\d+\.gamma$"
)
# Wrappers whose prefix every key of a saved model carries: DDP, torch.compile, Lightning-style
# modules, detection backbones.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.")
# Parameters timm holds as vectors that other layouts store with extra unit axes: LayerScale
# (torchvision: (C, 1, 1)) and GRN (FB, transformers: (1, 1, 1, C)).
_VECTORS = re.compile(r"(\.gamma|\.mlp\.grn\.(weight|bias))$")


def strip_prefix(state_dict: dict) -> tuple[dict, str]:
    """Remove wrapper prefixes (`module.`, `model.`, ...) that every key shares.

    Returns:
        The state dict and the prefix removed (`""` for none).
    """
    removed = ""
    while state_dict:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        removed += prefix
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict, removed


def detect(keys, hint: str | None = None) -> Layout:
    """The layout of a state dict's keys (prefixes already stripped): its signature matches one of
    them, and it places every one (renamed to a timm ConvNeXt's, or left as another model's).

    Args:
        keys: the state dict's keys.
        hint: the layout a config file next to the weights names (`transformers`, `timm`); the
            keys must agree with it.

    Raises:
        SourceError: no layout matches, or keys it cannot place; the message names the closest
            layout and its first differences.
    """
    keys = list(keys)
    found = [layout for layout in LAYOUTS.values() if any(layout.signature.match(k) for k in keys)]
    if len(found) > 1:
        raise SourceError(f"the checkpoint mixes the {' and '.join(f.name for f in found)} key layouts")
    if found and hint is not None and found[0].name != hint:
        raise SourceError(f"its config file says the {hint} layout but the keys are in the {found[0].name} layout")
    if found:
        unknown = [k for k in keys if not found[0].places(k)]
        if not unknown:
            return found[0]
        raise SourceError(
            f"{len(unknown)} of {len(keys)} keys have no place in a ConvNeXt of the {found[0].name} "
            f"layout:\n{_listed(unknown)}"
        )
    closest, unknown = _closest(keys)
    raise SourceError(
        f"not a ConvNeXt checkpoint in a known layout (timm, fb, transformers, torchvision); the closest is "
        f"{closest.name}, where {len(unknown)} of {len(keys)} keys have no place:\n{_listed(unknown)}"
    )


def _listed(keys: list[str], shown: int = 8) -> str:
    more = f"\n  ... and {len(keys) - shown} more" if len(keys) > shown else ""
    return "\n".join(f"  {k}" for k in keys[:shown]) + more


def _closest(keys: list[str]) -> tuple[Layout, list[str]]:
    """The layout whose names the keys use most (keys it renames or places), and the keys it cannot place."""

    def score(layout: Layout) -> tuple[int, int]:
        renamed = [layout.timm_key(k) for k in keys]
        used = sum(new != k or bool(TIMM_KEY.match(new)) for k, new in zip(keys, renamed, strict=True))
        return used, sum(bool(TIMM_KEY.match(new)) for new in renamed)

    best = max(LAYOUTS.values(), key=score)
    return best, [k for k in keys if not best.places(k)]


@dataclass(frozen=True)
class Recognised:
    """The ConvNeXt's tensors of a state dict, named as the checkpoint names them (`recognise`).

    Attributes:
        state: its tensors, keys as stored less the wrapper prefix.
        layout: their key layout.
        prefix: the wrapper prefix every key carried (`module.`; `""` for none), removed.
        left: how many keys of another model (the layout's `foreign`) were left out.
    """

    state: dict
    layout: Layout
    prefix: str
    left: int


def recognise(state_dict: dict, hint: str | None = None) -> Recognised:
    """The wrapper prefix every key shares removed, the layout detected (`detect`) and the keys
    that layout declares another model's left out; the prefix the ConvNeXt's own keys then share
    (a segmentation model's `backbone.`) removed too.

    Raises:
        SourceError: no known layout, or keys with no place in it.
    """
    state, prefix = strip_prefix(state_dict)
    declared = {k for k in state if any(layout.is_foreign(k) for layout in LAYOUTS.values())}
    own, inner = strip_prefix({k: v for k, v in state.items() if k not in declared})
    if not inner:
        _refuse_other_modules(own)
    layout = detect([*own, *declared], hint)  # the layout found must declare them itself
    return Recognised(own, layout, prefix + inner, len(declared))


def _refuse_other_modules(state: dict) -> None:
    """A ConvNeXt under a wrapper prefix (`backbone.`) beside modules no layout declares: name those."""
    for wrapper in WRAPPER_PREFIXES:
        under = [k[len(wrapper) :] for k in state if k.startswith(wrapper)]
        found = next((layout for layout in LAYOUTS.values() if any(map(layout.signature.match, under))), None)
        others = [k for k in state if not k.startswith(wrapper)]
        if found is not None and others:
            raise SourceError(
                f"{len(others)} of {len(state)} keys have no place in a ConvNeXt of the {found.name} layout (its "
                f"keys are under {wrapper!r}; these are another model's, which no layout declares):\n{_listed(others)}"
            )


def to_timm(state_dict: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """Rename a state dict of `layout` to timm's keys; vectors stored with unit axes become `(C,)`.

    Raises:
        SourceError: two keys map to one, or a vector parameter has an impossible shape.
    """
    out = {}
    for key, value in state_dict.items():
        new = layout.timm_key(key)
        if _VECTORS.search(new) and value.ndim != 1:
            if value.ndim == 0 or value.size != max(value.shape):
                raise SourceError(
                    f"{key}: a per-channel parameter of shape {value.shape}; expected (C,) or C with unit axes"
                )
            value = value.reshape(-1)
        if new in out:
            raise SourceError(f"two {layout.name} keys map to {new!r}")
        out[new] = value
    return out


def fit_mlp(state_dict: dict[str, np.ndarray], conv_mlp: bool) -> dict[str, np.ndarray]:
    """The MLP weights in the form the architecture holds them: `(out, in, 1, 1)` convs for
    timm's `conv_mlp` rows, `(out, in)` linears otherwise (the same numbers either way)."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        if re.search(r"\.mlp\.fc\d\.weight$", key):
            if conv_mlp and value.ndim == 2:
                out[key] = value.reshape(*value.shape, 1, 1)
            elif not conv_mlp and value.ndim == 4 and value.shape[2:] == (1, 1):
                out[key] = value.reshape(value.shape[:2])
    return out


def is_fb_layout(state_dict: dict) -> bool:
    """True for the official FB key layout (`downsample_layers.*`, `stages.i.j.*`)."""
    return any(LAYOUTS["fb"].signature.match(k) for k in state_dict)


def from_timm(state_dict: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """The way back: a timm-keyed state dict renamed to `layout`'s keys (`Layout.back`), its vector
    parameters given the unit axes that layout stores (`Layout.unit_axes`); the values untouched.

    Each new key must read back, through the layout's own renaming (`Layout.rules`), to the timm key
    it came from: a table that disagrees with itself fails here, before anything is written.

    Raises:
        SourceError: `layout` is read only, or its two tables disagree on a key.
    """
    if layout.name != "timm" and not layout.back:
        raise SourceError(f"the {layout.name} layout is read, never written")
    out = {}
    for key, value in state_dict.items():
        new = layout.own_key(key)
        if layout.timm_key(new) != key or new in out:
            raise SourceError(f"the {layout.name} layout has no single name for {key!r} (got {new!r})")
        shape = next((s for pattern, s in layout.unit_axes if pattern.search(key)), None)
        out[new] = value.reshape([value.size if n == -1 else n for n in shape]) if shape and value.ndim == 1 else value
    return out
