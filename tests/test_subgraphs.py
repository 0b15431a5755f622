"""Layers inside If, Loop and Scan subgraphs: found and named by their path, calibrated where a branch runs
(an If branch, on the samples that take it), factorized data-free where calibration cannot reach (loop
bodies, said aloud), and exact at full rank in real ONNX Runtime sessions."""

from __future__ import annotations

import json

import graphs as G
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgelr.api import compress
from edgelr.calibration.grams import collect_grams, input_gram
from edgelr.cli import main
from edgelr.graph.layers import find_layers
from edgelr.io.samples import samples_from_arrays
from edgelr.passes.factorize import FactorizeConfig

THEN_CONV, THEN_GEMM = "If_3/then_branch/Conv_1", "If_3/then_branch/Gemm_4"
ELSE_CONV, ELSE_GEMM = "If_3/else_branch/Conv_0", "If_3/else_branch/Gemm_2"
BRANCH_LAYERS = {THEN_CONV, THEN_GEMM, ELSE_CONV, ELSE_GEMM}
LOOP, SCAN = "repeat/body/MatMul_0", "rows/body/MatMul_0"


def if_samples(signs) -> np.ndarray:
    """Inputs of G.if_convnet, one per sign: the sign of the offset decides which branch the sample takes."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((len(signs), 1, 3, 6, 6)) + 3.0 * np.asarray(signs)[:, None, None, None, None]
    return x.astype(np.float32)


def taken(proto: onnx.ModelProto, x: np.ndarray) -> list[bool]:
    """Whether each sample takes the then branch (the If's condition, read as an extra output)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return [bool(session.run(["cond"], {"x": sample})[0]) for sample in x]


def max_diff(a: str, b: str, feeds: list[dict]) -> float:
    """The largest absolute difference between two model files' outputs, over every output and feed."""
    first, second = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (a, b))
    return max(float(np.abs(u - v).max()) for feed in feeds for u, v in zip(first.run(None, feed), second.run(None, feed)))


def full_ranks(proto: onnx.ModelProto) -> dict[str, int]:
    return {layer.name: layer.max_rank(layer.forms()[0]) for layer in find_layers(G.Built(proto, {}).ir())[0]}


@pytest.fixture()
def if_model(tmp_path):
    built = G.if_convnet(np.random.default_rng(0))
    onnx.save(built.proto, tmp_path / "if.onnx")
    x = if_samples([1, -1, 1, -1, 1, -1])
    assert sorted(set(taken(built.proto, x))) == [False, True]  # both branches are calibrated
    np.savez(tmp_path / "calib.npz", x=x)
    return built, tmp_path / "if.onnx", x


