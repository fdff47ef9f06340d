"""Checkpoints as each PyTorch framework saves them, every tensor perturbed to a realistic scale.

Built with the frameworks' own model classes and saved by their own savers (timm state dicts
and training checkpoints, DDP saves, transformers `save_pretrained`, torchvision state dicts),
so that the converter meets the keys, shapes and containers users have. LayerScale starts at
1e-6 and GRN at zero in these frameworks, which makes every block an identity: here they are
drawn away from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from converters.layouts import fit_mlp, recognise, to_timm
from converters.reading import read_source
from converters.reference import perturbed
from converters.source import SourceWeights
from zoo.core.architectures import Architecture


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter of `module` redrawn at a realistic, non-trivial scale (numpy, from `seed`),
    by the scheme of the converter's own random weights (`converters.reference.perturbed`)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            value = perturbed(name, tuple(p.shape), rng, classifier=name.startswith(CLASSIFIERS))
            p.copy_(torch.from_numpy(value))
    return module.eval()


# The classifier in each layout: timm's head.fc; transformers' classifier, torchvision's classifier.2
# (its classifier.0 is the head norm, whose 1-D weight takes the norm rule first).
CLASSIFIERS = ("head.fc.", "classifier.")


def timm_model(arch: Architecture, num_classes: int, seed: int = 0) -> torch.nn.Module:
    import timm

    return perturb(timm.create_model(arch.name, pretrained=False, num_classes=num_classes, **arch.timm_kwargs()), seed)


def transformers_model(
    arch: Architecture,
    num_classes: int,
    seed: int = 0,
    *,
    head: bool = True,
    labels: list[str] | None = None,
    layer_norm_eps: float = 1e-12,
) -> torch.nn.Module:
    """transformers' ConvNext(V2)ForImageClassification (or the bare Model without `head`)."""
    import transformers

    family = "ConvNextV2" if arch.use_grn else "ConvNext"
    extra = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}
    config = getattr(transformers, f"{family}Config")(
        depths=list(arch.depths),
        hidden_sizes=list(arch.dims),
        num_labels=num_classes,
        layer_norm_eps=layer_norm_eps,
        **({} if arch.use_grn else {"layer_scale_init_value": 1e-6}),
        **extra,
    )
    cls = getattr(transformers, f"{family}ForImageClassification" if head else f"{family}Model")
    return perturb(cls(config), seed)


def torchvision_model(arch: Architecture, num_classes: int, seed: int = 0) -> torch.nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    settings = [CNBlockConfig(arch.dims[i], arch.dims[i + 1] if i < 3 else None, arch.depths[i]) for i in range(4)]
    return perturb(ConvNeXt(settings, layer_scale=1e-6, num_classes=num_classes), seed)


def train_checkpoint(model: torch.nn.Module, ema: torch.nn.Module | None, path: Path, arch_name: str) -> Path:
    """A checkpoint as timm's train.py saves it (`model_best.pth.tar`): an argparse.Namespace and
    the optimizer's state beside the weights, the EMA weights under `state_dict_ema`."""
    state = {
        "epoch": 3,
        "arch": arch_name,
        "state_dict": model.state_dict(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        "version": 2,
        "args": argparse.Namespace(model=arch_name, lr=0.1, epochs=3),
        "metric": 41.5,
    }
    if ema is not None:
        state["state_dict_ema"] = ema.state_dict()
    torch.save(state, path)
    return path


def ddp_save(model: torch.nn.Module, path: Path) -> Path:
    """`torch.save(DistributedDataParallel(model).state_dict())`: every key prefixed `module.`."""
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    return path


def normalise_keys(state_dict: dict[str, np.ndarray], conv_mlp: bool = False) -> dict[str, np.ndarray]:
    """A state dict in any known layout renamed as the converter reads it (`reading.read_source`):
    timm's keys, MLP weights shaped for `conv_mlp`."""
    found = recognise(state_dict)
    return fit_mlp(to_timm(found.state, found.layout), conv_mlp)


def load_source(path: Path, conv_mlp: bool = False) -> dict[str, np.ndarray]:
    """A checkpoint file in any known layout as the converter ports it: read by `reading.read_source`
    (timm's keys), MLP weights shaped for `conv_mlp`."""
    return fit_mlp(read_source(SourceWeights(Path(path), None))[0], conv_mlp)
