"""On-disk cache of calibration statistics, keyed by the content of the model and the data.

Calibration (running the samples through the model and summing each layer's input Gram) and the
layers' whitened spectra cost more than anything else in a compression run but depend only on the
model, the samples and the damping, not on the budget: trying --latency 0.75, then 0.6, then --params
0.5 on the same model calibrates once. Entries live under `$EDGELR_CACHE/calibration` (default
`~/.cache/edgelr`), the oldest are dropped past `CACHE_LIMIT_BYTES`, and an unreadable entry is simply
recomputed (it is only a cache).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.version import __version__

CACHE_LIMIT_BYTES = int(os.environ.get("EDGELR_CACHE_MB", "2048")) << 20
CACHE_FORMAT = 2  # bump when what an entry holds changes: old entries then simply miss


def cache_root() -> Path:
    return Path(os.environ.get("EDGELR_CACHE", Path.home() / ".cache" / "edgelr"))


def content_key(model_path: Path, model: ir.Model, calib_path: Path, *extra) -> str:
    """sha256 of the model file, its external data files' sizes and times, the samples file, and `extra`."""
    digest = hashlib.sha256(f"edgelr {__version__} format {CACHE_FORMAT} {extra!r}".encode())
    for path in (model_path, calib_path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    for data_file in sorted(_external_files(model, model_path)):
        stat = data_file.stat()  # weights beside the model: hashing gigabytes each run would cost more than it saves
        digest.update(f"{data_file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _external_files(model: ir.Model, model_path: Path) -> set[Path]:
    files = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.base_dir or model_path.parent) / tensor.location)
    return {f for f in files if f.is_file()}


class ArrayCache:
    """Named groups of arrays as .npz files in one folder: get(key) -> dict or None, put(key, arrays)."""

    def __init__(self, kind: str, root: Path | None = None):
        self.dir = (root or cache_root()) / kind

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.dir / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # missing, truncated, foreign: recompute
            return None
        os.utime(path)  # recently used: evicted last
        return arrays

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        size = sum(a.nbytes for a in arrays.values())
        if size > CACHE_LIMIT_BYTES // 2:
            return  # one entry may not push everything else out
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".npz")
            tmp = Path(name)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, self.dir / f"{key}.npz")
        except OSError:  # a full or read-only cache folder must not fail the job
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            return
        self._evict()

    def _evict(self) -> None:
        entries = sorted(self.dir.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for path in entries:
            total += path.stat().st_size
            if total > CACHE_LIMIT_BYTES:
                path.unlink(missing_ok=True)
