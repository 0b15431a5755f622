"""Verification: the compressed model against the original on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.calibrate import Samples
from edgelr.model_io import ort_session


def output_error(original: ir.Model | Path, compressed: ir.Model | Path, samples: Samples) -> dict[str, float]:
    """Relative error ||y - y'|| / ||y|| of each float output over all samples, and 'all' over them together."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    with ort_session(original) as ref, ort_session(compressed) as new:
        names = [o.name for o in ref.get_outputs()]
        for i in range(len(samples)):
            feed = samples.feed(i)
            for name, a, b in zip(names, ref.run(None, feed), new.run(names, feed)):
                a, b = np.asarray(a), np.asarray(b)
                if a.dtype.kind != "f":
                    continue
                a64, b64 = a.astype(np.float64), b.astype(np.float64)
                num[name] = num.get(name, 0.0) + float(np.sum((a64 - b64) ** 2))
                den[name] = den.get(name, 0.0) + float(np.sum(a64**2))
    errors = {name: _ratio(num[name], den[name]) for name in num}
    if errors:
        errors["all"] = _ratio(sum(num.values()), sum(den.values()))
    return errors


def _ratio(num: float, den: float) -> float:
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))
