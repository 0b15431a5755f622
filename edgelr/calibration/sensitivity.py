"""How much each layer's error reaches the model's outputs: the weights of the rank allocation.

The allocation minimises a sum of per-layer errors; but a relative error of 0.1 in an early layer, in a
branch the outputs barely read, or right before a large output, changes the whole model's output by very
different amounts. As in ASVD's sensitivity-based rank search (and HAWQ's Hessian traces for mixed
precision), we measure that end to end, once per layer: truncate the layer to a relative error e (its own
whitened truncation, so the direction of the error is the real one), run a few calibration samples, and
take s = E^2 / e^2, E^2 the objective's sum of its groups' relative errors squared
(edgelr.core.objective: each output, and each group of channels of one scale, on its own scale; a
detector's class scores count as much as its box pixels). To first order the model's E^2 is then
sum_l s_l e_l^2, which is what the allocation minimises (with no s_l below the median one: see
factorize._weights), and what its predicted errors are.

All layers are measured in one ONNX Runtime session: each gets a parallel branch, its weight's truncation
residual times a scalar gate fed as an input, added to its output; the gates open one layer at a time.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from edgelr.core import lowrank
from edgelr.core.objective import Objective
from edgelr.graph.layers import Layer, find_layers
from edgelr.io import model as model_io
from edgelr.io.progress import progress_bar
from edgelr.io.samples import Samples

PROBE_ERROR2 = 0.01  # the truncation each layer is probed at: a relative error of 0.1
PROBE_SAMPLES = 8  # spread over the calibration set: samples often come a few crops per photo
GROUP_BYTES = 64 << 20  # residual weights added to one probing model (more go in further groups)


def layer_sensitivity(source, layers: list[Layer], grams: Mapping[str, np.ndarray], spectra: dict,
                      damping: float, samples: Samples, objective: Objective, progress: bool = True,
                      rows: Mapping[str, int] | None = None) -> dict[str, float]:
    """Layer name -> s, the objective's error^2 per unit of the layer's own relative error^2.
    `spectra`: factorize's memo of error-by-rank curves, read and filled in. `rows`: each Gram's input
    rows, for the damping to adapt to as factorize's does (edgelr.core.lowrank.adapted_damping)."""
    from edgelr.calibration.spectra import spectrum

    rows = rows or {}
    probes = {}
    for layer in layers:
        if layer.name not in grams:
            continue
        form = layer.forms()[0]
        residual = spectrum(layer, form, grams[layer.name], damping, spectra, rows.get(layer.name))
        rank = _probe_rank(residual, layer.max_rank(form))
        if rank and residual[rank] > 0:
            probes[layer.name] = (form, rank, float(residual[rank]))
    picked = sorted(set(np.linspace(0, len(samples) - 1, min(PROBE_SAMPLES, len(samples))).round().astype(int)))
    result: dict[str, float] = {}
    bar = progress_bar(total=len(probes) * len(picked), desc="sensitivity", unit="run", show=progress)
    for group in _groups([layer for layer in layers if layer.name in probes]):
        model = model_io.load(source)
        fresh = {layer.name: layer for layer in find_layers(model)[0]}
        gates = []
        for layer in group:
            form, rank, _ = probes[layer.name]
            delta = _residual_weight(layer, form, rank, grams[layer.name], damping, rows.get(layer.name))
            gates.append(_add_probe(model.graph, fresh[layer.name], delta, len(gates)))
        meters = {gate: objective.meter() for gate in gates}
        with model_io.ort_session(model) as session:
            names = [o.name for o in session.get_outputs()]
            closed = {g: np.zeros((), dtype=np.float32) for g in gates}
            for i in picked:
                feed = samples.feed(int(i))
                base = dict(zip(names, session.run(names, feed | closed)))
                for gate in gates:
                    out = session.run(names, feed | closed | {gate: np.ones((), dtype=np.float32)})
                    meters[gate].add(base, dict(zip(names, out)))
                    bar.update()
        for layer, gate in zip(group, gates):
            result[layer.name] = meters[gate].total2() / probes[layer.name][2]
    bar.close()
    return result


