"""The subgraphs of a model (the branches of an If, the bodies of a Loop or Scan): where each sits, how often
it runs, whether calibration reaches it, and a body cut out as a model of its own.

A subgraph's nodes are named by their path, OWNER/ATTRIBUTE/NODE (`If_0/then_branch/Conv_3`), so a layer's
name is unique across graphs (--ranks, the report and the profiler refer to nodes by name). Calibration
runs an If branch as a model of its own on the outer values it reads (edgelr.calibration.values); a
Loop or Scan body runs once per iteration on values that never leave the loop, so its layers get no Gram.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir

BRANCHES = ("then_branch", "else_branch")


@dataclass(frozen=True)
class Scope:
    """A subgraph: the node that owns it, under which attribute, and how the model runs it."""

    graph: ir.Graph
    owner: ir.Node  # the If, Loop or Scan node
    attribute: str  # then_branch, else_branch, body
    path: str  # OWNER_NAME/ATTRIBUTE: the prefix of its nodes' names
    repeats: int  # runs per run of the model (an If branch: at most once)
    uncalibrated: str | None  # why calibration does not reach it (None: it does)

    @property
    def parent(self) -> ir.Graph:
        return self.owner.graph


def scopes(model: ir.Model) -> dict[int, Scope]:
    """id(graph) -> Scope for every subgraph, nested ones too; names every node of every graph on the way
    (unnamed ones OP_INDEX, subgraph ones prefixed with their path), the same way on every call."""
    found: dict[int, Scope] = {}

    def visit(graph: ir.Graph, path: str, repeats: int, uncalibrated: str | None) -> None:
        name_nodes(graph, path)
        for node in graph:
            for attribute, body in _bodies(node):
                times, why = _runs(node, attribute)
                scope = Scope(body, node, attribute, f"{node.name}/{attribute}", repeats * times, uncalibrated or why)
                found[id(body)] = scope
                visit(body, scope.path, scope.repeats, scope.uncalibrated)

    visit(model.graph, "", 1, None)
    return found


def name_nodes(graph: ir.Graph, path: str = "") -> None:
    """Give every unnamed node a unique name (OP_INDEX); in a subgraph, prefix every name with its path."""
    seen = {n.name for n in graph if n.name}
    for i, node in enumerate(graph):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)
        if path and not node.name.startswith(path + "/"):
            node.name = f"{path}/{node.name}"


def _bodies(node: ir.Node):
    """(attribute name, graph) of each subgraph the node holds."""
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.GRAPH:
            yield name, attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from ((f"{name}_{i}", g) for i, g in enumerate(attr.value))


def _runs(node: ir.Node, attribute: str) -> tuple[int, str | None]:
    """(how many times the body runs per run of its node, why calibration cannot reach it or None).
    A count the graph does not fix (a computed trip count, a dynamic sequence) is taken as 1: the FLOPs
    of such a body are then those of one iteration."""
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    if op == "If" and attribute in BRANCHES:
        return 1, None
    why = f"inside the {op} '{node.name}' {attribute}: calibration does not run its iterations"
    if op == "Loop":
        trip = node.inputs[0] if node.inputs else None
        tensor = ir.convenience.get_const_tensor(trip) if trip is not None else None
        return (int(tensor.numpy().reshape(-1)[0]) if tensor is not None and tensor.size == 1 else 1), why
    if op == "Scan":
        return _scan_length(node), why
    return 1, f"inside the {op} '{node.name}' {attribute}: calibration does not run it"


def _scan_length(node: ir.Node) -> int:
    """Iterations of a Scan: the length of its first scan input along its scan axis (1 if not static)."""
    scanned = node.attributes.get_int("num_scan_inputs", 1)
    first = node.inputs[len(node.inputs) - scanned] if scanned <= len(node.inputs) else None
    axes = node.attributes.get_ints("scan_input_axes", [0])
    if first is None or first.shape is None:
        return 1
    dim = first.shape.dims[axes[0] % len(first.shape)] if len(first.shape) else None
    return dim if isinstance(dim, int) and dim > 0 else 1


# --- a body as a model of its own ------------------------------------------------------------
def captured(body: ir.Graph) -> list[ir.Value]:
    """The outer values the body reads (its nested subgraphs included), in order of first use."""
    inside = {id(body)} | {id(node.graph) for node in ir.traversal.RecursiveGraphIterator(body)}
    found: dict[int, ir.Value] = {}
    for node in ir.traversal.RecursiveGraphIterator(body):
        for value in node.inputs:
            if value is not None and _defined_in(value) not in inside:
                found.setdefault(id(value), value)
    return list(found.values())


def _defined_in(value: ir.Value) -> int | None:
    producer = value.producer()
    graph = producer.graph if producer is not None else value.graph
    return id(graph) if graph is not None else None


def body_model(model: ir.Model, body: ir.Graph, outputs: list[str], input_types: dict[str, int]) -> ir.Model:
    """The body as a model: the outer constants it reads become its initializers, the other outer values it
    reads its inputs (INPUT_TYPES: name -> ONNX element type), OUTPUTS (names inside it) its outputs."""
    proto = ir.serde.serialize_graph(body)
    for value in captured(body):
        tensor = _constant(value)
        if tensor is not None:
            proto.initializer.append(ir.serde.serialize_tensor(ir.tensor(tensor.numpy(), name=value.name)))
        else:
            proto.input.append(onnx.helper.make_tensor_value_info(value.name, input_types[value.name], None))
    del proto.output[:]
    proto.output.extend(onnx.helper.ValueInfoProto(name=name) for name in outputs)
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    return ir.from_proto(onnx.helper.make_model(proto, opset_imports=opsets, ir_version=model.ir_version))


def _constant(value: ir.Value) -> ir.TensorProtocol | None:
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def is_constant(value: ir.Value) -> bool:
    return _constant(value) is not None
