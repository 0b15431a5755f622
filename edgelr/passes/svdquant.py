"""A low-rank branch in float beside INT8 weights (SVDQuant, Li et al. 2024), on the layers where it helps.

A layer y = W x (+ b) becomes

    x' = x / λ                      Mul per input channel (smoothing; skipped when α = 0)
    y  = R x' + U (D x') (+ b)      R = Wλ - UD is quantized; U, D (rank r) stay in float

with SmoothQuant's λ_j = max|x_j|^α / max|W_:j|^(1-α). Smoothing moves the activation outliers into the
weight, where the low-rank branch (the top singular directions of Wλ) absorbs them, so both the
quantized x' and the quantized residual R have narrow ranges. The branch's nodes (the Mul, D, U and the
Add) carry edgelr.quantize.FLOAT_BRANCH in their names: they stay in float and read float inputs.

Which layers get a branch is measured, not guessed: each layer alone, with its real weights and its real
calibration activations, is quantized by ONNX Runtime plain and with the branch (for each α), and its
output error compared on held-back activations. The branch is kept where it cuts the error by MIN_GAIN.

    table = plan(model, samples)     # one row per layer: outlier ratio, INT8 error, branch error, chosen
    apply(model, table)              # rewrite the chosen layers in place; then quantize as "int8"
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgelr.calibration.grams import layer_inputs, observe_shapes
from edgelr.core import lowrank
from edgelr.errors import EdgelrError
from edgelr.graph.extract import single_layer_model
from edgelr.graph.layers import Layer, find_layers
from edgelr.graph.lowrank_pair import (
    add_initializer,
    drop_weight,
    factor_weights,
    pair_nodes,
)
from edgelr.io.model import load, ort_session, save
from edgelr.io.progress import progress_bar
from edgelr.io.samples import Samples, samples_from_arrays
from edgelr.passes.quantize import FLOAT_BRANCH, SCHEME_REWRITES, quantize, quiet

RANK = 16
ALPHAS = (0.0, 0.5)
MIN_GAIN = 0.2  # the branch must cut the layer's quantized output error by this fraction
MAX_SAMPLES = 8  # activations kept per layer for the measurement: half calibrate, half judge


@dataclass
class LayerPlan:
    name: str
    op: str
    outlier_ratio: float  # max over input channels of max|x_c|, over its median: how uneven x is
    int8_error: float  # relative output error of the layer quantized plainly
    branch_error: float | None  # the same with the low-rank branch, best α
    alpha: float | None
    rank: int
    chosen: bool
    absmax: np.ndarray | None = None  # per input channel, for the rewrite

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("absmax")
        return data


def plan(model: ir.Model, samples: Samples, *, rank: int = RANK, alphas=ALPHAS, min_gain: float = MIN_GAIN,
         activations: str = "uint8", progress: bool = True) -> list[LayerPlan]:
    """Measure, layer by layer, whether a low-rank float branch beats plain INT8 (see the module doc)."""
    if len(samples) < 2:
        raise EdgelrError("--quantize int8-lowrank measures each layer on held-back samples: give at least 2 "
                          f"calibration samples (got {len(samples)})")
    layers = [layer for layer in find_layers(model)[0] if _eligible(layer, rank)]
    inputs = _activations(model, layers, samples)
    rows = []
    for layer in progress_bar(layers, desc="low-rank branches", unit="layer", show=progress):
        xs = inputs[layer.uses[0].input.name]
        absmax = _channel_absmax(np.concatenate(xs), layer)
        half = len(xs) // 2
        calib, judge = np.concatenate(xs[:half]), xs[half:]
        plain = _quantized_error(layer, None, calib, judge, activations)
        tried = {alpha: _quantized_error(layer, (rank, alpha, absmax), calib, judge, activations) for alpha in alphas}
        alpha = min(tried, key=tried.get)
        rows.append(LayerPlan(
            name=layer.name, op=layer.op, outlier_ratio=float(absmax.max() / max(np.median(absmax), 1e-12)),
            int8_error=plain, branch_error=tried[alpha], alpha=alpha, rank=rank,
            chosen=tried[alpha] <= (1 - min_gain) * plain, absmax=absmax,
        ))
    return rows


def int8_errors(model: ir.Model, layers: list[Layer], samples: Samples, activations: str = "uint8",
                progress: bool = True) -> dict[str, float]:
    """Layer name -> what INT8 adds to the layer's relative output error^2, the layer alone with its real
    weights and activations (ONNX Runtime quantizes it on half the samples, the other half judge): its
    INT8 error^2 less that of only its output being quantized, which the next layer does in float too.
    What edgelr.passes.factorize weighs to leave a layer in float (see LatencyBudget)."""
    if len(samples) < 2:
        raise EdgelrError("measuring each layer's INT8 error needs at least 2 calibration samples "
                          f"(got {len(samples)})")
    inputs = _activations(model, layers, samples)
    errors = {}
    for layer in progress_bar(layers, desc="INT8 errors", unit="layer", show=progress):
        xs = inputs[layer.uses[0].input.name]
        half = max(1, len(xs) // 2)
        calib, judge = np.concatenate(xs[:half]), xs[half:]
        quantized, output_only = _quantized_error(layer, None, calib, judge, activations, both=True)
        errors[layer.name] = max(quantized**2 - output_only**2, 0.0)
    return errors


def _activations(model: ir.Model, layers: list[Layer], samples: Samples) -> dict[str, list[np.ndarray]]:
    """Input tensor name -> the layers' real inputs, one array per sample (at most MAX_SAMPLES)."""
    observe_shapes(model, layers, samples)
    inputs: dict[str, list[np.ndarray]] = {}
    for values in layer_inputs(model, layers, samples.split(MAX_SAMPLES)[0], progress=False):
        for name in {layer.uses[0].input.name for layer in layers}:
            inputs.setdefault(name, []).append(np.asarray(values[name], dtype=np.float32))
    return inputs


