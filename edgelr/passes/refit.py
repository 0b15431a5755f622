"""Refit of the factorized layers on the inputs the compressed model really feeds them.

Factorization fits each layer on the original model's activations. Inside the compressed model a layer
sees its upstream layers' errors too, and errors compound. Refitting each pair to the original layer's
output on the compressed model's own inputs stops that (SVD-LLM's sequential update, in closed form).

With X the original's input rows to a layer, Z the compressed model's, W the dense weight and
H = Z^T Z, the rank-r A minimising ||Z A^T - X W^T||^2 + d ||A - W||^2 is a reduced-rank regression:
with L L^T = H + d I and A* = W (X^T Z + d I) (H + d I)^-1 the (ridge) least-squares solution, the
objective is ||(A - A*) L||^2 + const, so the whitened truncation lowrank.decompose(A*, L, r) gives it
exactly. d is factorize's damping: where Z = X the result is factorize's own factors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import scipy.linalg
from threadpoolctl import threadpool_limits

from edgelr.calibration.analysis import SENSITIVITY_MAX_BYTES
from edgelr.calibration.grams import input_gram
from edgelr.calibration.values import values_by_sample
from edgelr.core import lowrank
from edgelr.core.objective import Objective
from edgelr.errors import EdgelrError
from edgelr.graph.layers import Layer
from edgelr.graph.lowrank_pair import PARTS, factor_weights, pair_of, part_name
from edgelr.io.cache import ArrayCache
from edgelr.io.model import load, model_bytes, save
from edgelr.io.progress import progress_bar
from edgelr.io.samples import Samples
from edgelr.measure.verify import judge, output_error
from edgelr.passes.base import EdgelrPass, PassConfig, PassDetails, register_pass
from edgelr.passes.factorize import FactorizeResult


def refit(original: ir.Model, compressed: ir.Model, layers: list[Layer], result: FactorizeResult,
          samples: Samples, damping: float, progress: bool = True, grams: Mapping[str, np.ndarray] | None = None,
          max_error: float | None = None, quantized: ir.Model | None = None,
          objective: Objective | None = None) -> list[str]:
    """Refit the factorized pairs of COMPRESSED (factorize's output, in place) towards ORIGINAL's layers
    on the calibration samples; `layers` and `result` are factorize's. Returns the names refit (a layer
    keeps its factors where refit ones, fitted on half the samples, do not fit the other half better;
    nothing changes unless the whole model's error on the samples drops too).

    With `grams` (the original's, as factorize had them), a refit layer's `error` in `result` is
    measured again: its own error on the original's inputs, which a refit raises while it lowers the
    whole model's; with `max_error` too (FactorizeConfig's gate), a refit over the gate is not made.

    `quantized`: COMPRESSED after static INT8 (QDQ, symmetric int8 weights). The inputs are then read
    from it, so a refit also makes up for the quantization upstream, and each refit pair's int8
    weights are quantized again in it, in place; COMPRESSED's float factors change alike.

    Sequential, as SVD-LLM and GPTQ are: a layer is refit on inputs that its upstream layers' refits
    already shaped. Refitting all at once overcorrects (each layer compensates an upstream error that
    the upstream refit then removes) and made YOLOv8n's error worse, pass after pass. Layers with the
    same number of factorized layers upstream cannot feed each other and share one run of the models.
    One pass is a fixed point: again, every layer would see the same inputs and keep its factors."""
    rows = {row.name: row for row in result.layers}
    chosen = _refittable(layers, rows)
    student, inputs = compressed, None
    if quantized is not None:
        usable, inputs = _quantized_inputs(quantized, chosen)
        student, chosen = quantized, [layer for layer in chosen if layer.name in usable]
    levels = _levels(original.graph, chosen)
    before = output_error(original, student, samples, objective=objective).get("worst", 0.0) if chosen else 0.0
    saved = _snapshot(compressed, quantized, chosen, rows)
    changed = set()
    for level in progress_bar(levels, desc="refitting", unit="level", show=progress):
        stats = _statistics(original, student, level, samples, inputs)
        nodes = {node.name: node for node in compressed.graph}
        with threadpool_limits(limits=1, user_api="blas"):  # small matrices: see factorize()
            for layer in level:
                row = rows[layer.name]
                found = _better_factors(nodes, layer, row, stats[layer.name], damping)
                if found is None:
                    continue
                factors, approx = found
                if grams and layer.name in grams:
                    error = lowrank.relative_error(layer.matrix("channel" if layer.is_conv else "svd"), approx, grams[layer.name])
                    if max_error is not None and error > max_error:
                        continue
                    row.error = error
                _set_factors(nodes, layer, row.form, factors)
                if quantized is not None:
                    _set_quantized(quantized, layer, row.form, factors)
                changed.add(layer.name)
    if changed and output_error(original, student, samples, objective=objective).get("worst", 0.0) >= before:
        _restore(saved)  # better layer by layer, worse end to end (a small random convnet did this)
        return []
    return [layer.name for layer in chosen if layer.name in changed]


def _refittable(layers: list[Layer], rows: dict, warnings: list[str] | None = None) -> list[Layer]:
    """The factorized layers refit can read: those of the main graph. A pair inside an If, Loop or Scan
    subgraph keeps its factors (refit reads both models' inputs by name from the main graph); WARNINGS,
    if given, gets a line naming them."""
    factorized = [layer for layer in layers if rows[layer.name].form != "dense" and rows[layer.name].rank]
    inside = [layer.name for layer in factorized if layer.in_subgraph]
    if inside and warnings is not None:
        warnings.append(f"not refit, inside subgraphs: {', '.join(inside)}")
    return [layer for layer in factorized if not layer.in_subgraph]


def _changeable(compressed: ir.Model, quantized: ir.Model | None, layers: list[Layer]):
    """(model tag, value) for every tensor refit may change: the pairs' weights (float, and int8 with
    scales) and their int32 biases with scales (_requantize_bias)."""
    for tag, model in (("float", compressed), ("int8", quantized)):
        if model is None:
            continue
        nodes = {node.name: node for node in model.graph}
        for layer in layers:
            for use in layer.uses:
                for part in PARTS:
                    node = nodes.get(part_name(use.node.name, part))
                    if node is None:  # not found again after quantization (renamed): not refit there either
                        continue
                    for value in node.inputs[1:3]:
                        dq = value.producer() if value is not None else None
                        if dq is not None and dq.op_type == "DequantizeLinear":
                            yield from ((tag, v) for v in dq.inputs[:2] if v.const_value is not None)
                        elif value is not None and value.const_value is not None:
                            yield tag, value


def _snapshot(compressed: ir.Model, quantized: ir.Model | None, layers: list[Layer], rows: dict) -> list:
    """What refit may change, to put back: those tensors and the layers' errors."""
    found = [(value, value.const_value) for _, value in _changeable(compressed, quantized, layers)]
    return found + [(rows[layer.name], rows[layer.name].error) for layer in layers]


def _restore(saved: list) -> None:
    for owner, value in saved:
        if isinstance(owner, ir.Value):
            owner.const_value = value
        else:
            owner.error = value


def refit_state(compressed: ir.Model, quantized: ir.Model | None, layers: list[Layer], result: FactorizeResult,
                refit_names: list[str]) -> dict[str, np.ndarray]:
    """What a refit left, as arrays (for a cache): the tensors it may change, the layers' errors, the names."""
    rows = {row.name: row for row in result.layers}
    chosen = [layer for layer in layers if layer.name in refit_names]
    state = {f"{tag}/{value.name}": value.const_value.numpy() for tag, value in _changeable(compressed, quantized, chosen)}
    state.update({f"error/{name}": np.float64(rows[name].error) for name in refit_names if rows[name].error is not None})
    return state | {"refit": np.array(refit_names, dtype=str)}


def apply_state(compressed: ir.Model, quantized: ir.Model | None, result: FactorizeResult,
                state: dict[str, np.ndarray]) -> list[str]:
    """Put a refit_state back into the same models (as factorize and quantize rebuild them); returns the
    names refit."""
    rows = {row.name: row for row in result.layers}
    models = {"float": compressed, "int8": quantized}
    errors, tensors = [], []  # all looked up before anything changes: a KeyError leaves the models as they were
    for key, array in state.items():
        kind, name = key.split("/", 1) if "/" in key else (key, "")
        if kind == "error":
            errors.append((rows[name], float(array)))
        elif kind in models:
            if models[kind] is None:
                raise KeyError(key)
            tensors.append((models[kind].graph.initializers[name], array))
    for value, array in tensors:
        value.const_value = ir.tensor(array, name=value.name)
    for row, error in errors:
        row.error = error
    return [str(name) for name in state["refit"]]


def _better_factors(nodes: dict, layer: Layer, row, halves: list[tuple[np.ndarray, np.ndarray]], damping: float):
    """The best factors for all the samples' statistics and their product (in the dense layout), if
    they fit better than the layer's own; else None. "Better" is judged out of sample where there are
    two halves: fitted on each half, tested on the other (with few samples per input dimension, a
    regression fits its samples and nothing else: it made the demo's held-out error worse)."""
    w = layer.matrix("channel" if layer.is_conv else "svd")
    now = _dense(layer, row.form, *_weights(nodes, layer))
    full = (halves[0][0] + halves[1][0], halves[0][1] + halves[1][1]) if len(halves) == 2 else halves[0]
    factors, approx = _solve(layer, row, *full, damping)
    if len(halves) == 2:
        tests = [(_solve(layer, row, *fit, damping)[1], test) for fit, test in (halves, halves[::-1])]
    else:
        tests = [(approx, full)]
    if sum(_loss(w, fitted, *test) for fitted, test in tests) >= sum(_loss(w, now, *test) for _, test in tests):
        return None
    return factors, approx


def _solve(layer: Layer, row, gram: np.ndarray, cross: np.ndarray, damping: float) -> tuple[lowrank.Factors, np.ndarray]:
    """best_factors in the layer's form, and their product in the dense layout."""
    if row.form == "spatial":  # as factorize whitens it: columns of the kernel taken as uncorrelated
        shape = layer.in_channels, layer.kernel
        gram, cross = lowrank.spatial_gram(gram, *shape), lowrank.spatial_gram(cross, *shape)
    factors = best_factors(layer.matrix(row.form), gram, cross, row.rank, damping)
    return factors, _dense(layer, row.form, *factor_weights(layer, row.form, factors))


def _levels(graph: ir.Graph, layers: list[Layer]) -> list[list[Layer]]:
    """The layers grouped by how many of them lie upstream (longest path), in order: one group's layers
    never feed each other."""
    nodes = {use.node.name for layer in layers for use in layer.uses}
    depth: dict[str, int] = {}  # value name -> layers upstream
    for node in graph:  # ONNX graphs are topologically sorted
        d = max((depth.get(v.name, 0) for v in node.inputs if v is not None), default=0) + (node.name in nodes)
        depth.update((v.name, d) for v in node.outputs)
    level = {layer.name: max(depth.get(use.input.name, 0) for use in layer.uses) for layer in layers}
    return [[layer for layer in layers if level[layer.name] == d] for d in sorted(set(level.values()))]


def best_factors(w: np.ndarray, gram: np.ndarray, cross: np.ndarray, rank: int, damping: float) -> lowrank.Factors:
    """The rank-r factors minimising ||Z A^T - X W^T||^2 + d ||A - W||^2, from H = Z^T Z and the cross
    Gram X^T Z, with d the damping factorize whitens with: the damping pulls towards W, not towards 0,
    so where Z = X this is factorize's own whitened truncation."""
    chol = lowrank.cholesky_factor(gram, damping)  # L L^T = H + d I
    d = (np.sum(chol * chol) - np.trace(gram)) / len(gram)
    least_squares = scipy.linalg.cho_solve((chol, True), (w @ cross + d * w).T, check_finite=False).T
    return lowrank.decompose(least_squares, chol, rank)[1]


def _loss(w: np.ndarray, approx: np.ndarray, gram: np.ndarray, cross: np.ndarray) -> float:
    """||Z A^T - X W^T||^2 up to a constant, A = approx (both in the dense layout)."""
    return float(np.sum((approx @ gram) * approx) - 2 * np.sum((w @ cross) * approx))


def _statistics(original: ir.Model, student: ir.Model, layers: list[Layer], samples: Samples,
                inputs: dict[str, str] | None = None) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Layer name -> (Z^T Z, X^T Z) summed over uses and the even samples, and over the odd ones
    (X: ORIGINAL's input, Z: STUDENT's, named as in ORIGINAL or by `inputs`); one pair for one sample."""
    names = list(dict.fromkeys(use.input.name for layer in layers for use in layer.uses))
    inputs = inputs or {name: name for name in names}
    teacher = values_by_sample(original, _values(original.graph, names), samples, False)
    student = values_by_sample(student, _values(student.graph, [inputs[n] for n in names]), samples, False)
    halves = min(len(samples), 2)
    stats = {layer.name: [[0.0, 0.0] for _ in range(halves)] for layer in layers}
    with closing(teacher), closing(student):  # each restores its graph's outputs when closed
        for i, (x, z) in enumerate(zip(teacher, student)):
            for layer in layers:
                for use in layer.uses:
                    a, b = np.asarray(x[use.input.name]), np.asarray(z[inputs[use.input.name]])
                    half = stats[layer.name][i % halves]
                    half[0] = half[0] + input_gram(b, use)
                    half[1] = half[1] + input_gram(a, use, b)
    return {name: [tuple(half) for half in parts] for name, parts in stats.items()}


def _quantized_inputs(quantized: ir.Model, layers: list[Layer]) -> tuple[set[str], dict[str, str]]:
    """The layers whose pairs both have symmetric int8 weights in the QDQ model (the others are left),
    and for those, original input name -> what the pair's first node reads there (a DequantizeLinear's
    output)."""
    nodes = {node.name: node for node in quantized.graph}
    usable, inputs = set(), {}
    for layer in layers:
        pairs = [pair_of(nodes, use.node.name) for use in layer.uses]
        if all(node is not None and _int8_weight(node) is not None for pair in pairs for node in pair):
            usable.add(layer.name)
            inputs.update((use.input.name, pair[0].inputs[0].name) for use, pair in zip(layer.uses, pairs))
    return usable, inputs


def _int8_weight(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear giving the node its weight, if it holds symmetric int8 constants."""
    dq = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 2:
        return None
    q, zero = dq.inputs[0].const_value, dq.inputs[2].const_value if len(dq.inputs) > 2 and dq.inputs[2] else None
    if q is None or dq.inputs[1].const_value is None or q.dtype != ir.DataType.INT8:
        return None
    return dq if zero is None or not np.any(zero.numpy()) else None


