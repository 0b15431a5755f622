"""Small ONNX models for the tests, built with onnx.helper and numpy.

Every builder returns a `Built`: the ModelProto (checked with the ONNX checker and strict shape
inference, so the declared input/output shapes are consistent), plus the concrete input shapes to
feed (symbolic dims get a concrete size here). The weights are drawn from the caller's numpy
Generator, so a test is reproducible from its seed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper as h
from onnx import numpy_helper as nh

IR_VERSION = 8  # what opset 17 needs at least; every ONNX Runtime of the last years reads it
OPSETS = (11, 13, 17)


@dataclass
class Built:
    proto: onnx.ModelProto
    input_shapes: dict[str, tuple[int, ...]]  # concrete shapes to feed, by input name
    dtype: type = np.float32
    dynamic: dict[str, int] = field(default_factory=dict)  # input name -> its symbolic axis
    offset: np.ndarray | None = None  # what the bias adds to the (single) output, broadcastable

    def ir(self) -> ir.Model:
        """A fresh onnx_ir copy (factorize edits its model in place)."""
        return ir.from_proto(self.proto)

    def inputs(
        self, rng: np.random.Generator, count: int | None = None, dynamic_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Random inputs: one feed, or `count` feeds stacked on a new first axis (for Samples).

        dynamic_size: the size to give the symbolic axis (default: the builder's concrete size).
        """
        lead = () if count is None else (count,)
        feeds = {}
        for name, shape in self.input_shapes.items():
            shape = list(shape)
            if dynamic_size is not None and name in self.dynamic:
                shape[self.dynamic[name]] = dynamic_size
            feeds[name] = rng.standard_normal(lead + tuple(shape)).astype(self.dtype)
        return feeds


# --- assembling ------------------------------------------------------------------------------
def elem_type(dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def value_info(name: str, dtype, shape) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem_type(dtype), list(shape))


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = h.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    model = h.make_model(
        graph, opset_imports=[h.make_opsetid("", opset)], ir_version=IR_VERSION, producer_name="edgelr-tests"
    )
    check(model)
    return model


def check(model: onnx.ModelProto) -> None:
    """The ONNX checker with strict shape inference: a declared shape that disagrees fails here."""
    onnx.checker.check_model(model, full_check=True)


def place_weight(name: str, array: np.ndarray, weight_as: str, nodes: list, inits: list) -> None:
    """Put a constant weight in the graph as an initializer or as a Constant node's `value`."""
    tensor = nh.from_array(np.ascontiguousarray(array), name)
    if weight_as == "initializer":
        inits.append(tensor)
    elif weight_as == "constant":
        nodes.append(h.make_node("Constant", [], [name], name=f"{name}_constant", value=tensor))
    else:
        raise ValueError(weight_as)


def declared(shape: tuple[int, ...], symbolic: dict[int, str]) -> list:
    """The shape as declared in the model: the axes in `symbolic` become named dims."""
    return [symbolic.get(i, d) for i, d in enumerate(shape)]