def apply(model: ir.Model, rows: list[LayerPlan]) -> int:
    """Give the chosen layers their branch, in place; returns how many."""
    chosen = {row.name: row for row in rows if row.chosen}
    count = 0
    for layer in find_layers(model)[0]:
        row = chosen.get(layer.name)
        if row is not None and _eligible(layer, row.rank):
            rewrite(model.graph, layer, row.rank, row.alpha, row.absmax)
            count += 1
    return count


def rewrite(graph: ir.Graph, layer: Layer, rank: int, alpha: float, absmax: np.ndarray) -> None:
    """Replace the layer's node by residual + float low-rank branch (+ smoothing Mul)."""

    use = layer.uses[0]
    node = use.node
    dtype = ir.convenience.get_const_tensor(layer.weight).dtype.numpy()
    scale = _smoothing(layer, absmax, alpha)
    per_column = np.repeat(scale, math.prod(layer.kernel) if layer.kernel else 1)
    w = layer.matrix("channel" if layer.is_conv else "svd") * per_column  # (out x in) W λ
    factors = lowrank.decompose(w, None, keep=rank)[1]
    residual = _stored_layout(layer, w - factors.up @ factors.down).astype(dtype)

    new_nodes = []
    x = use.input
    if alpha > 0:
        shape = (-1,) + (1,) * len(layer.kernel) if layer.is_conv else (-1,)
        inverse = add_initializer(graph, f"{layer.name}.smooth", (1.0 / scale).reshape(shape).astype(dtype))
        smooth = ir.node("Mul", [x, inverse], name=f"{node.name}{FLOAT_BRANCH}_smooth")
        new_nodes.append(smooth)
        x = smooth.outputs[0]
        x.name = f"{node.outputs[0].name}/smoothed"
    attrs = {k: v.value for k, v in node.attributes.items()}
    main = ir.node(node.op_type, [x, add_initializer(graph, f"{layer.name}.residual", residual)], attrs,
                   name=f"{node.name}/residual")
    node.replace_input_with(0, x)  # the branch reads x' too (_pair builds from the node's input)
    form = "channel" if layer.is_conv else "svd"
    first_w, second_w = _branch_weights(layer, factors)
    down = add_initializer(graph, f"{layer.name}.branch_down", first_w.astype(dtype))
    up = add_initializer(graph, f"{layer.name}.branch_up", second_w.astype(dtype))
    first, second = pair_nodes(layer, use, form, down, up)  # the bias rides on the branch's second node
    first.name, second.name = f"{node.name}{FLOAT_BRANCH}_down", f"{node.name}{FLOAT_BRANCH}_up"
    add = ir.node("Add", [main.outputs[0], second.outputs[0]], name=f"{node.name}{FLOAT_BRANCH}_add")
    main.outputs[0].name = f"{node.outputs[0].name}/residual"
    new_nodes += [main, first, second, add]
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, list(node.outputs), list(add.outputs))
    drop_weight(graph, layer.weight)


def _eligible(layer: Layer, rank: int) -> bool:
    """One use (a shared weight would need one branch per use), in the main graph (its inputs are read from
    there), no transposed input, room for the rank, and a Gemm whose bias is optional (opset 11)."""
    if len(layer.uses) != 1 or layer.uses[0].transpose_input or layer.in_subgraph:
        return False
    if layer.op == "Gemm" and layer.uses[0].opset < 11:
        return False
    return 2 * rank <= min(layer.out_features, layer.in_channels * (math.prod(layer.kernel) if layer.kernel else 1))


