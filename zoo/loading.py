"""The last step: a converted folder (or a name in the local store) back into a Keras model."""

from __future__ import annotations

import logging
from pathlib import Path

import keras

from checkpoints.converted import ConvertedFolder

from .core.architectures import Architecture
from .core.catalogue import resolve
from .core.errors import ArchitectureError, BackboneError
from .core.model import ConvNeXt, build_model, classifier, dtype_policy, feature_names, features_layer, pre_logits
from .core.runtime import policy_name
from .locating import locate

log = logging.getLogger(__name__)


def build_untrained(
    name: str | Architecture,
    *,
    num_classes: int | None = None,
    include_top: bool = True,
    pooling: str | None = "avg",
    drop_path_rate: float = 0.0,
    input_shape: tuple | None = None,
    dtype: str | None = None,
) -> keras.Model:
    """An uninitialised model for a checkpoint name, alias, architecture name or row.

    `num_classes` defaults to the checkpoint's head (1000 for a bare architecture row);
    `dtype` as for `load`.
    """
    policy = policy_name(dtype)
    if isinstance(name, Architecture):
        arch, classes = name, 1000
    else:
        ckpt = resolve(name)
        arch, classes = ckpt.arch, ckpt.num_classes
    with dtype_policy(policy):
        return build_model(
            arch,
            num_classes=classes if num_classes is None else num_classes,
            include_top=include_top,
            pooling=pooling,
            drop_path_rate=drop_path_rate,
            input_shape=input_shape,
        )


def load(
    name_or_path: str | Path,
    *,
    include_top: bool = True,
    pooling: str | None = "avg",
    num_classes: int | None = None,
    input_shape: tuple | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    drop_path_rate: float = 0.0,
    dtype: str | None = None,
    revision: str | None = None,
    hub_org: str | None = None,
    convert: bool = True,
) -> keras.Model:
    """A converted ConvNeXt with its weights.

    A folder path loads that folder, `hf://ORG/NAME[@REVISION]` that published repo (every
    sha256 checked). A name (canonical, alias or architecture) is looked up:
    (1) the local store, (2) the published Hub repo `<org>/<name>` (`ZOO_HUB_ORG`), pinned to
    one commit with every file's sha256 checked, (3) with the `convert` extra installed, a
    conversion from the source weights behind the parity gate, stored for next time. Steps
    (1) and (2) never import torch.

    Args:
        name_or_path: converted folder, `hf://ORG/NAME[@REVISION]`, or checkpoint name / alias /
            architecture name.
        include_top: keep the classifier. Without it the model returns the trained pooled
            features (pool + the trained head norm, timm's pre-logits) for `pooling="avg"`,
            or the feature map for `pooling=None`.
        pooling: see `include_top`.
        num_classes: a new classifier width: the backbone and head norm load, the new head is
            initialised fresh (and a warning says so); 0 drops the classifier (the pooled
            features, as timm's `num_classes=0`).
        input_shape: fixed NHWC input shape without batch (default: any size, the checkpoint's
            input channels).
        features_only: return a backbone whose outputs are the list of stage feature maps
            selected by `out_indices` (strides 4, 8, 16, 32), as timm's `features_only=True`;
            any input size divisible by 32 keeps the strides exact.
        out_indices: stages returned with `features_only`.
        drop_path_rate: stochastic depth for fine-tuning (rate of the last block, rising
            linearly from 0 as in timm); active only in training.
        dtype: precision for inference: "float32", "bfloat16" (weights and compute in
            bfloat16, normalisation statistics and logits in float32: about 2x faster on
            CPUs with AVX-512 BF16 or AMX, top-1 equal to float32's on >= 99% of images) or
            "float16" (Keras' mixed_float16, for GPUs); default: the global Keras dtype
            policy (set "mixed_bfloat16" there for fine-tuning). Logits are float32;
            features come in the compute precision.
        revision: Hub revision for step (2).
        hub_org: organisation for step (2) (default `ZOO_HUB_ORG`, else `convnext-zoo`).
        convert: allow step (3).

    Raises:
        ZooError: no step produced the model; the message says what each step found.
    """
    policy_name(dtype)  # bad values fail before any lookup
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    folder = locate(name_or_path, revision=revision, hub_org=hub_org, convert=convert)
    return from_folder(
        folder,
        include_top=include_top,
        pooling=pooling,
        num_classes=num_classes,
        input_shape=input_shape,
        features_only=features_only,
        out_indices=out_indices,
        drop_path_rate=drop_path_rate,
        dtype=dtype,
    )


