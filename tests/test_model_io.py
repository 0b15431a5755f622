"""Large-model paths: external data in and out, memory-mapped weights, ORT through files."""

from __future__ import annotations

import graphs as G
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgelr import FactorizeConfig, compress
from edgelr.io import model as model_io


def _run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _mlp(tmp_path, external: bool):
    rng = np.random.default_rng(0)
    built = G.mlp(rng, width=64)
    path = tmp_path / "mlp.onnx"
    onnx.save(built.proto, path, save_as_external_data=external, all_tensors_to_one_file=True,
              location="mlp.onnx.data", size_threshold=1024)
    feed = built.inputs(rng)
    np.savez(tmp_path / "calib.npz", **built.inputs(rng, count=8))
    return path, feed


def test_external_data_model_in_and_out(tmp_path, monkeypatch):
    """An input with external data compresses; an output past the inline limit gets its own data file."""
    source, feed = _mlp(tmp_path, external=True)
    monkeypatch.setattr(model_io, "_INLINE_LIMIT_BYTES", 1)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    done = compress(source, out, FactorizeConfig(params=0.5), calib=tmp_path / "calib.npz", progress=False,
                    max_output_error=1.0)  # a random toy model: its error is not what this tests
    assert done.result.factorized
    assert (out.parent / "small.onnx.data").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]  # no temp left
    y, y0 = _run(out, feed), _run(source, feed)  # both run, from their own folders' data files
    assert y.shape == y0.shape and np.isfinite(y).all()


def test_lazy_path_gives_the_same_model(tmp_path, monkeypatch):
    """Past _LAZY_BYTES weights are memory-mapped and ORT gets files: the result must not change."""
    source, feed = _mlp(tmp_path, external=False)
    config = FactorizeConfig(params=0.5)
    eager = compress(source, tmp_path / "eager.onnx", config, calib=tmp_path / "calib.npz", progress=False,
                     max_output_error=1.0)
    monkeypatch.setattr(model_io, "_LAZY_BYTES", 1)
    lazy = compress(source, tmp_path / "lazy.onnx", config, calib=tmp_path / "calib.npz", progress=False,
                    max_output_error=1.0)
    assert [(r.form, r.rank) for r in eager.result.layers] == [(r.form, r.rank) for r in lazy.result.layers]
    assert np.allclose(_run(tmp_path / "eager.onnx", feed), _run(tmp_path / "lazy.onnx", feed), rtol=1e-5, atol=1e-6)
    assert eager.output_error["worst"] == lazy.output_error["worst"] or np.isclose(
        eager.output_error["worst"], lazy.output_error["worst"], rtol=1e-4
    )


def test_a_scalar_input_is_calibrated_and_compressed(tmp_path):
    """A model input of shape [] (a gain, a sample rate) takes one value per sample; calibration feeds ORT
    a 0-d array (a NumPy scalar is refused by ONNX Runtime)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgelr.errors import EdgelrError

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(32, 32)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Mul", ["y", "gain"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32]),
         helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 32])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(8, 1, 32)).astype(np.float32),
             gain=rng.uniform(0.5, 2, size=8).astype(np.float32))
    done = compress(tmp_path / "m.onnx", tmp_path / "o.onnx", FactorizeConfig(params=0.5), calib=tmp_path / "calib.npz",
                    progress=False)
    assert done.result.factorized and 0 < done.output_error["worst"] < 1
    np.savez(tmp_path / "bad.npz", x=rng.normal(size=(8, 1, 32)).astype(np.float32), gain=np.float32(1.0))
    with pytest.raises(EdgelrError, match="scalar"):
        compress(tmp_path / "m.onnx", tmp_path / "p.onnx", FactorizeConfig(params=0.5), calib=tmp_path / "bad.npz",
                 progress=False)


def test_subgraph_layers_and_conv_transpose_are_named_not_passed_over(tmp_path, capsys):
    """Layers inside an If's branches are listed by their path (tests/test_subgraphs.py compresses them); a
    ConvTranspose is not rewritten: inspect lists it with why, and compress's refusal says why instead of 'no layer'."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgelr.cli import main

    rng = np.random.default_rng(0)

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.normal(size=(16, 16)).astype(np.float32), f"w_{name}")
        return helper.make_graph([helper.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"], name=f"mm_{name}")],
                                 name, [], [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["N", 16])], [w])

    wt = numpy_helper.from_array(rng.normal(size=(16, 4, 3, 3)).astype(np.float32), "wt")
    nodes = [helper.make_node("If", ["flag"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="choose"),
             helper.make_node("ConvTranspose", ["img", "wt"], ["up"], name="upsample")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                                           helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16]),
                               helper.make_tensor_value_info("up", TensorProto.FLOAT, None)], [wt])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "choose/then_branch/mm_then" in out and "choose/else_branch/mm_else" in out
    assert "upsample" in out and "ConvTranspose is not factorized yet" in out
    model = onnx.load(tmp_path / "m.onnx")
    model.graph.node.remove(model.graph.node[0])
    model.graph.output.remove(model.graph.output[0])
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--params", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "no factorizable" in err and "ConvTranspose" in err and not (tmp_path / "o.onnx").exists()
