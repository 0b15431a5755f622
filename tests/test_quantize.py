"""INT8 quantization with ONNX Runtime's tools: YOLOv8n (`nudenet`) calibrated on real photos and checked
on held-out ones, the TensorRT (symmetric) layout, dynamic quantization of a MatMul model, a model with
dynamic dims, and bad input (one EdgelrError line, no output file).
"""

from __future__ import annotations

import sys
from pathlib import Path

import graphs as G
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgelr.deploy.targets import load_target
from edgelr.errors import EdgelrError
from edgelr.io.model import load
from edgelr.io.samples import Samples, load_samples
from edgelr.measure.verify import output_error
from edgelr.passes.quantize import SCHEMES, activations_for, quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (real photos)


@pytest.fixture(scope="module")
def yolo() -> Path:
    nudenet = pytest.importorskip("nudenet")
    return Path(nudenet.__file__).parent / "320n.onnx"


@pytest.fixture(scope="module")
def photos(yolo, tmp_path_factory) -> tuple[Samples, Samples]:
    """(calibration, held-out): different photos, 320x320, as load_samples reads them from .npz."""
    pytest.importorskip("skimage")
    from models.data import CALIBRATION, HELD_OUT, samples

    folder = tmp_path_factory.mktemp("photos")
    np.savez(folder / "calib.npz", images=samples(CALIBRATION[:10], 320, crops=0, seed=0))
    np.savez(folder / "heldout.npz", images=samples(HELD_OUT, 320, crops=1, seed=1))
    model = load(yolo)
    return load_samples(folder / "calib.npz", model), load_samples(folder / "heldout.npz", model)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def stacked(built: G.Built, count: int, seed: int = 0) -> Samples:
    return Samples(built.inputs(np.random.default_rng(seed), count), {name: False for name in built.input_shapes})


