"""The PyTorch side of the parity check, run as its own process (`python -m converters.reference`).

TensorFlow imported before torch+timm in one process crashes the timm forward pass, so the
reference never shares a process with Keras: the parent writes inputs to disk, this process
runs the checkpoint in the framework it came from (timm, transformers or torchvision: told
apart by its keys, each loaded by its own model class and checkpoint loader, never by the
converter's key map), and writes every compared tensor back as NHWC numpy.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path


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


if __name__ == "__main__":
    _die_with_parent()  # before the imports below, which take seconds

import numpy as np  # noqa: E402
import torch  # noqa: E402,I001  (torch and timm first, never after tensorflow)
import timm  # noqa: E402

from checkpoints.fs import sha256_file  # noqa: E402
from converters.images import in_batches  # noqa: E402
from converters.layouts import detect, is_fb_layout, strip_prefix  # noqa: E402
from converters.metadata import TRANSFORMERS_TYPES  # noqa: E402
from converters.reading import read_checkpoint, read_state_dict  # noqa: E402
from converters.reference_process import SOURCE_SHA256, failure_line  # noqa: E402
from zoo.architectures import Architecture  # noqa: E402
from zoo.errors import SourceError  # noqa: E402

HEAD_NORM_KEYS = ("head.norm.weight", "head.norm.bias")
TIMM_PREFIXES = ("", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.")  # timm's loader removes them
OUTPUTS = ("stem", "stages.0", "stages.1", "stages.2", "stages.3", "pre_logits", "logits")


def create(arch: Architecture, num_classes: int, device: str = "cpu") -> torch.nn.Module:
    """timm's model for an architecture row, in eval mode.

    On the `meta` device its tensors have shapes and no storage (nothing is initialised).
    """
    with torch.device(device):
        model = timm.create_model(arch.name, pretrained=False, num_classes=num_classes, **arch.timm_kwargs())
    return model.eval()


def loaded(arch: Architecture, num_classes: int, path: Path, head_norm_affine: bool = True) -> torch.nn.Module:
    """timm's model for `arch` holding the timm- or FB-layout safetensors file at `path` (see `load_weights`).

    With every parameter in the checkpoint, the model is created without storage and takes the
    checkpoint's tensors as its parameters (convnext_large: 1.8 s of random initialisation and
    a copy saved); a checkpoint without head-norm weights loads into an initialised model.
    """
    model = create(arch, num_classes, device="meta" if head_norm_affine else "cpu")
    load_weights(model, path, head_norm_affine)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"timm's model kept tensors the checkpoint did not fill: {left}")
    return model


def load_weights(model: torch.nn.Module, path: Path, head_norm_affine: bool = True, use_ema: bool = True) -> None:
    """Load a checkpoint strictly; FB-layout files go through timm's own key remapping.

    Using timm's `checkpoint_filter_fn` here (not the converter's `normalise_keys`) makes the
    parity check an independent test of the converter's FB renaming. Checkpoints without
    head-norm weights (FCMAE) load as timm loads them: that norm keeps its identity init.
    A model on the `meta` device takes the checkpoint's tensors as its own. A wrapper prefix
    timm's loader does not remove (`model.`, `backbone.`) is removed here.
    """
    _load_arrays(model, strip_prefix(read_state_dict(path, use_ema=use_ema))[0], head_norm_affine)


def _load_arrays(model: torch.nn.Module, arrays: dict, head_norm_affine: bool) -> None:
    from timm.models.convnext import checkpoint_filter_fn

    state = {k: torch.from_numpy(v) for k, v in arrays.items()}
    if is_fb_layout(arrays):
        state = checkpoint_filter_fn(state, model)
    on_meta = any(p.is_meta for p in model.parameters())
    _strict(model.load_state_dict(state, strict=False, assign=on_meta), head_norm_affine, "timm")


def _strict(result, head_norm_affine: bool, framework: str) -> None:
    missing, unexpected = result
    allowed = set() if head_norm_affine else set(HEAD_NORM_KEYS)
    if set(missing) - allowed or unexpected or (allowed and set(missing) != allowed):
        raise RuntimeError(f"{framework} refused the checkpoint: missing {missing}, unexpected {unexpected}")


class Reference:
    """A loaded source model and how to read every compared tensor out of it.

    Attributes:
        model: the framework's own module, in eval mode.
        framework: `timm`, `transformers` or `torchvision`.
        layout: the checkpoint's key layout, as this process detected it.
        version: the framework's version.
    """

    def __init__(self, model, framework: str, layout: str, version: str):
        self.model, self.framework, self.layout, self.version = model, framework, layout, version

    @torch.inference_mode()
    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every compared tensor (NCHW maps) for an NCHW batch."""
        return _OUTPUTS[self.framework](self.model, x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(x)
        return out if isinstance(out, torch.Tensor) else _transformers_logits(out)


def reference(arch: Architecture, num_classes: int, path: Path, head_norm_affine: bool = True,
              use_ema: bool = True) -> Reference:
    """The checkpoint at `path` in the framework its keys belong to.

    timm and FB layouts: timm's model (timm's `load_checkpoint` for training checkpoints:
    its EMA choice and `module.` stripping). transformers: its model class for the `config.json`
    beside the weights (else for `arch`), loaded strictly by its own `from_pretrained` with the
    tensors of `path`, not with the weights file it would pick in the folder. torchvision: its
    `ConvNeXt` class built from `arch`, strictly loaded. Every layout runs exactly the file at `path`.
    """
    header_only = path.name.endswith(".safetensors")
    if header_only:  # the layout from the header: the tensors are read once, below
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            names = dict.fromkeys(f.keys())
    else:
        names = read_checkpoint(path, use_ema=use_ema)[0]
    names, prefix = strip_prefix(names)
    layout = detect(names)

    def arrays() -> dict:
        return strip_prefix(read_state_dict(path))[0] if header_only else names

    if layout.framework == "transformers":
        model = _transformers(arch, num_classes, path, names, arrays)
        return Reference(model, "transformers", layout.name, _version("transformers"))
    if layout.framework == "torchvision":
        return Reference(_torchvision(arch, num_classes, arrays()), "torchvision", layout.name, _version("torchvision"))
    if not header_only and prefix in TIMM_PREFIXES:
        # timm's own loader: its choice of entry (EMA first), its prefix removal, its FB remapping
        from timm.models import load_checkpoint
        from timm.models.convnext import checkpoint_filter_fn

        del names
        model = create(arch, num_classes)
        _strict(load_checkpoint(model, str(path), use_ema=use_ema, strict=False, filter_fn=checkpoint_filter_fn),
                head_norm_affine, "timm")
    elif header_only and not prefix:
        model = loaded(arch, num_classes, path, head_norm_affine)
    else:
        model = create(arch, num_classes)
        _load_arrays(model, arrays(), head_norm_affine)
    return Reference(model.eval(), "timm", layout.name, timm.__version__)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _transformers(arch: Architecture, num_classes: int, path: Path, names, arrays):
    """transformers' own model for the tensors of exactly the file at `path`, loaded by its own loader.

    The network is the folder's `config.json` when it is a transformers config (as
    `from_pretrained` reads it), else built from `arch`; the weights are the file's, never the
    weights file `from_pretrained` would pick in the folder. Any key transformers leaves missing,
    finds unexpected or of the wrong shape is an error.
    """
    try:
        import transformers
    except ImportError:
        raise RuntimeError("No module named 'transformers': converting a transformers checkpoint checks it "
                           "against transformers (pip install transformers)") from None
    config = _transformers_config(transformers, arch, num_classes, path.parent)
    family = "ConvNextV2" if TRANSFORMERS_TYPES[config.model_type] else "ConvNext"
    headed = any(k.startswith(("convnext.", "convnextv2.")) for k in names)
    cls = getattr(transformers, f"{family}ForImageClassification" if headed else f"{family}Model")
    state = {k: torch.from_numpy(v) for k, v in arrays().items()}
    # mismatched shapes listed in `info` like the other problems (else transformers raises a bare error)
    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True,
                                      dtype=torch.float32, ignore_mismatched_sizes=True)
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"transformers refused the checkpoint: {problems}")
    return model.eval()


