"""Einsums with a constant weight, rewritten as MatMuls with 2-D weights, which find_layers sees.

An Einsum of data X and a constant weight W (`bkdl,kcd->bkcl`: SS2D's x_proj, one (c x d) matrix per scan
direction k) is, per index of the letters W shares with X and the output (k: the *batch* letters), a matrix
product over the letters W shares with X alone (d: *contracted*) into the letters only W and the output have
(c: *out*). The rewrite, exact:

    Transpose X to (batch, free, contracted) -> Reshape (B, free..., K) -> per batch index b:
    Gather b -> MatMul W_b (K x O) -> Reshape (1, free..., O) -> Concat -> Reshape (batch, free, out) -> Transpose

so each W_b is a layer of its own: its own whitened SVD and rank, one low-rank pair per scan direction. Einsums
this cannot express (ellipsis, a letter repeated in one term, a letter summed over one operand alone, no
contracted or no out letter, more than two operands) are left as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgelr.graph.layers import FLOAT_TYPES, const_tensor
from edgelr.graph.lowrank_pair import add_initializer, drop_weight


@dataclass(frozen=True)
class Split:
    """An Einsum's letters by role (data: the non-constant operand's term)."""

    data: str
    weight: str
    out: str
    batch: str
    free: str
    contracted: str
    produced: str  # out letters: in the weight and the output only


def parse(equation: str, weight_first: bool) -> Split | None:
    """The roles of an equation's letters, or None where the rewrite does not apply."""
    equation = equation.replace(" ", "")
    if "..." in equation or equation.count(",") != 1:
        return None
    terms, arrow, out = equation.partition("->")
    first, second = terms.split(",")
    if not arrow:  # the implicit output: the letters seen once, in alphabetical order
        out = "".join(sorted(c for c in set(terms) if c.isalpha() and terms.count(c) == 1))
    data, weight = (second, first) if weight_first else (first, second)
    if any(len(set(t)) != len(t) for t in (data, weight, out)):
        return None
    batch = "".join(c for c in weight if c in data and c in out)
    contracted = "".join(c for c in weight if c in data and c not in out)
    produced = "".join(c for c in weight if c not in data and c in out)
    free = "".join(c for c in data if c not in weight)
    if (not contracted or not produced or any(c not in out for c in free)
            or len(batch + contracted + produced) != len(weight) or set(out) != set(batch + free + produced)):
        return None
    return Split(data, weight, out, batch, free, contracted, produced)


def lower_weight_einsums(model: ir.Model) -> list[str]:
    """Rewrite each Einsum of the main graph with a constant floating-point weight; the names rewritten."""
    graph = model.graph
    lowered = []
    for node in list(graph):
        if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        for weight_first in (False, True):
            weight, data = (node.inputs[0], node.inputs[1]) if weight_first else (node.inputs[1], node.inputs[0])
            array = _constant(weight)
            split = parse(node.attributes.get_string("equation", ""), weight_first) if array is not None else None
            if split is not None and data is not None:
                _rewrite(graph, node, data, array, split)
                lowered.append(node.name)
                break
    return lowered


def _constant(value: ir.Value | None) -> np.ndarray | None:
    tensor = const_tensor(value)
    return tensor.numpy() if tensor is not None and tensor.dtype in FLOAT_TYPES else None


def _ints(graph: ir.Graph, name: str, values) -> ir.Value:
    return add_initializer(graph, name, np.asarray(values, dtype=np.int64))


def _rewrite(graph: ir.Graph, node: ir.Node, data: ir.Value, weight: np.ndarray, s: Split) -> None:
    """Replace NODE by the MatMul form; the weight goes once nothing else reads it."""
    name = node.name or node.outputs[0].name
    size = dict(zip(s.weight, weight.shape))
    batch_n = math.prod(size[c] for c in s.batch)
    k, o = math.prod(size[c] for c in s.contracted), math.prod(size[c] for c in s.produced)
    order = [s.weight.index(c) for c in s.batch + s.contracted + s.produced]
    matrices = weight.transpose(order).reshape(batch_n, k, o)

    nodes: list[ir.Node] = []

    def add(op, inputs, attrs=None, label=None):
        nodes.append(ir.node(op, inputs, attrs or {}, name=f"{name}.{label or f'{op.lower()}{len(nodes)}'}"))
        return nodes[-1].outputs[0]

    known = [data.shape[s.data.index(c)] for c in s.free] if data.shape is not None else []
    if known and all(isinstance(d, int) for d in known):  # a fixed-size export: constant shapes, which inference reads
        free_dims = _ints(graph, f"{name}.free_dims", known)
    else:
        free_axes = _ints(graph, f"{name}.free_axes", [s.data.index(c) for c in s.free])
        free_dims = add("Gather", [add("Shape", [data]), free_axes], {"axis": 0})
    perm = [s.data.index(c) for c in s.batch + s.free + s.contracted]
    x = add("Transpose", [data], {"perm": perm})
    x = add("Reshape", [x, add("Concat", [_ints(graph, f"{name}.b", [batch_n]), free_dims,
                                          _ints(graph, f"{name}.k", [k])], {"axis": 0})])
    one = add("Concat", [_ints(graph, f"{name}.one", [1]), free_dims, _ints(graph, f"{name}.o", [o])], {"axis": 0})
    parts = []
    for b in range(batch_n):
        rows = add("Gather", [x, _ints(graph, f"{name}.index_{b}", b)], {"axis": 0})
        if data.shape is not None:  # shapes for the layer's costs: the free dims of X, then the contracted size
            rows.shape, rows.type = ir.Shape([data.shape[s.data.index(c)] for c in s.free] + [k]), data.type
        w = add_initializer(graph, f"{name}.weight_{b}" if batch_n > 1 else f"{name}.weight", matrices[b])
        product = add("MatMul", [rows, w], label=f"matmul{b}" if batch_n > 1 else "matmul")  # the layer's name
        parts.append(add("Reshape", [product, one]) if batch_n > 1 else product)
    y = add("Concat", parts, {"axis": 0}) if batch_n > 1 else parts[0]
    target = add("Concat", [_ints(graph, f"{name}.batch_dims", [size[c] for c in s.batch]), free_dims,
                            _ints(graph, f"{name}.out_dims", [size[c] for c in s.produced])], {"axis": 0})
    y = add("Reshape", [y, target])
    y = add("Transpose", [y], {"perm": [(s.batch + s.free + s.produced).index(c) for c in s.out]})
    weight_value = next(v for v in node.inputs if v is not data)
    ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, list(node.outputs), [y])
    drop_weight(graph, weight_value)