def save(proto: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    onnx.save(proto, str(folder / name))
    return folder / name


# --- YOLOv8n on real photos --------------------------------------------------------------------------
@pytest.mark.slow
def test_yolo_static_int8_is_close_on_held_out_photos(yolo, photos, tmp_path, monkeypatch):
    calib, heldout = photos
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # ORT's failed symbolic shape inference dumps files into the working directory
    out = Path("..") / "yolov8n.int8.onnx"  # relative, as a user types it
    result = quantize(yolo, out, "int8", calib, progress=False)
    out = out.resolve()
    assert result["scheme"] == "int8" and result["activations"] == "uint8" and result["samples"] == 10
    assert result["by_op"]["Conv"] == 64  # every conv of YOLOv8n holds INT8 weights
    # dynamic H, W defeat ORT's symbolic shape inference; quantization goes on without it
    assert result["preprocess"] == "without symbolic shape inference"
    ops = G.op_counts(onnx.load(str(out)))
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert out.stat().st_size < 0.4 * yolo.stat().st_size
    errors = output_error(yolo, out, heldout)
    # boxes and class scores each on their own scale: INT8 moves box pixels by a few percent, and the
    # scores (mostly near 0) by about 0.4 of their own size while the top class still agrees (below)
    assert errors["output0[0:4]"] < 0.1 and errors["output0[4:22]"] < 0.6, errors
    # the output tail (box decoding, Sigmoid, the Concat of boxes and class scores) stays float: quantized
    # as one tensor with the box pixels, the class scores flattened and the top class agreed nowhere
    graph = onnx.load(str(out)).graph
    producer = {o: n for n in graph.node for o in n.output}
    assert producer[graph.output[0].name].op_type == "Concat"
    ref, new = (np.concatenate([session(p).run(None, heldout.feed(i))[0] for i in range(len(heldout))]) for p in (yolo, out))
    confident = ref[:, 4:].max(axis=1) > 0.25
    agreement = (new[:, 4:].argmax(axis=1) == ref[:, 4:].argmax(axis=1))[confident].mean()
    assert confident.sum() > 10 and agreement > 0.8, agreement
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", out.name]  # no temporary files left behind
    assert not any(workdir.iterdir())


@pytest.mark.slow
def test_yolo_int8_for_tensorrt_is_symmetric_and_only_on_weighted_ops(yolo, photos, tmp_path):
    calib, heldout = photos
    out = tmp_path / "yolov8n.trt.onnx"
    result = quantize(yolo, out, "int8", calib, activations="int8-symmetric", progress=False)
    assert result["by_op"] == {"Conv": 64}
    graph = onnx.load(str(out)).graph
    by_name = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = by_name[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any()  # TensorRT: symmetric INT8 only
        if node.op_type == "DequantizeLinear":
            assert node.input[0] not in by_name or by_name[node.input[0]].dtype == np.int8  # no INT32 bias
    quantized_inputs = {n.op_type for n in graph.node for i in n.input if i in producers and producers[i].op_type == "DequantizeLinear"}
    assert "Conv" in quantized_inputs
    errors = output_error(yolo, out, heldout)
    assert errors["output0[0:4]"] < 0.1 and errors["output0[4:22]"] < 0.6, errors


# --- small graphs ---------------------------------------------------------------------------------------
def test_dynamic_dims_model_quantizes(tmp_path):
    built = G.convnet(np.random.default_rng(0), symbolic_batch=True)
    path = save(built.proto, tmp_path)
    out = tmp_path / "q.onnx"
    result = quantize(path, out, "int8", stacked(built, 8), progress=False)
    assert result["by_op"]["Conv"] == 2
    feed = built.inputs(np.random.default_rng(9), dynamic_size=5)  # a batch size it never saw
    reference, quantized = session(path).run(None, feed)[0], session(out).run(None, feed)[0]
    assert quantized.shape == reference.shape == (5, 4)
    assert np.linalg.norm(quantized - reference) / np.linalg.norm(reference) < 0.1
    assert G.interface(onnx.load(str(out))) == G.interface(built.proto)  # same names, dtypes, symbolic dims


def test_dynamic_int8_quantizes_matmul_weights(tmp_path):
    built = G.mlp(np.random.default_rng(1), width=32)
    path = save(built.proto, tmp_path)
    out = tmp_path / "dq.onnx"
    result = quantize(path, out, "int8-dynamic")
    assert result["scheme"] == "int8-dynamic" and result["samples"] == 0
    assert result["nodes_quantized"] >= 2
    assert G.op_counts(onnx.load(str(out)))["MatMulInteger"] >= 2
    feed = built.inputs(np.random.default_rng(2))
    reference, quantized = session(path).run(None, feed)[0], session(out).run(None, feed)[0]
    assert np.linalg.norm(quantized - reference) / np.linalg.norm(reference) < 0.05


def test_a_sinusoidal_embedding_stays_float(tmp_path):
    """A diffusion UNet's timestep embedding, sin/cos(t * frequencies) into a Linear: t * f reaches ~1000
    radians, where one uint8 step is a turn or more, so what feeds a Sin or Cos stays float (static INT8 once
    made a trained digits DDPM's images noise: 5.8 dB against the original's)."""
    rng = np.random.default_rng(0)
    freqs = np.exp(-np.log(10000) * np.arange(16) / 16).astype(np.float32)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["t", "freqs"], ["phase"], name="phase"),
         helper.make_node("Sin", ["phase"], ["sin"], name="sin"), helper.make_node("Cos", ["phase"], ["cos"], name="cos"),
         helper.make_node("Concat", ["sin", "cos"], ["emb"], axis=1, name="concat"),
         helper.make_node("MatMul", ["emb", "w"], ["y"], name="linear")],
        "embedding", [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor("freqs", TensorProto.FLOAT, [1, 16], freqs), helper.make_tensor("w", TensorProto.FLOAT, [32, 8], w)])
    path = tmp_path / "emb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    t = rng.uniform(0, 1000, (64, 1)).astype(np.float32)
    result = quantize(path, tmp_path / "q.onnx", "int8", Samples({"t": t[:48]}, {"t": True}), progress=False)
    assert result["by_op"]["MatMul"] == 1
    reference = np.concatenate([session(path).run(None, {"t": x[None]})[0] for x in t[48:]])
    quantized = np.concatenate([session(tmp_path / "q.onnx").run(None, {"t": x[None]})[0] for x in t[48:]])
    assert np.linalg.norm(quantized - reference) / np.linalg.norm(reference) < 0.05


