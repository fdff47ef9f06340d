"""The way back to PyTorch, proven: a Keras ConvNeXt's weights written for timm, transformers or
torchvision (`converters.targets`), then loaded by that framework's own loader in the reference
process and compared with the Keras model on the parity images (stem, every stage, pre-logits and
logits; the conversion's gate).

The Keras model is read through the conversion's own table run backwards (`mapping.timm_state`):
only transposes, so a converted model gives back its source's tensors bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from checkpoints.fs import ordinary, work_dir
from zoo.core.errors import ExportError, MappingError, SourceError
from zoo.core.model import DropPath, build_model, dtype_policy
from zoo.core.reports import DEFAULT_ATOL, DEFAULT_RTOL, ParityReport

from .inference import infer
from .mapping import timm_state
from .parity import compare_model
from .reference_process import Network, exported_outputs
from .targets import WEIGHTS, Described, Target, torchvision_builder

# layers that compute nothing at inference, and so have no counterpart to check
_INERT = (keras.layers.InputLayer, DropPath, keras.layers.Dropout)


def read_network(model: keras.Model) -> tuple[keras.Model, dict[str, np.ndarray], Described]:
    """What a Keras ConvNeXt holds: its float32 twin built by `build_model` for the network its weights
    say (the same weights, whatever dtype policy `model` computes in), those weights as timm's tensors,
    and the network described (name from the model; labels and preprocessing left for the caller).

    Raises:
        ExportError: layers added, renamed or removed since `build_model` made it (all listed), or
            weights that are not a ConvNeXt's.
    """
    try:
        state = timm_state(model, shapes_only=True)  # the network, read from the names and shapes
        norm_eps = _epsilon(model, "stages.0.blocks.0.norm")
        head_eps = _epsilon(model, "head.norm")
        inferred = infer(state, norm_eps=norm_eps, head_norm_eps=head_eps)
    except (MappingError, SourceError) as e:
        raise ExportError(f"{model.name}: {e}") from None
    arch = inferred.arch
    with dtype_policy("float32"):
        twin = build_model(
            arch,
            num_classes=inferred.num_classes,
            head_norm_affine=inferred.head_norm_affine,
            initialize=False,
            features=inferred.features,
            name=model.name,
        )
    _check_same_layers(model, twin)
    for layer in twin.layers:
        if layer.weights:
            layer.set_weights([np.asarray(w, np.float32) for w in model.get_layer(layer.name).get_weights()])
    described = Described(
        model.name, arch, inferred.num_classes, inferred.head_norm_affine, None, {}, inferred.features
    )
    return twin, timm_state(twin), described


def _epsilon(model: keras.Model, name: str) -> float | None:
    try:
        layer = model.get_layer(name)
    except ValueError:
        return None
    eps = getattr(layer, "epsilon", None)
    return float(eps) if eps is not None else None


def _check_same_layers(model: keras.Model, twin: keras.Model) -> None:
    """Refuse a model whose layers are not those of the network its weights say (by name and type)."""

    def layers_of(m: keras.Model) -> dict[str, str]:
        return {layer.name: type(layer).__name__ for layer in m.layers if not isinstance(layer, _INERT)}

    ours, built = layers_of(model), layers_of(twin)
    added = sorted(n for n in ours if n not in built)
    missing = sorted(n for n in built if n not in ours)
    retyped = sorted(f"{n} ({ours[n]}, expected {built[n]})" for n in ours if n in built and ours[n] != built[n])
    if not (added or missing or retyped):
        return
    lines = [f"  + not in a ConvNeXt: {n} ({ours[n]})" for n in added]
    lines += [f"  - missing: {n}" for n in missing]
    lines += [f"  ~ another type: {n}" for n in retyped]
    cut = (
        " (a model cut at its stages or its feature map: export the whole model; timm's "
        "create_model(..., features_only=True) on the export gives its stage maps)"
        if missing and not added
        else ""
    )
    raise ExportError(
        f"{model.name} is not the ConvNeXt its weights make: {len(added)} layers added, {len(missing)} missing, "
        f"{len(retyped)} of another type{cut}; the way back writes the network's own layers and nothing else:\n"
        + "\n".join(lines)
    )


def write(target: Target, described: Described, state: dict[str, np.ndarray], folder: Path) -> list[str]:
    """The target's files in `folder`: its weights (`model.safetensors`, float32, keyed as its model class
    keys them) and its configs. Returns the names written."""
    import json

    from safetensors.numpy import save_file

    weights = target.state(described, state)
    save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()},
        str(folder / WEIGHTS),
        metadata={"format": "pt"},
    )
    ordinary(folder / WEIGHTS)  # safetensors writes 0600; the other files are as open() makes them
    names = [WEIGHTS]
    for name, config in target.configs(described).items():
        (folder / name).write_text(json.dumps(config, indent=2) + "\n")
        names.append(name)
    return names


def prove(
    target: Target,
    twin: keras.Model,
    described: Described,
    folder: Path,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> ParityReport:
    """Load `folder` with the target framework's own loader in the reference process and compare its
    outputs on the parity images with `twin`'s: stem, every stage, pre-logits and logits (a backbone's
    feature maps), held to the conversion's gate. The report's `passed` says whether it held.

    Raises:
        ReferenceRunError: the framework refused the files (any key missing, unexpected or mis-shaped)
            or is not installed.
    """
    network = Network(
        described.arch,
        described.num_classes,
        True,
        described.input_size,
        tuple(described.pretrained_cfg["mean"]),
        tuple(described.pretrained_cfg["std"]),
        features=described.features,
    )
    inputs = network.parity_batch()
    export = {"framework": target.name, "folder": str(folder), "builder": None}
    if target.name == "torchvision":
        export["builder"] = torchvision_builder(described)
    with work_dir("zoo-back-") as work:
        ref, ran = exported_outputs(network, folder / WEIGHTS, inputs, export, work)
        return compare_model(
            twin, described.arch, inputs, ref, atol=atol, rtol=rtol, versions=ran, features=described.features
        )
