"""A hand-made Hugging Face Hub cache, as `huggingface_hub` lays it out, for offline tests.

<cache>/models--timm--convnext_tiny.fb_in1k/
    blobs/<sha256>  refs/main  snapshots/<commit>/model.safetensors -> ../../blobs/<sha256>
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_file(cache: Path, repo_id: str, filename: str, data: bytes, commit: str | None = None) -> Path:
    """Put `data` in the cache as `repo_id@main/filename`; returns the snapshot path."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(repo_id.encode() + data[:1024]).hexdigest()
    sha = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "blobs" / sha).write_bytes(data)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if snapshot.is_symlink() or snapshot.exists():
        snapshot.unlink()
    os.symlink(os.path.relpath(repo / "blobs" / sha, snapshot.parent), snapshot)
    return snapshot
