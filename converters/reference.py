"""The PyTorch side of the parity check, run as its own process (`python -m converters.reference`).

TensorFlow imported before torch+timm in one process crashes the timm forward pass, so the
reference never shares a process with Keras: the parent writes inputs to disk, this process
runs the checkpoint in the framework it came from (told apart by its keys, `layouts.LAYOUTS`;
each framework an `Adapter` of `ADAPTERS`: its own model class and checkpoint loader, never the
converter's key map), and writes every compared tensor back as NHWC numpy. Its stdout carries
one thing, the failure it reports (`reference_process.failure_record`); all else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def _die_with_parent() -> None:
    """Be killed when the converting process dies (Linux), rather than run on as an orphan."""
    parent = os.environ.get("ZOO_PARENT_PID")
    if not parent:
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the line above
        os._exit(1)


def _report_failures() -> None:
    """Keep stdout for the failure this process reports (an error it does not catch, as one JSON
    line), and send whatever else is written there (by the frameworks, say) to stderr."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def report(kind, error, tb) -> None:
        sys.__excepthook__(kind, error, tb)  # the traceback, for whoever runs it by hand
        from converters.reference_process import failure_record

        channel.write(json.dumps(failure_record(error)) + "\n")
        channel.flush()

    sys.excepthook = report


if __name__ == "__main__":
    _die_with_parent()  # before the imports below, which take seconds
    _report_failures()  # and can fail (torch not installed)

from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402  (timm and torch first, never after tensorflow)
import torch  # noqa: E402

from converters.containers import INDEX_SUFFIX, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, is_index, parse_index  # noqa: E402
from converters.images import in_batches  # noqa: E402
from converters.layouts import is_fb_layout, recognise  # noqa: E402
from converters.metadata import TRANSFORMERS_TYPES  # noqa: E402
from converters.reading import read_raw  # noqa: E402
from converters.reference_process import SOURCE_SHA256  # noqa: E402
from converters.source import source_sha256  # noqa: E402
from zoo.core.architectures import Architecture  # noqa: E402
from zoo.core.errors import SourceError  # noqa: E402

HEAD_NORM_KEYS = ("head.norm.weight", "head.norm.bias")
OUTPUTS = ("stem", "stages.0", "stages.1", "stages.2", "stages.3", "pre_logits", "logits")


def create(arch: Architecture, num_classes: int, device: str = "cpu") -> torch.nn.Module:
    """timm's model for an architecture row, in eval mode.

    On the `meta` device its tensors have shapes and no storage (nothing is initialised).
    """
    with torch.device(device):
        model = timm.create_model(arch.name, pretrained=False, num_classes=num_classes, **arch.timm_kwargs())
    return model.eval()


class Backbone(torch.nn.Module):
    """A dense-prediction model's ConvNeXt backbone in its own framework: `run` gives its normalised
    feature maps (NCHW, one per out_index), `stem` and `stages` are the modules whose outputs are compared.

    Attributes:
        module: the framework's own module (timm's ConvNeXt and its per-output norms, or transformers'
            `ConvNextBackbone`).
        features: the stages whose maps `run` returns, in order (the out_indices).
    """

    def __init__(self, module: torch.nn.Module, stem, stages, run: Callable[[torch.Tensor], list], features):
        super().__init__()
        self.module, self.stem, self.stages = module, stem, stages
        self.run, self.features = run, tuple(features)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.run(x))