def from_folder(
    folder: ConvertedFolder,
    *,
    include_top: bool = True,
    pooling: str | None = "avg",
    num_classes: int | None = None,
    input_shape: tuple | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    drop_path_rate: float = 0.0,
    dtype: str | None = None,
) -> keras.Model:
    """Build the folder's architecture, load its (already verified) weights, adapt the head."""
    if pooling not in ("avg", None):
        raise ValueError(f"pooling must be 'avg' or None, got {pooling!r}")
    with dtype_policy(policy_name(dtype)):
        return _from_folder(
            folder, include_top, pooling, num_classes, input_shape, features_only, out_indices, drop_path_rate
        )


def _from_folder(
    folder, include_top, pooling, num_classes, input_shape, features_only, out_indices, drop_path_rate
) -> keras.Model:
    config = folder.config
    if not config.pretrained:
        log.warning(
            "%s: %s holds seeded random weights (converted with --random-weights), not a pretrained model",
            config.name,
            folder.path,
        )
    arch = config.architecture
    # what is asked of the folder, checked before any work: bad indices, or a head a backbone has not
    picked = _picked(config, include_top, pooling, num_classes, features_only, out_indices)
    outputs = feature_names(arch, out_indices) if features_only and not config.is_backbone else None
    model = build_model(
        arch,
        num_classes=config.num_classes,
        name=config.name,
        head_norm_affine=config.head_norm_affine,
        drop_path_rate=drop_path_rate,
        input_shape=_input_shape(input_shape, arch, config.name),
        initialize=False,
        features=config.features,
    )
    model.load_weights(folder.weights)
    if config.is_backbone:
        if picked == config.features:
            return model
        maps = [model.outputs[config.features.index(i)] for i in picked]
        return ConvNeXt(model.input, maps, name=f"{model.name}_features")
    if features_only:
        return ConvNeXt(model.input, [model.get_layer(n).output for n in outputs], name=f"{model.name}_features")
    if not include_top or num_classes == 0:
        features = pre_logits(model) if pooling == "avg" else model.get_layer(features_layer(arch)).output
        return ConvNeXt(model.input, features, name=f"{model.name}_features")
    if num_classes is not None and num_classes != config.num_classes:
        log.warning(
            "%s: new %d-class head initialised fresh (the checkpoint's has %d classes); "
            "the backbone and head norm are pretrained",
            config.name,
            num_classes,
            config.num_classes,
        )
        head = classifier(num_classes)(pre_logits(model))
        return ConvNeXt(model.input, head, name=model.name)
    return model


def _picked(config, include_top, pooling, num_classes, features_only, out_indices) -> tuple[int, ...]:
    """The stages a dense-prediction backbone's folder is asked for (its own out_indices, or those of
    `features_only`); a head (`num_classes`) or pooled features ask for what it does not have. Empty
    for a classifier's folder.

    Raises:
        BackboneError: a head or pooling asked of a backbone.
        ValueError: out_indices that are not stages it returns.
    """
    if not config.is_backbone:
        return ()
    if num_classes or pooling is None or not include_top:
        raise BackboneError(
            f"{config.name} is a dense-prediction backbone (the feature maps of stages {list(config.features)}): "
            "it has no head to pool, keep or replace; load it as it is, or with features_only=True, out_indices=..."
        )
    if not features_only:
        return config.features
    try:
        picked = tuple(range(4)[i] for i in out_indices)
    except (IndexError, TypeError):
        picked = None
    if picked is None or not set(picked) <= set(config.features):
        raise ValueError(
            f"out_indices must be stages this backbone returns ({list(config.features)}), got {out_indices!r}"
        )
    return picked


def _input_shape(input_shape: tuple | None, arch: Architecture, name: str) -> tuple | None:
    """`input_shape`, if it has the checkpoint's channels (None: any size, those channels).

    Raises:
        ArchitectureError: another channel count (the stem's weights could not load).
    """
    if input_shape is not None and input_shape[-1] != arch.in_chans:
        raise ArchitectureError(
            f"input_shape {tuple(input_shape)} has {input_shape[-1]} channels; {name} takes {arch.in_chans} "
            f"(its stem's weights): give (height, width, {arch.in_chans}) or leave input_shape out"
        )
    return input_shape


__all__ = ["build_untrained", "from_folder", "load", "locate"]
