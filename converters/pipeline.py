"""The whole conversion: a plan (`converters.plan`) run top to bottom by `run`, the one spine.

source -> (the source framework runs the parity batch, in its own process) -> read and map -> write
-> load back -> parity -> saved folder. `convert` (a catalogue name or entry) and `convert_checkpoint`
(your own checkpoint) are the two front ends; `verify`, `convert_all` and a folder's recorded source
live in `converters.verify`, `converters.batch` and `converters.recorded`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from checkpoints import store
from checkpoints.fs import work_dir
from zoo.core.catalogue import CatalogueEntry, resolve
from zoo.core.errors import MappingError, ZooError
from zoo.core.folder_config import KERAS_CONFIG, WEIGHTS
from zoo.core.reports import ParityReport
from zoo.core.steps import step

from . import mapping, parity, reading
from .layouts import fit_mlp
from .plan import Choices, Options, Plan, Tensors, for_checkpoint, for_entry, framework_of
from .reference_process import Network

log = logging.getLogger(__name__)


def run(plan: Plan, options: Options = Options()) -> tuple[Path, ParityReport]:
    """Run a conversion plan; the folder is committed only if parity passes.

    The source framework loads the source and runs the parity batch in its own process, to its end,
    before this one reads the source (where the plan has not read it already): the two processes never
    hold the weights at the same time. The tensors are written straight into the weights file, and the
    folder's bytes, loaded back as `keras.saving.load_model` does, are what parity judges.

    Raises:
        ZooError: any failure; nothing is written then.
    """
    echo = options.echo
    with parity.started(plan.network, plan.source.path, random_seed=plan.random_seed) as pending:
        with step(echo, f"build {plan.network.arch.name}"):
            model = empty_model(plan.network, storage=False)  # its variables hold nothing: written from the tensors
        state, src = (plan.tensors or _read_after_reference(pending, plan, model, echo)).take()
        record = plan.record(src, model.count_params())
        with store.writing(plan.out, model) as folder:
            with step(echo, f"write the Keras model ({WEIGHTS}, {KERAS_CONFIG})"):
                listed = None if options.verbose else mapping.LISTED
                folder.save_model(model, record.name, mapping.values(state, model, listed))
                state = model = None  # the tensors leave memory before the folder is loaded back
            with step(echo, "load it back as keras.saving.load_model does"):
                model = folder.load_model()
            with step(echo, f"parity against {framework_of(src)} (separate process)"):
                report = pending.check(model, atol=options.atol, rtol=options.rtol)
            parity.check_same_source(report, record.source.sha256)
            echo(report.table())
            report.assert_passed()
            with step(echo, f"finish {folder.out}"):
                folder.commit(record, report.to_json())
    return folder.out, report


def convert(
    name: str | CatalogueEntry,
    *,
    out: str | Path | None = None,
    checkpoint: str | Path | None = None,
    random_seed: int | None = None,
    revision: str | None = None,
    from_url: bool = False,
    options: Options = Options(),
) -> tuple[Path, ParityReport]:
    """Convert one catalogued checkpoint and write it only if parity passes.

    Args:
        name: catalogue name, FB alias or bare architecture name, or a `CatalogueEntry` (its
            architecture row travels with it: `entry.with_architecture(row)`).
        out: destination folder (default: the local store, `store_path(canonical name)`).
        checkpoint: a local source file instead of the Hub download.
        random_seed: use perturbed random weights in timm's layout (not pretrained) instead.
        revision: Hub revision of the source repo.
        from_url: download the original release (FB's `.pth`/`.pt`) instead of timm's Hub copy;
            the only source of checkpoints timm does not carry.
        options: the parity gate's tolerances and where each step's line goes.

    Returns:
        The written folder and the parity report.

    Raises:
        ZooError: any failure; nothing is written then.
    """
    entry = name if isinstance(name, CatalogueEntry) else resolve(name)
    out = store.check_destination(out if out else store.store_path(entry.name))  # before the slow work
    with work_dir("zoo-convert-") as work:
        with step(options.echo, "source weights"):
            plan = for_entry(
                entry, out, work, checkpoint=checkpoint, random_seed=random_seed, revision=revision, from_url=from_url
            )
        try:
            return run(plan, options)
        except MappingError as e:
            if checkpoint is None:
                raise
            raise MappingError(
                f"{e}\n(a fine-tune of {entry.name} with another head converts without the "
                "catalogue name: zoo convert --checkpoint FILE --out DIR)"
            ) from None


def convert_checkpoint(
    checkpoint: str | Path, *, out: str | Path | None = None, options: Options = Options(), **choices
) -> tuple[Path, ParityReport]:
    """Convert any PyTorch ConvNeXt checkpoint, its architecture and head read from its tensors.

    Takes timm, FB, transformers (ConvNext, ConvNextV2) and torchvision layouts, in safetensors
    or pickle containers (training checkpoints: EMA weights first, as timm), wrapper prefixes
    (`module.`) removed, from a file, a `save_pretrained`/timm repo folder, or `hf://ORG/REPO`.
    The parity check runs the checkpoint in the framework it came from.

    Args:
        checkpoint: a file, a folder, or `hf://ORG/REPO[@REVISION]`.
        out: destination folder (default: the local store under the name).
        options: the parity gate's tolerances, `verbose` (a mismatch lists every key, not the first
            few) and where each step's line goes.
        **choices: what the files do not say, as `converters.plan.Choices` names it: `name` (one
            folder name; default: the repo's, folder's or file's), `arch` (a timm architecture name the
            tensors must be: checked, not trusted), `input_size`, `mean`, `std`, `labels` (a name per
            class), `use_ema` (default True: a training checkpoint's EMA weights), `revision` (`hf://`).

    Returns:
        The written folder and the parity report.

    Raises:
        InvalidNameError: the name cannot name a folder (before anything else).
        ZooError: any failure; nothing is written then.
    """
    with work_dir("zoo-convert-"):
        return run(for_checkpoint(checkpoint, Choices(**choices), out, options.echo), options)


def _read_after_reference(pending: parity.PendingCheck, plan: Plan, model, echo) -> Tensors:
    """The plan's source read once the PyTorch reference has run the parity batch and ended.

    Where the reference failed, a source this process cannot read or map onto `model` either fails
    as it would here (the converter's own error, naming what is wrong with the file) rather than
    with how the source framework took it; random weights it did not write, with its own error.
    """
    try:
        with step(echo, "the PyTorch reference runs the parity batch (separate process)"):
            pending.wait_for_reference()
    except ZooError:
        if plan.source.path.is_file():
            mapping.values(_read(plan).take()[0], model)  # raises naming every missing, unexpected, mis-shaped tensor
        raise
    with step(echo, f"read {plan.source.path.name}"):
        return _read(plan)


def _read(plan: Plan) -> Tensors:
    """The plan's source as a state dict (MLP weights shaped for its network), with its sha256 and layout."""
    state, src = reading.read_source(plan.source, use_ema=plan.network.use_ema)
    return Tensors(fit_mlp(state, plan.network.arch.conv_mlp), src)


def empty_model(network: Network, *, storage: bool = True):
    """The float32 Keras model for `network`, whatever dtype policy is set globally.

    Its kernels start at zero, not random: every variable is assigned from the source next.
    Without `storage`, its variables have their shapes and dtypes but hold no values (Keras'
    deferred initialisation): the model a weights file is written for from the source's
    tensors (`checkpoints.weights.write_weights`), at no memory (convnext_xxlarge: 3.4 GB of
    zeros otherwise).
    """
    from zoo.core.model import build_model, dtype_policy

    with dtype_policy("float32"), contextlib.nullcontext() if storage else _without_storage():
        return build_model(
            network.arch,
            num_classes=network.num_classes,
            head_norm_affine=network.head_norm_affine,
            initialize=False,
            features=network.features,
        )


@contextlib.contextmanager
def _without_storage() -> Iterator[None]:
    """Keras variables made in the block have their shapes and dtypes and hold no values.

    Keras defers a variable made in a stateless scope and initialises every deferred one when the
    next such scope it opens itself ends: the block's are taken off that list, so that they never
    take memory. A Keras without these pieces makes the variables as usual.
    """
    try:
        from keras import StatelessScope
        from keras.src.backend.common import global_state
    except ImportError:
        yield
        return
    key = "uninitialized_variables"
    before = list(global_state.get_global_attribute(key) or [])
    try:
        with StatelessScope(initialize_variables=False):
            yield
    finally:
        global_state.set_global_attribute(key, before)


__all__ = ["Choices", "Options", "Plan", "convert", "convert_checkpoint", "empty_model", "run"]