@dataclass(frozen=True)
class Adapter:
    """How the parity reference loads and runs the ConvNeXts of one framework.

    Attributes:
        name: the framework, as a layout names it (`Layout.framework`).
        package: its distribution, whose version the parity report records.
        load: `(arch, num_classes, state, folder, head_norm_affine) -> module`: the framework's
            own model class holding `state` (torch tensors, keyed as the framework keys them; or a
            `Sharded` checkpoint, which the framework's own sharded loader reads), loaded strictly
            by its own loader, in eval mode; `folder` holds the weights file (and any config of
            the framework's beside it).
        points: `module -> (stem, stages, classifier)`: the modules whose outputs are compared,
            and the classifier whose input is (None: the model has none).
        logits: `(module, x) -> logits` for an NCHW batch (the pooled features where the model
            has no classifier).
        backbone: `(arch, features, state, folder) -> Backbone`: a dense-prediction model's
            backbone (per-output norms for the stages `features`, no head), loaded strictly by
            the framework's own code.
    """

    name: str
    package: str
    load: Callable[..., torch.nn.Module]
    points: Callable[[torch.nn.Module], tuple]
    logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = lambda model, x: model(x)
    backbone: Callable[..., Backbone] | None = None

    def version(self) -> str:
        from importlib.metadata import version

        return version(self.package)

    @torch.inference_mode()
    def outputs(self, model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every compared tensor for an NCHW batch (`OUTPUTS`): the stem's and each stage's output
        (NCHW), the classifier's input (`pre_logits`) and the logits; for a `Backbone`, its feature
        maps (`features.{i}`) in place of the last two."""
        captured: dict[str, torch.Tensor] = {}

        def keep(name):
            return lambda _module, _args, output: captured.__setitem__(name, output)

        if isinstance(model, Backbone):
            hooks = [model.stem.register_forward_hook(keep("stem"))]
            hooks += [stage.register_forward_hook(keep(f"stages.{i}")) for i, stage in enumerate(model.stages)]
            try:
                maps = model(x)
            finally:
                for hook in hooks:
                    hook.remove()
            return {**captured, **{f"features.{i}": m for i, m in zip(model.features, maps, strict=True)}}
        stem, stages, classifier = self.points(model)
        hooks = [stem.register_forward_hook(keep("stem"))]
        hooks += [stage.register_forward_hook(keep(f"stages.{i}")) for i, stage in enumerate(stages)]
        if classifier is not None:
            hooks.append(
                classifier.register_forward_pre_hook(lambda _module, args: captured.__setitem__("pre_logits", args[0]))
            )
        try:
            captured["logits"] = self.logits(model, x)
        finally:
            for hook in hooks:
                hook.remove()
        if classifier is None:  # no classifier: the pooled, normalised features are the output
            captured["pre_logits"] = captured["logits"]
        return captured


@dataclass(frozen=True)
class Sharded:
    """A sharded checkpoint, for its framework's own sharded loader to read: its index (the shards
    beside it) and the keys the index lists. This process never reads the shards itself, so that
    a misreading of them by the converter's reader is not on both sides of the check.

    Attributes:
        index: the index file (`model.safetensors.index.json`, `pytorch_model.bin.index.json`).
        keys: the tensors it lists (less another model's, as `recognise` leaves them out).
    """

    index: Path
    keys: tuple[str, ...]

    @classmethod
    def of(cls, index: Path, found, features: tuple[int, ...] = ()) -> Sharded:
        """The sharded checkpoint at `index`, whose keys `found` (`layouts.Recognised`) recognised.

        Raises:
            SourceError: keys a sharded loader cannot take as saved (it loads them into the model
                as they are): a wrapper prefix, another model's, FB's layout (timm remaps it); or
                a dense-prediction backbone (`features`), which is loaded from a state dict.
        """
        why = (
            "a dense-prediction backbone's per-output norms"
            if features
            else f"keys under the prefix {found.prefix!r}"
            if found.prefix
            else f"{found.left} keys of another model"
            if found.left
            else "FB's key layout (timm remaps it from one state dict)"
            if found.layout.name == "fb"
            else None
        )
        if why:
            raise SourceError(
                f"{index.name}: a sharded checkpoint is checked by its framework's own sharded loader, "
                f"which loads its keys as saved: it cannot take {why}; save the weights as one file"
            )
        return cls(index, tuple(found.state))

    def __iter__(self):
        return iter(self.keys)

    @property
    def safetensors(self) -> bool:
        return self.index.name[: -len(INDEX_SUFFIX)].endswith(SAFETENSORS_SUFFIXES)

    def load_into(self, model: torch.nn.Module):
        """huggingface_hub's own sharded loader (`load_torch_model`: the index and every shard it
        lists, read by it) into `model`; its missing and unexpected keys."""
        from huggingface_hub import load_torch_model

        stem, _, suffix = self.index.name[: -len(INDEX_SUFFIX)].rpartition(".")  # model.safetensors
        return load_torch_model(
            model, self.index.parent, strict=False, safe=self.safetensors, filename_pattern=f"{stem}{{suffix}}.{suffix}"
        )

    def transformers_folder(self) -> Path:
        """The folder, for transformers' `from_pretrained` to read this index in it itself.

        Raises:
            SourceError: transformers would read another file of the folder.
        """
        single = "model.safetensors" if self.safetensors else "pytorch_model.bin"
        if self.index.name != single + INDEX_SUFFIX:
            raise SourceError(
                f"{self.index.name}: transformers reads a sharded checkpoint from {single}{INDEX_SUFFIX} "
                "only; give the index that name"
            )
        if (self.index.parent / single).exists():
            raise SourceError(
                f"{self.index.parent} holds {single} beside {self.index.name}, and transformers would load "
                f"{single}; move one of them out of the folder"
            )
        return self.index.parent


def _load_timm(
    arch: Architecture, num_classes: int, state: dict | Sharded, folder: Path, head_norm_affine: bool
) -> torch.nn.Module:
    """timm's model for `arch` holding `state`, in timm's or FB's layout: FB keys go through timm's
    own `checkpoint_filter_fn`, so that the parity check tests the converter's FB renaming.

    With every parameter in the checkpoint, the model is created without storage and takes the
    checkpoint's tensors as its parameters (convnext_large: 1.8 s of random initialisation and
    a copy saved); a checkpoint without head-norm weights (FCMAE) loads as timm loads it, into
    an initialised model whose head norm keeps its identity init. A sharded checkpoint loads
    through huggingface_hub's sharded loader (`Sharded.load_into`), into an initialised model.
    """
    from timm.models.convnext import checkpoint_filter_fn

    if isinstance(state, Sharded):
        model = create(arch, num_classes)
        _strict(state.load_into(model), head_norm_affine, "timm")
        return model.eval()
    model = create(arch, num_classes, device="meta" if head_norm_affine else "cpu")
    if is_fb_layout(state):
        state = checkpoint_filter_fn(state, model)
    _strict(model.load_state_dict(state, strict=False, assign=head_norm_affine), head_norm_affine, "timm")
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"timm's model kept tensors the checkpoint did not fill: {left}")
    return model.eval()


def _strict(result, head_norm_affine: bool, framework: str) -> None:
    missing, unexpected = result
    allowed = set() if head_norm_affine else set(HEAD_NORM_KEYS)
    if set(missing) - allowed or unexpected or (allowed and set(missing) != allowed):
        raise RuntimeError(f"{framework} refused the checkpoint: missing {missing}, unexpected {unexpected}")


def _timm_points(model):
    return model.stem, model.stages, model.head.fc


def _load_timm_backbone(arch: Architecture, features: tuple[int, ...], state: dict, folder: Path) -> Backbone:
    """FB's segmentation and detection backbone (its `norm{i}` after stage i) from timm's own modules: timm's
    ConvNeXt holding the trunk (FB keys through timm's own `checkpoint_filter_fn`), its stage outputs taken
    by timm's `forward_intermediates`, each through a timm `LayerNorm2d` holding FB's `norm{i}` tensors."""
    from timm.layers import LayerNorm2d
    from timm.models.convnext import checkpoint_filter_fn

    norm_keys = {f"norm{i}.{part}" for i in features for part in ("weight", "bias")}
    trunk = {k: v for k, v in state.items() if k not in norm_keys}
    model = create(arch, 0)
    if is_fb_layout(trunk):
        trunk = checkpoint_filter_fn(trunk, model)
    _strict(model.load_state_dict(trunk, strict=False), False, "timm")  # a backbone has no head norm
    norms = torch.nn.ModuleDict({str(i): LayerNorm2d(arch.dims[i], eps=arch.norm_eps) for i in features})
    norms.load_state_dict({f"{i}.{part}": state[f"norm{i}.{part}"] for i in features for part in ("weight", "bias")})

    def run(x):
        maps = model.forward_intermediates(x, indices=list(features), intermediates_only=True)
        return [norms[str(i)](m) for i, m in zip(features, maps, strict=True)]

    return Backbone(torch.nn.ModuleDict({"trunk": model, "norms": norms}), model.stem, model.stages, run, features)


def _load_transformers(
    arch: Architecture, num_classes: int, state: dict | Sharded, folder: Path, head_norm_affine: bool
) -> torch.nn.Module:
    """transformers' own model for `state`, loaded by its own loader.

    The network is the folder's `config.json` when it is a transformers config (as
    `from_pretrained` reads it), else built from `arch`; the weights are `state`, never the
    weights file `from_pretrained` would pick in the folder (a sharded checkpoint: the folder,
    whose index and shards `from_pretrained` reads itself, `Sharded.transformers_folder`). Any key
    transformers leaves missing, finds unexpected or of the wrong shape is an error.
    """
    transformers = _transformers()
    config = _transformers_config(transformers, arch, num_classes, folder)
    family = "ConvNextV2" if TRANSFORMERS_TYPES[config.model_type] else "ConvNext"
    headed = any(k.startswith(("convnext.", "convnextv2.")) for k in state)
    cls = getattr(transformers, f"{family}ForImageClassification" if headed else f"{family}Model")
    if isinstance(state, Sharded):
        where, weights = state.transformers_folder(), {"use_safetensors": state.safetensors}
    else:
        where, weights = None, {"state_dict": state}
    return _strictly_loaded(cls, where, config, "checkpoint", **weights)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RuntimeError(
            "No module named 'transformers': converting a transformers checkpoint checks it "
            "against transformers (pip install transformers)"
        ) from None
    return transformers


def _strictly_loaded(cls, where: Path | None, config, what: str, **weights) -> torch.nn.Module:
    """`cls.from_pretrained` (transformers' own loader) of `weights` (`state_dict=`, or the files in
    `where`), in eval mode; any key missing, unexpected or of another shape is an error naming it."""
    # mismatched shapes listed in `info` like the other problems (else transformers raises a bare error)
    model, info = cls.from_pretrained(
        where,
        config=config,
        **weights,
        output_loading_info=True,
        dtype=torch.float32,
        ignore_mismatched_sizes=True,
    )
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"transformers refused the {what}: {problems}")
    return model.eval()


def _transformers_config(transformers, arch: Architecture, num_classes: int, folder: Path):
    """The folder's transformers `config.json`, read by transformers; else one that describes `arch`."""
    config_file = folder / "config.json"
    folder_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if folder_config.get("model_type") in (*TRANSFORMERS_TYPES, "upernet"):
        return transformers.AutoConfig.from_pretrained(folder)
    family = "ConvNextV2" if arch.use_grn else "ConvNext"
    return getattr(transformers, f"{family}Config")(
        depths=list(arch.depths),
        hidden_sizes=list(arch.dims),
        num_labels=num_classes,
        layer_scale_init_value=1e-6 if arch.layer_scale else 0.0,
        layer_norm_eps=arch.head_eps,
        drop_path_rate=0.0,
        num_channels=arch.in_chans,
    )


