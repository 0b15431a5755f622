"""A layer cut out of its model: one node (or its factorized pair) as a model of its own, for timing it alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgelr.graph.layers import Layer, Use


def single_layer_model(layer: Layer, use: Use, rng: np.random.Generator | None) -> ir.Model:
    """A model of this one node fed at the real input shape: with random weights of the same shapes
    (timing), or with the layer's own weights when `rng` is None."""
    node = use.node
    dtype = use.input.dtype or ir.DataType.FLOAT
    x = ir.Value(name="x", shape=ir.Shape(use.input_shape), type=ir.TensorType(dtype))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": use.opset}, name="layer")

    def random(tensor) -> np.ndarray:  # shape and dtype only: a large external weight is not read
        return rng.normal(size=tuple(tensor.shape)).astype(tensor.dtype.numpy())

    stored = ir.convenience.get_const_tensor(layer.weight)
    inputs = [x, _const(graph, "w", layer.weight_array() if rng is None else random(stored))]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = ir.convenience.get_const_tensor(node.inputs[2])
        if bias is None:  # a computed bias: zeros stand in
            bias = ir.tensor(np.zeros(layer.out_features, stored.dtype.numpy()))
        inputs.append(_const(graph, "b", bias.numpy() if rng is None else random(bias)))
    attrs = {k: v.value for k, v in node.attributes.items()}
    copy = ir.node(node.op_type, inputs, attrs, name=node.name)
    graph.append(copy)
    copy.outputs[0].name = "y"
    graph.outputs.append(copy.outputs[0])
    return ir.Model(graph, ir_version=8)


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value