def _set_quantized(quantized: ir.Model, layer: Layer, form: str, factors: lowrank.Factors) -> None:
    """Quantize the factors into the QDQ model's int8 weights as ONNX Runtime's symmetric scheme does
    (scale = max|w| / 127 per channel on the DequantizeLinear's axis, or per tensor)."""
    nodes = {node.name: node for node in quantized.graph}
    for use in layer.uses:
        for part, array in zip(PARTS, factor_weights(layer, form, factors)):
            dq = _int8_weight(nodes[part_name(use.node.name, part)])
            q, scale = dq.inputs[0], dq.inputs[1]
            if scale.const_value.numpy().ndim == 0:
                step = np.abs(array).max() / 127.0
            else:
                axis = dq.attributes.get_int("axis", 1) % array.ndim
                other = tuple(i for i in range(array.ndim) if i != axis)
                step = np.expand_dims(np.abs(array).max(axis=other) / 127.0, other)
            step = np.where(step == 0, 1.0, step)
            values = np.clip(np.round(array / step), -127, 127).astype(np.int8)
            dtype = scale.const_value.dtype.numpy()
            q.const_value = ir.tensor(values, name=q.name)
            scale.const_value = ir.tensor(np.asarray(step, dtype).reshape(scale.const_value.numpy().shape), name=scale.name)
            _requantize_bias(nodes[part_name(use.node.name, part)], scale.const_value.numpy())


