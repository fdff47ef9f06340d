"""The reference runs exactly the file converted: a weights file given by path beside other weights
files is the one compared (conversion, `zoo verify`, `zoo export`), loaded by the framework's own
code, and a reference process that fails ends in one error line.

The sources are transformers `save_pretrained` folders (tests/support/sources.py), with other
weights of the same network, drawn from other seeds, saved beside them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from checkpoints.converted import open_folder
from checkpoints.weights import load_keras_folder
from converters.reference_process import Network, run_reference_process, write_spec
from tests.support import sources
from tests.support.archs import SMALL
from tests.support.cli import one_line_error, verify_then_export_keras, zoo_cli, zoo_inline
from zoo.core.errors import ReferenceRunError, StoreError

V1, V2 = SMALL["linear_mlp"], SMALL["v2_grn"]
CLASSES = 3
SEEDS = {
    "beside": 6,
    "beside/other.safetensors": 11,
    "beside/pytorch_model.bin": 12,
    "alone/other.safetensors": 11,
}  # what is converted -> the seed of the weights it holds


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in sources.transformers_model(V2, CLASSES, seed=seed).state_dict().items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """`beside`: a save_pretrained folder whose model.safetensors (seed 6) has other.safetensors
    (seed 11) and pytorch_model.bin (seed 12) beside it; `alone`: its config.json with
    other.safetensors and no model.safetensors."""
    root = tmp_path_factory.mktemp("sources")
    sources.transformers_model(V2, CLASSES, seed=SEEDS["beside"]).save_pretrained(root / "beside")
    save_file(_state(SEEDS["beside/other.safetensors"]), str(root / "beside" / "other.safetensors"))
    torch.save(_state(SEEDS["beside/pytorch_model.bin"]), root / "beside" / "pytorch_model.bin")
    (root / "alone").mkdir()
    shutil.copy(root / "beside" / "config.json", root / "alone")
    shutil.copy(root / "beside" / "other.safetensors", root / "alone")
    return root


@pytest.fixture(scope="module")
def converted(folders, tmp_path_factory):
    """Each source converted once through the CLI: name -> folder."""
    done = {}

    def convert(given):
        if given not in done:
            out = tmp_path_factory.mktemp("converted") / given.replace("/", "-")
            result = zoo_inline("convert", "--checkpoint", folders / given, "--out", out)
            assert result.exit_code == 0, result.stderr[-3000:]
            done[given] = out
        return done[given]

    return convert


def _transformers_logits(seed: int, inputs: np.ndarray) -> np.ndarray:
    model = sources.transformers_model(V2, CLASSES, seed=seed)
    with torch.inference_mode():
        return model(pixel_values=torch.from_numpy(inputs.transpose(0, 3, 1, 2).copy())).logits.numpy()


FILES = sorted(name for name in SEEDS if "/" in name)


# a pytorch_model.bin beside model.safetensors takes the same path as other.safetensors, and a file alone
# in a folder with a config the same as one beside others: -m slow
@pytest.mark.parametrize(
    "given", [pytest.param(f, marks=pytest.mark.slow) if not f.startswith("beside/other") else f for f in FILES]
)
def test_the_file_given_is_the_one_converted_and_compared(given, folders, converted):
    """The recorded sha256 is the given file's, parity passed against it, and the converted model's
    logits are its weights' (not its neighbours'); the folder itself still converts its
    model.safetensors."""
    for name, file in ((given, folders / given), ("beside", folders / "beside" / "model.safetensors")):
        out = converted(name)
        folder = open_folder(out)
        assert folder.config.source.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
        assert folder.config.source.filename == file.name
        assert folder.parity["passed"] and folder.parity["versions"]["reference"] == "transformers"
        inputs = Network.of_folder(folder.config).parity_batch()
        ours = np.asarray(load_keras_folder(out).predict(inputs, verbose=0))
        theirs = {seed: _transformers_logits(seed, inputs) for seed in set(SEEDS.values())}
        assert np.abs(ours - theirs[SEEDS[name]]).max() <= 1e-4, name
        assert all(np.abs(ours - logits).max() > 0.1 for seed, logits in theirs.items() if seed != SEEDS[name])


@pytest.mark.slow
def test_verify_and_export_run_the_recorded_file(converted, tmp_path):
    """`zoo verify` and `zoo export` re-run the reference on other.safetensors, the file recorded,
    though a model.safetensors of other weights sits beside it."""
    verified, report = verify_then_export_keras(converted("beside/other.safetensors"), tmp_path)
    assert "parity against transformers" in verified
    assert report["source"]["pytorch_reference"] == "transformers"
    assert report["vs_pytorch"]["max_abs"] <= 1e-4


def test_a_failing_reference_is_one_error_line(tmp_path):
    """transformers refuses weights its config.json does not describe (no layer scale, say): the
    conversion ends in one `error:` line naming what it refused, without the child's stack frames."""
    sources.transformers_model(V1, CLASSES, seed=5).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "layer_scale_init_value": 0.0}))
    result = zoo_cli("convert", "--checkpoint", tmp_path / "hf", "--out", tmp_path / "out")
    line = one_line_error(result)
    assert "transformers refused the checkpoint" in line and "layer_scale_parameter" in line
    assert 'File "' not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_reference_process_that_fails_reports_its_error_in_one_line(tmp_path):
    """Whatever the layout, the child's own error (here: its source file is gone) is the one line."""
    network = Network(V2, CLASSES, True, 64, (0.5,) * 3, (0.25,) * 3)
    spec = write_spec(network, tmp_path / "gone.safetensors", tmp_path, inputs=network.parity_batch())
    with pytest.raises(ReferenceRunError) as err:
        run_reference_process(["forward", str(spec)])
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "gone.safetensors" in message and 'File "' not in message


