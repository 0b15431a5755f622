"""The low-rank factorization pass: rewrite MatMul, Gemm and Conv layers as pairs of thinner ones.

    model = edgelr.load("model.onnx")
    grams = edgelr.collect_grams(model, edgelr.find_layers(model)[0], samples)   # optional
    result = edgelr.factorize(model, FactorizeConfig(params=0.5), grams)          # in place

MatMul(x, W)         -> MatMul(MatMul(x, down), up)
Gemm(A, B, C)        -> Gemm(Gemm(A, down), up, C)        (alpha, beta, transA kept)
Conv k x k, C -> N   -> channel: Conv k x k C -> r, then Conv 1 x 1 r -> N
                        spatial: Conv kh x 1 C -> r, then Conv 1 x kw r -> N
Strides, pads, auto_pad and dilations are split between the two convs; the bias goes on the second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from edgelr.calibration.analysis import Analysis, analyse
from edgelr.calibration.grams import Grams
from edgelr.calibration.spectra import spectrum, whitening
from edgelr.core import lowrank
from edgelr.core.allocate import (
    Allocation,
    Choice,
    Cost,
    allocate,
    front,
    layer_choices,
    param_break_even,
    pareto,
    paying_ranks,
    rank_grid,
)
from edgelr.core.costs import LatencyBudget
from edgelr.errors import EdgelrError
from edgelr.graph.layers import Layer, Skipped, find_layers
from edgelr.graph.lowrank_pair import rewrite_pair
from edgelr.io.progress import progress_bar
from edgelr.measure.profile import layer_aliases
from edgelr.passes.base import EdgelrPass, PassConfig, PassDetails, register_pass

CONV_FORMS = ("auto", "channel", "spatial")


@dataclass(frozen=True)
class FactorizeConfig(PassConfig):
    """What to keep and how close to stay.

    params / flops: keep this fraction (0 < F <= 1) of the factorizable layers' total.
    latency: keep this fraction of the whole model's measured latency (needs a LatencyBudget).
    max_error: per-layer relative output error gate; a layer over it stays dense.
    ranks: explicit ranks by layer name (other layers stay dense; {} keeps every layer dense); overrides the budget.
    conv_form: "auto" picks per layer the form with the lower error at equal cost.
    damping: added to the Gram's diagonal, as a fraction of its mean, before whitening.
    adapt_damping: damp more where a layer's Gram saw few input rows per input (few samples):
        shrinkage towards plain SVD (edgelr.core.lowrank.adapted_damping). Off by default: it did not
        lower held-out error consistently (docs/benchmarks.md, "Small calibration sets").
    max_cost_ratio: factorize a layer only if it keeps at most this fraction of its dense cost
        (default 0.75 of params or FLOPs; 0.95 of measured latency, which is the real thing).
    sensitivity: with calibration data, weigh each layer's error by how much of it reaches the model's
        outputs, measured end to end (edgelr.calibration.sensitivity); False: all layers alike.
    (A `refit` pass after this one refits the pairs on the inputs the compressed model feeds them.)
    """

    kind: ClassVar[str] = "factorize"

    params: float | None = None
    flops: float | None = None
    latency: float | None = None
    max_error: float | None = None
    ranks: Mapping[str, int] | None = None
    conv_form: str = "auto"
    damping: float = 0.1
    adapt_damping: bool = False
    max_cost_ratio: float | None = None
    sensitivity: bool = True

    def __post_init__(self):
        for name in ("params", "flops", "latency"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= 1):
                raise EdgelrError(f"{name} {value}: the fraction to keep must be in (0, 1]")
        if sum(f is not None for f in (self.params, self.flops, self.latency)) > 1:
            raise EdgelrError("give one budget: params, flops or latency")
        if self.max_error is not None and not self.max_error > 0:
            raise EdgelrError(f"max_error {self.max_error}: must be a positive relative error, e.g. 0.05")
        if self.fraction is None and self.max_error is None and self.ranks is None:
            raise EdgelrError("say how far to compress: params, flops or latency (a fraction to keep), max_error, or ranks")
        if self.conv_form not in CONV_FORMS:
            raise EdgelrError(f"conv_form '{self.conv_form}' is not one of {', '.join(CONV_FORMS)}")
        if not (0 < self.cost_ratio <= 1) or self.damping < 0:
            raise EdgelrError("max_cost_ratio must be in (0, 1] and damping >= 0")

    def needs_calibration(self) -> str | None:
        return "latency is measured on real inputs" if self.latency is not None else None

    @property
    def metric(self) -> str:
        return "flops" if self.flops is not None else "latency" if self.latency is not None else "params"

    @property
    def fraction(self) -> float | None:
        return next((f for f in (self.params, self.flops, self.latency) if f is not None), None)

    @property
    def cost_ratio(self) -> float:
        if self.max_cost_ratio is not None:
            return self.max_cost_ratio
        return 0.95 if self.metric == "latency" else 0.75


@dataclass
class LayerResult:
    """What happened to one layer."""

    name: str
    op: str
    weight_shape: tuple[int, ...]
    form: str  # "dense" when left alone
    rank: int
    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None
    predicted_error: float
    error: float  # relative output error of this layer alone, measured on the calibration Gram
    note: str = ""
    latency_before: float | None = None  # predicted seconds on the target (with --latency)
    latency_after: float | None = None
    measured_ms_before: float | None = None  # ONNX Runtime profiler, ms per run (compress with a report)
    measured_ms_after: float | None = None


@dataclass
class FactorizeResult:
    layers: list[LayerResult]
    skipped: list[Skipped]
    metric: str
    fraction: float | None
    budget_reached: bool
    data_aware: bool
    warnings: list[str] = field(default_factory=list)
    # what the search weighed: (cost of the factorizable layers, predicted error^2), one per allocation
    # on the Pareto front, and the cost of those layers left dense (the same unit: params, FLOPs or s)
    front: list[tuple[float, float]] = field(default_factory=list)
    dense_cost: float | None = None
    # the allocation's objective: the predicted whole-model error^2 when weighted by layer sensitivity,
    # else the sum of the layers' own errors^2
    predicted_error2: float = 0.0
    weighted: bool = False
    # on a quantized target (LatencyBudget.float_layers): the nodes the search left in float
    keep_float: list[str] = field(default_factory=list)
    # the layers edgelr.passes.refit refit on the compressed model's own inputs
    refit: list[str] = field(default_factory=list)

    def total(self, key: str) -> int | None:
        values = [getattr(r, key) for r in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def factorized(self) -> list[LayerResult]:
        return [r for r in self.layers if r.form != "dense"]


def factorize(
    model: ir.Model,
    config: FactorizeConfig,
    grams: Mapping[str, np.ndarray] | None = None,
    layers: list[Layer] | None = None,
    progress: bool = True,
    latency: LatencyBudget | None = None,
    spectra: dict[tuple[str, str], np.ndarray] | None = None,
    sensitivity: Mapping[str, float] | None = None,
) -> FactorizeResult:
    """Factorize the model in place. `grams`: calibration statistics by layer name (data-aware SVD).
    `latency`: the target's latency tables and the seconds to save, for FactorizeConfig(latency=F).
    `spectra`: a memo of each (layer, form)'s error-by-rank curve, read and filled in: pass the same
    dict to factorize the same model and Grams again (another budget) without the eigendecompositions.
    `sensitivity`: per layer, the whole model's error^2 per unit of the layer's own (edgelr.calibration.sensitivity):
    the allocation then minimises the predicted whole-model error instead of the sum of layer errors."""
    if layers is None:
        layers, skipped = find_layers(model)
    else:
        skipped = []
    if not layers:
        raise EdgelrError("the model has no factorizable MatMul, Gemm or Conv node with a constant weight")
    grams = grams or {}
    if config.ranks:
        unknown = sorted(set(config.ranks) - {layer.name for layer in layers})
        if unknown:
            raise EdgelrError(f"ranks given for unknown layers {unknown}; `edgelr inspect` lists the layer names")
    unsized = next((layer.name for layer in layers for u in layer.uses if u.positions() is None), None)
    if config.metric in ("flops", "latency") and unsized is not None:
        raise EdgelrError(f"--{config.metric} needs each layer's input size, and {unsized}'s is not known (dynamic dims): "
                          "pass --calib DATA.npz with samples that reach it")
    if config.metric == "latency" and latency is None:
        raise EdgelrError("a latency budget needs the target's latency tables: use edgelr.compress, which measures them")
    cost = cost_function(config, latency)

    # One BLAS thread: these matrices are small, and OpenBLAS threads that wait on a busy machine's
    # cores made an eigendecomposition 50x slower than single-threaded (measured on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        weights = _weights(layers, sensitivity)
        return _factorize(model, config, grams, layers, skipped, progress, cost, latency,
                          spectra if spectra is not None else {}, weights)


@dataclass
class Factorized:
    """What the factorize pass leaves for the passes after it (refit) and the report."""

    config: FactorizeConfig
    before: Path  # the file of the model as factorize received it
    layers: list[Layer]
    result: FactorizeResult
    analysis: Analysis
    aliases: dict[str, str]  # profiled kernel names -> layer (for the report's per-layer timings)


@register_pass(FactorizeConfig)
class FactorizePass(EdgelrPass):
    """factorize() on the pipeline's model, with the calibration analysis (Grams, spectra, sensitivity)."""

    def call(self, model: ir.Model) -> PassDetails:
        ctx, config = self.context, self.config
        layers, skipped = find_layers(model)
        if not layers and config.ranks == {}:  # every layer stays dense (pruning or quantization alone): nothing to do
            return PassDetails(model, False, None)
        if not layers:
            reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
            raise EdgelrError(f"{ctx.source}: no factorizable MatMul, Gemm or Conv node with a constant weight"
                              + (f" ({reasons})" if reasons else ""))
        aliases = layer_aliases(layers)  # before the pass replaces the nodes
        probe = config.sensitivity and config.ranks is None
        analysis = analyse(ctx.path, model, layers, ctx.samples, ctx.calib, config.damping, probe, ctx.progress,
                           ctx.objective, config.adapt_damping)
        model, layers, result = self.allocate(model, layers, analysis)
        analysis.keep(layers)
        result.skipped = skipped
        result.warnings.extend(analysis.warnings)
        ctx.factorized = Factorized(config, ctx.path, layers, result, analysis, aliases)
        if ctx.pristine:
            ctx.references = analysis.references
        ctx.objective = ctx.objective or analysis.objective
        return PassDetails(model, bool(result.factorized), result)

    def allocate(self, model: ir.Model, layers: list[Layer], analysis: Analysis) -> tuple[ir.Model, list[Layer], FactorizeResult]:
        """Choose the ranks and rewrite the model; a search (edgelr.search) overrides this."""
        result = factorize(model, self.config, analysis.grams, layers=layers, progress=self.context.progress,
                           spectra=analysis.spectra, sensitivity=analysis.sensitivity if self.config.sensitivity else None)
        return model, layers, result