def _requantize_bias(node: ir.Node, weight_scale: np.ndarray) -> None:
    """An int32 bias is quantized with scale input_scale * weight_scale; ONNX Runtime fuses the node into
    an integer kernel only while that holds (a stale bias scale left YOLOv8n 1.3x slower)."""
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    dq = bias.producer() if bias is not None else None
    source = node.inputs[0].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or source is None or source.op_type != "DequantizeLinear":
        return
    q, scale = dq.inputs[0], dq.inputs[1]
    if q.const_value is None or scale.const_value is None or q.const_value.dtype != ir.DataType.INT32:
        return
    values = q.const_value.numpy().astype(np.float64) * scale.const_value.numpy().astype(np.float64)
    step = (np.float32(source.inputs[1].const_value.numpy()) * weight_scale.astype(np.float32)).astype(np.float32)
    step = np.where(step == 0, 1.0, step).astype(np.float32)
    q.const_value = ir.tensor(np.round(values / step).astype(np.int32), name=q.name)
    scale.const_value = ir.tensor(step.reshape(scale.const_value.numpy().shape), name=scale.name)


def _values(graph: ir.Graph, names: list[str]) -> list[ir.Value]:
    """The graph's values with these names (factorization keeps the names of the values it replaces)."""
    found = {v.name: v for v in graph.inputs}
    for node in graph:
        found.update((v.name, v) for v in node.outputs)
    return [found[name] for name in names if name in found]


