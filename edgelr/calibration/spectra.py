"""A layer's weight in whitened coordinates and its error-by-rank curve: what allocation and sensitivity read."""

from __future__ import annotations

import numpy as np

from edgelr.core import lowrank
from edgelr.errors import EdgelrError
from edgelr.graph.layers import Layer


def whitening(layer: Layer, form: str, gram: np.ndarray | None, damping: float, rows: int | None = None):
    """(W in the form's orientation, Cholesky factor of its input Gram or None). `rows`: how many input
    rows the Gram was summed over (Grams.rows), to damp a poorly determined one more (None: `damping`)."""
    w = layer.matrix(form)
    if gram is None:
        return w, None
    if form == "spatial":
        gram = lowrank.spatial_gram(gram, layer.in_channels, layer.kernel)
        rows = rows and rows * layer.kernel[1]  # each patch gives one vertical patch per kernel column
    try:
        return w, lowrank.cholesky_factor(gram, lowrank.adapted_damping(damping, gram, rows))
    except np.linalg.LinAlgError:
        raise EdgelrError(f"layer {layer.name}: its calibration statistics are degenerate; add more samples") from None


def spectrum(layer: Layer, form: str, gram: np.ndarray | None, damping: float, memo: dict,
             rows: int | None = None) -> np.ndarray:
    """r -> the layer's relative output error^2 at rank r in this form (whitened when there is a Gram)."""
    if (layer.name, form) not in memo:
        w, chol = whitening(layer, form, gram, damping, rows)
        memo[layer.name, form] = lowrank.residual_fraction(lowrank.decompose(w, chol, keep=0)[0])
    return memo[layer.name, form]
