"""The way back to PyTorch: what timm, transformers and torchvision load, as data.

Each `Target` says what its framework's ConvNeXt can hold (an architecture it cannot express is
named before anything is written), the layout its weights are keyed in (`converters.layouts`),
and the files its own loader reads beside them: timm's `config.json` (`create_model("hf-hub:...")`,
`"local-dir:..."`), transformers' `save_pretrained` folder, torchvision's state dict. Numpy only:
the files are written without torch, and proven by the framework itself in the reference process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from zoo.core.architectures import ARCHITECTURES, Architecture
from zoo.core.errors import ExportError

from .layouts import LAYOUTS, fit_mlp, from_timm

WEIGHTS = "model.safetensors"
TIMM_CONFIG = "config.json"
TRANSFORMERS_CONFIG = "config.json"
PROCESSOR_CONFIG = "preprocessor_config.json"
# transformers' blocks, stem and downsampling LayerNorms have a fixed epsilon; torchvision's every one
FIXED_EPS = 1e-6
# torchvision's four builders: `torchvision.models.convnext_tiny(num_classes=N)` and its siblings
TORCHVISION_SIZES = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL's numbers, as transformers' processors store them


@dataclass(frozen=True)
class Described:
    """A Keras ConvNeXt as the way back sees it: its network, head and the facts a user's framework
    keeps beside the weights.

    Attributes:
        name: the model's name.
        arch: its architecture row.
        num_classes: classifier width (0: the pooled pre-logits are the output).
        head_norm_affine: the head norm has weights (FCMAE's has none).
        labels: a name per class, or None.
        pretrained_cfg: timm's preprocessing facts (`input_size`, `crop_pct`, `crop_mode`,
            `interpolation`, `mean`, `std`; `license` when known).
        features: a dense-prediction backbone's out_indices (its per-output norms); empty for a classifier.
    """

    name: str
    arch: Architecture
    num_classes: int
    head_norm_affine: bool
    labels: tuple[str, ...] | None
    pretrained_cfg: dict
    features: tuple[int, ...] = ()

    @property
    def input_size(self) -> int:
        return int(self.pretrained_cfg["input_size"][-1])


@dataclass(frozen=True)
class Target:
    """One framework a Keras ConvNeXt goes back to.

    Attributes:
        name: `timm`, `transformers` or `torchvision`.
        layout: the key layout its weights are written in (`converters.layouts.LAYOUTS`).
        cannot: `(described) -> [what the framework's ConvNeXt lacks to hold it]` (empty: it can).
        keys: `(described, layout's state) -> state`: the keys as its model class names them
            (transformers' classifier puts `convnext.` before the trunk).
        configs: `(described) -> {file name: JSON object}` written beside the weights.
        load: `(described, where) -> the lines that load it with the framework's own code`.
    """

    name: str
    layout: str
    cannot: Callable[[Described], list[str]]
    keys: Callable[[Described, dict], dict]
    configs: Callable[[Described], dict[str, dict]]
    load: Callable[[Described, str], str]

    def state(self, described: Described, timm_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The weights as this framework's model holds them, from the timm-keyed state (values as they
        are; MLPs as linears where the framework has no 1x1-convolution form)."""
        state = fit_mlp(timm_state, described.arch.conv_mlp and self.name == "timm")
        if not described.head_norm_affine and not described.features:
            state = {**state, **_identity_head_norm(described.arch)}
        return self.keys(described, from_timm(state, LAYOUTS[self.layout]))

    def check(self, described: Described) -> None:
        """Refuse, in one message, a network this framework cannot express, naming what it lacks
        and the targets that can hold it.

        Raises:
            ExportError: naming them.
        """
        missing = self.cannot(described)
        if not missing:
            return
        able = [t.name for t in TARGETS.values() if not t.cannot(described)]
        raise ExportError(
            f"{self.name} cannot hold {described.name}: its ConvNeXt has {'; '.join(missing)}; "
            + (f"export it to {' or '.join(able)} instead" if able else "no PyTorch target can hold it")
        )


def _identity_head_norm(arch: Architecture) -> dict[str, np.ndarray]:
    """A head norm without weights (FCMAE) as the LayerNorm with unit scale and zero shift it computes:
    the frameworks' models all hold the two tensors."""
    key = "norm_pre" if arch.head_norm_first else "head.norm"
    width = arch.dims[-1]
    return {f"{key}.weight": np.ones(width, np.float32), f"{key}.bias": np.zeros(width, np.float32)}


# --- what each framework cannot express ---------------------------------------------------------


def _plain_convnext_gaps(arch: Architecture, framework: str) -> list[str]:
    """What transformers' and torchvision's ConvNeXt lack: both are FB's network and nothing else."""
    gaps = []
    if arch.stem_type != "patch":
        gaps.append(f"no overlapping stem (this one's is {arch.stem_type!r}; only the 4x4 patch stem)")
    if arch.norm != "layernorm":
        gaps.append(f"no {arch.norm} (only LayerNorm)")
    if arch.head_norm_first:
        gaps.append("no norm before the pooling (head_norm_first)")
    if arch.head_hidden_size:
        gaps.append(f"no pre-logits MLP in the head ({arch.head_hidden_size} wide)")
    if arch.kernel_size != 7:
        gaps.append(f"no depthwise kernel of {arch.kernel_size} (only 7)")
    if arch.mlp_ratio != 4:
        gaps.append(f"no MLP ratio {arch.mlp_ratio} (only 4)")
    if not arch.conv_bias:
        gaps.append("no convolutions without bias")
    if arch.norm_eps != FIXED_EPS:
        gaps.append(f"no LayerNorm epsilon {arch.norm_eps:g} in its blocks (fixed at {FIXED_EPS:g})")
    return gaps


def _timm_cannot(d: Described) -> list[str]:
    gaps = []
    if d.arch.head_norm_eps is not None:
        gaps.append(
            f"one LayerNorm epsilon for every norm (this model's head norm uses {d.arch.head_norm_eps:g}, "
            f"its blocks {d.arch.norm_eps:g}: transformers' layer_norm_eps)"
        )
    if d.features:
        gaps.append("no per-output norms of a dense-prediction backbone (norm0..norm3)")
    return gaps


def _transformers_cannot(d: Described) -> list[str]:
    gaps = _plain_convnext_gaps(d.arch, "transformers")
    if d.arch.use_grn and d.arch.layer_scale:
        gaps.append("no LayerScale beside GRN (ConvNeXt-V2 has GRN only)")
    return gaps


def _torchvision_cannot(d: Described) -> list[str]:
    gaps = _plain_convnext_gaps(d.arch, "torchvision")
    if d.arch.use_grn:
        gaps.append("no GRN (it is ConvNeXt V1 only)")
    if not d.arch.layer_scale:
        gaps.append("no block without LayerScale")
    if d.arch.head_eps != FIXED_EPS:
        gaps.append(f"no head-norm epsilon {d.arch.head_eps:g} (fixed at {FIXED_EPS:g})")
    if d.arch.in_chans != 3:
        gaps.append(f"no stem for {d.arch.in_chans} input channels (only 3)")
    if d.features:
        gaps.append("no dense-prediction backbone with per-output norms")
    elif not d.num_classes:
        gaps.append("no model without a classifier (its classifier always ends in a Linear)")
    return gaps


# --- keys ---------------------------------------------------------------------------------------


def _same(d: Described, state: dict) -> dict:
    return state


def transformers_family(arch: Architecture) -> str:
    """`ConvNextV2` for GRN networks, else `ConvNext` (transformers' class-name stem)."""
    return "ConvNextV2" if arch.use_grn else "ConvNext"


def transformers_class(d: Described) -> str:
    """The transformers class holding `d`: its classifier, its backbone, or the bare model."""
    family = transformers_family(d.arch)
    return (
        f"{family}Backbone" if d.features else f"{family}ForImageClassification" if d.num_classes else f"{family}Model"
    )


def _transformers_keys(d: Described, state: dict) -> dict:
    """`ConvNextForImageClassification` keeps the trunk under `convnext.` (`convnextv2.`), the classifier at the top."""
    if not d.num_classes or d.features:
        return state
    prefix = transformers_family(d.arch).lower() + "."
    return {k if k.startswith("classifier.") else prefix + k: v for k, v in state.items()}


# --- the files beside the weights ---------------------------------------------------------------


def label_map(d: Described) -> list[str]:
    return list(d.labels) if d.labels is not None else [f"LABEL_{i}" for i in range(d.num_classes)]


def _timm_configs(d: Described) -> dict[str, dict]:
    """timm's `config.json` as `save_for_hf` writes it: the architecture, the arguments that make it this
    network (those that differ from timm's own row of that name), the head and the preprocessing."""
    cfg = d.pretrained_cfg
    kwargs = d.arch.timm_kwargs()
    row = ARCHITECTURES.get(d.arch.name)
    defaults = row.timm_kwargs() if row is not None and row.head_norm_eps is None else {}
    model_args = {k: v for k, v in kwargs.items() if k not in defaults or defaults[k] != v}
    size = d.input_size
    pretrained_cfg = {
        "tag": cfg.get("tag") or None,
        "custom_load": False,
        "input_size": [d.arch.in_chans, size, size],
        "fixed_input_size": False,
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": cfg.get("crop_pct", 0.875),
        "crop_mode": cfg.get("crop_mode", "center"),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "num_classes": d.num_classes,
        "pool_size": [max(size // 32, 1)] * 2,
        "first_conv": "stem.0",
        "classifier": "head.fc",
        "license": cfg.get("license"),
    }
    config = {
        "architecture": d.arch.name,
        "num_classes": d.num_classes,
        "num_features": d.arch.head_hidden_size or d.arch.num_features,
        "global_pool": "avg",
        "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None},
    }
    if model_args:
        config["model_args"] = model_args
    if d.labels is not None:
        config["label_names"] = list(d.labels)
    return {TIMM_CONFIG: config}


def _transformers_configs(d: Described) -> dict[str, dict]:
    """transformers' `config.json` (the model class, `id2label`, `layer_norm_eps` for the final norm) and the
    `preprocessor_config.json` of its `ConvNextImageProcessor` (`AutoImageProcessor` reads it)."""
    family = transformers_family(d.arch)
    config = {
        "architectures": [transformers_class(d)],
        "model_type": family.lower(),
        "num_channels": d.arch.in_chans,
        "patch_size": 4,
        "num_stages": 4,
        "hidden_sizes": list(d.arch.dims),
        "depths": list(d.arch.depths),
        "hidden_act": "gelu",
        "initializer_range": 0.02,
        "layer_norm_eps": d.arch.head_eps,
        "drop_path_rate": 0.0,
        "image_size": d.input_size,
        "dtype": "float32",
    }
    if family == "ConvNext":
        config["layer_scale_init_value"] = 1e-6 if d.arch.layer_scale else 0.0
    if d.features:
        config["out_features"] = [f"stage{i + 1}" for i in d.features]
    elif d.num_classes:
        names = label_map(d)
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
    cfg = d.pretrained_cfg
    processor = {
        "image_processor_type": "ConvNextImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": d.input_size},
        "crop_pct": cfg.get("crop_pct", 0.875),
        "resample": RESAMPLE.get(cfg.get("interpolation", "bicubic"), 3),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg["mean"]),
        "image_std": list(cfg["std"]),
    }
    return {TRANSFORMERS_CONFIG: config, PROCESSOR_CONFIG: processor}


def processor_differs(d: Described) -> str | None:
    """How transformers' `ConvNextImageProcessor` cannot prepare images as `d` was evaluated, or None:
    it resizes the shorter side to size/crop_pct and centre-crops below 384, warps to a square from 384."""
    cfg = d.pretrained_cfg
    squash = cfg.get("crop_mode", "center") == "squash"
    crop_pct = cfg.get("crop_pct", 0.875)
    if d.input_size < 384 and squash:
        return f"below 384 it crops where this model squashes (crop_pct {crop_pct:g})"
    if d.input_size >= 384 and not squash and crop_pct != 1.0:
        return f"from 384 it warps the whole image where this model crops (crop_pct {crop_pct:g})"
    if cfg.get("interpolation", "bicubic") not in RESAMPLE:
        return f"it has no {cfg.get('interpolation')!r} resampling"
    return None


def _no_configs(d: Described) -> dict[str, dict]:
    return {}


# --- how users load each ------------------------------------------------------------------------


def torchvision_builder(d: Described) -> str | None:
    """torchvision's builder of `d`'s size (`convnext_tiny`), or None for another size."""
    return next(
        (n for n, (depths, dims) in TORCHVISION_SIZES.items() if (d.arch.depths, d.arch.dims) == (depths, dims)), None
    )


def _timm_load(d: Described, where: str) -> str:
    return (
        f'model = timm.create_model("local-dir:{where}", pretrained=True)  # or "hf-hub:ORG/NAME" once published\n'
        f'model = timm.create_model("{d.arch.name}", pretrained=True, num_classes={d.num_classes}, '
        f'pretrained_cfg_overlay=dict(file="{where}/{WEIGHTS}", num_classes={d.num_classes}){_timm_args(d)})'
    )


def _timm_args(d: Described) -> str:
    config = _timm_configs(d)[TIMM_CONFIG]
    return "".join(f", {k}={json.dumps(v)}" for k, v in config.get("model_args", {}).items()).replace("null", "None")


def _transformers_load(d: Described, where: str) -> str:
    auto = transformers_class(d) if d.features else "AutoModelForImageClassification" if d.num_classes else "AutoModel"
    return (
        f'model = transformers.{auto}.from_pretrained("{where}")\n'
        f'processor = transformers.AutoImageProcessor.from_pretrained("{where}")'
    )


def _torchvision_load(d: Described, where: str) -> str:
    builder = torchvision_builder(d)
    if builder:
        made = f"torchvision.models.{builder}(num_classes={d.num_classes})"
    else:
        settings = ", ".join(
            f"torchvision.models.convnext.CNBlockConfig({d.arch.dims[i]}, {d.arch.dims[i + 1] if i < 3 else None}, "
            f"{d.arch.depths[i]})"
            for i in range(4)
        )
        made = f"torchvision.models.convnext.ConvNeXt([{settings}], num_classes={d.num_classes})"
    return f'model = {made}\nmodel.load_state_dict(safetensors.torch.load_file("{where}/{WEIGHTS}"))'


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("timm", "timm", _timm_cannot, _same, _timm_configs, _timm_load),
        Target(
            "transformers",
            "transformers",
            _transformers_cannot,
            _transformers_keys,
            _transformers_configs,
            _transformers_load,
        ),
        Target("torchvision", "torchvision", _torchvision_cannot, _same, _no_configs, _torchvision_load),
    )
}


def target(name: str) -> Target:
    """The target framework `name`.

    Raises:
        ExportError: an unknown one, naming those there are.
    """
    try:
        return TARGETS[name]
    except KeyError:
        raise ExportError(f"unknown PyTorch target {name!r}; choose one of {', '.join(TARGETS)}") from None
