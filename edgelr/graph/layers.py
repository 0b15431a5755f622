"""Finding the layers a low-rank pass can rewrite, and what they cost.

A *layer* is one constant weight and the MatMul/Gemm/Conv nodes that use it (usually one node;
several when an exporter shares a weight), in the main graph or inside If/Loop/Scan subgraphs
(edgelr.graph.subgraphs). Every cost here is per input sample, a loop body's over all its iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgelr.graph import subgraphs
from edgelr.graph.subgraphs import name_nodes  # noqa: F401  (passes name nodes through here)

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


@dataclass(frozen=True)
class ConvGeometry:
    """The attributes of a Conv node that a factorized pair must reproduce."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end... (ONNX order); ignored when auto_pad is SAME_*
    auto_pad: str

    @classmethod
    def of(cls, node: ir.Node, kernel: tuple[int, ...]) -> ConvGeometry:
        nd = len(kernel)
        attrs = node.attributes
        return cls(
            kernel=kernel,
            strides=tuple(attrs.get_ints("strides", [1] * nd)),
            dilations=tuple(attrs.get_ints("dilations", [1] * nd)),
            pads=tuple(attrs.get_ints("pads", [0] * (2 * nd))),
            auto_pad=attrs.get_string("auto_pad", "NOTSET"),
        )

    def explicit_pads(self, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Pads as numbers for an input of this size (resolves auto_pad)."""
        nd = len(self.kernel)
        if self.auto_pad in ("NOTSET", ""):
            return self.pads
        if self.auto_pad == "VALID":
            return (0,) * (2 * nd)
        begin, end = [], []
        for size, k, s, d in zip(in_spatial, self.kernel, self.strides, self.dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if self.auto_pad == "SAME_UPPER" else large)
            end.append(large if self.auto_pad == "SAME_UPPER" else small)
        return tuple(begin + end)

    def out_spatial(self, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
        nd = len(self.kernel)
        pads = self.explicit_pads(in_spatial)
        return tuple(
            (size + pads[i] + pads[i + nd] - self.dilations[i] * (self.kernel[i] - 1) - 1) // self.strides[i] + 1
            for i, size in enumerate(in_spatial)
        )


@dataclass
class Use:
    """One node applying the layer's weight to an input."""

    node: ir.Node
    input: ir.Value  # the activation the weight multiplies
    transpose_input: bool = False  # Gemm transA: rows of the input are its columns
    geometry: ConvGeometry | None = None
    input_shape: tuple[int, ...] | None = None  # per sample; from shape inference or calibration
    opset: int = 17  # of the model's default domain
    scope: str = ""  # the path of the subgraph holding the node (edgelr.graph.subgraphs), "" in the main graph
    repeats: int = 1  # runs of the node per run of the model: a Loop or Scan body's iterations
    uncalibrated: str | None = None  # why calibration cannot reach the node (a loop body), None if it can

    def positions(self) -> int | None:
        """How many times per sample the weight is applied (rows of a MatMul, output pixels of a Conv),
        over every run of the node."""
        shape = self.input_shape
        if shape is None or any(not isinstance(d, int) for d in shape):
            return None
        if self.geometry is not None:
            once = math.prod(self.geometry.out_spatial(tuple(shape[2:])))
        elif self.transpose_input:
            once = shape[-1]
        else:
            once = math.prod(shape[:-1]) if len(shape) > 1 else 1
        return once * self.repeats


@dataclass
class Layer:
    """A constant weight and the nodes that use it; W is read in (out x in) orientation."""

    name: str
    op: str  # MatMul, Gemm or Conv
    weight: ir.Value
    uses: list[Use] = field(default_factory=list)
    out_features: int = 0  # m: N for a conv
    in_features: int = 0  # n: C*prod(kernel) for a conv
    kernel: tuple[int, ...] = ()  # conv only
    transposed_weight: bool = False  # weight stored (in x out), as MatMul and Gemm(transB=0) do

    @property
    def is_conv(self) -> bool:
        return self.op == "Conv"

    @property
    def in_subgraph(self) -> bool:
        """Some node of the layer sits inside an If, Loop or Scan subgraph."""
        return any(use.scope for use in self.uses)

    @property
    def uncalibrated(self) -> str | None:
        """Why calibration cannot see the layer's inputs (it is then factorized data-free), None if it can."""
        return next((use.uncalibrated for use in self.uses if use.uncalibrated), None)

    @property
    def in_channels(self) -> int:
        return self.in_features // math.prod(self.kernel) if self.kernel else self.in_features

    def forms(self) -> tuple[str, ...]:
        """The factorized forms this layer can take."""
        if not self.is_conv:
            return ("svd",)
        if len(self.kernel) == 2 and min(self.kernel) > 1:
            return ("channel", "spatial")
        return ("channel",)

    def weight_array(self) -> np.ndarray:
        """The weight as stored; a memory-mapped weight is copied out and unmapped."""
        tensor = ir.convenience.get_const_tensor(self.weight)
        if isinstance(tensor, ir.ExternalTensor):
            array = np.array(tensor.numpy())
            tensor.release()
            return array
        return tensor.numpy()

    def matrix(self, form: str = "svd") -> np.ndarray:
        """The weight as the (out x in) matrix that a form factorizes."""
        w = self.weight_array().astype(np.float64)
        if not self.is_conv:
            return w.T if self.transposed_weight else w
        if form == "spatial":  # rows (n, j), columns (c, i): conv kh x 1 then 1 x kw
            n, c, kh, kw = w.shape
            return w.transpose(0, 3, 1, 2).reshape(n * kw, c * kh)
        return w.reshape(w.shape[0], -1)

    # --- costs -------------------------------------------------------------------------------
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def params(self, form: str, rank: int) -> int:
        if form == "spatial":
            n, c, (kh, kw) = self.out_features, self.in_channels, self.kernel
            return rank * (c * kh + n * kw)
        return rank * (self.out_features + self.in_features)

    def dense_flops(self) -> int | None:
        total = 0
        for use in self.uses:
            positions = use.positions()
            if positions is None:
                return None
            total += 2 * positions * self.out_features * self.in_features
        return total

    def flops(self, form: str, rank: int) -> int | None:
        total = 0
        for use in self.uses:
            positions = use.positions()
            if positions is None:
                return None
            if form != "spatial":
                total += 2 * positions * rank * (self.out_features + self.in_features)
                continue
            # first conv (kh x 1) keeps the input width; the second (1 x kw) strides it
            g = use.geometry
            in_h, in_w = use.input_shape[-2:]
            out_h, _ = g.out_spatial((in_h, in_w))
            n, c, (kh, kw) = self.out_features, self.in_channels, self.kernel
            total += 2 * (use.repeats * out_h * in_w * rank * c * kh + positions * n * rank * kw)
        return total

    def cost(self, metric: str, form: str | None = None, rank: int = 0) -> int | None:
        """Params or FLOPs of the dense layer (form None) or of a factorized form at a rank."""
        if metric == "params":
            return self.dense_params() if form is None else self.params(form, rank)
        return self.dense_flops() if form is None else self.flops(form, rank)

    def max_rank(self, form: str) -> int:
        """The rank at which a form reproduces W exactly."""
        if form == "spatial":
            n, c, (kh, kw) = self.out_features, self.in_channels, self.kernel
            return min(n * kw, c * kh)
        return min(self.out_features, self.in_features)


@dataclass
class Skipped:
    """A MatMul/Gemm/Conv node that the pass leaves alone, and why."""

    name: str
    op: str
    reason: str


def find_layers(model: ir.Model) -> tuple[list[Layer], list[Skipped]]:
    """Every constant-weight MatMul/Gemm/Conv layer of the model, in If/Loop/Scan subgraphs too (named by their
    path, edgelr.graph.subgraphs), and the weighted nodes passed over, with why (ConvTranspose among them)."""
    scope_of = subgraphs.scopes(model)  # names every node
    opset = model.graph.opset_imports.get("", 17)  # a subgraph uses its model's opsets
    layers: dict[int, Layer] = {}
    skipped: list[Skipped] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
            continue
        if node.op_type == "ConvTranspose":
            skipped.append(Skipped(node.name, node.op_type, "ConvTranspose is not factorized yet"))
            continue
        reason, use, weight = _inspect_node(node, opset)
        if reason:
            skipped.append(Skipped(node.name, node.op_type, reason))
            continue
        scope = scope_of.get(id(node.graph))
        if scope is not None:
            use.scope, use.repeats, use.uncalibrated = scope.path, scope.repeats, scope.uncalibrated
        layer = layers.get(id(weight))
        if layer is None:
            layer = _new_layer(node, weight)
            if layer is None:
                skipped.append(Skipped(node.name, node.op_type, "weight shape does not fit the op"))
                continue
            layers[id(weight)] = layer
        elif not _same_layout(layer, node):
            skipped.append(Skipped(node.name, node.op_type, f"shares its weight with {layer.name} in another layout"))
            continue
        layer.uses.append(use)
    result = []
    for layer in layers.values():
        # a weight that other ops read too (tied embeddings, say) must stay, so factorizing saves nothing
        other = [u for u in layer.weight.uses() if u.node not in {x.node for x in layer.uses}]
        if other:
            skipped.append(Skipped(layer.name, layer.op, f"weight also read by {other[0].node.op_type} '{other[0].node.name}'"))
        else:
            result.append(layer)
    return result, skipped


def _inspect_node(node: ir.Node, opset: int):
    """(reason it is skipped or None, Use, weight value)."""
    op = node.op_type
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[0] is None:
        return "missing inputs", None, None
    weight = node.inputs[1]
    if weight.is_graph_input() and not weight.is_initializer():
        return "weight is a graph input", None, None
    tensor = const_tensor(weight)
    if tensor is None:
        producer = weight.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "weight is quantized: factorize the float model", None, None
        return "weight is not a constant", None, None
    if tensor.dtype not in FLOAT_TYPES:
        return f"weight is {tensor.dtype.name}, not floating point", None, None
    use = Use(node=node, input=node.inputs[0], input_shape=_static_shape(node.inputs[0]), opset=opset)
    if op == "Gemm":
        use.transpose_input = bool(node.attributes.get_int("transA", 0))
    if op == "MatMul" and len(tensor.shape) != 2:
        return "weight is not 2-D", None, None
    if op == "Conv":
        if node.attributes.get_int("group", 1) != 1:
            return "grouped or depthwise conv", None, None
        if len(tensor.shape) < 3:
            return "weight rank below 3", None, None
        use.geometry = ConvGeometry.of(node, tuple(int(d) for d in tensor.shape[2:]))
    return None, use, weight


def const_tensor(value: ir.Value | None):
    """The value's constant tensor (an initializer or a Constant node's), None if it has none: a graph input
    (which a caller may feed), or computed."""
    if value is None or (value.is_graph_input() and not value.is_initializer()):
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def _static_shape(value: ir.Value) -> tuple | None:
    """The value's shape with a batch of 1, or None; symbolic dims stay as strings."""
    if value.shape is None:
        return None
    dims = [d if isinstance(d, int) and d >= 0 else str(d) for d in value.shape.dims]  # -1: dynamic (old Paddle)
    if dims and not isinstance(dims[0], int):
        dims[0] = 1
    return tuple(dims)


def _new_layer(node: ir.Node, weight: ir.Value) -> Layer | None:
    shape = tuple(int(d) for d in ir.convenience.get_const_tensor(weight).shape)
    op = node.op_type
    if op == "Conv":
        return Layer(node.name, op, weight, out_features=shape[0], in_features=math.prod(shape[1:]), kernel=shape[2:])
    if len(shape) != 2:
        return None
    transposed = op == "MatMul" or not node.attributes.get_int("transB", 0)
    k, n = shape if transposed else shape[::-1]
    return Layer(node.name, op, weight, out_features=n, in_features=k, transposed_weight=transposed)


def _same_layout(layer: Layer, node: ir.Node) -> bool:
    if node.op_type == "Conv" or layer.is_conv:
        return node.op_type == layer.op
    transposed = node.op_type == "MatMul" or not node.attributes.get_int("transB", 0)
    return transposed == layer.transposed_weight