def _load_transformers_backbone(arch: Architecture, features: tuple[int, ...], state: dict, folder: Path) -> Backbone:
    """transformers' own `ConvNextBackbone` (or V2) for `state`, loaded by its own loader: the
    folder's `ConvNextBackbone` config or the backbone config of its `UperNetForSemanticSegmentation`
    config, else one built from `arch` with out_features for `features`."""
    transformers = _transformers()
    config = _transformers_config(transformers, arch, 0, folder)
    config = getattr(config, "backbone_config", None) or config  # UperNet's holds the backbone's
    if not getattr(config, "out_features", None) or config.out_features == ["stage4"] and features != (3,):
        config.out_features = [f"stage{i + 1}" for i in features]  # a config of transformers' default output
    family = "ConvNextV2" if TRANSFORMERS_TYPES[config.model_type] else "ConvNext"
    model = _strictly_loaded(getattr(transformers, f"{family}Backbone"), None, config, "backbone", state_dict=state)
    return Backbone(
        model, model.embeddings, model.encoder.stages, lambda x: model(pixel_values=x).feature_maps, features
    )


def _transformers_points(model):
    base = getattr(model, "convnext", None) or getattr(model, "convnextv2", None) or model
    head = getattr(model, "classifier", None)
    return base.embeddings, base.encoder.stages, head if isinstance(head, torch.nn.Linear) else None


