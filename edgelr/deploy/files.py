"""Manifest entries for the files a deployable folder holds."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_entry(path: Path) -> dict:
    """What a manifest records of a file: its sha256 and size."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
