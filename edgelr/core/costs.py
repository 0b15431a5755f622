"""Cost models the allocation prices layers with (parameters and FLOPs live on the layer; latency here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class LatencyBudget:
    """What FactorizeConfig(latency=F) needs: the tables, and how many seconds the layers must save.

    For a quantized target, `table` times the layers' INT8 kernels; `float_layers` (layer name ->
    (seconds, error^2)) are layers that may stay in float instead: what that adds to the quantized
    model's time and takes off its error^2, both measured on the whole model (a float layer between
    INT8 neighbours breaks their fused layout, which a layer timed alone does not show). Which layers to
    quantize is then chosen on the same budget as the ranks."""

    table: Any  # edgelr.search.tables.LatencyTable: cost(layer, form, rank, grid) -> seconds
    seconds: float
    float_layers: Mapping[str, tuple[float, float]] | None = None