def test_activation_type_follows_the_target():
    assert activations_for(load_target("rtx")) == "int8-symmetric"
    assert activations_for(load_target("jetson-orin")) == "int8-symmetric"
    assert activations_for(load_target("rpi5")) == "int8"
    assert activations_for(load_target("x86-cpu")) == "uint8"


# --- bad input: one line, nothing written ---------------------------------------------------------------
@pytest.fixture
def mlp_path(tmp_path) -> Path:
    return save(G.mlp(np.random.default_rng(1)).proto, tmp_path)


def expect_error(match: str, model: Path, out: Path, *args, **kwargs) -> None:
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else None
    with pytest.raises(EdgelrError, match=match) as caught:
        quantize(model, out, *args, progress=False, **kwargs)
    assert "\n" not in str(caught.value)
    assert not out.exists()
    if before is not None:
        assert sorted(p.name for p in out.parent.iterdir()) == before  # no temp folder or half file left


def test_static_without_calibration_data(mlp_path, tmp_path):
    expect_error("static INT8 quantization needs calibration data.*int8-dynamic", mlp_path, tmp_path / "o.onnx", "int8")


def test_unknown_scheme_lists_the_known_ones(mlp_path, tmp_path):
    expect_error(f"unknown quantization scheme 'int4'; known schemes: {', '.join(SCHEMES)}", mlp_path,
                 tmp_path / "o.onnx", "int4")
    expect_error("unknown activation type 'fp8'", mlp_path, tmp_path / "o.onnx", "int8-dynamic", activations="fp8")


def test_missing_corrupt_and_unwritable_paths(mlp_path, tmp_path):
    expect_error("no such file", tmp_path / "missing.onnx", tmp_path / "o.onnx", "int8-dynamic")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a model")
    expect_error("not a readable ONNX model", corrupt, tmp_path / "o.onnx", "int8-dynamic")
    expect_error("folder .* does not exist", mlp_path, tmp_path / "nope" / "o.onnx", "int8-dynamic")
    with pytest.raises(EdgelrError, match="is also the input"):
        quantize(mlp_path, mlp_path, "int8-dynamic")


def test_a_model_onnxruntime_cannot_quantize(tmp_path):
    """An op ONNX Runtime has no kernel for: calibration cannot run it; one line says so."""
    x = G.value_info("x", np.float32, (2, 8))
    w = onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Mystery", ["h"], ["y"], name="odd", domain="com.example")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                              ir_version=G.IR_VERSION)
    path = save(proto, tmp_path)
    samples = Samples({"x": np.ones((3, 2, 8), np.float32)}, {"x": False})
    expect_error("ONNX Runtime could not quantize the model .*Mystery", path, tmp_path / "o.onnx", "int8", samples)


def test_a_model_with_nothing_to_quantize(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="act")]
    proto = G.make_model(nodes, [G.value_info("x", np.float32, (2, 8))], [G.value_info("y", np.float32, (2, 8))])
    path = save(proto, tmp_path)
    expect_error("found nothing to quantize", path, tmp_path / "o.onnx", "int8-dynamic")


