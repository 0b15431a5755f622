"""A model's intermediate values, per calibration sample, one sample at a time.

Main-graph values become extra outputs of one ONNX Runtime session. Runtime cannot return a value that
lives inside a subgraph, so each If branch that holds a wanted value runs again as a model of its own
(edgelr.graph.subgraphs.body_model), fed the outer values it reads, on the samples whose condition takes
it; a nested If's branch is fed from the run of the branch around it. Loop and Scan bodies are not run
(their inputs change every iteration and never leave the loop): their layers get no statistics, and
Layer.uncalibrated says why.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.graph.subgraphs import Scope, body_model, captured, is_constant, scopes
from edgelr.io.model import first_line, ort_session
from edgelr.io.progress import progress_bar
from edgelr.io.samples import Samples, model_inputs

# id(graph) -> {value name: array}, for each graph that ran on one sample
Runs = dict[int, dict[str, np.ndarray]]


def values_by_sample(model: ir.Model, values: list[ir.Value], samples: Samples, progress: bool,
                     desc: str = "calibrating"):
    """Yield, per sample, these values of the model's graph (and its outputs and feed) by name."""
    graph = model.graph
    original_outputs = list(graph.outputs)
    fed = {v.name for v in model_inputs(model)}
    extra = dict.fromkeys(v for v in values if v.name not in fed and v not in original_outputs)
    graph.outputs.extend(extra)
    try:
        with ort_session(model) as session:
            names = [o.name for o in session.get_outputs()]
            for i in progress_bar(range(len(samples)), desc=desc, unit="sample", show=progress):
                feed = samples.feed(i)
                try:
                    values = dict(zip(names, session.run(None, feed)))
                except Exception as exc:  # noqa: BLE001  (ORT reports bad input as a generic runtime error)
                    raise EdgelrError(f"calibration sample {i} does not run through the model: {first_line(exc)}") from None
                values.update(feed)
                yield values
    finally:
        graph.outputs.clear()
        graph.outputs.extend(original_outputs)


def graph_values(model: ir.Model, wanted: Mapping[int, list[ir.Value]], samples: Samples,
                 progress: bool) -> Iterator[Runs]:
    """Per sample, id(graph) -> the WANTED values (keyed by the id of the graph whose nodes read them) of
    each graph that ran: the main graph always (with the model's outputs and feed), an If branch when the
    sample's condition took it. Values wanted in Loop and Scan bodies (and subgraphs inside them) are
    not returned."""
    found = scopes(model)
    main: list[ir.Value] = []
    branches: dict[int, _Branch] = {}

    def need(graph_id: int, values: list[ir.Value]) -> None:
        """The graph must report these values; an If branch then needs its condition and inputs from around it."""
        if graph_id == id(model.graph):
            main.extend(values)
            return
        branch = branches.get(graph_id)
        if branch is None:
            branch = branches[graph_id] = _Branch(found[graph_id])
            need(id(branch.scope.parent), ([] if is_constant(branch.condition) else [branch.condition]) + branch.inputs)
        branch.outputs.extend(v.name for v in values if v not in branch.inputs and v.name not in branch.outputs)

    for graph_id, values in wanted.items():
        scope = found.get(graph_id)
        if graph_id == id(model.graph) or (scope is not None and scope.uncalibrated is None):
            need(graph_id, values)
    outer_first = sorted(branches.values(), key=lambda b: b.scope.path.count("/"))
    with ExitStack() as sessions:
        for values in values_by_sample(model, main, samples, progress):
            runs: Runs = {id(model.graph): values}
            for branch in outer_first:
                around = runs.get(id(branch.scope.parent))
                if around is not None and branch.taken(around):
                    runs[id(branch.scope.graph)] = branch.run(model, around, sessions)
            yield runs


@dataclass
class _Branch:
    """An If branch to run: the outer values it reads and the values of its own it gives back."""

    scope: Scope
    inputs: list[ir.Value] = field(init=False)  # constants are copied into its model instead
    outputs: list[str] = field(default_factory=list)
    session: object = None

    def __post_init__(self):
        self.inputs = [v for v in captured(self.scope.graph) if not is_constant(v)]

    @property
    def condition(self) -> ir.Value:
        return self.scope.owner.inputs[0]

    def taken(self, around: dict[str, np.ndarray]) -> bool:
        cond = self.condition
        value = ir.convenience.get_const_tensor(cond).numpy() if is_constant(cond) else around[cond.name]
        return ("then_branch" if bool(np.asarray(value).reshape(-1)[0]) else "else_branch") == self.scope.attribute

    def run(self, model: ir.Model, around: dict[str, np.ndarray], sessions: ExitStack) -> dict[str, np.ndarray]:
        feed = {v.name: around[v.name] for v in self.inputs}
        if not self.outputs:  # only a way to a branch inside it, which reads outer values alone
            return feed
        if self.session is None:  # built on first use, its inputs typed by what they are fed
            types = {name: onnx.helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype) for name, a in feed.items()}
            try:
                self.session = sessions.enter_context(ort_session(body_model(model, self.scope.graph, self.outputs, types)))
            except Exception as exc:  # noqa: BLE001  (ONNX Runtime raises its own types)
                raise EdgelrError(f"calibration: the If branch '{self.scope.path}' does not run as a model of its own "
                                  f"({first_line(exc)})") from None
        return feed | dict(zip(self.outputs, self.session.run(self.outputs, feed)))
