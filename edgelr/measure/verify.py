"""Verification: the compressed model against the original on the same inputs."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.io.model import ort_session
from edgelr.io.samples import Samples


def output_error(original: ir.Model | Path, compressed: ir.Model | Path, samples: Samples,
                 references: list[dict[str, np.ndarray]] | None = None) -> dict[str, float]:
    """Relative error ||y - y'|| / ||y|| of each float output over all samples, and 'all' over them together.
    `references`: the original's outputs per sample, when calibration kept them (the original is not rerun)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        new = stack.enter_context(ort_session(compressed))
        names = [o.name for o in new.get_outputs()]
        if not references:
            ref = stack.enter_context(ort_session(original))
        for i in range(len(samples)):
            feed = samples.feed(i)
            expected = [references[i][n] for n in names] if references else ref.run(names, feed)
            for name, a, b in zip(names, expected, new.run(names, feed)):
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
