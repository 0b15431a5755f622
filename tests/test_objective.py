"""The objective: each output, and each group of channels of one scale within it, judged on its own scale."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgelr.api import compress
from edgelr.core import objective
from edgelr.core.objective import Group, Objective
from edgelr.io import model as model_io
from edgelr.io.samples import load_samples
from edgelr.measure.verify import output_error
from edgelr.passes.factorize import FactorizeConfig


def two_heads(path, rng: np.random.Generator) -> None:
    """x [N, 16 anchors, 128] -> trunk -> two branches, each a decaying-spectrum 256x256 layer and a head;
    head A's outputs are 100x head B's, and both are concatenated on one channel axis: [N, 16, 4 + 6], as a
    YOLO head holds boxes and class scores."""
    d = 256

    def decaying() -> np.ndarray:
        u, _ = np.linalg.qr(rng.normal(size=(d, d)))
        v, _ = np.linalg.qr(rng.normal(size=(d, d)))
        return (u * np.geomspace(3, 0.03, d)) @ v.T

    weights = {"W1": rng.normal(size=(128, d)) / np.sqrt(128), "WA1": decaying(), "WB1": decaying(),
               "WA2": rng.normal(size=(d, 4)) * 100 / np.sqrt(d), "WB2": rng.normal(size=(d, 6)) / np.sqrt(d)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["t"])]
    for head in "AB":
        nodes += [helper.make_node("MatMul", ["t", f"W{head}1"], [f"{head}h"]),
                  helper.make_node("Relu", [f"{head}h"], [f"{head}r"]),
                  helper.make_node("MatMul", [f"{head}r", f"W{head}2"], [head.lower()])]
    nodes.append(helper.make_node("Concat", ["a", "b"], ["y"], axis=2))
    graph = helper.make_graph(nodes, "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 10])],
                              [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_groups_split_where_channel_scales_jump():
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.normal(size=(1, 4, 50)) * 100, rng.uniform(0, 0.01, size=(1, 18, 50))], axis=1)
    objective = Objective.of([{"y": y, "ids": np.arange(3)}])  # integer outputs carry no error
    assert [g.name for g in objective.groups] == ["y[0:4]", "y[4:22]"]
    same = Objective.of([{"y": rng.normal(size=(1, 22, 50)) * np.linspace(1, 5, 22)[None, :, None]}])
    assert [g.name for g in same.groups] == ["y"]  # one kind of channel: one group
    assert Objective.of([{"y": rng.normal(size=(1, 4000))}]).groups == (Group("y"),)  # no channel axis
    probabilities = np.array([[0.999, 0.001]])  # a vector: a class nothing lit is not a quantity of its own
    assert Objective.of([{"p": probabilities}]).groups == (Group("p"),)
    transposed = np.concatenate([rng.normal(size=(1, 50, 4)) * 100, rng.uniform(0, 0.01, size=(1, 50, 18))], axis=2)
    assert [g.name for g in Objective.of([{"y": transposed}]).groups] == ["y[0:4]", "y[4:22]"]
    text_map = np.zeros((1, 1, 64, 64))
    text_map[0, 0, 10:20] = 0.9  # rows with text beside empty rows: one map, not groups of rows
    assert Objective.of([{"m": text_map}]).groups == (Group("m"),)


def test_a_broken_small_head_is_the_worst_error_not_a_rounding_error():
    rng = np.random.default_rng(1)
    y = np.concatenate([rng.normal(size=(2, 4, 30)) * 100, rng.uniform(0, 1, size=(2, 6, 30))], axis=1)
    broken = y.copy()
    broken[:, 4:] = 0  # every score gone
    errors = Objective.of([{"y": y}]).errors([{"y": y}], [{"y": broken}])
    whole = np.linalg.norm(y - broken) / np.linalg.norm(y)
    assert whole < 0.01 and errors["y[4:10]"] == errors["worst"] == 1.0 and errors["y[0:4]"] == 0.0


def test_compression_keeps_both_heads_of_100x_different_scale(tmp_path, monkeypatch):
    """A budget the small head's branch could pay alone (a whole-output error barely sees it) is shared:
    both heads stay within 0.15 on held-out inputs, where one whole-output error leaves the small one at 0.27."""
    rng = np.random.default_rng(0)
    two_heads(tmp_path / "m.onnx", rng)
    mix = rng.normal(size=(16, 128)) / 4  # inputs on a 16-dim subspace: the trunk's layer is nearly free to cut
    for name in ("calib", "heldout"):
        np.savez(tmp_path / f"{name}.npz", x=(rng.normal(size=(64 * 16, 16)) @ mix).reshape(64, 16, 128).astype(np.float32))
    held = load_samples(tmp_path / "heldout.npz", model_io.load(tmp_path / "m.onnx"))
    errors = {}
    for gap in (objective.GROUP_GAP, 1e12):  # a gap no scales reach: one group, the whole output
        monkeypatch.setattr(objective, "GROUP_GAP", gap)
        out = tmp_path / f"out{gap:g}.onnx"
        done = compress(tmp_path / "m.onnx", out, FactorizeConfig(params=0.5), calib=tmp_path / "calib.npz",
                        heldout=tmp_path / "heldout.npz", progress=False)
        assert done.result.total("params_after") <= 0.5 * done.result.total("params_before") * 1.01
        monkeypatch.undo()
        errors[gap] = output_error(tmp_path / "m.onnx", out, held)
    aware, blind = errors[objective.GROUP_GAP], errors[1e12]
    assert aware["y[0:4]"] < 0.15 and aware["y[4:10]"] < 0.15, aware
    assert blind["y[4:10]"] > 0.15 and blind["y[0:4]"] < 0.05, blind  # the small head paid for the budget
