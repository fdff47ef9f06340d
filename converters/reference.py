"""The PyTorch side of the parity check, run as its own process (`python -m converters.reference`).

TensorFlow imported before torch+timm in one process crashes the timm forward pass, so the
reference never shares a process with Keras: the parent writes inputs to disk, this process
builds timm's model from the same architecture row, loads the same weights, and writes every
compared tensor back as NHWC numpy.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
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

from converters.layouts import is_fb_layout  # noqa: E402
from converters.reading import read_state_dict  # noqa: E402
from zoo.architectures import Architecture  # noqa: E402

HEAD_NORM_KEYS = ("head.norm.weight", "head.norm.bias")
OUTPUTS = ("stem", "stages.0", "stages.1", "stages.2", "stages.3", "pre_logits", "logits")


def create(arch: Architecture, num_classes: int, device: str = "cpu") -> torch.nn.Module:
    """timm's model for an architecture row, in eval mode.

    On the `meta` device its tensors have shapes and no storage (nothing is initialised).
    """
    with torch.device(device):
        model = timm.create_model(arch.name, pretrained=False, num_classes=num_classes, **arch.timm_kwargs())
    return model.eval()


def loaded(arch: Architecture, num_classes: int, path: Path, head_norm_affine: bool = True) -> torch.nn.Module:
    """timm's model for `arch` holding the checkpoint at `path` (see `load_weights`).

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


def load_weights(model: torch.nn.Module, path: Path, head_norm_affine: bool = True) -> None:
    """Load a checkpoint strictly; FB-layout files go through timm's own key remapping.

    Using timm's `checkpoint_filter_fn` here (not the converter's `normalise_keys`) makes the
    parity check an independent test of the converter's FB renaming. Checkpoints without
    head-norm weights (FCMAE) load as timm loads them: that norm keeps its identity init.
    A model on the `meta` device takes the checkpoint's tensors as its own.
    """
    from timm.models.convnext import checkpoint_filter_fn

    arrays = read_state_dict(path)
    state = {k: torch.from_numpy(v) for k, v in arrays.items()}
    if is_fb_layout(arrays):
        state = checkpoint_filter_fn(state, model)
    on_meta = any(p.is_meta for p in model.parameters())
    missing, unexpected = model.load_state_dict(state, strict=False, assign=on_meta)
    allowed = set() if head_norm_affine else set(HEAD_NORM_KEYS)
    if set(missing) - allowed or unexpected or (allowed and set(missing) != allowed):
        raise RuntimeError(f"timm refused the checkpoint: missing {missing}, unexpected {unexpected}")


@torch.inference_mode()
def forward(model: torch.nn.Module, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every compared tensor for an NHWC batch, returned NHWC."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda _module, _args, output: captured.__setitem__(name, output)

    hooks = [model.stem.register_forward_hook(keep("stem"))]
    hooks += [stage.register_forward_hook(keep(f"stages.{i}")) for i, stage in enumerate(model.stages)]
    hooks.append(model.head.fc.register_forward_pre_hook(
        lambda _module, args: captured.__setitem__("pre_logits", args[0])))
    try:
        x = torch.from_numpy(np.ascontiguousarray(inputs.transpose(0, 3, 1, 2)))
        captured["logits"] = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (t.permute(0, 2, 3, 1) if t.ndim == 4 else t).float().numpy().copy()
            for name, t in captured.items()}


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


def classify(model: torch.nn.Module, files: list[str], pretrained_cfg: dict, batch_size: int = 16) -> np.ndarray:
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
            out.append(model(torch.stack(batch)).float().numpy())
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
        shape = tuple(tensor.shape)
        if key.endswith("gamma") or ".grn." in key:
            value = rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
        elif tensor.ndim == 1 and key.endswith(".weight"):  # norm scales
            value = 1.0 + 0.25 * rng.standard_normal(shape)
        elif tensor.ndim == 1:  # biases
            value = 0.1 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            gain = 3.0 if key.startswith("head.fc") else 1.0  # logits of a few units, as trained nets
            value = gain * rng.standard_normal(shape) / np.sqrt(fan_in)
        out[key] = value.astype(np.float32)
    return out


def _forward_command(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    arch = Architecture.from_config(spec["arch"])
    if "random_seed" in spec:  # the source is random weights this process writes first
        write_random(arch, spec["num_classes"], spec["random_seed"], Path(spec["source"]),
                     spec.get("head_norm_affine", True))
    inputs = np.load(spec["inputs"]) if "inputs" in spec else None
    if "out_indices" in spec:
        outputs = features(arch, spec["num_classes"], Path(spec["source"]), inputs, spec["out_indices"],
                           spec.get("head_norm_affine", True))
    else:
        model = loaded(arch, spec["num_classes"], Path(spec["source"]), spec.get("head_norm_affine", True))
        if "files" in spec:
            outputs = {"logits": classify(model, spec["files"], spec["pretrained_cfg"])}
        else:
            outputs = forward(model, inputs)
    np.savez(spec["outputs"], **outputs)
    if "versions" in spec:  # what the reference ran on, for the parity report
        Path(spec["versions"]).write_text(json.dumps({"torch": torch.__version__, "timm": timm.__version__}))


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
    sys.exit(main())