def _channel_absmax(x: np.ndarray, layer: Layer) -> np.ndarray:
    """max |x| per input channel: axis 1 of a conv input, the last axis of a MatMul/Gemm input."""
    if layer.is_conv:
        return np.abs(x).max(axis=tuple(i for i in range(x.ndim) if i != 1))
    return np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)


def _smoothing(layer: Layer, absmax: np.ndarray, alpha: float) -> np.ndarray:
    """λ per input channel (SmoothQuant); ones when α = 0."""
    if alpha == 0:
        return np.ones(layer.in_channels)
    w = np.abs(layer.matrix("channel" if layer.is_conv else "svd"))
    wmax = w.reshape(w.shape[0], layer.in_channels, -1).max(axis=(0, 2))
    scale = np.maximum(absmax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
    return np.clip(scale, 1e-4, 1e4)


def _stored_layout(layer: Layer, matrix: np.ndarray) -> np.ndarray:
    """An (out x in) matrix back in the layout the layer stores its weight."""
    if layer.is_conv:
        return matrix.reshape(layer.out_features, layer.in_channels, *layer.kernel)
    return matrix.T if layer.transposed_weight else matrix


def _branch_weights(layer: Layer, factors: lowrank.Factors) -> tuple[np.ndarray, np.ndarray]:

    return factor_weights(layer, "channel" if layer.is_conv else "svd", factors)


def _quantized_error(layer: Layer, branch, calib: np.ndarray, judge: list[np.ndarray], activations: str,
                     both: bool = False):
    """Relative output error of the layer alone quantized by ONNX Runtime, plainly (branch None) or with
    the branch (rank, α, absmax). Outputs are fake-quantized to UINT8 on the float output's range in
    both cases: in the model the next layer quantizes them either way. `both`: also the error of that
    output quantization alone (the float layer's)."""

    use = layer.uses[0]
    shaped = type(use)(**{**use.__dict__, "input_shape": tuple(judge[0].shape)})  # one sample's shape
    tiny = single_layer_model(layer, shaped, rng=None)
    with ort_session(tiny) as session:
        reference = [session.run(None, {"x": x})[0] for x in judge]
        low, high = _range(session.run(None, {"x": calib[:1]})[0], reference)
    if branch is not None:
        rank, alpha, absmax = branch
        rewrite(tiny.graph, find_layers(tiny)[0][0], rank, alpha, absmax)
    with tempfile.TemporaryDirectory(prefix="edgelr-branch-") as tmp:
        ir.save(tiny, Path(tmp) / "layer.onnx")
        samples = samples_from_arrays({"x": calib}, tiny)
        quantize(Path(tmp) / "layer.onnx", Path(tmp) / "layer.q.onnx", "int8", samples, activations=activations,
                 progress=False, prepare=False)
        with ort_session(Path(tmp) / "layer.q.onnx") as session:
            got = [_fake_quant(session.run(None, {"x": x})[0], low, high) for x in judge]
    error = _relative(got, reference)
    return (error, _relative([_fake_quant(r, low, high) for r in reference], reference)) if both else error


def _relative(got: list[np.ndarray], reference: list[np.ndarray]) -> float:
    num = sum(float(np.sum((g - r) ** 2)) for g, r in zip(got, reference))
    den = sum(float(np.sum(r**2)) for r in reference)
    return math.sqrt(num / den) if den > 0 else 0.0


def _range(first: np.ndarray, rest: list[np.ndarray]) -> tuple[float, float]:
    values = [first, *rest]
    return min(0.0, min(float(v.min()) for v in values)), max(0.0, max(float(v.max()) for v in values))


def _fake_quant(y: np.ndarray, low: float, high: float) -> np.ndarray:
    """UINT8 asymmetric quantize-dequantize (ORT's activation scheme) on [low, high]."""
    scale = (high - low) / 255 or 1.0
    zero = round(-low / scale)
    return (np.clip(np.round(y / scale) + zero, 0, 255) - zero) * scale


def branch_model(model_path: Path, tmp: Path, samples: Samples, activations: str, progress: bool) -> list:
    """edgelr.passes.svdquant: measure each layer plain and with a float low-rank branch; write the model with
    the branches that measured better to tmp/branched.onnx. Returns the per-layer table."""
    model = load(model_path)
    with quiet():
        rows = plan(model, samples, activations=activations, progress=progress)
    if apply(model, rows):
        save(model, tmp / "branched.onnx")
    return rows


SCHEME_REWRITES["int8-lowrank"] = branch_model
