"""Using converted models needs neither torch nor timm: build, write and load in a process
where importing either fails, as it does where the `convert` extra is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.support.archs import SMALL_V1
from tests.support.cli import BLOCK_TORCH
from zoo.core.folder_config import CONTENT_FILES, MANIFEST

CODE = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import numpy as np

    out = Path(sys.argv[2])
    arch_config = json.loads(sys.argv[1])

    import zoo
    from zoo.core.architectures import Architecture
    from zoo.core.folder_config import FolderConfig, SourceRecord
    from zoo.core.model import build_model
    from tests.support.writing import write_converted

    arch = Architecture.from_config(arch_config)
    model = build_model(arch, num_classes=10)
    config = FolderConfig(name="convnext_tiny.fb_in1k", architecture=arch, num_classes=10,
                          pretrained_cfg=zoo.resolve("convnext_tiny.fb_in1k").pretrained_cfg(),
                          source=SourceRecord("random", "0" * 64, seed=0), pretrained=False)
    write_converted(out, model, config, {"passed": True})
    loaded = zoo.load(out)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    features = zoo.load(out, include_top=False)
    assert tuple(features(x).shape) == (2, arch.dims[-1])

    leaked = sorted(n for n, m in sys.modules.items()
                    if m is not None and (n.split(".")[0] in ("torch", "timm")))
    print(json.dumps({"torch_blocked": sys.modules.get("torch", None) is None,
                      "leaked": leaked, "keras": "keras" in sys.modules}))
""")


def run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=180)


def test_build_write_load_without_torch(tmp_path):
    out = tmp_path / "ckpt"
    result = run(BLOCK_TORCH + CODE, json.dumps(SMALL_V1.to_config()), str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"torch_blocked": True, "leaked": [], "keras": True}
    assert sorted(p.name for p in out.iterdir()) == sorted([*CONTENT_FILES, MANIFEST])


def test_the_block_works():
    """The test above can fail: in such a process importing torch or timm raises."""
    code = BLOCK_TORCH + textwrap.dedent("""
        for name in ("torch", "timm"):
            try:
                __import__(name)
            except ImportError:
                print(name, "blocked")
    """)
    result = run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["torch blocked", "timm blocked"]
