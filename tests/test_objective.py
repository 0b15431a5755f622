"""The objective: each output, and each group of channels of one scale within it, judged on its own scale."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgelr.api import compress
from edgelr.core.objective import Group, Objective
from edgelr.io import model as model_io
from edgelr.io.samples import load_samples
from edgelr.measure.verify import output_error
from edgelr.passes.factorize import FactorizeConfig


def two_heads(path, rng: np.random.Generator) -> None:
    """x -> trunk -> two branches, each a decaying-spectrum 256x256 layer and a head; head A's outputs are
    100x head B's, and both are concatenated on one channel axis (as a YOLO head holds boxes and scores)."""
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
    nodes.append(helper.make_node("Concat", ["a", "b"], ["y"], axis=1))
    graph = helper.make_graph(nodes, "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
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


def test_a_broken_small_head_is_the_worst_error_not_a_rounding_error():
    rng = np.random.default_rng(1)
    y = np.concatenate([rng.normal(size=(2, 4, 30)) * 100, rng.uniform(0, 1, size=(2, 6, 30))], axis=1)
    broken = y.copy()
    broken[:, 4:] = 0  # every score gone
    errors = Objective.of([{"y": y}]).errors([{"y": y}], [{"y": broken}])
    whole = np.linalg.norm(y - broken) / np.linalg.norm(y)
    assert whole < 0.01 and errors["y[4:10]"] == errors["worst"] == 1.0 and errors["y[0:4]"] == 0.0


def test_compression_keeps_both_heads_of_100x_different_scale(tmp_path):
    """A budget the small head's branch could pay alone (a whole-output error barely sees it) is shared."""
    rng = np.random.default_rng(0)
    two_heads(tmp_path / "m.onnx", rng)
    mix = rng.normal(size=(16, 128)) / 4  # inputs on a 16-dim subspace: the trunk's layer is nearly free to cut
    for name in ("calib", "heldout"):
        np.savez(tmp_path / f"{name}.npz", x=(rng.normal(size=(128, 16)) @ mix).astype(np.float32))
    done = compress(tmp_path / "m.onnx", tmp_path / "out.onnx", FactorizeConfig(params=0.7), calib=tmp_path / "calib.npz",
                    heldout=tmp_path / "heldout.npz", progress=False)
    assert done.result.total("params_after") <= 0.7 * done.result.total("params_before") * 1.01
    model = model_io.load(tmp_path / "m.onnx")
    held = output_error(tmp_path / "m.onnx", tmp_path / "out.onnx", load_samples(tmp_path / "heldout.npz", model))
    assert set(held) >= {"y[0:4]", "y[4:10]"}
    assert held["y[0:4]"] < 0.1 and held["y[4:10]"] < 0.1, held
    assert done.output_error == held and done.judged_on == "held-out"