def weights(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(dtype)


def compressible(rng: np.random.Generator, shape, decay: float = 0.3) -> np.ndarray:
    """Float32 weights of this shape whose (first axis x the rest) matrix has singular values decaying by
    DECAY: a few ranks carry nearly all of it, so a model of them compresses with a small error."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    u = np.linalg.qr(rng.standard_normal((rows, rows)))[0]
    v = np.linalg.qr(rng.standard_normal((cols, cols)))[0]
    k = min(rows, cols)
    return ((u[:, :k] * decay ** np.arange(k)) @ v[:, :k].T).reshape(shape).astype(np.float32)


# --- single-layer models ---------------------------------------------------------------------
def matmul(
    rng: np.random.Generator,
    in_shape: tuple[int, ...],
    out_features: int,
    *,
    dtype=np.float32,
    opset: int = 17,
    weight_as: str = "initializer",
    symbolic_batch: bool = False,
    node_name: str = "mm",
) -> Built:
    """y = MatMul(x, W) with x (..., K) and a constant W (K, out); node_name "" leaves it unnamed."""
    k = in_shape[-1]
    w = weights(rng, (k, out_features), dtype)
    nodes, inits = [], []
    place_weight("W", w, weight_as, nodes, inits)
    nodes.append(h.make_node("MatMul", ["x", "W"], ["y"], name=node_name))
    sym = {0: "N"} if symbolic_batch and len(in_shape) > 1 else {}
    out_shape = in_shape[:-1] + (out_features,)
    proto = make_model(
        nodes,
        [value_info("x", dtype, declared(in_shape, sym))],
        [value_info("y", dtype, declared(out_shape, sym))],
        inits,
        opset,
    )
    return Built(proto, {"x": in_shape}, dtype, dynamic={"x": 0} if sym else {})


def gemm(
    rng: np.random.Generator,
    m: int,
    k: int,
    n: int,
    *,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: str | None = None,  # None, "1d" (n,), "2d" (m, n) or, with a symbolic m, (1, n)
    dtype=np.float32,
    opset: int = 17,
    weight_as: str = "initializer",
    symbolic_batch: bool = False,
) -> Built:
    """y = alpha * A' B' + beta * C with A (m, k) or (k, m) and a constant B (k, n) or (n, k)."""
    a_shape = (k, m) if trans_a else (m, k)
    nodes, inits = [], []
    place_weight("B", weights(rng, (n, k) if trans_b else (k, n), dtype), weight_as, nodes, inits)
    inputs = ["A", "B"]
    offset = None
    if bias is not None:
        c_shape = (n,) if bias == "1d" else ((1, n) if symbolic_batch else (m, n))
        c = rng.standard_normal(c_shape).astype(dtype)
        place_weight("C", c, weight_as, nodes, inits)
        inputs.append("C")
        offset = beta * c.astype(np.float64)
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": float(alpha), "beta": float(beta)}
    nodes.append(h.make_node("Gemm", inputs, ["y"], name="gemm", **attrs))
    a_sym = {1 if trans_a else 0: "M"} if symbolic_batch else {}
    y_sym = {0: "M"} if symbolic_batch else {}
    proto = make_model(
        nodes,
        [value_info("A", dtype, declared(a_shape, a_sym))],
        [value_info("y", dtype, declared((m, n), y_sym))],
        inits,
        opset,
    )
    dynamic = {"A": 1 if trans_a else 0} if symbolic_batch else {}
    return Built(proto, {"A": a_shape}, dtype, dynamic=dynamic, offset=offset)


def conv_out_spatial(in_spatial, kernel, strides, dilations, pads, auto_pad) -> tuple[int, ...]:
    """ONNX Conv output size, written out from the operator spec (independent of edgelr's)."""
    out = []
    for i, size in enumerate(in_spatial):
        k_eff = dilations[i] * (kernel[i] - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // strides[i]))
        elif auto_pad == "VALID":
            out.append((size - k_eff) // strides[i] + 1)
        else:
            out.append((size + pads[i] + pads[i + len(in_spatial)] - k_eff) // strides[i] + 1)
    return tuple(out)


def conv(
    rng: np.random.Generator,
    *,
    batch: int,
    in_channels: int,
    out_channels: int,
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...] | None = None,
    dilations: tuple[int, ...] | None = None,
    pads: tuple[int, ...] | None = None,  # begin..., end...; only with auto_pad NOTSET
    auto_pad: str = "NOTSET",
    bias: bool = False,
    dtype=np.float32,
    opset: int = 17,
    weight_as: str = "initializer",
    symbolic_batch: bool = False,
    explicit_kernel_shape: bool = True,
) -> Built:
    """y = Conv(x, W[, b]) with group 1, 1-D or 2-D (or more)."""
    nd = len(kernel)
    strides = strides or (1,) * nd
    dilations = dilations or (1,) * nd
    nodes, inits = [], []
    place_weight("W", weights(rng, (out_channels, in_channels, *kernel), dtype), weight_as, nodes, inits)
    inputs = ["x", "W"]
    offset = None
    if bias:
        b = rng.standard_normal(out_channels).astype(dtype)
        place_weight("b", b, weight_as, nodes, inits)
        inputs.append("b")
        offset = b.astype(np.float64).reshape((1, -1) + (1,) * nd)
    attrs = {"strides": list(strides), "dilations": list(dilations)}
    if explicit_kernel_shape:
        attrs["kernel_shape"] = list(kernel)
    if auto_pad == "NOTSET":
        if pads is not None:
            attrs["pads"] = list(pads)
    else:
        attrs["auto_pad"] = auto_pad
    nodes.append(h.make_node("Conv", inputs, ["y"], name="conv", **attrs))
    in_shape = (batch, in_channels, *spatial)
    out_spatial = conv_out_spatial(spatial, kernel, strides, dilations, pads or (0,) * (2 * nd), auto_pad)
    out_shape = (batch, out_channels, *out_spatial)
    sym = {0: "N"} if symbolic_batch else {}
    proto = make_model(
        nodes,
        [value_info("x", dtype, declared(in_shape, sym))],
        [value_info("y", dtype, declared(out_shape, sym))],
        inits,
        opset,
    )
    return Built(proto, {"x": in_shape}, dtype, dynamic={"x": 0} if sym else {}, offset=offset)


def shared_matmul(
    rng: np.random.Generator,
    *,
    rows: int,
    seq: int,
    k: int,
    n: int,
    dtype=np.float32,
    opset: int = 17,
    weight_as: str = "initializer",
) -> Built:
    """One weight W (k, n) read by two MatMul nodes: y1 = x1 W (x1 2-D), y2 = x2 W (x2 3-D)."""
    nodes, inits = [], []
    place_weight("W", weights(rng, (k, n), dtype), weight_as, nodes, inits)
    nodes.append(h.make_node("MatMul", ["x1", "W"], ["y1"], name="mm1"))
    nodes.append(h.make_node("MatMul", ["x2", "W"], ["y2"], name="mm2"))
    proto = make_model(
        nodes,
        [value_info("x1", dtype, (rows, k)), value_info("x2", dtype, (rows, seq, k))],
        [value_info("y1", dtype, (rows, n)), value_info("y2", dtype, (rows, seq, n))],
        inits,
        opset,
    )
    return Built(proto, {"x1": (rows, k), "x2": (rows, seq, k)}, dtype)


# --- multi-layer models ----------------------------------------------------------------------
def mlp(rng: np.random.Generator, *, batch: int = 2, seq: int = 3, width: int = 8, opset: int = 17) -> Built:
    """MatMul (3-D input) -> Relu -> Reshape to 2-D -> Gemm(transB=1, 1-D bias) -> Tanh -> MatMul."""
    d0, d1, d2, d3 = width, width + 3, width - 2, 5
    nodes, inits = [], []
    place_weight("W0", weights(rng, (d0, d1), np.float32), "initializer", nodes, inits)
    place_weight("W1", weights(rng, (d2, d1), np.float32), "constant", nodes, inits)
    place_weight("b1", rng.standard_normal(d2).astype(np.float32), "initializer", nodes, inits)
    place_weight("W2", weights(rng, (d2, d3), np.float32), "initializer", nodes, inits)
    inits.append(nh.from_array(np.array([-1, d1], np.int64), "flat"))
    nodes += [
        h.make_node("MatMul", ["x", "W0"], ["h0"], name="fc0"),
        h.make_node("Relu", ["h0"], ["a0"]),
        h.make_node("Reshape", ["a0", "flat"], ["r0"]),
        h.make_node("Gemm", ["r0", "W1", "b1"], ["h1"], name="fc1", transB=1, alpha=0.7),
        h.make_node("Tanh", ["h1"], ["a1"]),
        h.make_node("MatMul", ["a1", "W2"], ["y"], name="fc2"),
    ]
    proto = make_model(
        nodes,
        [value_info("x", np.float32, (batch, seq, d0))],
        [value_info("y", np.float32, (batch * seq, d3))],
        inits,
        opset,
    )
    return Built(proto, {"x": (batch, seq, d0)})


def convnet(rng: np.random.Generator, *, opset: int = 17, symbolic_batch: bool = True) -> Built:
    """Conv 3x3 SAME_UPPER stride 2 -> Relu -> Conv 2x3 pads -> GlobalAveragePool -> Flatten -> Gemm."""
    nodes, inits = [], []
    place_weight("W0", weights(rng, (6, 3, 3, 3), np.float32), "initializer", nodes, inits)
    place_weight("b0", rng.standard_normal(6).astype(np.float32), "initializer", nodes, inits)
    place_weight("W1", weights(rng, (7, 6, 2, 3), np.float32), "constant", nodes, inits)
    place_weight("W2", weights(rng, (7, 4), np.float32), "initializer", nodes, inits)
    nodes += [
        h.make_node("Conv", ["x", "W0", "b0"], ["c0"], name="conv0", strides=[2, 2], auto_pad="SAME_UPPER"),
        h.make_node("Relu", ["c0"], ["a0"]),
        h.make_node("Conv", ["a0", "W1"], ["c1"], name="conv1", pads=[1, 0, 0, 2], dilations=[1, 2]),
        h.make_node("GlobalAveragePool", ["c1"], ["p"]),
        h.make_node("Flatten", ["p"], ["f"]),
        h.make_node("Gemm", ["f", "W2"], ["y"], name="head"),
    ]
    sym = {0: "N"} if symbolic_batch else {}
    proto = make_model(
        nodes,
        [value_info("x", np.float32, declared((2, 3, 9, 8), sym))],
        [value_info("y", np.float32, declared((2, 4), sym))],
        inits,
        opset,
    )
    return Built(proto, {"x": (2, 3, 9, 8)}, dynamic={"x": 0} if sym else {})


# --- models with subgraphs -------------------------------------------------------------------
def if_convnet(rng: np.random.Generator, *, opset: int = 17) -> Built:
    """Conv "stem" -> If (mean of its output > 0):
    then: Conv 3x3 -> Relu -> Flatten -> Gemm(transB=1, bias), weights the branch's own (one a Constant);
    else: Conv 1x1 -> Flatten -> Gemm, its weight read from the main graph's initializers;
    -> MatMul "head". The If and the branch nodes are unnamed (find_layers names them by path)."""
    c, hw, n = 4, 6, 12
    flat = c * hw * hw

    def graph(name, nodes, output, inits=()):
        return h.make_graph(nodes, name, [], [value_info(output, np.float32, (1, n))], list(inits))

    then_nodes, then_inits = [], []
    place_weight("Wt0", compressible(rng, (c, c, 3, 3)), "initializer", then_nodes, then_inits)
    place_weight("Wt1", compressible(rng, (n, flat)), "constant", then_nodes, then_inits)
    place_weight("bt1", rng.standard_normal(n).astype(np.float32), "initializer", then_nodes, then_inits)
    then_nodes += [h.make_node("Conv", ["s", "Wt0"], ["t0"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["t0"], ["t1"]),
                   h.make_node("Flatten", ["t1"], ["t2"]), h.make_node("Gemm", ["t2", "Wt1", "bt1"], ["yt"], transB=1)]
    else_nodes, else_inits = [], []
    place_weight("We0", compressible(rng, (c, c, 1, 1)), "initializer", else_nodes, else_inits)
    else_nodes += [h.make_node("Conv", ["s", "We0"], ["e0"]), h.make_node("Flatten", ["e0"], ["e1"]),
                   h.make_node("Gemm", ["e1", "We1"], ["ye"])]
    nodes, inits = [], []
    place_weight("W0", compressible(rng, (c, 3, 3, 3)), "initializer", nodes, inits)
    place_weight("We1", compressible(rng, (flat, n)), "initializer", nodes, inits)
    place_weight("Wh", compressible(rng, (n, n)), "initializer", nodes, inits)
    inits.append(nh.from_array(np.array(0.0, np.float32), "zero"))
    nodes += [
        h.make_node("Conv", ["x", "W0"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        h.make_node("ReduceMean", ["s"], ["m"], keepdims=0),
        h.make_node("Greater", ["m", "zero"], ["cond"]),
        h.make_node("If", ["cond"], ["b"], then_branch=graph("then", then_nodes, "yt", then_inits),
                    else_branch=graph("else", else_nodes, "ye", else_inits)),
        h.make_node("MatMul", ["b", "Wh"], ["y"], name="head"),
    ]
    proto = make_model(nodes, [value_info("x", np.float32, (1, 3, hw, hw))], [value_info("y", np.float32, (1, n))],
                       inits, opset)
    return Built(proto, {"x": (1, 3, hw, hw)})


def loop_mlp(rng: np.random.Generator, *, trips: int = 3, opset: int = 17) -> Built:
    """MatMul "fc" -> Loop (TRIPS times: h = Tanh(MatMul(h, Wl))) -> Scan over the rows of x (each row
    through MatMul(Ws)) beside it. The loop's and the scan's MatMuls are unnamed."""
    k = 16
    nodes, inits = [], []
    place_weight("W0", compressible(rng, (k, k)), "initializer", nodes, inits)
    place_weight("Wl", compressible(rng, (k, k)), "initializer", nodes, inits)
    inits.append(nh.from_array(np.array(trips, np.int64), "trips"))
    body_inits = [nh.from_array(compressible(rng, (k, k)), "Ws")]
    loop_body = h.make_graph(
        [h.make_node("MatMul", ["h_in", "Wl"], ["l0"]), h.make_node("Tanh", ["l0"], ["h_out"]),
         h.make_node("Identity", ["c_in"], ["c_out"])],
        "loop_body",
        [value_info("i", np.int64, ()), value_info("c_in", np.bool_, ()), value_info("h_in", np.float32, (4, k))],
        [value_info("c_out", np.bool_, ()), value_info("h_out", np.float32, (4, k))],
    )
    scan_body = h.make_graph(
        [h.make_node("MatMul", ["row", "Ws"], ["r0"]), h.make_node("Add", ["acc_in", "r0"], ["acc_out"]),
         h.make_node("Identity", ["r0"], ["r_out"])],
        "scan_body",
        [value_info("acc_in", np.float32, (k,)), value_info("row", np.float32, (k,))],
        [value_info("acc_out", np.float32, (k,)), value_info("r_out", np.float32, (k,))],
        body_inits,
    )
    inits.append(nh.from_array(np.zeros(k, np.float32), "acc0"))
    nodes += [
        h.make_node("MatMul", ["x", "W0"], ["f"], name="fc"),
        h.make_node("Loop", ["trips", "", "f"], ["y"], name="repeat", body=loop_body),
        h.make_node("Scan", ["acc0", "f"], ["acc", "rows"], name="rows", body=scan_body, num_scan_inputs=1),
    ]
    proto = make_model(nodes, [value_info("x", np.float32, (4, k))],
                       [value_info("y", np.float32, (4, k)), value_info("acc", np.float32, (k,)),
                        value_info("rows", np.float32, (4, k))], inits, opset)
    return Built(proto, {"x": (4, k)})


def nested_if(rng: np.random.Generator, *, k: int = 8) -> Built:
    """If (input "outer"): then: MatMul -> If (input "inner"): then: MatMul of the value made around it,
    else: MatMul of the model's input x; else: MatMul. Each MatMul's weight is its own branch's."""

    def branch(name: str, reads: str, nodes=(), inits=()) -> onnx.GraphProto:
        weight = nh.from_array(compressible(rng, (k, k)), f"W_{name}")
        nodes = [*nodes, h.make_node("MatMul", [reads, weight.name], [f"y_{name}"])]
        return h.make_graph(nodes, name, [], [value_info(f"y_{name}", np.float32, (1, k))], [weight, *inits])

    inner = h.make_node("If", ["inner"], ["y_outer_then"], then_branch=branch("inner_then", "made"),
                        else_branch=branch("inner_else", "x"))
    made = nh.from_array(compressible(rng, (k, k)), "W_made")
    outer_then = h.make_graph([h.make_node("MatMul", ["x", "W_made"], ["made"]), inner], "outer_then", [],
                              [value_info("y_outer_then", np.float32, (1, k))], [made])
    nodes = [h.make_node("If", ["outer"], ["y"], then_branch=outer_then, else_branch=branch("outer_else", "x"))]
    inputs = [value_info("x", np.float32, (1, k)), value_info("outer", np.bool_, ()), value_info("inner", np.bool_, ())]
    proto = make_model(nodes, inputs, [value_info("y", np.float32, (1, k))])
    return Built(proto, {"x": (1, k), "outer": (), "inner": ()})


# --- looking at models -----------------------------------------------------------------------
def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def interface(model: onnx.ModelProto) -> tuple[list, list]:
    """(inputs, outputs) as (name, elem_type, dims) with symbolic dims by name."""

    def describe(vi):
        t = vi.type.tensor_type
        dims = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim)
        return vi.name, t.elem_type, dims

    return [describe(v) for v in model.graph.input], [describe(v) for v in model.graph.output]