def cost_function(config: FactorizeConfig, latency: LatencyBudget | None) -> Cost:
    if config.metric != "latency":
        metric = config.metric
        return lambda layer, form, rank: layer.cost(metric, form, rank)

    def cost(layer: Layer, form: str | None, rank: int) -> float:
        grid = [] if form is None else rank_grid(layer.max_rank(form), param_break_even(layer, form))
        return latency.table.cost(layer, form, rank, grid)

    return cost


def _weights(layers: list[Layer], sensitivity: Mapping[str, float] | None) -> dict[str, float]:
    """Each layer's error weight: its sensitivity (the mean one where it was not measured), but never below
    the median layer's: a relative output error reads magnitudes, so a branch feeding small outputs (a
    detector's class scores next to its box coordinates) measures as nearly free and would be cut to
    nothing (docs/benchmarks.md). None without sensitivities."""
    known = [v for v in (sensitivity or {}).values() if v > 0]
    if not known:
        return {}
    default = float(np.mean(known))
    floor = float(np.median(known))
    return {layer.name: max(sensitivity.get(layer.name, default), floor) for layer in layers}


def _factorize(model, config, grams, layers, skipped, progress, cost: Cost, latency, spectra, weights) -> FactorizeResult:
    rows = grams.rows if config.adapt_damping and isinstance(grams, Grams) else {}
    bar = progress_bar(layers, desc="analysing", unit="layer", show=progress)
    options = [layer_options(layer, config, grams.get(layer.name), cost, spectra, weights.get(layer.name, 1.0),
                             rows.get(layer.name)) for layer in bar]
    if latency is not None and latency.float_layers and config.ranks is None:
        options = [_quantized_options(layer, opts, latency) if layer.name in latency.float_layers else opts
                   for layer, opts in zip(layers, options)]
    allocation = choose_ranks(layers, options, config, cost, latency)
    # costs before _apply: the latency tables' signatures read the nodes it replaces
    dense_cost = sum(cost(layer, None, 0) for layer in layers)
    warnings = []
    if not allocation.reached:
        fixed, total = budget_split(layers, config, cost)
        kept = (allocation.cost - fixed) / max(total, 1e-12)
        why = "the --max-error gate" if config.max_error is not None else "break-even"
        warnings.append(f"budget not reached: {why} keeps {kept:.2f} of the {config.metric}, not {config.fraction}")

    data_free = _data_free(layers, grams)
    if data_free:
        warnings.append("factorized data-free (plain SVD), calibration does not reach them: "
                        + "; ".join(f"{name} ({why})" for name, why in data_free.items()))

    results, keep_float = [], []
    bar = progress_bar(total=len(layers), desc="factorizing", unit="layer", show=progress)
    for layer, choice, opts in zip(layers, allocation.choices, options):
        if choice.keep_float:
            keep_float += [use.node.name for use in layer.uses]
        if config.metric == "latency":  # before _apply: the signature reads the node, which it replaces
            before, after = cost(layer, None, 0), cost(layer, choice.form, choice.rank)
        results.append(_apply(model.graph, layer, choice, config, grams.get(layer.name), weights.get(layer.name, 1.0),
                              rows.get(layer.name)))
        if config.metric == "latency":
            row = results[-1]
            row.latency_before, row.latency_after = before, choice.cost if choice.keep_float else after if row.rank else before
        if choice.keep_float:
            results[-1].note = "kept in float: INT8 error"
        elif choice.form is None and sum(not c.keep_float for c in opts) == 1 and config.ranks is None:
            results[-1].note = "over the error gate" if pays(layer, config, cost) else "below break-even"
        if layer.name in data_free:
            results[-1].note = "; ".join(filter(None, [results[-1].note, f"data-free: {data_free[layer.name]}"]))
        bar.update()
    bar.close()
    return FactorizeResult(
        layers=results,
        skipped=skipped,
        metric=config.metric,
        fraction=config.fraction,
        budget_reached=allocation.reached,
        data_aware=bool(grams),
        warnings=warnings,
        front=[] if config.ranks is not None else front(options),
        predicted_error2=sum(c.error2 for c in allocation.choices),
        weighted=bool(weights),
        dense_cost=dense_cost,
        keep_float=keep_float,
    )


