"""TensorRT engines built ahead of time with TensorRT for RTX (CPU-only here; the GPU parity test runs
where a GPU is): YOLOv8n from `nudenet`, original and factorized, at fp32, fp16 and INT8 (Q/DQ); small
graphs for dynamic shapes, unsupported ops and bad input. Every error is one EdgelrError line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import graphs as G
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgelr import FactorizeConfig, compress
from edgelr.deploy.targets import load_target
from edgelr.errors import EdgelrError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (real photos)

pytest.importorskip(
    "tensorrt_rtx_bindings",
    reason="TensorRT for RTX is not installed (pip install edgelr[trt]); CI installs it",
)

from edgelr.deploy.tensorrt import build_engine, gpu_available

HAS_FULL_TENSORRT = importlib.util.find_spec("tensorrt") is not None


# --- models and data ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolo() -> Path:
    nudenet = pytest.importorskip("nudenet")
    return Path(nudenet.__file__).parent / "320n.onnx"


@pytest.fixture(scope="module")
def yolo_factorized(yolo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lr") / "yolov8n.lr.onnx"
    compress(yolo, out, FactorizeConfig(params=0.5), progress=False)
    return out


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """Ten real photos, 320x320, samples on the first axis (the --calib .npz layout)."""
    pytest.importorskip("skimage")
    from models.data import CALIBRATION, samples

    return {"images": samples(CALIBRATION[:10], 320, crops=0, seed=0)}


@pytest.fixture
def rtx():
    return load_target("rtx")


def save(proto: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    onnx.save(proto, str(path))
    return path


def dest(tmp_path: Path, name: str = "engine") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_manifest(folder: Path, manifest: dict, precision: str, files: set[str]) -> None:
    """The manifest on disk equals the one returned and describes the files exactly."""
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert set(manifest["files"]) == files
    assert {p.name for p in folder.iterdir()} == files | {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
        assert entry["bytes"] > 0
    assert manifest["precision"] == precision
    assert manifest["tensorrt"]["module"] == "tensorrt_rtx_bindings"
    assert manifest["tensorrt"]["version"].startswith(manifest["target"]["runtime_version"])
    assert manifest["target"]["backend"] == "tensorrt-rtx"
    assert manifest["build_seconds"] > 0
    if not gpu_available():
        assert manifest["parity"] == "skipped: no GPU"


# --- YOLOv8n: original and factorized, three precisions -------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("which", ["original", "factorized"])
def test_yolo_engines_at_every_precision(which, yolo, yolo_factorized, photos, rtx, tmp_path):
    source = yolo if which == "original" else yolo_factorized
    sizes = {}
    for precision in ("fp32", "fp16", "int8"):
        folder = dest(tmp_path, precision)
        manifest = build_engine(source, rtx, folder, photos, precision=precision, progress=False)
        converted = {"fp32": set(), "fp16": {"model.fp16.onnx"}, "int8": {"model.int8.onnx"}}[precision]
        check_manifest(folder, manifest, precision, {"model.engine"} | converted)
        sizes[precision] = manifest["files"]["model.engine"]["bytes"]
        # I/O as the model declares it (dynamic N, H, W), fixed by the photos' shape in the profile
        assert manifest["inputs"] == [{"name": "images", "dtype": "float32", "shape": [-1, 3, -1, -1]}]
        assert manifest["outputs"] == [{"name": "output0", "dtype": "float32", "shape": [-1, 22, -1]}]
        assert manifest["profile"] == {"images": {"min": [1, 3, 320, 320], "opt": [1, 3, 320, 320], "max": [1, 3, 320, 320]}}
        if converted:
            graph = onnx.load(str(folder / converted.pop()))
            io_types = {v.type.tensor_type.elem_type for v in [*graph.graph.input, *graph.graph.output]}
            assert io_types == {TensorProto.FLOAT}  # the engine keeps fp32 I/O
            ops = G.op_counts(graph)
            if precision == "fp16":
                assert any(t.data_type == TensorProto.FLOAT16 for t in graph.graph.initializer)
            else:  # Q/DQ in TensorRT's layout: symmetric (zero points 0) on every Conv
                assert ops["DequantizeLinear"] > 0 and ops["QuantizeLinear"] > 0
                zero_points = [onnx.numpy_helper.to_array(t) for t in graph.graph.initializer if t.name.endswith("_zero_point")]
                assert zero_points and all(not z.any() for z in zero_points)
                assert "int8" in manifest["graph"] and "10 calibration samples" in manifest["graph"]
    # fp16 halves the weights; weights are a large part of a YOLOv8n engine
    assert sizes["fp16"] < 0.8 * sizes["fp32"]


@pytest.mark.slow
def test_factorized_engine_is_smaller(yolo, yolo_factorized, photos, rtx, tmp_path):
    original = build_engine(yolo, rtx, dest(tmp_path, "a"), photos, precision="fp16", progress=False)
    factorized = build_engine(yolo_factorized, rtx, dest(tmp_path, "b"), photos, precision="fp16", progress=False)
    assert factorized["files"]["model.engine"]["bytes"] < 0.8 * original["files"]["model.engine"]["bytes"]


@pytest.mark.slow
def test_yolo_fp16_with_dynamic_batch_and_size(yolo, rtx, tmp_path):
    """Batch 1..4 and 320..640 pixels in one engine. The anchor grid (Shape -> Range -> Mul) stays fp32:
    TensorRT for RTX cannot build it in fp16 with dynamic sizes, and fp16 is inexact past 2048."""
    shapes = {"images": ((1, 3, 320, 320), (1, 3, 640, 640), (4, 3, 640, 640))}
    manifest = build_engine(yolo, rtx, dest(tmp_path), precision="fp16", shapes=shapes)
    assert manifest["profile"]["images"]["max"] == [4, 3, 640, 640]
    converted = tmp_path / "engine" / "model.fp16.onnx"
    onnx.checker.check_model(str(converted), full_check=True)  # valid and topologically sorted
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(converted))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    ranges = [n for n in graph.node if n.op_type == "Range"]
    assert ranges and all(types[n.output[0]] != TensorProto.FLOAT16 for n in ranges)
    assert sum(n.op_type == "Conv" and types[n.output[0]] == TensorProto.FLOAT16 for n in graph.node) == 64


def test_yolo_without_shapes_or_samples_takes_its_size_from_its_metadata(yolo, rtx, tmp_path):
    """Ultralytics writes imgsz = [320, 320] and batch = 1 into the model: the profile needs nothing else."""
    manifest = build_engine(yolo, rtx, dest(tmp_path), precision="fp32", progress=False)
    assert manifest["profile"] == {"images": {"min": [1, 3, 320, 320], "opt": [1, 3, 320, 320], "max": [1, 3, 320, 320]}}
    check_manifest(tmp_path / "engine", manifest, "fp32", {"model.engine"})
    bare = onnx.load(str(yolo))
    del bare.metadata_props[:]
    with pytest.raises(EdgelrError, match=r"input 'images' has dynamic dims \[batch, 3, height, width\]; "
                                          r"give --shapes images=1x3x640x640 \(or --calib DATA.npz\)$"):
        build_engine(save(bare, tmp_path, "bare.onnx"), rtx, dest(tmp_path, "bare"), precision="fp32")


def test_int8_without_calibration_data_is_a_clear_error(yolo, rtx, tmp_path):
    shapes = {"images": ((1, 3, 320, 320),) * 3}
    with pytest.raises(EdgelrError, match="int8 engine needs calibration data"):
        build_engine(yolo, rtx, dest(tmp_path), precision="int8", shapes=shapes)


# --- dynamic batch: profiles from the flag, the target, the samples ----------------------------------
@pytest.fixture
def dynamic_batch(tmp_path) -> Path:
    return save(G.convnet(np.random.default_rng(0), symbolic_batch=True).proto, tmp_path, "convnet.onnx")


def test_dynamic_batch_builds_with_a_profile(dynamic_batch, rtx, tmp_path):
    triple = ((1, 3, 9, 8), (4, 3, 9, 8), (16, 3, 9, 8))
    manifest = build_engine(dynamic_batch, rtx, dest(tmp_path, "flag"), precision="fp32", shapes={"x": triple})
    assert manifest["profile"] == {"x": {"min": [1, 3, 9, 8], "opt": [4, 3, 9, 8], "max": [16, 3, 9, 8]}}
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 3, 9, 8]}]
    check_manifest(tmp_path / "flag", manifest, "fp32", {"model.engine"})

    from_target = build_engine(dynamic_batch, dataclasses.replace(rtx, shapes={"x": triple}), dest(tmp_path, "target"),
                               precision="fp32")
    assert from_target["profile"] == manifest["profile"]

    samples = {"x": np.zeros((5, 2, 3, 9, 8), np.float32)}  # 5 samples of batch 2
    from_samples = build_engine(dynamic_batch, rtx, dest(tmp_path, "samples"), samples, precision="fp32")
    assert from_samples["profile"] == {"x": {"min": [2, 3, 9, 8], "opt": [2, 3, 9, 8], "max": [2, 3, 9, 8]}}


def test_dynamic_batch_without_a_profile_fails_clearly(dynamic_batch, rtx, tmp_path):
    with pytest.raises(EdgelrError, match=r"input 'x' has dynamic dims \[N, 3, 9, 8\]; give --shapes x=1x3x9x8 \(or --calib"):
        build_engine(dynamic_batch, rtx, dest(tmp_path), precision="fp32")


@pytest.mark.parametrize(
    "triple, message",
    [
        (((1, 3, 9), (1, 3, 9), (1, 3, 9)), "has 3 dims; the input has 4"),
        (((1, 3, 9, 8), (1, 4, 9, 8), (1, 3, 9, 8)), "has 4 in dim 1, which the model fixes at 3"),
        (((4, 3, 9, 8), (2, 3, 9, 8), (8, 3, 9, 8)), "min <= opt <= max"),
    ],
)
def test_bad_profile_shapes_are_clear_errors(dynamic_batch, rtx, tmp_path, triple, message):
    with pytest.raises(EdgelrError, match=message):
        build_engine(dynamic_batch, rtx, dest(tmp_path), precision="fp32", shapes={"x": triple})
    with pytest.raises(EdgelrError, match="--shapes given for 'y', which the model does not have; its inputs: x"):
        build_engine(dynamic_batch, rtx, dest(tmp_path, "other"), precision="fp32", shapes={"y": triple})


def test_static_model_needs_no_profile_and_converts_to_fp16(tmp_path, rtx):
    path = save(G.mlp(np.random.default_rng(1)).proto, tmp_path)
    manifest = build_engine(path, rtx, dest(tmp_path), precision="fp16")
    assert manifest["profile"] is None
    check_manifest(tmp_path / "engine", manifest, "fp16", {"model.engine", "model.fp16.onnx"})


# --- precision from the graph ------------------------------------------------------------------------
def qdq_model(tmp_path: Path, activations=np.int8) -> Path:
    """x -> Q/DQ (ACTIVATIONS, zero point 0) -> MatMul with a DQ'd int8 weight -> y."""
    rng = np.random.default_rng(2)
    inits = [
        onnx.numpy_helper.from_array(np.float32(0.05), "s"),
        onnx.numpy_helper.from_array(activations(0), "za"),
        onnx.numpy_helper.from_array(np.int8(0), "z"),
        onnx.numpy_helper.from_array(rng.integers(-100, 100, (8, 4)).astype(np.int8), "Wq"),
        onnx.numpy_helper.from_array(np.float32(0.01), "ws"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "za"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "za"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["Wq", "ws", "z"], ["W"], name="wdq"),
        helper.make_node("MatMul", ["xd", "W"], ["y"], name="mm"),
    ]
    proto = G.make_model(nodes, [G.value_info("x", np.float32, (2, 8))], [G.value_info("y", np.float32, (2, 4))], inits)
    return save(proto, tmp_path, "qdq.onnx")