def _transformers_config(transformers, arch: Architecture, num_classes: int, folder: Path):
    """The folder's transformers `config.json`, read by transformers; else one that describes `arch`."""
    config_file = folder / "config.json"
    folder_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if folder_config.get("model_type") in TRANSFORMERS_TYPES:
        return transformers.AutoConfig.from_pretrained(folder)
    family = "ConvNextV2" if arch.use_grn else "ConvNext"
    return getattr(transformers, f"{family}Config")(
        depths=list(arch.depths), hidden_sizes=list(arch.dims), num_labels=num_classes,
        layer_scale_init_value=1e-6 if arch.layer_scale else 0.0, layer_norm_eps=arch.head_eps, drop_path_rate=0.0)


def _torchvision(arch: Architecture, num_classes: int, raw: dict):
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    settings = [CNBlockConfig(arch.dims[i], arch.dims[i + 1] if i < 3 else None, arch.depths[i]) for i in range(4)]
    model = ConvNeXt(settings, stochastic_depth_prob=0.0, layer_scale=1e-6, num_classes=num_classes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in raw.items()}, strict=True)
    return model.eval()


def forward(model, inputs: np.ndarray, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Every compared tensor for an NHWC batch, returned NHWC (`model`: a `Reference`, or timm's module).

    Run `batch_size` images at a time, as the Keras side runs them, each output filled in place:
    a whole parity batch at once holds GBs of activations (convnextv2_huge at 512: 2.5 GB more).
    """
    ref = model if isinstance(model, Reference) else Reference(model, "timm", "timm", timm.__version__)

    def run(part: np.ndarray) -> dict[str, np.ndarray]:
        captured = ref.outputs(torch.from_numpy(np.ascontiguousarray(part.transpose(0, 3, 1, 2))))
        return {name: (t.permute(0, 2, 3, 1) if t.ndim == 4 else t).float().numpy() for name, t in captured.items()}

    return in_batches(run, inputs, batch_size)


def _hooked(model, x, stem, stages, head_in, run) -> dict[str, torch.Tensor]:
    """`run(model, x)` (the logits) with the stem's and each stage's output and the classifier's input captured."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda _module, _args, output: captured.__setitem__(name, output)

    hooks = [stem.register_forward_hook(keep("stem"))]
    hooks += [stage.register_forward_hook(keep(f"stages.{i}")) for i, stage in enumerate(stages)]
    if head_in is not None:
        hooks.append(head_in.register_forward_pre_hook(
            lambda _module, args: captured.__setitem__("pre_logits", args[0])))
    try:
        captured["logits"] = run(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    if head_in is None:  # no classifier: the pooled, normalised features are the output
        captured["pre_logits"] = captured["logits"]
    return captured


def _timm_outputs(model, x):
    return _hooked(model, x, model.stem, model.stages, model.head.fc, lambda m, x: m(x))


def _torchvision_outputs(model, x):
    f = model.features  # [stem, stage 0, downsample, stage 1, downsample, stage 2, downsample, stage 3]
    return _hooked(model, x, f[0], [f[1], f[3], f[5], f[7]], model.classifier[2], lambda m, x: m(x))


def _transformers_logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.pooler_output


def _transformers_outputs(model, x):
    base = getattr(model, "convnext", None) or getattr(model, "convnextv2", None) or model
    head = getattr(model, "classifier", None)
    return _hooked(model, x, base.embeddings, base.encoder.stages,
                   head if isinstance(head, torch.nn.Linear) else None,
                   lambda m, x: _transformers_logits(m(pixel_values=x)))


_OUTPUTS = {"timm": _timm_outputs, "torchvision": _torchvision_outputs, "transformers": _transformers_outputs}


def features(arch: Architecture, num_classes: int, source: Path, inputs: np.ndarray, out_indices,
             head_norm_affine: bool = True) -> dict[str, np.ndarray]:
    """timm's `features_only=True` outputs (NHWC), the model loaded by timm's own pretrained path.

    The weights file goes in as `pretrained_cfg_overlay=dict(file=...)`, so timm applies its own
    loading and FB-layout filtering, then wraps the model in its feature extractor.
    """
    model = timm.create_model(arch.name, pretrained=True, features_only=True, out_indices=tuple(out_indices),
                              num_classes=num_classes, pretrained_strict=head_norm_affine,
                              pretrained_cfg_overlay=dict(file=str(source), num_classes=num_classes),
                              **arch.timm_kwargs()).eval()
    with torch.inference_mode():
        maps = model(torch.from_numpy(np.ascontiguousarray(inputs.transpose(0, 3, 1, 2))))
    return {f"features.{i}": t.permute(0, 2, 3, 1).float().numpy().copy() for i, t in zip(out_indices, maps)}


def classify(model: Reference, files: list[str], pretrained_cfg: dict, batch_size: int = 16) -> np.ndarray:
    """Logits for image files prepared by timm's own eval transform for `pretrained_cfg`."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config(pretrained_cfg=pretrained_cfg), is_training=False)
    out = []
    with torch.inference_mode():
        for i in range(0, len(files), batch_size):
            batch = []
            for f in files[i:i + batch_size]:
                with Image.open(f) as image:  # timm's ImageDataset loader: RGB
                    batch.append(transform(image.convert("RGB")))
            out.append(model.logits(torch.stack(batch)).float().numpy())
    return np.concatenate(out)


def random_state_dict(arch: Architecture, num_classes: int, seed: int = 0,
                      head_norm_affine: bool = True) -> dict[str, np.ndarray]:
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
        write_random(arch, spec["num_classes"], spec["random_seed"], Path(spec["source"]),
                     spec.get("head_norm_affine", True))
    # The bytes this process runs, for the converter to check against the bytes it converted: the
    # same digest before and after loading, or the file changed while it was read.
    digest = sha256_file(Path(spec["source"]))
    inputs = np.load(spec["inputs"]) if "inputs" in spec else None
    if "out_indices" in spec:
        outputs = features(arch, spec["num_classes"], Path(spec["source"]), inputs, spec["out_indices"],
                           spec.get("head_norm_affine", True))
    else:
        model = reference(arch, spec["num_classes"], Path(spec["source"]), spec.get("head_norm_affine", True),
                          spec.get("use_ema", True))
        ran = {"torch": torch.__version__, model.framework: model.version, "reference": model.framework,
               "layout": model.layout}
        if "files" in spec:
            outputs = {"logits": classify(model, spec["files"], spec["pretrained_cfg"])}
        else:
            outputs = forward(model, inputs)
    if sha256_file(Path(spec["source"])) != digest:
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
    write_random(Architecture.from_config(json.loads(args.arch)), args.num_classes, args.seed, Path(args.out),
                 not args.no_head_norm)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.reference", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fwd = sub.add_parser("forward", help="run timm on a spec written by the parity check "
                         "(its features_only model when the spec has out_indices; "
                         "image files through timm's transform when it has files)")
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
    try:
        sys.exit(main())
    except Exception as error:
        traceback.print_exc()  # for whoever runs it by hand; the parent reports the line below
        sys.stderr.write(failure_line(error) + "\n")
        sys.exit(1)