def _probe_rank(residual: np.ndarray, max_rank: int) -> int:
    """The smallest rank whose truncation error^2 is at most PROBE_ERROR2 (below full rank)."""
    below = np.nonzero(residual[1:max_rank] <= PROBE_ERROR2)[0]
    return int(below[0]) + 1 if len(below) else max(1, max_rank - 1)


def _groups(layers: list[Layer]) -> list[list[Layer]]:
    groups, size = [[]], 0
    for layer in layers:
        nbytes = 4 * layer.out_features * layer.in_features
        if groups[-1] and size + nbytes > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(layer)
        size += nbytes
    return [g for g in groups if g]


def _residual_weight(layer: Layer, form: str, rank: int, gram: np.ndarray, damping: float,
                     rows: int | None) -> np.ndarray:
    """W minus its best rank-`rank` whitened approximation, in the weight's stored layout."""
    from edgelr.calibration.spectra import whitening

    w, chol = whitening(layer, form, gram, damping, rows)
    factors = lowrank.decompose(w, chol, keep=rank)[1]
    delta = w - factors.up @ factors.down
    stored = layer.weight_array()
    if layer.is_conv:
        return delta.reshape(stored.shape).astype(stored.dtype)
    return (delta.T if layer.transposed_weight else delta).astype(stored.dtype)


def _add_probe(graph: ir.Graph, layer: Layer, delta: np.ndarray, index: int) -> str:
    """y -> y + gate * op(x, delta) at every use of the layer; returns the gate input's name. The delta and
    the gate go in the main GRAPH, which a use inside a subgraph sees too; the branch goes beside the use."""
    weight = ir.Value(name=f"edgelr_probe_{index}.delta", shape=ir.Shape(delta.shape),
                      type=ir.TensorType(ir.DataType.from_numpy(delta.dtype)))
    weight.const_value = ir.tensor(delta, name=weight.name)
    graph.register_initializer(weight)
    out_type = layer.uses[0].node.outputs[0].type or ir.TensorType(ir.DataType.FLOAT)
    gate = ir.Value(name=f"edgelr_probe_{index}.gate", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(gate)
    for use in layer.uses:
        node = use.node
        slot = list(node.inputs).index(layer.weight)
        inputs = list(node.inputs[:slot]) + [weight]  # no bias: the branch carries only the weight's error
        if node.op_type == "Gemm" and use.opset < 11:  # C was required before opset 11: a zero, broadcast
            inputs.append(_zero(graph, delta.dtype, index))
        attrs = {k: v.value for k, v in node.attributes.items()}
        branch = ir.node(node.op_type, inputs, attrs, name=f"{node.name}/edgelr_probe")
        opened = ir.node("Mul", [branch.outputs[0], _cast(gate, out_type, node, index)])
        y = node.outputs[0]
        consumers = list(y.uses())
        total = ir.node("Add", [y, opened.outputs[0]])
        for part, added in (("branch", branch), ("opened", opened), ("total", total)):  # unique in every graph
            added.outputs[0].name = f"{node.name}/edgelr_probe_{part}"
        node.graph.insert_after(node, [branch, opened, total])
        for consumer, at in consumers:
            consumer.replace_input_with(at, total.outputs[0])
        outputs = node.graph.outputs
        if y in outputs:  # the output keeps its name
            outputs[list(outputs).index(y)] = total.outputs[0]
            name, y.name = y.name, f"{y.name}/edgelr_pre"
            total.outputs[0].name = name
    return gate.name


def _zero(graph: ir.Graph, dtype, index: int) -> ir.Value:
    name = f"edgelr_probe_{index}.zero"
    if name not in graph.initializers:
        value = ir.Value(name=name, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype))))
        value.const_value = ir.tensor(np.zeros(1, dtype=dtype), name=name)
        graph.register_initializer(value)
    return graph.initializers[name]


def _cast(gate: ir.Value, out_type, node: ir.Node, index: int) -> ir.Value:
    """The gate in the layer output's float type (fp16 models)."""
    dtype = getattr(out_type, "dtype", ir.DataType.FLOAT)
    if dtype == ir.DataType.FLOAT:
        return gate
    cast = ir.node("Cast", [gate], {"to": dtype}, name=f"edgelr_probe_{index}.cast.{node.name}")
    cast.outputs[0].name = cast.name
    node.graph.insert_before(node, [cast])
    return cast.outputs[0]