def test_every_layout_names_a_framework_the_reference_runs():
    from converters.layouts import LAYOUTS
    from converters.reference import ADAPTERS

    assert {layout.framework for layout in LAYOUTS.values()} <= ADAPTERS.keys()


# what the child's `torch` does when imported -> the one line the converter reports
FAILURES = {
    "missing": (
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')",
        "the PyTorch reference needs torch and timm: pip install 'convnext-zoo[convert]'",
    ),
    "error_after_output_on_stdout": (
        "print('a line of its own on stdout')\nraise RuntimeError('the framework\\nfailed')",
        "the PyTorch reference process failed (exit 1): RuntimeError: the framework failed",
    ),
    "killed": (
        "import os, signal, sys\nsys.stderr.write('its last words\\n')\nsys.stderr.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)",
        "the PyTorch reference process was killed by SIGKILL: its last words",
    ),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_the_failure_a_child_reports_is_the_one_line(case, tmp_path, monkeypatch):
    """The child reports its failure on its stdout, which it keeps for that alone; a child that
    reports none (killed: out of memory, say) is named by its end and the last line it wrote."""
    code, says = FAILURES[case]
    (tmp_path / "shadow" / "torch").mkdir(parents=True)
    (tmp_path / "shadow" / "torch" / "__init__.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))  # this `torch` before the installed one
    with pytest.raises(ReferenceRunError) as err:
        run_reference_process(["forward", str(tmp_path / "spec.json")])
    assert str(err.value) == says


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full to write to")
def test_a_full_disk_under_the_reference_is_a_store_error(tmp_path):
    network = Network(V2, CLASSES, True, 64, (0.5,) * 3, (0.25,) * 3)
    spec = write_spec(network, tmp_path / "random.safetensors", tmp_path, inputs=network.parity_batch(), random_seed=1)
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "versions": "/dev/full"}))  # writes fail: ENOSPC
    with pytest.raises(StoreError, match=r"^no space left on the disk holding .* for the PyTorch reference's files"):
        run_reference_process(["forward", str(spec)])
