"""edgelr: low-rank factorization, compression and deployment of ONNX models for edge devices.

The names below are loaded on first use, so `import edgelr` (and the `edgelr` command, which imports
only what its verb needs) stays quick.
"""

from __future__ import annotations

import importlib

from edgelr.version import __version__

_WHERE = {
    "CompressReport": "edgelr.api", "compress": "edgelr.api",
    "collect_grams": "edgelr.calibration.grams",
    "EdgelrError": "edgelr.errors",
    "find_layers": "edgelr.graph.layers",
    "load": "edgelr.io.model", "save": "edgelr.io.model",
    "Samples": "edgelr.io.samples", "load_samples": "edgelr.io.samples",
    "output_error": "edgelr.measure.verify",
    "FactorizeConfig": "edgelr.passes.factorize", "FactorizeResult": "edgelr.passes.factorize",
    "factorize": "edgelr.passes.factorize",
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgelr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