def _data_free(layers: list[Layer], grams: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Layer name -> why it has no Gram in a calibrated run (a loop body, an If branch no sample took)."""
    if not grams:
        return {}
    return {layer.name: layer.uncalibrated or "no calibration sample takes its If branch"
            for layer in layers if layer.name not in grams}


def _forms(layer: Layer, config: FactorizeConfig) -> tuple[str, ...]:
    forms = layer.forms()
    if config.conv_form != "auto" and layer.is_conv:
        forms = tuple(f for f in forms if f == config.conv_form) or ("channel",)
    return forms



def layer_options(layer: Layer, config: FactorizeConfig, gram: np.ndarray | None, cost: Cost, spectra: dict,
             weight: float = 1.0, rows: int | None = None) -> list[Choice]:
    """The layer's choices, with errors from its spectra (`rows`: the Gram's input rows, Grams.rows).
    Factors are not kept: with calibration,
    holding every layer's factors beside the Grams would break the memory bound; _apply recomputes
    them for the layers that are chosen."""
    if config.ranks is not None and layer.name not in config.ranks:
        return [Choice(None, 0, 0.0, 0.0)]
    residuals = {}
    for form in _forms(layer, config):
        residuals[form] = spectrum(layer, form, gram, config.damping, spectra, rows)
    if config.ranks:
        rank = config.ranks[layer.name]
        fits = [f for f in residuals if 0 < rank <= layer.max_rank(f)]
        if not fits:
            top = max(layer.max_rank(f) for f in residuals)
            raise EdgelrError(f"rank {rank} for layer {layer.name}: must be in 1..{top}")
        form = min(fits, key=lambda f: residuals[f][rank])
        return [Choice(form, rank, 0.0, weight * float(residuals[form][rank]))]
    return layer_choices(layer, residuals, cost, config.cost_ratio, config.max_error, weight)


def _quantized_options(layer: Layer, options: list[Choice], latency: LatencyBudget) -> list[Choice]:
    """On a quantized target, a layer in LatencyBudget.float_layers may also stay dense in float: at the
    seconds that adds, without the error^2 its INT8 kernel adds to the model (which every quantized
    choice then carries: factors quantize about as their dense layer does, the two errors adding in
    squares, measured on YOLOv8n)."""
    seconds, error2 = latency.float_layers[layer.name]
    quantized = [replace(c, error2=c.error2 + error2) for c in options]
    dense = next(c for c in options if c.form is None)
    return pareto(quantized + [Choice(None, 0, dense.cost + seconds, 0.0, keep_float=True)])



def choose_ranks(layers, options, config: FactorizeConfig, cost: Cost, latency: LatencyBudget | None) -> Allocation:
    if config.ranks is not None or config.fraction is None:
        return allocate(options, None) if config.ranks is None else Allocation([o[0] for o in options], 0, None, True)
    fixed, total = budget_split(layers, config, cost)
    if latency is not None:  # the layers must save this many seconds of the whole model's time
        return allocate(options, fixed + total - latency.seconds)
    return allocate(options, fixed + config.fraction * total)


def budget_split(layers: list[Layer], config: FactorizeConfig, cost: Cost) -> tuple[float, float]:
    """(cost of layers that cannot pay off, cost of those that can): the budget is a fraction of the
    second, whatever the error gate later allows."""
    paying = [pays(layer, config, cost) for layer in layers]
    fixed = sum(cost(layer, None, 0) for layer, p in zip(layers, paying) if not p)
    return fixed, sum(cost(layer, None, 0) for layer, p in zip(layers, paying) if p)


def pays(layer: Layer, config: FactorizeConfig, cost: Cost) -> bool:
    return any(paying_ranks(layer, f, cost, config.cost_ratio) for f in _forms(layer, config))


def _apply(graph: ir.Graph, layer: Layer, choice: Choice, config: FactorizeConfig, gram, weight: float = 1.0,
           rows: int | None = None) -> LayerResult:
    row = LayerResult(
        name=layer.name,
        op=layer.op,
        weight_shape=tuple(int(d) for d in layer.weight.shape or layer.weight_array().shape),
        form="dense",
        rank=0,
        params_before=layer.dense_params(),
        params_after=layer.dense_params(),
        flops_before=layer.dense_flops(),
        flops_after=layer.dense_flops(),
        predicted_error=0.0,
        error=0.0,
    )
    if choice.form is None:
        return row
    w, chol = whitening(layer, choice.form, gram, config.damping, rows)
    factors = lowrank.decompose(w, chol, keep=choice.rank)[1]
    error = measured_error(layer, choice.form, factors, gram)
    row.predicted_error = math.sqrt(choice.error2 / weight)  # the layer's own, as `error` is
    row.error = error
    if config.max_error is not None and error > config.max_error and config.ranks is None:
        row.note = f"error {error:.3f} over the gate"
        return row
    rewrite_pair(graph, layer, choice.form, factors)
    row.form, row.rank = choice.form, choice.rank
    row.params_after = layer.params(choice.form, choice.rank)
    row.flops_after = layer.flops(choice.form, choice.rank)
    return row


def measured_error(layer: Layer, form: str, factors: lowrank.Factors, gram) -> float:
    """Relative output error with the full (undamped) Gram, in the dense layout."""
    approx = factors.up @ factors.down
    if form == "spatial":
        n, c, (kh, kw) = layer.out_features, layer.in_channels, layer.kernel
        approx = approx.reshape(n, kw, c, kh).transpose(0, 2, 3, 1).reshape(n, -1)
    return lowrank.relative_error(layer.matrix("channel" if layer.is_conv else "svd"), approx, gram)



