"""Deployable folders: written whole or not at all, and the manifest entries for the files they hold."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgelr.io.model import checkpoint


def file_entry(path: Path) -> dict:
    """What a manifest records of a file: its sha256 and size."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


@contextlib.contextmanager
def whole_folder(out_dir: Path) -> Iterator[Path]:
    """An empty folder to write OUT_DIR's files into, hidden beside it; when the block ends without an error it
    takes OUT_DIR's place (an empty folder or an earlier bundle there is set aside first: swapped, never merged).
    An error, or a kill, leaves OUT_DIR as it was and at most the hidden `.NAME.edgelr-*` folder."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.edgelr-") as tmp:
        stage = Path(tmp) / out_dir.name
        stage.mkdir()
        yield stage
        checkpoint("folder-written")
        if out_dir.exists():
            os.replace(out_dir, Path(tmp) / "replaced")
        os.replace(stage, out_dir)