def _weights(nodes: dict, layer: Layer) -> list[np.ndarray]:
    """The current (first, second) weights of the layer's pair (edgelr.graph.lowrank_pair names its nodes)."""
    name = layer.uses[0].node.name
    return [nodes[part_name(name, part)].inputs[1].const_value.numpy().astype(np.float64) for part in PARTS]


def _dense(layer: Layer, form: str, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The pair's product in the dense layer's (out x in) layout: factorize.factor_weights undone."""
    if not layer.is_conv:
        return (first @ second).T
    rank, n = first.shape[0], layer.out_features
    if form == "channel":
        return second.reshape(n, rank) @ first.reshape(rank, -1)
    kw = layer.kernel[1]
    up = second.reshape(n, rank, kw).transpose(0, 2, 1).reshape(n * kw, rank)
    product = up @ first.reshape(rank, -1)  # rows (n, j), columns (c, i)
    return product.reshape(n, kw, layer.in_channels, -1).transpose(0, 2, 3, 1).reshape(n, -1)


def _set_factors(nodes: dict, layer: Layer, form: str, factors: lowrank.Factors) -> None:
    """Replace the weights of the layer's factorized pair, in every node using it."""
    first, second = factor_weights(layer, form, factors)
    for use in layer.uses:
        for part, array in (("down", first), ("up", second)):
            weight = nodes[part_name(use.node.name, part)].inputs[1]
            dtype = weight.const_value.dtype.numpy()
            weight.const_value = ir.tensor(array.astype(dtype), name=weight.name)


@dataclass(frozen=True)
class RefitConfig(PassConfig):
    """Refit the pairs a factorize pass made, on the inputs the compressed model feeds them. Placed after
    a static INT8 quantize pass, it reads the INT8 model's inputs and refits its weights too, so it also
    makes up for the quantization error upstream (a refit on float inputs alone made a small convnet's
    INT8 error worse, tests/test_refit.py). The damping and error gate are the factorize pass's."""

    kind: ClassVar[str] = "refit"

    def needs_calibration(self) -> str | None:
        return "the pairs are refit on the calibration samples"


@register_pass(RefitConfig)
class RefitPass(EdgelrPass):
    def requires(self, model: ir.Model) -> None:
        if self.context.factorized is None:
            raise EdgelrError("a refit pass needs a factorize pass before it")
        quantized = self.context.quantized
        if quantized is not None and quantized["scheme"] != "int8":
            raise EdgelrError(f"a refit after quantize ({quantized['scheme']}) cannot read that model's inputs: "
                              "put the refit before the quantize pass (only static int8 is refit after it)")

    def call(self, model: ir.Model) -> PassDetails:
        ctx, done = self.context, self.context.factorized
        result = done.result
        if not result.factorized:
            return PassDetails(model, False)
        if model_bytes(model) > SENSITIVITY_MAX_BYTES:  # a run of both models per level: too slow here
            result.warnings.append(f"factorized pairs not refit (the model is over {SENSITIVITY_MAX_BYTES >> 20} MB)")
            return PassDetails(model, False)
        quantized = model if ctx.float_model is not None else None
        compressed = ctx.float_model if quantized is not None else model
        config = done.config

        def run() -> list[str]:
            return refit(load(done.before), compressed, done.layers, result, ctx.samples, config.damping, ctx.progress,
                         done.analysis.grams, config.max_error, quantized=quantized, objective=ctx.objective)

        rows = {row.name: row for row in result.layers}
        pairs = _refittable(done.layers, rows, result.warnings)
        saved = _snapshot(compressed, quantized, pairs, rows) if ctx.task is not None else []
        before = self._task_value(model) if ctx.task is not None else None
        result.refit = _cached(done, "int8" if quantized is not None else None, compressed, quantized, run)
        if before is not None and result.refit:
            after = self._task_value(model)
            if after < before:  # fitted to the calibration outputs, it lost objects on the judged inputs
                _restore(saved)
                result.warnings.append(f"refit undone: it lowered the {ctx.task.kind} metric on the judged samples "
                                       f"from {before:.3f} to {after:.3f}")
                result.refit = []
        return PassDetails(model, bool(result.refit), result.refit)

    def _task_value(self, model: ir.Model) -> float:
        ctx = self.context
        path = ctx.scratch("refit-judged")
        save(model, path)
        known = ctx.references if ctx.judged is ctx.samples else None  # the original's outputs, not run again
        return judge(ctx.source, path, ctx.judged, ctx.task, known, ctx.objective).score.value


def _cached(done, scheme: str | None, compressed: ir.Model, quantized: ir.Model | None, run) -> list[str]:
    """`run()` (the refit), or what it left the last time on the same model, samples and allocation:
    the refit is most of a second run on the same model (about 70 s of YOLOv8n's 95 s on 2 cores)."""
    key, result, config = done.analysis.key, done.result, done.config
    if key is None:
        return run()
    allocation = sorted((row.name, row.form, row.rank) for row in result.layers if row.rank)
    # the INT8 state holds scales from ONNX Runtime's quantizer: another version may calibrate differently
    objective = done.analysis.objective.key if done.analysis.objective else None  # it judges whether a refit is kept
    what = repr((key, allocation, result.keep_float, config.damping, config.max_error, scheme, objective, ort.__version__))
    name = hashlib.sha256(what.encode()).hexdigest()[:32]
    cache = ArrayCache("refit")
    state = cache.get(name)
    if state is not None and "refit" in state:
        try:
            return apply_state(compressed, quantized, result, state)
        except (KeyError, ValueError):  # an entry that does not fit these models: refit again
            pass
    names = run()
    cache.put(name, refit_state(compressed, quantized, done.layers, result, names))
    return names
