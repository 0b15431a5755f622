"""The pass on models as other exporters write them, unchanged: tf2onnx / Paddle2ONNX style graphs,
a real PyTorch (TorchScript) export of a small transformer, and real Paddle2ONNX models shipped in a wheel.

For each: ONNX Runtime runs the compressed model, input and output names and shapes are kept, at full
rank the outputs match the original to 1e-4 (relative), and at --params 0.5 some layers are factorized.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgelr
import edgelr.io.model
from edgelr.graph.layers import find_layers
from edgelr.passes.factorize import FactorizeConfig


# --- shared checks -------------------------------------------------------------------------------
def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelr", "-q", *map(str, args)], capture_output=True, text=True, timeout=600)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def signature(path: Path) -> tuple[list, list]:
    """(inputs, outputs) as (name, elem_type, dims) from the file itself: dim_value or dim_param."""

    def dims(value):
        return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]

    def describe(values):
        return [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in values]

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return describe([v for v in model.graph.input if v.name not in inits]), describe(model.graph.output)


def run_both(original: Path, compressed: Path, feeds: list[dict]) -> float:
    """Worst relative error over feeds and float outputs; the two models must give the same names, shapes,
    dtypes, and finite values."""
    ref, new = session(original), session(compressed)
    names = [o.name for o in ref.get_outputs()]
    assert names == [o.name for o in new.get_outputs()]
    worst = 0.0
    for feed in feeds:
        for name, a, b in zip(names, ref.run(names, feed), new.run(names, feed)):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert np.all(np.isfinite(b)), name
            if a.dtype.kind == "f":
                worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)))
    return worst


def full_rank_copy(source: Path, out: Path, conv_form: str = "channel") -> list:
    """Every layer factorized at the rank that reproduces it exactly (through the library: no budget does that)."""
    model = edgelr.load(source)
    layers, _ = find_layers(model)
    assert layers, "nothing to factorize"
    ranks = {}
    for layer in layers:
        form = conv_form if layer.is_conv and conv_form in layer.forms() else layer.forms()[0]
        ranks[layer.name] = layer.max_rank(form)
    result = edgelr.factorize(model, FactorizeConfig(ranks=ranks, conv_form=conv_form), progress=False)
    edgelr.save(model, out)
    assert len(result.factorized) == len(layers)
    return result.factorized


def compress_cli(source: Path, tmp: Path, *flags) -> tuple[Path, dict]:
    out, report = tmp / "small.onnx", tmp / "report.json"
    result = run_cli("compress", source, "-o", out, "--report", report, *flags)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return out, json.loads(report.read_text())


def factorized_ops(report: dict) -> list[str]:
    return [row["op"] for row in report["layers"] if row["form"] != "dense"]


def count_ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# --- tf2onnx / Paddle2ONNX style -----------------------------------------------------------------
def tf_style_model(batch_dim) -> onnx.ModelProto:
    """What tf2onnx and Paddle2ONNX write: opset 12, every tensor (weights, biases, BN params, the reshape
    target) in a Constant node and no initializer, an NHWC input transposed to NCHW, Conv + BN + Relu,
    a strided SAME_UPPER conv, a ConvTranspose (not factorizable: must survive), Flatten + Gemm(transB=1),
    Reshape + MatMul + Add, names with ':0', and two graph outputs (one straight from the Gemm)."""
    rng = np.random.default_rng(7)
    nodes = []

    def const(name, array):
        nodes.append(helper.make_node("Constant", [], [name], name=f"{name}/Const", value=numpy_helper.from_array(array, name)))
        return name

    def randn(*shape, scale=None):
        scale = scale if scale is not None else 1 / math.sqrt(math.prod(shape[1:]) or 1)
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output.split(":")[0], **attrs))
        return output

    x = node("Transpose", ["input_1:0"], "model/to_nchw:0", perm=[0, 3, 1, 2])
    x = node("Conv", [x, const("conv1/kernel:0", randn(16, 3, 3, 3)), const("conv1/bias:0", randn(16, scale=0.1))],
             "model/conv1/BiasAdd:0", kernel_shape=[3, 3], strides=[1, 1], dilations=[1, 1], pads=[1, 1, 1, 1])
    bn = [const(f"bn1/{k}:0", v) for k, v in (
        ("gamma", 1 + randn(16, scale=0.1)), ("beta", randn(16, scale=0.1)),
        ("moving_mean", randn(16, scale=0.1)), ("moving_variance", 1 + np.abs(randn(16, scale=0.1))))]
    x = node("BatchNormalization", [x, *bn], "model/bn1/FusedBatchNormV3:0", epsilon=1e-3)
    x = node("Relu", [x], "model/bn1/Relu:0")
    x = node("Conv", [x, const("conv2/kernel:0", randn(32, 16, 3, 3)), const("conv2/bias:0", randn(32, scale=0.1))],
             "model/conv2/BiasAdd:0", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
    features = node("Relu", [x], "model/conv2/Relu:0")
    x = node("ConvTranspose", [features, const("deconv/kernel:0", randn(32, 8, 2, 2)), const("deconv/bias:0", randn(8, scale=0.1))],
             "model/deconv/BiasAdd:0", kernel_shape=[2, 2], strides=[2, 2])
    x = node("Relu", [x], "model/deconv/Relu:0")
    x = node("Flatten", [x], "model/flatten/Reshape:0", axis=1)
    logits = node("Gemm", [x, const("dense/kernel:0", randn(64, 512)), const("dense/bias:0", randn(64, scale=0.1))],
                  "dense/BiasAdd:0", transB=1)
    x = node("Relu", [logits], "model/dense/Relu:0")
    x = node("Reshape", [x, const("reshape/shape:0", np.array([-1, 4, 16], np.int64))], "model/reshape/Reshape:0")
    x = node("MatMul", [x, const("proj/kernel:0", randn(16, 24))], "model/proj/MatMul:0")
    node("Add", [x, const("proj/bias:0", randn(24, scale=0.1))], "Identity:0")
    node("Transpose", [features], "Identity_1:0", perm=[0, 2, 3, 1])

    inputs = [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch_dim, 8, 8, 3])]
    outputs = [
        helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, [batch_dim, 4, 24]),
        helper.make_tensor_value_info("Identity_1:0", TensorProto.FLOAT, [batch_dim, 4, 4, 32]),
        helper.make_tensor_value_info("dense/BiasAdd:0", TensorProto.FLOAT, [batch_dim, 64]),
    ]
    graph = helper.make_graph(nodes, "tf2onnx", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], producer_name="tf2onnx", producer_version="1.16.1")
    model.ir_version = 7
    return model


# tf2onnx names unknown dims 'unk__N' (Paddle2ONNX 1.x 'p2o.DynamicDimension.N', as the real PP-OCRv4
# models below show); older Paddle2ONNX writes dim_value -1, as the real ch_ppocr_mobile_v2.0_cls does.
BATCH_DIMS = {"named": "unk__0", "minus-one": -1}


@pytest.fixture(scope="module", params=list(BATCH_DIMS), ids=list(BATCH_DIMS))
def tf_model(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tf") / f"{request.param}.onnx"
    model = tf_style_model(BATCH_DIMS[request.param])
    if request.param != "minus-one":  # the checker's shape inference rejects a -1 dim; ORT runs it
        onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def nhwc_feeds(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_1:0": rng.standard_normal((batch, 8, 8, 3)).astype(np.float32)} for batch in (1, 3)[:count]]


@pytest.mark.parametrize("conv_form", ["channel", "spatial"])
def test_tf_style_full_rank_is_exact(tf_model, tmp_path, conv_form):
    out = tmp_path / "full.onnx"
    done = full_rank_copy(tf_model, out, conv_form)
    assert {r.op for r in done} == {"Conv", "Gemm", "MatMul"}
    assert signature(out) == signature(tf_model)
    assert onnx.load(str(out)).opset_import[0].version == 12
    counts = count_ops(out)
    assert counts["ConvTranspose"] == 1 and counts["BatchNormalization"] == 1
    assert counts["Conv"] == 4 and counts["Gemm"] == 2 and counts["MatMul"] == 2
    assert run_both(tf_model, out, nhwc_feeds(2)) < 1e-4


def test_tf_style_half_params(tf_model, tmp_path):
    out, report = compress_cli(tf_model, tmp_path, "--params", "0.5")
    assert factorized_ops(report), report["layers"]
    assert report["totals"]["params_after"] <= 0.5 * report["totals"]["params_before"]
    assert signature(out) == signature(tf_model)
    assert count_ops(out)["ConvTranspose"] == 1
    run_both(tf_model, out, nhwc_feeds(2))  # plain SVD at half the params: runs, accuracy not judged


def test_tf_style_half_params_with_calibration(tf_model, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{"input_1:0": np.random.default_rng(3).standard_normal((8, 8, 8, 3)).astype(np.float32)})
    out, report = compress_cli(tf_model, tmp_path, "--flops", "0.5", "--calib", calib, "--max-output-error", "1")
    assert factorized_ops(report)
    assert report["data_aware"] and report["output_error"]["worst"] < 1.0
    assert report["totals"]["flops_after"] <= 0.5 * report["totals"]["flops_before"]
    assert signature(out) == signature(tf_model)
    assert run_both(tf_model, out, nhwc_feeds(2)) < 1.0


def test_minus_one_batch_dim_is_dynamic(tmp_path):
    """A dim_value of -1 means 'unknown' to ONNX Runtime; edgelr takes it as a fixed size of -1."""
    path = tmp_path / "m.onnx"
    onnx.save(tf_style_model(-1), path)
    model = edgelr.load(path)
    edgelr.io.model.infer_shapes(model)
    layers, _ = find_layers(model)
    for layer in layers:
        flops = layer.dense_flops()
        assert flops is None or flops > 0, f"{layer.name}: {flops} FLOPs"


# --- a real PyTorch export -----------------------------------------------------------------------
VOCAB, DIM, HEADS, HIDDEN, MAX_LEN = 96, 64, 4, 128, 32


@pytest.fixture(scope="module")
def torch_transformer(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
            self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln1(x)

            def heads(y):
                return y.reshape(b, t, HEADS, DIM // HEADS).transpose(1, 2)

            q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
            att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS), dim=-1)
            x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, DIM))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, DIM)
            self.pos = nn.Parameter(torch.randn(MAX_LEN, DIM) * 0.02)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.norm = nn.LayerNorm(DIM)
            self.head = nn.Linear(DIM, VOCAB)

        def forward(self, input_ids):
            x = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("torch") / "encoder.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder().eval(),
            (torch.randint(0, VOCAB, (2, 12)),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
        )
    return path


def token_feeds(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, shape).astype(np.int64)} for shape in ((1, 5), (3, 17))]


def test_torch_export_is_found(torch_transformer):
    model = edgelr.load(torch_transformer)
    layers, _ = find_layers(model)
    # per block q, k, v, o, fc1, fc2 (nn.Linear on 3-D input exports as MatMul + Add), plus the head
    assert sorted(layer.op for layer in layers) == ["MatMul"] * 13
    assert signature(torch_transformer)[0] == [("input_ids", TensorProto.INT64, ["batch", "sequence"])]


def test_torch_full_rank_is_exact(torch_transformer, tmp_path):
    out = tmp_path / "full.onnx"
    done = full_rank_copy(torch_transformer, out)
    assert len(done) == 13
    assert signature(out) == signature(torch_transformer)
    assert run_both(torch_transformer, out, token_feeds()) < 1e-4


@pytest.mark.parametrize("budget", [["--params", "0.5"], ["--flops", "0.5"]], ids=["params", "flops"])
def test_torch_with_int64_calibration(torch_transformer, tmp_path, budget):
    calib = tmp_path / "tokens.npz"
    np.savez(calib, input_ids=np.random.default_rng(5).integers(0, VOCAB, (8, 12)).astype(np.int64))
    out, report = compress_cli(torch_transformer, tmp_path, *budget, "--calib", calib)
    ops = factorized_ops(report)
    assert ops and set(ops) == {"MatMul"}
    assert report["data_aware"] is True
    assert set(report["output_error"]) == {"logits", "worst"} and report["output_error"]["worst"] < 1.0
    metric = budget[0][2:]
    assert report["totals"][f"{metric}_after"] <= 0.5 * report["totals"][f"{metric}_before"] * 1.001
    assert signature(out) == signature(torch_transformer)
    assert run_both(torch_transformer, out, token_feeds(1)) < 1.0  # other batch and sequence lengths


def test_torch_initializers_as_inputs_are_factorized(tmp_path):
    """keep_initializers_as_inputs=True (the old exporters' default, IR v3 style) lists every weight as a
    graph input too. Such weights are constants with a default; edgelr factorizes them and drops the
    replaced weights from the input list, keeping the real input."""
    torch = pytest.importorskip("torch")
    import onnx
    import onnxruntime as ort

    source = tmp_path / "mlp.onnx"
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 64),), str(source), dynamo=False, opset_version=17,
                          keep_initializers_as_inputs=True, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    out = tmp_path / "small.onnx"
    result = run_cli("compress", source, "-o", out, "--params", "0.5")
    assert result.returncode == 0, result.stderr
    model = onnx.load(out)
    inits = {i.name for i in model.graph.initializer}
    assert "x" in [i.name for i in model.graph.input]
    assert all(i.name in inits for i in model.graph.input if i.name != "x")  # no dangling weight inputs
    assert sum(n.op_type in ("MatMul", "Gemm") for n in model.graph.node) > 2  # something was factorized
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((3, 64), np.float32)})
    assert y[0].shape == (3, 64)


# --- real Paddle2ONNX models from a wheel --------------------------------------------------------
def _rapidocr_models() -> Path:
    """rapidocr_onnxruntime ships PP-OCR models exported by Paddle2ONNX. Found without importing the
    package (its __init__ needs OpenCV, which these tests do not)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("rapidocr_onnxruntime is not installed (pip install rapidocr_onnxruntime==1.4.4 --no-deps)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    if not folder.is_dir():
        pytest.skip(f"{folder}: no models in this rapidocr_onnxruntime")
    return folder


@pytest.fixture(scope="module")
def ppocr() -> Path:
    return _rapidocr_models()


def _paddle_model(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{name} not shipped in this rapidocr_onnxruntime")
    model = onnx.load(str(path), load_external_data=False)
    assert model.producer_name in ("PaddlePaddle", "") and not model.graph.initializer  # weights in Constant nodes
    return path


def image_feeds(height: int, width: int, seed: int = 0) -> list[dict]:
    return [{"x": np.random.default_rng(seed).random((1, 3, height, width), dtype=np.float32)}]


@pytest.mark.slow  # tens of seconds when OpenBLAS threads compete for the cores (see test_ppocr_rec_half_params)
def test_ppocr_rec_full_rank_is_exact(ppocr, tmp_path):
    """PP-OCRv4 recognizer (SVTR: convs, attention MatMuls with constant weights, p2o.DynamicDimension dims)."""
    source = _paddle_model(ppocr, "ch_PP-OCRv4_rec_infer.onnx")
    out = tmp_path / "full.onnx"
    done = full_rank_copy(source, out)
    assert {r.op for r in done} == {"Conv", "MatMul"}
    assert signature(out) == signature(source)
    assert run_both(source, out, image_feeds(48, 160)) < 1e-4


@pytest.mark.slow  # ~3 s alone, but 25 s when OpenBLAS's threads share 2 busy cores (the 6625x120 SVD)
def test_ppocr_rec_half_params(ppocr, tmp_path):
    source = _paddle_model(ppocr, "ch_PP-OCRv4_rec_infer.onnx")
    out, report = compress_cli(source, tmp_path, "--params", "0.5")
    assert {"Conv", "MatMul"} <= set(factorized_ops(report))
    assert signature(out) == signature(source)
    run_both(source, out, image_feeds(48, 160))  # plain SVD at half the params: runs, accuracy not judged


@pytest.mark.slow
def test_ppocr_rec_with_calibration(ppocr, tmp_path):
    source = _paddle_model(ppocr, "ch_PP-OCRv4_rec_infer.onnx")
    calib = tmp_path / "lines.npz"
    np.savez(calib, x=np.random.default_rng(1).random((2, 3, 48, 160), dtype=np.float32))
    out, report = compress_cli(source, tmp_path, "--flops", "0.7", "--calib", calib)
    assert factorized_ops(report) and report["data_aware"]
    assert report["output_error"]["worst"] < 0.5
    assert signature(out) == signature(source)


@pytest.mark.slow  # 2 s alone, up to a minute when OpenBLAS's threads share 2 busy cores
def test_ppocr_det_keeps_conv_transpose(ppocr, tmp_path):
    """PP-OCRv4 detector: DBNet with Resize and two ConvTranspose layers, which must survive as they are."""
    source = _paddle_model(ppocr, "ch_PP-OCRv4_det_infer.onnx")
    out, report = compress_cli(source, tmp_path, "--params", "0.5")
    assert "Conv" in factorized_ops(report)
    assert count_ops(out)["ConvTranspose"] == count_ops(source)["ConvTranspose"] == 2
    assert signature(out) == signature(source)
    run_both(source, out, image_feeds(64, 96))  # plain SVD at half the params: runs, accuracy not judged


def test_ppocr_cls_with_calibration(ppocr, tmp_path):
    """The PP-OCR direction classifier declares its input as [-1, 3, ?, ?]: dim_value -1 for the batch."""
    source = _paddle_model(ppocr, "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    calib = tmp_path / "crops.npz"
    np.savez(calib, x=np.random.default_rng(2).random((4, 3, 48, 192), dtype=np.float32))
    out, report = compress_cli(source, tmp_path, "--params", "0.5", "--calib", calib)
    assert factorized_ops(report)
    assert signature(out) == signature(source)
    assert run_both(source, out, image_feeds(48, 192)) < 1.0