def _transformers_logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def _load_torchvision(
    arch: Architecture, num_classes: int, state: dict | Sharded, folder: Path, head_norm_affine: bool
) -> torch.nn.Module:
    """torchvision's `ConvNeXt` class built from `arch`, holding `state`, strictly loaded (a sharded
    checkpoint by huggingface_hub's sharded loader, `Sharded.load_into`: torchvision has none)."""
    model = _torchvision_model((arch.depths, arch.dims), num_classes)
    if isinstance(state, Sharded):
        _strict(state.load_into(model), True, "torchvision")
    else:
        model.load_state_dict(state, strict=True)
    return model.eval()


def _torchvision_model(size: tuple[tuple[int, ...], tuple[int, ...]], num_classes: int) -> torch.nn.Module:
    """torchvision's `ConvNeXt` class for `(depths, dims)` (its builders' class, any size)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    depths, dims = size
    settings = [CNBlockConfig(dims[i], dims[i + 1] if i < 3 else None, depths[i]) for i in range(4)]
    return ConvNeXt(settings, stochastic_depth_prob=0.0, layer_scale=1e-6, num_classes=num_classes)


def _torchvision_points(model):
    f = model.features  # [stem, stage 0, downsample, stage 1, downsample, stage 2, downsample, stage 3]
    return f[0], [f[1], f[3], f[5], f[7]], model.classifier[2]


# Every framework a layout can name (`Layout.framework`): a new framework is a new row here.
ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (
        Adapter("timm", "timm", _load_timm, _timm_points, backbone=_load_timm_backbone),
        Adapter(
            "transformers",
            "transformers",
            _load_transformers,
            _transformers_points,
            _transformers_logits,
            _load_transformers_backbone,
        ),
        Adapter("torchvision", "torchvision", _load_torchvision, _torchvision_points),
    )
}


@dataclass(frozen=True)
class Reference:
    """A source model loaded in its own framework.

    Attributes:
        model: the framework's own module, in eval mode.
        adapter: how its framework loads and runs it.
        layout: the checkpoint's key layout, as this process detected it.
    """

    model: torch.nn.Module
    adapter: Adapter
    layout: str

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every compared tensor (NCHW maps) for an NCHW batch."""
        return self.adapter.outputs(self.model, x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.adapter.logits(self.model, x)


def reference(
    arch: Architecture,
    num_classes: int,
    path: Path,
    head_norm_affine: bool = True,
    use_ema: bool = True,
    features: tuple[int, ...] = (),
) -> Reference:
    """The checkpoint at `path` in the framework its keys belong to, the file read once.

    Its layout names the framework, whose `Adapter` loads the tensors with the framework's own
    model class and loader: timm's model (FB keys through timm's own remapping), transformers'
    model class for the `config.json` beside the weights (else for `arch`), torchvision's
    `ConvNeXt` built from `arch`. Every layout runs exactly the file at `path` (a sharded
    checkpoint's index: its shards read by the framework's own sharded loader, `Sharded`). With
    `features` (a dense-prediction model's out_indices), the framework's backbone (`Adapter.backbone`).
    """
    found = recognise(_read(path, use_ema))  # another model's keys left out, and the prefix they leave
    adapter = ADAPTERS[found.layout.framework]
    state = Sharded.of(path, found, features) if is_index(path) else found.state
    if not features:
        model = adapter.load(arch, num_classes, state, path.parent, head_norm_affine)
    elif adapter.backbone is None:
        raise SourceError(f"{adapter.name} has no dense-prediction backbone of a ConvNeXt with per-output norms")
    else:
        model = adapter.backbone(arch, tuple(features), state, path.parent)
    return Reference(model, adapter, found.layout.name)


def exported(framework: str, folder: Path, features: tuple[int, ...] = (), builder: str | None = None) -> Reference:
    """A model exported back to PyTorch (`zoo.export.to_pytorch`), loaded from its folder the way its
    framework's users load it, by that framework's own public loader and nothing of the converter's:

    - timm: `timm.create_model("local-dir:FOLDER", pretrained=True)` (its `config.json` and weights,
      strictly loaded as `"hf-hub:ORG/NAME"` loads a published copy);
    - transformers: the `Auto` class for the model its `config.json` names, `from_pretrained(FOLDER)`,
      any key missing, unexpected or mis-shaped an error; its `AutoImageProcessor` must load too;
    - torchvision: its builder (`torchvision.models.convnext_tiny(num_classes=N)`, or `ConvNeXt` for
      other sizes), `load_state_dict(safetensors.torch.load_file(...), strict=True)`.
    """
    adapter = ADAPTERS[framework]
    if framework == "timm":
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    elif framework == "transformers":
        transformers = _transformers()
        named = transformers.AutoConfig.from_pretrained(folder).architectures[0]
        # (AutoBackbone.from_pretrained takes Hub repos only: its class's own from_pretrained reads folders)
        auto = (
            getattr(transformers, named)
            if named.endswith("Backbone")
            else transformers.AutoModelForImageClassification
            if named.endswith("ForImageClassification")
            else transformers.AutoModel
        )
        model = _strictly_loaded(auto, str(folder), None, "export")
        transformers.AutoImageProcessor.from_pretrained(str(folder))  # its processor must load too
        if features:
            return Reference(
                Backbone(
                    model,
                    model.embeddings,
                    model.encoder.stages,
                    lambda x: model(pixel_values=x).feature_maps,
                    features,
                ),
                adapter,
                "transformers",
            )
    else:
        import torchvision
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
        classes = int(state["classifier.2.weight"].shape[0])
        if builder:
            model = getattr(torchvision.models, builder)(num_classes=classes)
        else:
            model = _torchvision_model(_torchvision_arch(state), classes)
        model.load_state_dict(state, strict=True)
        model.eval()
    return Reference(model, adapter, framework)


def _torchvision_arch(state: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The depths and widths of a torchvision ConvNeXt state dict (its blocks' `features.{1,3,5,7}.j` keys)."""
    depths = tuple(1 + max(int(k.split(".")[2]) for k in state if k.startswith(f"features.{s}.")) for s in (1, 3, 5, 7))
    dims = tuple(int(state[f"features.{s}.0.layer_scale"].shape[0]) for s in (1, 3, 5, 7))
    return depths, dims


def _read(path: Path, use_ema: bool) -> dict[str, torch.Tensor | None]:
    """Every tensor of the checkpoint file at `path` (floats as float32), keys as stored.

    A pickle container is read by timm's own `load_state_dict`, whatever its layout: for a
    training checkpoint, timm's choice of entry (EMA first, unless not `use_ema`) and its removal
    of `module.`/`_orig_mod.`, so that the parity check tests the converter's own choices. A
    safetensors file holds no entries and is read by the converter's reader (one copy in memory).
    A sharded checkpoint's index gives the keys it lists and no tensors (None): its framework's
    own sharded loader reads them (`Sharded`), never the converter's reader.
    """
    if is_index(path):
        return dict.fromkeys(parse_index(path).weight_map)
    if path.name.endswith(PICKLE_SUFFIXES):
        from timm.models import load_state_dict

        return {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(str(path), use_ema).items()}
    # floats as float32, other dtypes (another model's BatchNorm counters) as stored: the loader judges them
    return {
        k: torch.from_numpy(v).float() if v.dtype.kind == "f" else torch.from_numpy(v)
        for k, v in read_raw(path)[0].items()
    }


def forward(model, inputs: np.ndarray, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Every compared tensor for an NHWC batch, returned NHWC (`model`: a `Reference`, or timm's module).

    Run `batch_size` images at a time, as the Keras side runs them, each output filled in place:
    a whole parity batch at once holds GBs of activations (convnextv2_huge at 512: 2.5 GB more).
    """
    ref = model if isinstance(model, Reference) else Reference(model, ADAPTERS["timm"], "timm")

    def run(part: np.ndarray) -> dict[str, np.ndarray]:
        captured = ref.outputs(torch.from_numpy(np.ascontiguousarray(part.transpose(0, 3, 1, 2))))
        return {name: (t.permute(0, 2, 3, 1) if t.ndim == 4 else t).float().numpy() for name, t in captured.items()}

    return in_batches(run, inputs, batch_size)


def features(
    arch: Architecture, num_classes: int, source: Path, inputs: np.ndarray, out_indices, head_norm_affine: bool = True
) -> dict[str, np.ndarray]:
    """timm's `features_only=True` outputs (NHWC), the model loaded by timm's own pretrained path.

    The weights file goes in as `pretrained_cfg_overlay=dict(file=...)`, so timm applies its own
    loading and FB-layout filtering, then wraps the model in its feature extractor.
    """
    model = timm.create_model(
        arch.name,
        pretrained=True,
        features_only=True,
        out_indices=tuple(out_indices),
        num_classes=num_classes,
        pretrained_strict=head_norm_affine,
        pretrained_cfg_overlay=dict(file=str(source), num_classes=num_classes),
        **arch.timm_kwargs(),
    ).eval()
    with torch.inference_mode():
        maps = model(torch.from_numpy(np.ascontiguousarray(inputs.transpose(0, 3, 1, 2))))
    return {
        f"features.{i}": t.permute(0, 2, 3, 1).float().numpy().copy() for i, t in zip(out_indices, maps, strict=True)
    }


def classify(model: Reference, files: list[str], pretrained_cfg: dict, batch_size: int = 16) -> np.ndarray:
    """Logits for image files prepared by timm's own eval transform for `pretrained_cfg`."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(pretrained_cfg=pretrained_cfg)
    transform = create_transform(**config, is_training=False)
    mode = "RGB" if config["input_size"][0] == 3 else "L"  # as timm's train.py and validate.py choose it
    out = []
    with torch.inference_mode():
        for i in range(0, len(files), batch_size):
            batch = []
            for f in files[i : i + batch_size]:
                with Image.open(f) as image:  # timm's ImageDataset loader, in that mode
                    batch.append(transform(image.convert(mode)))
            out.append(model.logits(torch.stack(batch)).float().numpy())
    return np.concatenate(out)


def random_state_dict(
    arch: Architecture, num_classes: int, seed: int = 0, head_norm_affine: bool = True
) -> dict[str, np.ndarray]:
    """timm's state dict for `arch` with every tensor drawn at a realistic, non-trivial scale.

    timm initialises LayerScale to 1e-6, which makes every block an identity and hides mapping
    bugs; here gammas are O(0.1-1), norms are perturbed around 1, biases are non-zero, and
    conv/linear weights have unit-gain fan-in scaling, so every tensor changes the output.
    Drawn with numpy from `seed`: the same on every machine and torch version. Without
    `head_norm_affine` the head-norm weights are left out, as in FCMAE checkpoints.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key, tensor in create(arch, num_classes, device="meta").state_dict().items():
        if not head_norm_affine and key in HEAD_NORM_KEYS:
            continue
        out[key] = perturbed(key, tuple(tensor.shape), rng, classifier=key.startswith("head.fc"))
    return out


def perturbed(name: str, shape: tuple[int, ...], rng: np.random.Generator, classifier: bool = False) -> np.ndarray:
    """One tensor of a perturbed random network (float32), drawn from `rng`, by its name and shape:
    layer scales and GRN (`gamma`, `layer_scale`, `grn` in any layout) uniform in +-[0.1, 1];
    norm scales (1-D `weight`) 1 + 0.25 N(0, 1); other 1-D tensors (biases) 0.1 N(0, 1);
    conv/linear weights N(0, 1) / sqrt(fan-in), times 3 for the `classifier` (logits of a few
    units, as trained networks give)."""
    if any(part in name for part in ("gamma", "layer_scale", "grn")):
        value = rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    elif len(shape) == 1 and name.endswith("weight"):
        value = 1.0 + 0.25 * rng.standard_normal(shape)
    elif len(shape) == 1:
        value = 0.1 * rng.standard_normal(shape)
    else:
        value = (3.0 if classifier else 1.0) * rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[1:])))
    return value.astype(np.float32)


def _forward_command(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    arch = Architecture.from_config(spec["arch"])
    if "random_seed" in spec:  # the source is random weights this process writes first
        write_random(
            arch, spec["num_classes"], spec["random_seed"], Path(spec["source"]), spec.get("head_norm_affine", True)
        )
    # The bytes this process runs, for the converter to check against the bytes it converted: the
    # same digest before and after loading, or the file changed while it was read (a sharded
    # checkpoint's: of its index and every shard, `containers.files_sha256`).
    digest = source_sha256(Path(spec["source"]))
    inputs = np.load(spec["inputs"]) if "inputs" in spec else None
    if "out_indices" in spec:
        outputs = features(
            arch,
            spec["num_classes"],
            Path(spec["source"]),
            inputs,
            spec["out_indices"],
            spec.get("head_norm_affine", True),
        )
    else:
        if "export" in spec:  # a model exported back to PyTorch, loaded from its folder by its framework
            back = spec["export"]
            model = exported(
                back["framework"], Path(back["folder"]), tuple(spec.get("features", ())), back.get("builder")
            )
        else:
            model = reference(
                arch,
                spec["num_classes"],
                Path(spec["source"]),
                spec.get("head_norm_affine", True),
                spec.get("use_ema", True),
                tuple(spec.get("features", ())),
            )
        framework = model.adapter.name
        ran = {
            "torch": torch.__version__,
            framework: model.adapter.version(),
            "reference": framework,
            "layout": model.layout,
        }
        if "files" in spec:
            outputs = {"logits": classify(model, spec["files"], spec["pretrained_cfg"])}
        else:
            outputs = forward(model, inputs)
    if source_sha256(Path(spec["source"])) != digest:
        raise SourceError(f"{spec['source']} changed while the reference read it; convert again")
    np.savez(spec["outputs"], **outputs)
    if "versions" in spec:  # what the reference ran on, for the parity report
        if "out_indices" in spec:
            ran = {"torch": torch.__version__, "timm": timm.__version__, "reference": "timm"}
        Path(spec["versions"]).write_text(json.dumps({**ran, SOURCE_SHA256: digest}))


def write_random(arch: Architecture, num_classes: int, seed: int, out: Path, head_norm_affine: bool = True) -> None:
    """`random_state_dict` as a safetensors file at `out`, which appears whole (written beside it,
    then renamed): a process waiting for the file never reads it half-written."""
    from safetensors.numpy import save_file

    state = random_state_dict(arch, num_classes, seed, head_norm_affine)
    partial = out.with_name(out.name + ".partial")
    # One metadata key only: safetensors writes metadata from a hash map whose order varies
    # between processes, and the file's sha256 must be a function of the seed.
    save_file(state, str(partial), metadata={"format": "pt"})
    os.replace(partial, out)


def _random_command(args) -> None:
    write_random(
        Architecture.from_config(json.loads(args.arch)),
        args.num_classes,
        args.seed,
        Path(args.out),
        not args.no_head_norm,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.reference", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fwd = sub.add_parser(
        "forward",
        help="run timm on a spec written by the parity check "
        "(its features_only model when the spec has out_indices; "
        "image files through timm's transform when it has files)",
    )
    fwd.add_argument("spec", type=Path)
    rnd = sub.add_parser("random", help="write perturbed random weights in timm's layout")
    rnd.add_argument("--arch", required=True, help="architecture config as JSON")
    rnd.add_argument("--num-classes", type=int, required=True)
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--no-head-norm", action="store_true", help="leave out head-norm weights (FCMAE)")
    rnd.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.command == "forward":
        _forward_command(args.spec)
    else:
        _random_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())  # an error it raises is reported by `_report_failures`