def test_a_qdq_model_is_used_as_is_at_int8(tmp_path, rtx):
    manifest = build_engine(qdq_model(tmp_path), rtx, dest(tmp_path), precision="int8")
    assert manifest["graph"] == "as is: the model's own Q/DQ nodes"
    check_manifest(tmp_path / "engine", manifest, "int8", {"model.engine"})
    with pytest.raises(EdgelrError, match="already quantized.*export it with precision int8"):
        build_engine(qdq_model(tmp_path), rtx, dest(tmp_path, "fp16"), precision="fp16")


def test_a_model_quantized_for_x86_is_refused_in_one_line(tmp_path, rtx):
    """ONNX Runtime's x86 layout (uint8 activations) fails TensorRT's parser with "Invalid Node": say why first."""
    with pytest.raises(EdgelrError, match="uint8 activations.*--quantize int8 --target rtx"):
        build_engine(qdq_model(tmp_path, np.uint8), rtx, dest(tmp_path), precision="int8")
    assert not any((tmp_path / "engine").iterdir())


def test_int8_takes_the_activation_type_the_target_wants(dynamic_batch, rtx, tmp_path):
    """The Q/DQ flavour comes from edgelr.passes.quantize.activations_for, as compress quantizes for the target."""
    from edgelr.passes.quantize import activations_for

    assert activations_for(rtx) == "int8-symmetric"
    samples = {"x": np.random.default_rng(3).random((4, 1, 3, 9, 8), dtype=np.float32)}
    manifest = build_engine(dynamic_batch, rtx, dest(tmp_path), samples, precision="int8", progress=False)
    check_manifest(tmp_path / "engine", manifest, "int8", {"model.engine", "model.int8.onnx"})
    assert "symmetric" in manifest["graph"] and "4 calibration samples" in manifest["graph"]
    graph = onnx.load(str(tmp_path / "engine" / "model.int8.onnx"))
    zero_points = [onnx.numpy_helper.to_array(t) for t in graph.graph.initializer if t.name.endswith("_zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)


def test_target_precision_is_the_default_and_the_argument_overrides_it(tmp_path, rtx):
    path = save(G.mlp(np.random.default_rng(1)).proto, tmp_path)
    assert build_engine(path, rtx, dest(tmp_path, "a"))["precision"] == rtx.precision == "fp16"
    assert build_engine(path, rtx, dest(tmp_path, "b"), precision="fp32")["precision"] == "fp32"
    with pytest.raises(EdgelrError, match="precision 'int4' is not one of fp16, fp32, int8"):
        build_engine(path, rtx, dest(tmp_path, "c"), precision="int4")


# --- parse errors name the node -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op, domain, why",
    [
        ("Unique", "", "TensorRT does not support this op"),
        ("MyCustomOp", "com.example", "no TensorRT plugin implements it"),
    ],
)
def test_an_op_tensorrt_cannot_parse_names_the_node(tmp_path, rtx, op, domain, why):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="first"), helper.make_node(op, ["r"], ["y"], name="weird", domain=domain)]
    graph = helper.make_graph(nodes, "g", [G.value_info("x", np.float32, (4,))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path = save(helper.make_model(graph, opset_imports=opsets, ir_version=G.IR_VERSION), tmp_path)
    with pytest.raises(EdgelrError) as caught:
        build_engine(path, rtx, dest(tmp_path), precision="fp32")
    message = str(caught.value)
    assert f"TensorRT cannot parse the model: node 'weird' (op {op}): " in message
    assert why in message
    assert "\n" not in message


# --- timing cache, targets, versions, folders ---------------------------------------------------------------
def test_timing_cache_is_not_written_for_tensorrt_rtx(tmp_path, rtx):
    """TensorRT for RTX picks kernels on the device: its timing-cache calls are no-ops, so no file."""
    path = save(G.mlp(np.random.default_rng(1)).proto, tmp_path)
    cache = tmp_path / "cache" / "trt.cache"
    manifest = build_engine(path, rtx, dest(tmp_path), precision="fp32", timing_cache=cache)
    assert manifest["timing_cache"].startswith("not used: TensorRT for RTX")
    assert not cache.exists()


@pytest.mark.skipif(not HAS_FULL_TENSORRT or not gpu_available(), reason="full TensorRT and a GPU are not here")
def test_timing_cache_is_written_and_reused_with_full_tensorrt(tmp_path):
    target = dataclasses.replace(load_target("gpu"), runtime_version="installed")
    path = save(G.mlp(np.random.default_rng(1)).proto, tmp_path)
    cache = tmp_path / "cache" / "trt.cache"
    first = build_engine(path, target, dest(tmp_path, "a"), precision="fp16", timing_cache=cache)
    assert cache.stat().st_size == first["timing_cache"]["saved_bytes"] > 0
    assert first["timing_cache"]["loaded_bytes"] == 0
    second = build_engine(path, target, dest(tmp_path, "b"), precision="fp16", timing_cache=cache)
    assert second["timing_cache"]["loaded_bytes"] == first["timing_cache"]["saved_bytes"]


@pytest.mark.skipif(HAS_FULL_TENSORRT, reason="full TensorRT is installed here")
def test_full_tensorrt_target_without_tensorrt_says_build_on_the_device(tmp_path):
    path = save(G.mlp(np.random.default_rng(1)).proto, tmp_path)
    with pytest.raises(EdgelrError, match="target 'jetson-orin' needs TensorRT.*build on the device itself"):
        build_engine(path, load_target("jetson-orin"), dest(tmp_path))


def test_wrong_targets_and_folders_are_clear_errors(tmp_path, rtx):
    path = save(G.mlp(np.random.default_rng(1)).proto, tmp_path)
    with pytest.raises(EdgelrError, match="target 'rpi5' uses backend 'onnxruntime'"):
        build_engine(path, load_target("rpi5"), dest(tmp_path, "a"))
    with pytest.raises(EdgelrError, match=r"runs TensorRT for RTX 0\.9, but 1\..* is installed.*tensorrt-rtx-cu12-libs==0\.9\.\*"):
        build_engine(path, dataclasses.replace(rtx, runtime_version="0.9"), dest(tmp_path, "b"))
    full = dest(tmp_path, "full")
    (full / "old.txt").write_text("x")
    with pytest.raises(EdgelrError, match="must be an existing empty folder"):
        build_engine(path, rtx, full)
    with pytest.raises(EdgelrError, match="no such file"):
        build_engine(tmp_path / "missing.onnx", rtx, dest(tmp_path, "c"))


# --- parity on a GPU ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not gpu_available(), reason="no NVIDIA GPU here: the engine cannot run (it was built ahead of time)")
def test_engine_matches_onnxruntime_on_the_gpu(yolo, photos, rtx, tmp_path):
    fp16 = build_engine(yolo, rtx, dest(tmp_path, "fp16"), photos, precision="fp16", progress=False)
    if isinstance(fp16["parity"], str) and fp16["parity"].startswith("skipped: this GPU cannot run"):
        pytest.skip(fp16["parity"])  # e.g. a data-centre GPU: TensorRT for RTX runs on RTX (Ampere+, not Hopper)
    assert isinstance(fp16["parity"], dict), fp16["parity"]
    assert fp16["parity"]["samples"] == 4
    assert fp16["parity"]["relative_error"] < 0.01
    assert fp16["parity"]["relative_error_vs_source"] < 0.01
    int8 = build_engine(yolo, rtx, dest(tmp_path, "int8"), photos, precision="int8", progress=False)
    assert int8["parity"]["relative_error"] < 0.05
    assert int8["parity"]["relative_error_vs_source"] < 0.1


# --- 2:4 sparsity --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width, pruned", [(8, "W0"), (9, "W1")])  # an initializer (in x out); a Constant, transB=1
def test_sparsity_2_4_prunes_every_group_of_four_inputs(tmp_path, rtx, width, pruned):
    built = G.mlp(np.random.default_rng(1), width=width)
    path = save(built.proto, tmp_path)
    feed = {"x": np.random.default_rng(2).standard_normal((4, *built.input_shapes["x"])).astype(np.float32)}
    manifest = build_engine(path, rtx, dest(tmp_path), feed, precision="fp32", sparsity="2:4")
    check_manifest(tmp_path / "engine", manifest, "fp32", {"model.engine", "model.sparse.onnx"})
    assert manifest["sparsity"]["layers"] == 1 and manifest["sparsity"]["skipped"] == 2
    assert 0 < manifest["sparsity"]["output_error"] < 1
    assert manifest["source_model"] == str(path)
    sparse = onnx.load(str(tmp_path / "engine" / "model.sparse.onnx"))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in sparse.graph.initializer}
    weights |= {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in sparse.graph.node if n.op_type == "Constant"}
    rows = weights[pruned].T if pruned == "W0" else weights[pruned]  # (out x in)
    original = onnx.numpy_helper.to_array(next(t for t in built.proto.graph.initializer if t.name == pruned)) \
        if pruned == "W0" else None
    groups = rows.reshape(rows.shape[0], -1, 4)
    assert ((groups == 0).sum(axis=-1) >= 2).all()
    if original is not None:  # the two kept are the two largest of each four
        kept = np.sort(np.abs(original.T.reshape(groups.shape)), axis=-1)[..., 2:]
        np.testing.assert_array_equal(np.sort(np.abs(groups), axis=-1)[..., 2:], kept)


def test_sparsity_is_refused_where_it_cannot_run(tmp_path, rtx):
    path = save(G.mlp(np.random.default_rng(1), width=7).proto, tmp_path)  # no input dimension divisible by 4
    with pytest.raises(EdgelrError, match="no Conv, MatMul or Gemm weight has an input dimension divisible by 4"):
        build_engine(path, rtx, dest(tmp_path), precision="fp32", sparsity="2:4")
    with pytest.raises(EdgelrError, match="the only pattern TensorRT runs is 2:4"):
        build_engine(path, rtx, dest(tmp_path, "b"), precision="fp32", sparsity="1:2")
    from edgelr.deploy.export import export

    with pytest.raises(EdgelrError, match="2:4 sparse weights run on TensorRT targets.*not on 'rpi5'"):
        export(path, "rpi5", tmp_path / "bundle", sparsity="2:4")
    assert not (tmp_path / "bundle").exists()