@pytest.fixture()
def loop_model(tmp_path):
    built = G.loop_mlp(np.random.default_rng(0))
    onnx.save(built.proto, tmp_path / "loop.onnx")
    x = np.random.default_rng(1).standard_normal((4, 4, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return built, tmp_path / "loop.onnx", x


def test_layers_in_subgraphs_are_found_and_named_by_their_path(if_model, loop_model):
    layers, skipped = find_layers(if_model[0].ir())
    assert {layer.name for layer in layers} == {"stem", "head"} | BRANCH_LAYERS and not skipped
    assert find_layers(if_model[0].ir())[0][2].name == layers[2].name  # the same names on every load
    layers, _ = find_layers(loop_model[0].ir())
    by_name = {layer.name: layer for layer in layers}
    assert set(by_name) == {"fc", LOOP, SCAN}
    assert "Loop 'repeat'" in by_name[LOOP].uncalibrated and by_name["fc"].uncalibrated is None
    # a Loop body runs once per iteration: its FLOPs count all 3 of them
    assert by_name[LOOP].dense_flops() == 3 * by_name["fc"].dense_flops()


def test_same_node_names_in_two_branches_stay_apart(if_model, tmp_path):
    """Node names need only be unique in their own graph: a layer's name is its path, so --ranks can pick one."""
    proto = if_model[0].proto
    branches = {a.name: a.g for n in proto.graph.node if n.op_type == "If" for a in n.attribute}
    for graph in branches.values():
        next(n for n in graph.node if n.op_type == "Gemm").name = "fc"
    onnx.save(proto, tmp_path / "same.onnx")
    names = [layer.name for layer in find_layers(G.Built(proto, {}).ir())[0]]
    assert "If_3/then_branch/fc" in names and "If_3/else_branch/fc" in names and len(set(names)) == len(names)
    done = compress(tmp_path / "same.onnx", tmp_path / "out.onnx", FactorizeConfig(ranks={"If_3/then_branch/fc": 2}),
                    progress=False)
    assert [(r.name, r.rank) for r in done.result.factorized] == [("If_3/then_branch/fc", 2)]


def test_branch_grams_count_the_samples_that_take_the_branch(if_model):
    """Checked against the Gemms' inputs read out of the model itself: each branch also returns its Gemm's
    input, as a second output of the If."""
    built, _, x = if_model
    proto = onnx.ModelProto()
    proto.CopyFrom(built.proto)
    node = next(n for n in proto.graph.node if n.op_type == "If")
    node.output.append("gemm_input")
    for attr in node.attribute:
        gemm = next(n for n in attr.g.node if n.op_type == "Gemm")
        attr.g.output.append(onnx.helper.make_tensor_value_info(gemm.input[0], onnx.TensorProto.FLOAT, [1, 144]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("gemm_input", onnx.TensorProto.FLOAT, [1, 144]))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    conditions = taken(built.proto, x)
    model = built.ir()
    layers, _ = find_layers(model)
    grams = collect_grams(model, layers, samples_from_arrays({"x": x}, model), progress=False)
    by_name = {layer.name: layer for layer in layers}
    for name, branch in ((THEN_GEMM, True), (ELSE_GEMM, False)):
        inputs = [session.run(["gemm_input"], {"x": s})[0] for s, c in zip(x, conditions) if c == branch]
        want = sum(input_gram(a, by_name[name].uses[0]) for a in inputs)
        np.testing.assert_allclose(grams[name], want, rtol=1e-5, atol=1e-5)
    assert by_name[THEN_CONV].uses[0].input_shape == (1, 4, 6, 6)  # observed in the branch


def test_a_branch_no_sample_takes_is_factorized_data_free_and_says_so(if_model, tmp_path):
    built, path, _ = if_model
    x = if_samples([1, 1, 1])
    conditions = set(taken(built.proto, x))
    assert len(conditions) == 1  # all one branch
    (reached, missed) = ((THEN_GEMM, ELSE_GEMM), (ELSE_GEMM, THEN_GEMM))[conditions == {False}]
    np.savez(tmp_path / "one.npz", x=x)
    done = compress(path, tmp_path / "out.onnx", FactorizeConfig(ranks=full_ranks(built.proto)),
                    calib=tmp_path / "one.npz", progress=False)
    notes = {r.name: r.note for r in done.result.layers}
    assert notes[missed] == "data-free: no calibration sample takes its If branch" and notes[reached] == ""
    assert any(missed in w and reached not in w for w in done.result.warnings)


def test_if_branches_at_full_rank_are_exact(if_model, tmp_path):
    built, path, x = if_model
    done = compress(path, tmp_path / "full.onnx", FactorizeConfig(ranks=full_ranks(built.proto)),
                    calib=tmp_path / "calib.npz", progress=False)
    assert {r.name for r in done.result.factorized} >= BRANCH_LAYERS
    assert max_diff(path, tmp_path / "full.onnx", [{"x": s} for s in x]) < 1e-5
    # the dense weights are gone, the branch's own included (one was a Constant node)
    out = onnx.load(tmp_path / "full.onnx")
    bodies = [a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute]
    names = {i.name for g in [out.graph, *bodies] for i in g.initializer} | {o for g in bodies for n in g.node for o in n.output}
    assert not names & {"Wt0", "Wt1", "We0", "We1"}


def test_loop_and_scan_bodies_at_full_rank_are_exact(loop_model, tmp_path):
    built, path, x = loop_model
    done = compress(path, tmp_path / "full.onnx", FactorizeConfig(ranks=full_ranks(built.proto)),
                    calib=tmp_path / "calib.npz", progress=False)
    assert {r.name for r in done.result.factorized} == {"fc", LOOP, SCAN}
    assert max_diff(path, tmp_path / "full.onnx", [{"x": s} for s in x]) < 1e-5


def test_cli_compresses_if_branches_with_calibration(if_model, tmp_path, capsys):
    _, path, x = if_model
    out, report = tmp_path / "half.onnx", tmp_path / "report.json"
    assert main(["compress", str(path), "-o", str(out), "--params", "0.5", "--calib", str(tmp_path / "calib.npz"),
                 "--report", str(report), "-q"]) == 0
    rows = {r["name"]: r for r in json.loads(report.read_text())["layers"]}
    factorized = {name for name, r in rows.items() if r["form"] != "dense"}
    assert factorized & {THEN_CONV, THEN_GEMM} and factorized & {ELSE_CONV, ELSE_GEMM}
    assert not any("data-free" in r["note"] for r in rows.values())  # both branches were calibrated
    assert "not refit, inside subgraphs" in capsys.readouterr().err
    assert max_diff(path, out, [{"x": s} for s in x]) < 0.1  # it runs, and stays close


def test_cli_says_loop_bodies_are_factorized_data_free(loop_model, tmp_path, capsys):
    _, path, _ = loop_model
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    assert LOOP in shown and SCAN in shown and "factorized data-free (plain SVD)" in shown
    assert "inside the Loop 'repeat' body" in shown
    out = tmp_path / "half.onnx"
    assert main(["compress", str(path), "-o", str(out), "--params", "0.5", "--calib", str(tmp_path / "calib.npz"),
                 "-q"]) == 0
    err = capsys.readouterr().err
    assert f"factorized data-free (plain SVD), calibration does not reach them: {LOOP}" in err


def test_inspect_lists_branch_layers_with_their_path(if_model, capsys):
    assert main(["inspect", str(if_model[1])]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in BRANCH_LAYERS) and "left alone" not in shown


def test_nested_if_branches_are_calibrated_on_the_samples_that_reach_them(tmp_path):
    built = G.nested_if(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((8, 1, 8)).astype(np.float32),
             "outer": np.array([1, 1, 1, 0, 1, 0, 0, 1], bool), "inner": np.array([1, 0, 1, 0, 0, 1, 0, 1], bool)}
    model = built.ir()
    layers, _ = find_layers(model)
    grams = collect_grams(model, layers, samples_from_arrays(feeds, model), progress=False)
    x = feeds["x"]
    # the inner else branch reads the model's input, on the samples whose conditions are (True, False)
    np.testing.assert_allclose(grams["If_0/then_branch/If_1/else_branch/MatMul_0"], sum(x[i].T @ x[i] for i in (1, 4)),
                               rtol=1e-5, atol=1e-5)
    assert len(grams) == 4
    onnx.save(built.proto, tmp_path / "nested.onnx")
    np.savez(tmp_path / "calib.npz", **feeds)
    compress(tmp_path / "nested.onnx", tmp_path / "full.onnx", FactorizeConfig(ranks=full_ranks(built.proto)),
             calib=tmp_path / "calib.npz", progress=False)
    samples = [{name: np.asarray(a[i]) for name, a in feeds.items()} for i in range(8)]
    assert max_diff(tmp_path / "nested.onnx", tmp_path / "full.onnx", samples) < 1e-5
