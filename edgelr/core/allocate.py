"""Rank allocation: per layer, dense or a (form, rank), against a global budget of params or FLOPs.

Each layer offers choices (cost, predicted error^2), the error from its whitened spectrum. We minimise
the sum of the layers' relative output errors^2 under the budget with a Lagrange multiplier: for a
price lam every layer independently takes the choice minimising error^2 + lam * cost, and lam is
bisected until the total cost fits. That is the convex-hull optimum (D-Rank's closed form is the same
Lagrangian on a continuous relaxation); a greedy pass then spends what is left of the budget on the
upgrades with the best error reduction per unit of cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Layer(Protocol):
    """What allocation needs of a layer (edgelr.graph.layers.Layer has it): its size per factorized form."""

    name: str

    def max_rank(self, form: str) -> int: ...

    def dense_params(self) -> int: ...

    def params(self, form: str, rank: int) -> int: ...


@dataclass(frozen=True)
class Choice:
    form: str | None  # None: the layer stays dense
    rank: int
    cost: float
    error2: float  # predicted relative output error, squared
    keep_float: bool = False  # on a quantized target: the layer stays dense and in float


def rank_grid(full_rank: int, max_rank: int) -> list[int]:
    """Candidate ranks up to max_rank: multiples of 8 when the layer is large enough (kernels like them)."""
    step = 8 if full_rank >= 64 else 1
    return list(range(step, max_rank + 1, step))


Cost = Callable[[Layer, "str | None", int], float]  # (layer, form or None for dense, rank) -> cost


def paying_ranks(layer: Layer, form: str, cost: Cost, max_cost_ratio: float) -> list[int]:
    """The grid ranks at which a form costs at most max_cost_ratio of the dense layer."""
    dense = cost(layer, None, 0)
    candidates = rank_grid(layer.max_rank(form), param_break_even(layer, form))
    return [r for r in candidates if cost(layer, form, r) <= max_cost_ratio * dense]


def param_break_even(layer: Layer, form: str) -> int:
    """The largest rank with fewer parameters (and FLOPs) than dense: past it nothing can pay."""
    return min(layer.max_rank(form), (layer.dense_params() - 1) // layer.params(form, 1))


def layer_choices(
    layer: Layer,
    residuals: dict[str, np.ndarray],
    cost: Cost,
    max_cost_ratio: float,
    max_error: float | None,
    weight: float = 1.0,
) -> list[Choice]:
    """Dense plus every (form, rank) that clearly beats break-even and passes the error gate (on the
    layer's own error); a choice's error2 is that error^2 times the layer's `weight` (its sensitivity)."""
    choices = [Choice(None, 0, float(cost(layer, None, 0)), 0.0)]
    for form, residual in residuals.items():
        for rank in paying_ranks(layer, form, cost, max_cost_ratio):
            error2 = float(residual[rank])
            if max_error is not None and error2 > max_error**2:
                continue
            choices.append(Choice(form, rank, float(cost(layer, form, rank)), weight * error2))
    return pareto(choices)


def pareto(choices: list[Choice]) -> list[Choice]:
    """Drop choices that another beats on both cost and error (e.g. the worse form at each cost)."""
    front, best = [], math.inf
    for c in sorted(choices, key=lambda c: (c.cost, c.error2)):
        if c.error2 < best:
            front.append(c)
            best = c.error2
    return front


@dataclass
class Allocation:
    choices: list[Choice]
    cost: float
    budget: float | None
    reached: bool  # False when the error gate or break-even kept the budget out of reach


def allocate(options: list[list[Choice]], budget: float | None) -> Allocation:
    """The choice per layer; with no budget, the cheapest choice within the error gate."""
    if budget is None:
        picks = [min(opts, key=lambda c: (c.cost, c.error2)) for opts in options]
        return Allocation(picks, sum(c.cost for c in picks), None, True)
    cheapest = [min(opts, key=lambda c: c.cost) for opts in options]
    if sum(c.cost for c in cheapest) > budget:
        return Allocation(cheapest, sum(c.cost for c in cheapest), budget, False)
    scale = sum(max(c.cost for c in opts) for opts in options) or 1.0

    def pick(lam: float) -> list[Choice]:
        return [min(opts, key=lambda c: c.error2 + lam * c.cost / scale) for opts in options]

    lo, hi = 1e-12, 1e12  # pick(hi) is the cheapest allocation, pick(lo) the most accurate
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if sum(c.cost for c in pick(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    picks = pick(hi)
    picks = _fill(options, picks, budget)
    return Allocation(picks, sum(c.cost for c in picks), budget, True)


def front(options: list[list[Choice]], points: int = 40) -> list[tuple[float, float]]:
    """The (total cost, total error^2) trade-offs the Lagrangian search walks through, cheapest last:
    the lower-convex Pareto front of the whole model, one allocation per multiplier."""
    scale = sum(max(c.cost for c in opts) for opts in options) or 1.0
    seen = {}
    for lam in np.geomspace(1e-5, 1e5, points):
        picks = [min(opts, key=lambda c: c.error2 + lam * c.cost / scale) for opts in options]
        cost, error2 = sum(c.cost for c in picks), sum(c.error2 for c in picks)
        seen.setdefault(round(cost, 12), (cost, error2))
    return sorted(seen.values(), reverse=True)


def _fill(options: list[list[Choice]], picks: list[Choice], budget: float) -> list[Choice]:
    """Spend the leftover budget greedily on the best error reduction per unit of cost."""
    picks = list(picks)
    spent = sum(c.cost for c in picks)
    while True:
        best, best_gain = None, 0.0
        for i, opts in enumerate(options):
            current = picks[i]
            for c in opts:
                extra = c.cost - current.cost
                gain = current.error2 - c.error2
                if gain > 0 and 0 < extra <= budget - spent and gain / extra > best_gain:
                    best, best_gain = (i, c), gain / extra
        if best is None:
            return picks
        i, c = best
        spent += c.cost - picks[i].cost
        picks[i] = c
