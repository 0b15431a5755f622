"""The low-rank pair: a layer rewritten as two nodes (down: input -> rank, up: rank -> output).

Nodes are named NODE/lowrank_down and NODE/lowrank_up, the middle value NODE_OUTPUT/lowrank_mid;
the helpers below are the one place that knows it (refit, profile and distill ask them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgelr.core import lowrank
from edgelr.graph.layers import Layer, Use

PARTS = ("down", "up")
_MARK = "/lowrank_"


def part_name(node_name: str, part: str) -> str:
    """The name of the `part` ("down", "up") node a factorized node NODE_NAME became (or "mid": the value between)."""
    return f"{node_name}{_MARK}{part}"


@dataclass(frozen=True)
class LowRankPair:
    """A factorized layer in a graph: the node it replaced (by name) and the two nodes that replaced it."""

    layer: str
    down: ir.Node
    up: ir.Node


def find_pairs(graph: ir.Graph) -> list[LowRankPair]:
    """Every low-rank pair in the graph, in graph order of their second node."""
    nodes = {node.name: node for node in graph}
    pairs = []
    for node in graph:
        if node.name.endswith(_MARK + "up"):
            layer = node.name[: -len(_MARK + "up")]
            down = nodes.get(part_name(layer, "down"))
            if down is not None:
                pairs.append(LowRankPair(layer, down, node))
    return pairs


def pair_of(nodes: Mapping[str, ir.Node], node_name: str) -> list[ir.Node | None]:
    """[down, up] of the pair that replaced NODE_NAME (None where missing), from a name -> node map."""
    return [nodes.get(part_name(node_name, part)) for part in PARTS]


def unpaired(name: str) -> str:
    """A pair's node or value name back to the name of the layer it replaced (other names unchanged)."""
    for part in (*PARTS, "mid"):
        name = name.replace(_MARK + part, "")
    return name


# --- graph rewriting --------------------------------------------------------------------------
def rewrite_pair(graph: ir.Graph, layer: Layer, form: str, factors: lowrank.Factors) -> None:
    """Replace each use of the layer by its pair, in the graph (or subgraph) holding that use; the factor
    weights go where the dense weight was, which every use can see (GRAPH: the model's main graph)."""
    dtype = ir.convenience.get_const_tensor(layer.weight).dtype.numpy()
    first, second = factor_weights(layer, form, factors)
    home = holder(layer.weight) or graph
    down = add_initializer(home, f"{layer.name}.lowrank_down", first.astype(dtype))
    up = add_initializer(home, f"{layer.name}.lowrank_up", second.astype(dtype))
    for use in layer.uses:
        nodes = pair_nodes(layer, use, form, down, up)
        ir.convenience.replace_nodes_and_values(
            use.node.graph, use.node, [use.node], nodes, list(use.node.outputs), list(nodes[-1].outputs)
        )
    drop_weight(graph, layer.weight)


def holder(value: ir.Value) -> ir.Graph | None:
    """The graph that defines the value (a subgraph's own initializer or node output lives there)."""
    producer = value.producer()
    return producer.graph if producer is not None else value.graph


def factor_weights(layer: Layer, form: str, factors: lowrank.Factors) -> tuple[np.ndarray, np.ndarray]:
    """The two factors as the weights of the ops that carry them."""
    up, down = factors.up, factors.down
    rank = factors.rank
    if not layer.is_conv:
        return down.T, up.T  # MatMul/Gemm weights are (in x out)
    n, c = layer.out_features, layer.in_channels
    ones = (1,) * len(layer.kernel)
    if form == "channel":
        return down.reshape(rank, c, *layer.kernel), up.reshape(n, rank, *ones)
    kh, kw = layer.kernel
    return down.reshape(rank, c, kh, 1), up.reshape(n, kw, rank).transpose(0, 2, 1).reshape(n, rank, 1, kw)


def pair_nodes(layer: Layer, use: Use, form: str, down: ir.Value, up: ir.Value) -> list[ir.Node]:
    node = use.node
    name = node.name
    if node.op_type == "MatMul":
        first = ir.node("MatMul", [node.inputs[0], down], name=part_name(name, "down"))
        second = ir.node("MatMul", [first.outputs[0], up], name=part_name(name, "up"))
    elif node.op_type == "Gemm":
        attrs = node.attributes
        first_inputs = [node.inputs[0], down]
        if use.opset < 11:  # Gemm's C is optional from opset 11
            first_inputs.append(add_initializer(use.node.graph, f"{layer.name}.lowrank_zero", np.zeros(1, down.dtype.numpy())))
        first = ir.node("Gemm", first_inputs, {"transA": attrs.get_int("transA", 0)}, name=part_name(name, "down"))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        second_inputs = [first.outputs[0], up] + ([bias] if bias is not None else [])
        second_attrs = {"alpha": attrs.get_float("alpha", 1.0), "beta": attrs.get_float("beta", 1.0)}
        second = ir.node("Gemm", second_inputs, second_attrs, name=part_name(name, "up"))
    else:
        first, second = _conv_pair(layer, use, form, down, up)
    first.outputs[0].name = part_name(node.outputs[0].name, "mid")  # profiles name fused kernels by output
    return [first, second]


def _conv_pair(layer: Layer, use: Use, form: str, down: ir.Value, up: ir.Value) -> tuple[ir.Node, ir.Node]:
    g = use.geometry
    node = use.node
    nd = len(g.kernel)
    bias = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else []
    if form == "channel":
        first_attrs = {"kernel_shape": list(g.kernel), "strides": list(g.strides), "dilations": list(g.dilations)}
        second_attrs = {"kernel_shape": [1] * nd}
        if g.auto_pad in ("NOTSET", ""):
            first_attrs["pads"] = list(g.pads)
        else:
            first_attrs["auto_pad"] = g.auto_pad
    else:  # the height part of every attribute goes to the first conv, the width part to the second
        (sh, sw), (dh, dw) = g.strides, g.dilations
        first_attrs = {"kernel_shape": [g.kernel[0], 1], "strides": [sh, 1], "dilations": [dh, 1]}
        second_attrs = {"kernel_shape": [1, g.kernel[1]], "strides": [1, sw], "dilations": [1, dw]}
        if g.auto_pad in ("NOTSET", ""):
            top, left, bottom, right = g.pads
            first_attrs["pads"] = [top, 0, bottom, 0]
            second_attrs["pads"] = [0, left, 0, right]
        else:  # SAME_* and VALID split exactly: a size-1 kernel with stride 1 needs no padding
            first_attrs["auto_pad"] = second_attrs["auto_pad"] = g.auto_pad
    first = ir.node("Conv", [node.inputs[0], down], first_attrs, name=part_name(node.name, "down"))
    second = ir.node("Conv", [first.outputs[0], up, *bias], second_attrs, name=part_name(node.name, "up"))
    return first, second


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value


def drop_weight(graph: ir.Graph, weight: ir.Value) -> None:
    """Remove the dense weight once nothing reads it (an initializer or a Constant node), from the graph
    that holds it (GRAPH, or the subgraph it belongs to)."""
    if weight.uses():
        return
    graph = holder(weight) or graph
    if weight.is_initializer():
        graph.initializers.pop(weight.name)
        if weight.is_graph_input():  # old exporters list initializers as inputs too
            graph.inputs.remove(weight)
        return
    producer = weight.producer()
    if producer is not None and producer.op_type == "Constant" and not any(o.uses() for o in producer.outputs):
        graph.remove(producer, safe=True)
