"""Residual branches: the blocks a network can lose whole.

A residual block adds a branch to its input, y = x + f(x) (ResNet, a YOLO bottleneck, a diffusion UNet's
resnets and attentions, a transformer's layers). Removing the branch leaves y = x: the model stays
runnable, with one block's compute gone (HierarchicalPrune removes a diffusion model's late blocks so).
Here a branch is found from its `Add` alone, whatever the exporter named things: the nodes whose every
output flows only into one input of the Add (the exclusive cone of that input), the other input being the
skip. A branch is removable when it holds at least one weighted layer and the Add's output has the skip's
shape (the branch does not broadcast it). Branches nest (a transformer's layers inside its block): a
branch removed takes the ones inside it with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from edgelr.graph.layers import const_tensor

WEIGHTED = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"}


@dataclass(frozen=True)
class ResidualBranch:
    """One Add's branch: removing its nodes and passing the skip on in the Add's place leaves the block out.
    Nodes are named by position in the graph's node order (exporters may leave node names empty or repeat
    them), so a branch applies to the graph it was found in, or to a copy of it."""

    name: str  # the branch's nodes' common name prefix (e.g. /down_blocks.1/resnets.0), unique in the model
    add: int  # the joining Add's position
    skip: int  # which input of the Add is the skip (0 or 1)
    nodes: tuple[int, ...]  # the branch's positions, in graph order
    params: int  # weights only the branch uses

    def contains(self, other: ResidualBranch) -> bool:
        return other.add in self.nodes


def residual_branches(model: ir.Model) -> list[ResidualBranch]:
    """The main graph's removable residual branches, in graph order."""
    graph = model.graph
    nodes = list(graph)
    position = {id(node): i for i, node in enumerate(nodes)}
    outputs = set(map(id, graph.outputs))
    found, names = [], {}
    data = _data_values(graph)
    for add in nodes:
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
            continue
        if any(v is None or v.producer() is None or id(v) not in data for v in add.inputs):
            continue  # a bias (also through an Identity or a Reshape), a constant, or a graph input added: not a block
        for side in (0, 1):
            skip, branch_out = add.inputs[1 - side], add.inputs[side]
            cone = _exclusive_cone(branch_out, add, outputs)
            if not cone or not _starts_at_skip(cone, skip) or not _keeps_shape(skip, add.outputs[0]):
                continue
            if not any(n.op_type in WEIGHTED for n in cone):
                continue
            ordered = sorted(position[id(n)] for n in cone)
            name = _common_name([nodes[i].name for i in ordered]) or add.name or f"block{len(found)}"
            names[name] = names.get(name, 0) + 1
            if names[name] > 1:
                name = f"{name}#{names[name]}"
            found.append(ResidualBranch(name, position[id(add)], 1 - side, tuple(ordered), _own_params(cone)))
            break  # one branch per Add: the side with the exclusive cone (the other is the skip's path)
    return found


def remove_branches(model: ir.Model, branches: list[ResidualBranch]) -> None:
    """Leave the BRANCHES out, in place (none inside another): each Add becomes an Identity of its skip (the
    Add's output name is kept, so a graph output stays), the branch's nodes and the weights only they used
    are removed."""
    graph = model.graph
    nodes = list(graph)
    doomed, weights = [], set()
    for branch in branches:
        add = nodes[branch.add]
        out = add.outputs[0]
        identity = ir.node("Identity", [add.inputs[branch.skip]], name=f"{add.name}/branch_removed")
        graph.insert_after(add, identity)
        out.replace_all_uses_with(identity.outputs[0])
        if out in graph.outputs:
            graph.outputs[graph.outputs.index(out)] = identity.outputs[0]
        name, out.name = out.name, None
        identity.outputs[0].name = name
        identity.outputs[0].shape, identity.outputs[0].type = out.shape, out.type
        removed = [nodes[i] for i in branch.nodes] + [add]
        doomed += removed
        weights |= {v for node in removed for v in node.inputs if v is not None and v.is_initializer()}
    graph.remove(doomed, safe=True)
    for value in weights:
        if not value.uses():
            graph.initializers.pop(value.name, None)


def _exclusive_cone(value: ir.Value, add: ir.Node, graph_outputs: set[int]) -> set[ir.Node]:
    """The nodes whose every output is used only by ADD (through VALUE) or by other nodes of the set: grown
    backwards from VALUE's producer to a fixed point (a diamond's top joins once both its arms have)."""

    def exclusive(node: ir.Node, users: set) -> bool:
        return all(id(out) not in graph_outputs and all(user in users for user, _ in out.uses()) for out in node.outputs)

    first = value.producer()
    if first is None or first.graph is not add.graph or not exclusive(first, {add}):
        return set()
    cone, grown = {first}, True
    while grown:
        grown = False
        for node in list(cone):  # noqa: PERF101  (the cone grows inside the loop)
            for v in node.inputs:
                producer = v.producer() if v is not None else None
                if producer is not None and producer not in cone and producer.graph is add.graph and exclusive(producer, cone):
                    cone.add(producer)
                    grown = True
    return cone


def _data_values(graph: ir.Graph) -> set[int]:
    """The ids of the values computed from the graph's fed inputs (not from constants alone)."""
    data = {id(v) for v in graph.inputs if not v.is_initializer()}
    for node in graph:  # topological order
        if any(v is not None and id(v) in data for v in node.inputs):
            data.update(id(out) for out in node.outputs)
    return data


def _starts_at_skip(cone: set[ir.Node], skip: ir.Value) -> bool:
    """Whether the branch reads the skip itself or what the skip was computed from (a shortcut conv's input):
    a residual block, not two independent paths merged (a feature pyramid's lateral + upsampled)."""
    read = {id(v) for node in cone for v in node.inputs if v is not None and v.producer() not in cone}
    feeds = [skip] + ([v for v in skip.producer().inputs if v is not None] if skip.producer() is not None else [])
    return any(id(v) in read for v in feeds)


def _keeps_shape(skip: ir.Value, out: ir.Value) -> bool:
    """Whether the Add's output has the skip's shape: known and equal where both are known (symbolic dims by
    name), or, unknown, the same rank at least not ruled out."""
    if skip.shape is None or out.shape is None:
        return True  # no shape information: the pass's verification run decides
    if len(skip.shape) != len(out.shape):
        return False
    return all(a == b or not (isinstance(a, int) and isinstance(b, int)) for a, b in
               zip(_dims(skip.shape), _dims(out.shape)))


def _dims(shape: ir.Shape) -> list:
    return [d if isinstance(d, int) else str(d) for d in shape]


def _own_params(cone: set[ir.Node]) -> int:
    total = 0
    seen = set()
    for node in cone:
        for v in node.inputs:
            if v is None or v in seen:
                continue
            tensor = const_tensor(v)  # weights: float tensors, not scalars (shapes, split sizes, scales)
            if (tensor is not None and tensor.dtype.is_floating_point() and tensor.size > 1
                    and all(user in cone for user, _ in v.uses())):
                seen.add(v)
                total += tensor.size
    return total


def _common_name(names: list[str]) -> str:
    """The longest common '/'-separated prefix of the node names (exporters name nodes by module path)."""
    parts = [name.strip("/").split("/") for name in names if name]
    if not parts:
        return ""
    prefix = []
    for segments in zip(*parts):
        if len(set(segments)) != 1:
            break
        prefix.append(segments[0])
    return "/" + "/".join(prefix) if prefix else ""