def _cli(*args) -> "subprocess.CompletedProcess":
    import subprocess

    return subprocess.run([sys.executable, "-m", "edgelr", "-q", *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False)


def test_compress_then_quantize_from_the_command_line(tmp_path):
    """compress --quantize: factorized, then INT8 (static on --calib, or dynamic); error against the float model."""
    from edgelr.demo import build_model, synthetic_images

    onnx.save(build_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", image=synthetic_images(8, seed=1))
    run = _cli("compress", tmp_path / "m.onnx", "-o", tmp_path / "s.onnx", "--params", "0.5", "--calib",
               tmp_path / "calib.npz", "--quantize", "int8", "--report", tmp_path / "r.json")
    assert run.returncode == 0, run.stderr
    ops = {n.op_type for n in onnx.load(tmp_path / "s.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "quantized" in run.stdout and "relative output error on the calibration samples" in run.stdout
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["quantized"]["scheme"] == "int8" and 0 < report["output_error"]["worst"] < 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.onnx", "r.json", "s.onnx"]  # no leftovers
    run = _cli("compress", tmp_path / "m.onnx", "-o", tmp_path / "d.onnx", "--params", "0.5", "--quantize", "int8-dynamic")
    assert run.returncode == 0, run.stderr
    assert "MatMulInteger" in {n.op_type for n in onnx.load(tmp_path / "d.onnx").graph.node}


def test_compress_quantize_bad_input_writes_nothing(tmp_path):
    from edgelr.demo import build_model

    onnx.save(build_model(), tmp_path / "m.onnx")
    run = _cli("compress", tmp_path / "m.onnx", "-o", tmp_path / "s.onnx", "--params", "0.5", "--quantize", "int8")
    assert run.returncode == 1 and "--calib" in run.stderr and "Traceback" not in run.stderr
    run = _cli("compress", tmp_path / "m.onnx", "-o", tmp_path / "s.onnx", "--params", "0.5", "--quantize", "int4")
    assert run.returncode == 2 and "int4" in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_an_already_quantized_model_is_refused_for_what_it_is(tmp_path):
    """Quantizing an INT8 model again, or factorizing its quantized weights: one line that says so, nothing
    written; quantization alone is judged without advice to loosen a budget it does not have."""
    from edgelr.demo import build_model, synthetic_images

    onnx.save(build_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", image=synthetic_images(8, seed=1))
    run = _cli("compress", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--quantize", "int8", "--calib",
               tmp_path / "calib.npz")
    assert run.returncode == 0, run.stderr
    run = _cli("compress", tmp_path / "q.onnx", "-o", tmp_path / "qq.onnx", "--quantize", "int8", "--calib",
               tmp_path / "calib.npz")
    assert run.returncode == 1 and "already quantized" in run.stderr and "Traceback" not in run.stderr
    run = _cli("compress", tmp_path / "q.onnx", "-o", tmp_path / "qq.onnx", "--params", "0.5", "--calib",
               tmp_path / "calib.npz")
    assert run.returncode == 1 and "weight is quantized: factorize the float model" in run.stderr
    run = _cli("compress", tmp_path / "m.onnx", "-o", tmp_path / "tight.onnx", "--quantize", "int8", "--calib",
               tmp_path / "calib.npz", "--max-output-error", "0.0001")
    assert run.returncode == 1 and "not written" in run.stderr and "budget" not in run.stderr, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.onnx", "q.onnx"]


# --- the low-rank branch beside INT8 (edgelr.passes.svdquant) ----------------------------------------------------------
def outlier_conv(tmp_path: Path, heavy: float = 60.0) -> tuple[Path, Samples]:
    """Relu -> Conv 3x3 (16 -> 32) -> Relu, whose input has two channels `heavy` times the others."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["xs"], name="gain"),
        helper.make_node("Conv", ["xs", "w", "b"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    gain = np.ones((1, 16, 1, 1), np.float32)
    gain[0, [3, 11]] = heavy
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w, "w"), (rng.standard_normal(32).astype(np.float32), "b"),
                                                               (gain, "gain"))]
    proto = G.make_model(nodes, [G.value_info("x", np.float32, (1, 16, 12, 12))],
                         [G.value_info("y", np.float32, (1, 32, 12, 12))], inits)
    x = np.abs(rng.standard_normal((12, 16, 12, 12))).astype(np.float32)
    return save(proto, tmp_path), Samples({"x": x}, {"x": True})


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("op", ["Conv", "MatMul", "Gemm"])
def test_the_branch_rewrite_is_exact_in_float(tmp_path, op, alpha):
    from edgelr.calibration.grams import observe_shapes
    from edgelr.graph.layers import find_layers
    from edgelr.io.model import save as save_model
    from edgelr.passes import svdquant
    from edgelr.passes.quantize import FLOAT_BRANCH

    rng = np.random.default_rng(3)
    if op == "Conv":
        path, samples = outlier_conv(tmp_path)
        feed = {"x": samples.arrays["x"][:1]}
    else:
        w = rng.standard_normal((40, 48) if op == "MatMul" else (48, 40)).astype(np.float32)
        attrs = {} if op == "MatMul" else {"transB": 1, "alpha": 0.5}
        inputs = ["x", "w"] + ([] if op == "MatMul" else ["b"])
        inits = [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.ones(48, np.float32), "b")]
        proto = G.make_model([helper.make_node(op, inputs, ["y"], name="fc", **attrs)],
                             [G.value_info("x", np.float32, (6, 40))], [G.value_info("y", np.float32, (6, 48))],
                             inits[: 1 if op == "MatMul" else 2])
        path, feed = save(proto, tmp_path), {"x": rng.standard_normal((6, 40)).astype(np.float32)}
    model = load(path)
    layer = find_layers(model)[0][0]
    observe_shapes(model, [layer], Samples({"x": feed["x"][None]}, {"x": False}))
    absmax = np.abs(feed["x"]).max(axis=tuple(i for i in range(feed["x"].ndim) if i != (1 if op == "Conv" else 1)))
    svdquant.rewrite(model.graph, layer, rank=4, alpha=alpha, absmax=absmax)
    save_model(model, tmp_path / "branched.onnx")
    names = [n.name for n in onnx.load(str(tmp_path / "branched.onnx")).graph.node]
    assert sum(FLOAT_BRANCH in n for n in names) == (4 if alpha else 3)
    want, got = (session(p).run(None, feed)[0] for p in (path, tmp_path / "branched.onnx"))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_int8_lowrank_beats_plain_int8_on_a_layer_with_outliers(tmp_path):
    path, samples = outlier_conv(tmp_path)
    plain = quantize(path, tmp_path / "plain.onnx", "int8", samples, progress=False)
    branched = quantize(path, tmp_path / "branched.onnx", "int8-lowrank", samples, progress=False)
    assert "low_rank_branches" not in plain
    (row,) = branched["low_rank_branches"]
    assert row["name"] == "conv" and row["outlier_ratio"] > 30 and row["chosen"]
    assert row["branch_error"] < 0.8 * row["int8_error"]
    graph = onnx.load(str(tmp_path / "branched.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    branch = [n for n in graph.node if "/float_branch" in n.name]
    assert branch and not any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                              for n in branch for i in n.input if i not in {t.name for t in graph.initializer})
    assert "QuantizeLinear" in {n.op_type for n in graph.node}  # the residual conv is still INT8
    check = Samples({"x": samples.arrays["x"][::-1].copy()}, {"x": True})
    assert output_error(path, tmp_path / "branched.onnx", check)["worst"] < output_error(path, tmp_path / "plain.onnx", check)["worst"]


def test_int8_lowrank_needs_two_samples(tmp_path):
    path, samples = outlier_conv(tmp_path)
    one = Samples({"x": samples.arrays["x"][:1]}, {"x": True})
    with pytest.raises(EdgelrError, match="at least 2 calibration samples"):
        quantize(path, tmp_path / "out.onnx", "int8-lowrank", one, progress=False)
    assert not (tmp_path / "out.onnx").exists()


def test_keep_float_leaves_the_named_layers_in_float_on_float_inputs(tmp_path):
    """The layers the latency search leaves in float: excluded by name, with float weights, reading the
    float tensor (not the dequantized copy ORT makes for their quantized neighbours) unless ORT folded
    its producer into the quantization (a Relu: then only the dequantized copy is clamped); the rest INT8."""
    built = G.convnet(np.random.default_rng(0), symbolic_batch=False)
    path = save(built.proto, tmp_path)
    out = tmp_path / "q.onnx"
    result = quantize(path, out, "int8", stacked(built, 8), progress=False,
                      keep_float=["conv1", "head", "no-such-node"])
    assert result["kept_float"] == ["conv1", "head"]
    graph = onnx.load(str(out)).graph
    producers = {o: n for n in graph.node for o in n.output}
    node = {n.name: n for n in graph.node}
    assert node["head"].input[0] == "f"  # the Flatten's float output
    assert producers[node["conv1"].input[0]].op_type == "DequantizeLinear"  # the Relu before it was folded
    assert all(n.input[1] not in producers or producers[n.input[1]].op_type != "DequantizeLinear"
               for n in (node["conv1"], node["head"]))  # float weights
    assert producers[node["conv0"].input[1]].op_type == "DequantizeLinear"  # still INT8
    feed = built.inputs(np.random.default_rng(9))
    reference, quantized = session(path).run(None, feed)[0], session(out).run(None, feed)[0]
    assert np.linalg.norm(quantized - reference) / np.linalg.norm(reference) < 0.05


def test_an_old_opset_model_is_upgraded_for_per_channel_int8(tmp_path):
    """Opset 11 has no per-channel DequantizeLinear: the model is converted to opset 13 first (it crashed
    with a traceback before), and the result runs and stays close."""
    from edgelr.api import compress
    from edgelr.passes.factorize import FactorizeConfig

    rng = np.random.default_rng(0)
    built = G.convnet(rng, opset=11)
    onnx.save(built.proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **built.inputs(rng, count=16))
    done = compress(tmp_path / "m.onnx", tmp_path / "q.onnx", FactorizeConfig(params=0.5), calib=tmp_path / "calib.npz",
                    quantize="int8", progress=False)
    assert done.quantized["opset"].startswith("upgraded from opset 11 to 13")
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 13
    assert done.output_error["worst"] < 0.5


@pytest.mark.parametrize("bias_shape", [(1, 24), (24,)], ids=["bias-1xN", "bias-N"])
def test_a_matmul_and_add_fused_into_a_gemm_quantizes_and_refits(tmp_path, bias_shape):
    """ORT's pre-processing fuses MatMul + Add into a Gemm named NAME/MatMulAddFusion: with a [1, N] bias
    its per-channel INT8 bias check failed ("could not quantize", magika in the corpus), and the renamed
    low-rank node made the refit after INT8 crash with a KeyError (magika, ppocr-cls-v2). The Gemm keeps its
    name and runs; the factorized pair is found in the INT8 model."""
    from edgelr.api import compress
    from edgelr.passes.factorize import FactorizeConfig

    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array((rng.standard_normal((16, 32)) / 4).astype(np.float32), "W0"),
             onnx.numpy_helper.from_array((rng.standard_normal((32, 24)) / 6).astype(np.float32), "W1"),
             onnx.numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "b1")]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="fc0"), helper.make_node("Relu", ["h0"], ["a0"]),
             helper.make_node("MatMul", ["a0", "W1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["y"], name="bias1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])], inits)
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 16)).astype(np.float32))
    # a task metric (the refit then keeps a snapshot to restore); random weights have no low-rank
    # structure: the floor is not what this checks
    done = compress(path, tmp_path / "q.onnx", FactorizeConfig(params=0.6), calib=tmp_path / "calib.npz",
                    quantize="int8", progress=False, metric="classify", floor=0.0)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    up = next(n for n in graph.node if n.name == "fc1/lowrank_up")
    assert producers[up.input[1]].op_type == "DequantizeLinear"  # INT8 weights, where refit looks for them
    assert done.quantized["by_op"].get("Gemm") == 1 and done.output_error["worst"] < 0.5
