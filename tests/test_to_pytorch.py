"""Back to PyTorch: a converted (or fine-tuned) Keras ConvNeXt exported as timm, transformers or
torchvision weights, each loaded by its framework's own loader in a fresh process.

The round trip is the identity: for every layout, `convert` then the export back to the source's
own framework gives back the source's tensors bit for bit (same keys, float32, same values), as
that framework itself holds them (FB's files: as timm's own remapping of them).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support import sources
from tests.support.archs import SMALL
from tests.support.cli import zoo_inline
from tests.support.fb_layout import to_fb_layout

V1, V1_CONV_MLP, V2 = SMALL["linear_mlp"], SMALL["conv_mlp"], SMALL["v2_grn"]
LABELS = ["cat", "dog", "bird"]


def _numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="session")
def sources_by_layout(tmp_path_factory):
    """One checkpoint per layout, written by its framework, with the tensors that framework holds for it."""
    root = tmp_path_factory.mktemp("back_sources")
    made = {}
    timm_v1 = sources.timm_model(V1_CONV_MLP, 5, seed=11)
    save_file(timm_v1.state_dict(), str(root / "timm.safetensors"))
    made["timm"] = (root / "timm.safetensors", "timm", _numpy_state(timm_v1))

    from timm.models.convnext import checkpoint_filter_fn

    fb_source = sources.timm_model(V2, 4, seed=12)
    fb = to_fb_layout(_numpy_state(fb_source))
    torch.save({"model": {k: torch.from_numpy(v) for k, v in fb.items()}}, root / "fb.pth")
    as_timm = checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in fb.items()}, fb_source)
    made["fb"] = (root / "fb.pth", "timm", {k: v.numpy() for k, v in as_timm.items()})

    for name, arch, seed in (("transformers_v1", V1, 13), ("transformers_v2", V2, 14)):
        model = sources.transformers_model(arch, 3, seed=seed, labels=LABELS)
        model.save_pretrained(root / name)
        made[name] = (
            root / name,
            "transformers",
            {k: v.numpy() for k, v in load_file(root / name / "model.safetensors").items()},
        )

    tv = sources.torchvision_model(V1, 7, seed=15)
    torch.save(tv.state_dict(), root / "tv.pth")
    made["torchvision"] = (root / "tv.pth", "torchvision", _numpy_state(tv))
    return made


def _exported_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("layout", ["timm", "fb", "transformers_v1", "transformers_v2", "torchvision"])
def test_round_trip_is_the_identity(layout, sources_by_layout, tmp_path):
    source, framework, expected = sources_by_layout[layout]
    folder = tmp_path / "converted"
    result = zoo_inline("convert", "--checkpoint", source, "--out", folder)
    assert result.exit_code == 0, result.output
    out = tmp_path / f"back.{framework}"
    result = zoo_inline("export", folder, "--format", framework, "--out", out)
    assert result.exit_code == 0, result.output

    got = _exported_tensors(out)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32, key
        assert tuple(got[key].shape) == value.shape, key
        assert np.array_equal(got[key].numpy(), value.astype(np.float32)), key
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["export"]["framework"] == framework
    compared = {c["name"] for c in report["parity"]["comparisons"]}
    assert {"stem", "stages.0", "stages.3", "pre_logits", "logits"} <= compared
