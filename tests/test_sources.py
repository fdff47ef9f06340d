"""Source checkpoints from release URLs (FB-only entries) and batch conversion."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.numpy import save as save_bytes

import converters.pipeline as pipeline
from converters import source
from converters.batch import convert_all
from converters.reference import random_state_dict
from converters.verify import verify
from tests.support.archs import SMALL_V1
from tests.support.cli import zoo_inline
from tests.support.fb_layout import to_fb_layout
from tests.support.http_files import serve
from tests.support.hub_cache import add_file
from zoo.core.architectures import ARCHITECTURES
from zoo.core.catalogue import catalogue
from zoo.core.errors import SourceError
from zoo.core.folder_config import CONTENT_FILES, MANIFEST, RECORD, WEIGHTS


def fb_pth_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": {k: torch.from_numpy(v) for k, v in to_fb_layout(state).items()}}, buffer)
    return buffer.getvalue()


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.slow  # the release-URL download path runs by default for torchvision's entries (test_own_checkpoints)
def test_fb_only_entry_converts_from_its_release_url(monkeypatch, online, tmp_path):
    name = "convnext_base.fb_in1k_384"
    monkeypatch.setitem(ARCHITECTURES, "convnext_base", SMALL_V1)
    data = fb_pth_bytes(random_state_dict(SMALL_V1, 1000, seed=4))
    with serve({"/convnext/convnext_base_1k_384.pth": data}) as (base, requests):
        entry = catalogue()[name]
        monkeypatch.setitem(
            catalogue(), name, dataclasses.replace(entry, url=f"{base}/convnext/convnext_base_1k_384.pth")
        )
        out, report = pipeline.convert("convnext_base_1k_384", out=tmp_path / "out")
        assert report.passed and report.input_size == 384
        recorded = json.loads((out / RECORD).read_text())["source"]
        assert recorded["kind"] == "url" and recorded["url"].endswith("convnext_base_1k_384.pth")
        assert len(requests) == 1
    # the server is gone: verify works from the source cache, checking the recorded sha256
    assert verify(out).passed


def test_release_download_errors(online, tmp_path):
    data = b"x" * 4096
    with serve({"/a.pth": data}, truncate={"/a.pth"}) as (base, _):
        with pytest.raises(SourceError, match="download ended after 2048 of 4096 bytes|cannot download"):
            source.fetch_url(f"{base}/a.pth")
        with pytest.raises(SourceError, match="cannot download"):
            source.fetch_url(f"{base}/missing.pth")
    with serve({"/b.pth": data}) as (base, _):
        with pytest.raises(SourceError, match="differs from the expected"):
            source.fetch_url(f"{base}/b.pth", expected_sha256="0" * 64)
        got = source.fetch_url(f"{base}/b.pth")
        assert got.path.read_bytes() == data
    leftovers = [p for p in got.path.parent.parent.rglob(".*") if p.is_file()]
    assert leftovers == []  # no partial downloads kept


def test_release_download_offline_needs_the_cache(tmp_path):
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE"):
        source.fetch_url("http://127.0.0.1:9/never.pth")


@pytest.mark.slow  # with -m slow: the default run keeps to its 10 minutes
def test_convert_all_is_resumable_and_survives_failures(small_tiny, tmp_path):
    state = random_state_dict(small_tiny, 1000, seed=6)
    add_file(Path(os.environ["HF_HUB_CACHE"]), "timm/convnext_tiny.fb_in1k", "model.safetensors", save_bytes(state))
    names = ["convnext_tiny.fb_in1k", "convnext_tiny.in12k_ft_in1k"]  # the second is not in the cache
    rows, summary = convert_all(names, out_root=tmp_path / "all")
    assert [r["status"] for r in rows] == ["ok", "failed"], rows
    assert "not in the local Hub cache" in rows[1]["error"]
    assert rows[0]["max_abs"] <= 1e-4 and rows[0]["params"] > 0
    assert json.loads(summary.read_text())["rows"] == rows
    assert not (tmp_path / "all" / names[1]).exists()

    again, _ = convert_all(names[:1], out_root=tmp_path / "all")
    assert again[0]["status"] == "skipped (done)" and again[0]["max_abs"] == rows[0]["max_abs"]
    # a sweep run: forced again, keeping no weights
    forced, _ = convert_all(names[:1], out_root=tmp_path / "all", force=True, keep_weights=False)
    assert forced[0]["status"] == "ok"
    assert sorted(p.name for p in (tmp_path / "all" / names[0]).iterdir()) == sorted(
        {*CONTENT_FILES, MANIFEST} - {WEIGHTS}
    )
    resumed, _ = convert_all(names[:1], out_root=tmp_path / "all", keep_weights=False)
    assert resumed[0]["status"] == "skipped (done)" and resumed[0]["params"] == rows[0]["params"]
    whole, _ = convert_all(names[:1], out_root=tmp_path / "all")  # weights wanted: redone
    assert whole[0]["status"] == "ok"


def test_cli_convert_all_exit_code_and_table(tmp_path):
    proc = zoo_inline("convert", "--all", "convnext_zepto_rms.", "--random-weights", "--out", tmp_path / "all")
    assert proc.exit_code == 0, proc.stderr[-2000:]
    assert "convnext_zepto_rms.ra4_e3600_r224_in1k" in proc.stdout and " ok" in proc.stdout
    rows = json.loads((tmp_path / "all" / "summary.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"]
    proc = zoo_inline("convert", "--all", "no_such_thing")
    assert proc.exit_code == 1 and "no checkpoint matches" in proc.stderr
