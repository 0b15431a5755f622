"""Distillation (edgelr.train: distill, convert, data, losses, qat, loop): onnx2torch conversion with trainable weights, training against the
ONNX teacher, exact resume, write-back into the student graph, and bad input.

Real components throughout: small models built with onnx.helper, ONNX Runtime, torch, onnx2torch;
the slow tests use the YOLOv8n detector nudenet ships and scikit-image's photos.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:  # not imported here: edgelr.train.distill imports it past torchvision
    pytest.skip("needs onnx2torch (pip install onnx2torch --no-deps)", allow_module_level=True)

from edgelr.errors import EdgelrError
from edgelr.train.convert import onnx_info, parameter_sources, to_torch
from edgelr.train.distill import DistillConfig, distill
from edgelr.train.losses import weights_outside_pairs

warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # onnx2torch's Slice, under new torch

OPSET = [helper.make_opsetid("", 17)]
SIZE = 16


# --- models and data ---------------------------------------------------------------------------
def _tiny(rng: np.random.Generator, name: str = "tiny") -> onnx.ModelProto:
    """x [N,3,16,16] -> Conv s2 -> BatchNorm -> SiLU -> Conv -> Relu -> two heads:
    'det' [N, 6, 64]: a 1x1 Conv head, channels 0..3 scaled x50 (box-like), 4..5 ~1 (score-like);
    'logits' [N, 5]: GlobalAveragePool -> Flatten -> Gemm(transB) -> Relu -> MatMul (Constant node) -> Add bias."""
    def w(*shape, scale=None):
        scale = scale if scale is not None else 1 / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else 1)
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {
        "w1": w(8, 3, 3, 3), "b1": w(8, scale=0.1),
        "bn_s": (1 + 0.1 * rng.standard_normal(8)).astype(np.float32), "bn_b": w(8, scale=0.1),
        "bn_m": w(8, scale=0.1), "bn_v": (1 + 0.1 * rng.random(8)).astype(np.float32),
        "w2": w(16, 8, 3, 3), "b2": w(16, scale=0.1),
        "w3": w(6, 16, 1, 1), "b3": w(6, scale=0.1),
        "shape": np.array([0, 6, -1], dtype=np.int64),
        "gain": np.array([50, 50, 50, 50, 1, 1], dtype=np.float32).reshape(1, 6, 1),
        "w4": w(10, 16), "b4": w(10, scale=0.1),
        "b5": w(5, scale=0.1),
    }
    const = numpy_helper.from_array(w(10, 5), "wc")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["n1"], name="bn1"),
        helper.make_node("Sigmoid", ["n1"], ["g1"], name="sig1"),
        helper.make_node("Mul", ["n1", "g1"], ["a1"], name="silu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["h"], name="head"),
        helper.make_node("Reshape", ["h", "shape"], ["r"], name="flat"),
        helper.make_node("Mul", ["r", "gain"], ["det"], name="gain"),
        helper.make_node("GlobalAveragePool", ["a2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["e"], name="fc1", transB=1),
        helper.make_node("Relu", ["e"], ["er"], name="relu3"),
        helper.make_node("Constant", [], ["wc_out"], name="wconst", value=const),
        helper.make_node("MatMul", ["er", "wc_out"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "b5"], ["logits"], name="fc2_bias"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
    outs = [helper.make_tensor_value_info("det", TensorProto.FLOAT, ["N", 6, 64]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])]
    inits = [numpy_helper.from_array(a, k) for k, a in weights.items()]
    model = helper.make_model(helper.make_graph(nodes, name, [x], outs, inits), opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _perturbed(model: onnx.ModelProto, rng: np.random.Generator, amount: float = 0.15) -> onnx.ModelProto:
    """The same graph with every float weight (initializers and the Constant) off by `amount` relative noise."""
    out = onnx.ModelProto()
    out.CopyFrom(model)

    def noisy(t):
        a = numpy_helper.to_array(t)
        if a.dtype != np.float32 or t.name.startswith("bn_") or t.name == "gain":
            return t
        return numpy_helper.from_array((a * (1 + amount * rng.standard_normal(a.shape))).astype(np.float32), t.name)

    new = [noisy(t) for t in out.graph.initializer]
    del out.graph.initializer[:]
    out.graph.initializer.extend(new)
    for node in out.graph.node:
        if node.op_type == "Constant":
            node.attribute[0].t.CopyFrom(noisy(node.attribute[0].t))
    return out


def _images(rng: np.random.Generator, count: int) -> np.ndarray:
    """Smooth random images (blobs, not white noise), [count, 3, 16, 16] in 0..1."""
    coarse = rng.random((count, 3, 4, 4)).astype(np.float32)
    return np.clip(coarse.repeat(4, axis=2).repeat(4, axis=3) + 0.05 * rng.standard_normal((count, 3, SIZE, SIZE)),
                   0, 1).astype(np.float32)


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    teacher = _tiny(rng)
    onnx.save(teacher, tmp_path / "teacher.onnx")
    onnx.save(_perturbed(teacher, rng), tmp_path / "student.onnx")
    np.savez(tmp_path / "data.npz", x=_images(rng, 24))
    np.savez(tmp_path / "eval.npz", x=_images(np.random.default_rng(99), 8))
    return tmp_path


def _run(tmp, out="out.onnx", **kw):
    """distill with a DistillConfig of KW (steps 6, batch 4, on the CPU unless KW says otherwise)."""
    kw.setdefault("steps", 6)
    kw.setdefault("batch", 4)
    kw.setdefault("device", "cpu")
    call = {k: kw.pop(k) for k in ("progress", "eval_samples", "task_loss") if k in kw}
    call.setdefault("progress", False)
    data = kw.pop("data", tmp / "data.npz")
    return distill(tmp / "teacher.onnx", tmp / "student.onnx", data, tmp / out, DistillConfig(**kw), **call)


def _weights(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


# --- to_torch ----------------------------------------------------------------------------------
def test_to_torch_matches_ort_and_every_weight_trains(tmp_path):
    onnx.save(_tiny(np.random.default_rng(1)), tmp_path / "m.onnx")
    module = to_torch(tmp_path / "m.onnx")
    info = onnx_info(module)
    assert set(info.params) == {"w1", "b1", "bn_s", "bn_b", "w2", "b2", "w3", "b3", "w4", "b4", "wc_out", "b5"}
    assert info.weights["wc_out"].kind == "constant" and info.weights["wc_out"].node == "wconst"
    assert info.weights["w4"].shape == (10, 16)  # the Gemm weight as ONNX stores it, not onnx2torch's alpha*B^T
    assert all(p.requires_grad for p in info.params.values())
    assert {p for p in module.parameters() if p.requires_grad} == set(info.params.values())  # BN stats stay fixed
    assert set(parameter_sources(module).values()) == set(info.weights.values())
    x = _images(np.random.default_rng(2), 3)
    want = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    assert isinstance(got, tuple) and len(got) == 2
    for a, b in zip(want, got):
        assert np.abs(a - b.numpy()).max() <= 1e-5 * np.abs(a).max()
    # gradients reach the weights onnx2torch would have kept as buffers (the MatMul's Constant)
    sum(o.square().sum() for o in module(torch.from_numpy(x))).backward()
    assert info.params["wc_out"].grad is not None and info.params["wc_out"].grad.abs().sum() > 0


def test_shared_weight_is_one_parameter(tmp_path):
    w = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="b")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=OPSET), tmp_path / "s.onnx")
    module = to_torch(tmp_path / "s.onnx")
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert len(trainable) == 1 and len(parameter_sources(module)) == 2  # two uses, one parameter
    x = torch.ones(2, 4)
    assert torch.allclose(module(x)[0], x @ torch.from_numpy(w) @ torch.from_numpy(w), rtol=1e-5)


def test_unsupported_op_names_it(tmp_path):
    nodes = [helper.make_node("Hardmax", ["x"], ["y"], name="hm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    onnx.save(helper.make_model(graph, opset_imports=OPSET), tmp_path / "h.onnx")
    with pytest.raises(EdgelrError, match="Hardmax"):
        to_torch(tmp_path / "h.onnx")


def test_torchvision_placeholder_is_gone_but_explains(tmp_path):
    onnx.save(_tiny(np.random.default_rng(1)), tmp_path / "m.onnx")
    to_torch(tmp_path / "m.onnx")
    nms = sys.modules["onnx2torch.node_converters.nms"]
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001  (missing, or broken with this torch: the case the placeholder is for)
        assert "torchvision" not in sys.modules and "torchvision.ops" not in sys.modules
        with pytest.raises(EdgelrError, match="torchvision"):
            nms.torchvision.ops.nms  # noqa: B018
    else:
        pytest.skip("a working torchvision is installed")


# --- distill -----------------------------------------------------------------------------------
def test_distill_lowers_the_error_and_writes_the_same_graph(pair):
    result = _run(pair, steps=40, batch=8, lr=3e-3, eval_samples=pair / "eval.npz")
    before, after = result["error_before"]["worst"], result["error_after"]["worst"]
    assert after < 0.6 * before, (before, after)
    assert result["steps"] == 40 and not result["stopped_early"]
    assert result["losses"][-1][1] < result["losses"][0][1]
    assert all(v <= 1e-4 for v in result["parity"].values()) and set(result["parity"]) == {"det", "logits"}
    student, written = onnx.load(str(pair / "student.onnx")), onnx.load(str(pair / "out.onnx"))
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in written.graph.node] == \
           [(n.name, n.op_type, list(n.input), list(n.output)) for n in student.graph.node]
    assert [t.name for t in written.graph.initializer] == [t.name for t in student.graph.initializer]
    old, new = _weights(pair / "student.onnx"), _weights(pair / "out.onnx")
    assert not np.array_equal(old["wc_out"], new["wc_out"])  # the Constant node's value was trained
    assert not np.array_equal(old["w4"], new["w4"])
    for fixed in ("bn_m", "bn_v", "shape", "gain"):  # statistics and non-weights untouched
        assert np.array_equal(old[fixed], new[fixed])


def test_distill_a_factorized_student(tmp_path):
    """A student with other nodes (edgelr.api's factorization) and the teacher's inputs and outputs."""
    from edgelr import FactorizeConfig, compress

    rng = np.random.default_rng(5)
    onnx.save(_tiny(rng), tmp_path / "teacher.onnx")
    np.savez(tmp_path / "data.npz", x=_images(rng, 24))
    compress(tmp_path / "teacher.onnx", tmp_path / "student.onnx", FactorizeConfig(ranks={"conv2": 3, "fc1": 3}),
             calib=tmp_path / "data.npz", progress=False, max_output_error=1.0)  # rank 3: far off, for training to fix
    assert len(onnx.load(str(tmp_path / "student.onnx")).graph.node) > len(onnx.load(str(tmp_path / "teacher.onnx")).graph.node)
    result = _run(tmp_path, steps=30, batch=8, lr=3e-3, eval_samples=tmp_path / "data.npz")
    assert result["error_after"]["worst"] < result["error_before"]["worst"]
    aligned = _run(tmp_path, "aligned.onnx", steps=30, batch=8, lr=3e-3, eval_samples=tmp_path / "data.npz",
                   features="factorized", feature_weight=0.1)  # each pair towards the layer it replaced
    assert aligned["error_after"]["worst"] < aligned["error_before"]["worst"]
    assert aligned["final_loss"] > result["final_loss"]  # the pairs' terms are in the loss
    others = weights_outside_pairs(tmp_path / "student.onnx")
    pairs = {t.name for t in onnx.load(str(tmp_path / "student.onnx")).graph.initializer} - set(others)
    assert others and pairs and all("lowrank" in name for name in pairs)
    _run(tmp_path, "pairs.onnx", steps=5, batch=8, lr=3e-3, freeze=others)
    before, after = _weights(tmp_path / "student.onnx"), _weights(tmp_path / "pairs.onnx")
    assert all(np.array_equal(before[n], after[n]) for n in others)
    assert any(not np.array_equal(before[n], after[n]) for n in pairs)


def test_lr_scale_slows_or_stops_the_weights_it_names(pair):
    old = _weights(pair / "student.onnx")
    _run(pair, "scaled.onnx", steps=10, batch=8, lr=3e-3, lr_scale={"w4": 0.0, "wc_*": 0.1})
    _run(pair, "plain.onnx", steps=10, batch=8, lr=3e-3)
    scaled, plain = _weights(pair / "scaled.onnx"), _weights(pair / "plain.onnx")
    assert np.array_equal(scaled["w4"], old["w4"]) and not np.array_equal(plain["w4"], old["w4"])
    slow = np.abs(scaled["wc_out"] - old["wc_out"]).max()  # a Constant node's weight, by its value's name
    assert 0 < slow < 0.5 * np.abs(plain["wc_out"] - old["wc_out"]).max()
    with pytest.raises(EdgelrError, match="lr_scale"):
        _run(pair, "bad.onnx", lr_scale={"w4": -1})
    assert not (pair / "bad.onnx").exists()


def test_factorized_features_need_a_factorized_student(pair):
    with pytest.raises(EdgelrError, match="no factorized pairs"):
        _run(pair, features="factorized")
    with pytest.raises(EdgelrError, match="'factorized'"):
        _run(pair, features="all")
    assert not (pair / "out.onnx").exists()


class _Interrupt(Exception):
    pass


def _crash_hook():
    """A task_loss that adds nothing and raises _Interrupt after calls["stop_at"] forwards (a crash)."""
    calls = {"n": 0, "stop_at": None}

    def hook(outputs, indices):
        calls["n"] += 1
        if calls["stop_at"] is not None and calls["n"] > calls["stop_at"]:
            raise _Interrupt
        return outputs["logits"].sum() * 0.0

    return calls, hook


def test_deterministic_and_resume_is_bit_identical(pair):
    calls, hook = _crash_hook()

    common = {"steps": 6, "checkpoint_every": 3, "task_loss": hook, "lr": 1e-3}
    _run(pair, "a.onnx", checkpoint=pair / "a.ckpt", **common)
    _run(pair, "b.onnx", checkpoint=pair / "b.ckpt", **common)
    calls.update(n=0, stop_at=4)  # one forward per step: dies during step 5, after the checkpoint at step 3
    with pytest.raises(_Interrupt):
        _run(pair, "c.onnx", checkpoint=pair / "c.ckpt", **common)
    assert not (pair / "c.onnx").exists()
    assert torch.load(pair / "c.ckpt", weights_only=True)["step"] == 3
    calls.update(n=0, stop_at=None)
    resumed = _run(pair, "c.onnx", checkpoint=pair / "c.ckpt", resume=True, **common)
    assert resumed["resumed_from"] == 3 and resumed["steps_this_run"] == 3 and resumed["steps"] == 6

    states = [torch.load(pair / f"{k}.ckpt", weights_only=True) for k in "abc"]
    for s in states[1:]:
        assert s["module"].keys() == states[0]["module"].keys()
        for key, value in states[0]["module"].items():
            assert torch.equal(value, s["module"][key]), key
        assert s["losses"] == states[0]["losses"]
    files = [_weights(pair / f"{k}.onnx") for k in "abc"]
    for f in files[1:]:
        assert all(np.array_equal(files[0][k], f[k]) for k in files[0])
    assert not np.array_equal(files[0]["w2"], _weights(pair / "student.onnx")["w2"])

    other = _run(pair, "d.onnx", seed=1, steps=6, lr=1e-3)
    assert not np.array_equal(_weights(pair / "d.onnx")["w2"], files[0]["w2"])
    assert other["steps"] == 6


def test_quantization_aware_rounds_as_onnx_runtime_uint8():
    from edgelr.train.qat import fake_quantize_inputs, round_input

    conv = torch.nn.Conv2d(3, 4, 3)
    hooks = fake_quantize_inputs(conv)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    conv(x)  # the range the input reached: min..max, widened to hold 0
    low, high = conv.edgelr_input_range.tolist()
    assert low == pytest.approx(x.min().item()) and high == pytest.approx(x.max().item())
    scale = np.float32((high - low) / 255)
    zero = np.uint8(round(-low / scale))
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(zero), "z")])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    want = session.run(None, {"x": x.numpy()})[0]
    x.requires_grad_(True)
    got = round_input(conv, (x,))[0]
    assert np.abs(got.detach().numpy() - want).max() <= 1e-5 * (high - low)
    assert not torch.equal(got, x)
    got.sum().backward()  # straight through: the rounding passes gradients unchanged
    assert torch.equal(x.grad, torch.ones_like(x))
    for hook in hooks:
        hook.remove()
    assert torch.equal(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias))


def test_quantization_aware_resume_is_bit_identical_and_saves_float(pair):
    calls, hook = _crash_hook()
    common = {"steps": 6, "checkpoint_every": 3, "task_loss": hook, "lr": 1e-3, "quantization_aware": True}
    plain = _run(pair, "a.onnx", checkpoint=pair / "a.ckpt", **common)
    assert all(v <= 1e-4 for v in plain["parity"].values())  # the saved float model is the torch one, unrounded
    calls.update(n=0, stop_at=4)
    with pytest.raises(_Interrupt):
        _run(pair, "b.onnx", checkpoint=pair / "b.ckpt", **common)
    calls.update(n=0, stop_at=None)
    _run(pair, "b.onnx", checkpoint=pair / "b.ckpt", resume=True, **common)
    a, b = _weights(pair / "a.onnx"), _weights(pair / "b.onnx")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    _run(pair, "c.onnx", **{k: v for k, v in common.items() if k != "quantization_aware"})
    assert not np.array_equal(_weights(pair / "c.onnx")["w2"], a["w2"])  # the rounding changed the training


def test_quantization_aware_needs_a_conv_or_gemm(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    for name in ("teacher", "student"):
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / f"{name}.onnx")
    np.savez(tmp_path / "data.npz", x=np.ones((8, 4), np.float32))
    with pytest.raises(EdgelrError, match="quantization_aware needs a Conv or Gemm"):
        _run(tmp_path, steps=2, quantization_aware=True)
    assert not (tmp_path / "out.onnx").exists()


def test_resume_refuses_another_runs_checkpoint(pair):
    _run(pair, "a.onnx", steps=2, checkpoint=pair / "a.ckpt")
    with pytest.raises(EdgelrError, match="another run"):
        _run(pair, "b.onnx", steps=2, batch=2, checkpoint=pair / "a.ckpt", resume=True)
    assert not (pair / "b.onnx").exists()


def test_time_limit_stops_cleanly_and_still_writes(pair):
    result = _run(pair, steps=10_000, time_limit=0.0)
    assert result["stopped_early"] and result["steps"] == 0 and (pair / "out.onnx").exists()


def test_features_align_intermediate_tensors(pair):
    result = _run(pair, steps=3, features=[("a2", "a2")], feature_weight=0.5)
    assert result["steps"] == 3 and (pair / "out.onnx").exists()
    with pytest.raises(EdgelrError, match="nowhere"):
        _run(pair, "x.onnx", steps=3, features=[("nowhere", "a2")])
    assert not (pair / "x.onnx").exists()


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


def test_image_folder_default_yolo_preprocessing(pair):
    rng = np.random.default_rng(7)
    folder = pair / "photos"
    folder.mkdir()
    for i, (h, w) in enumerate([(40, 60), (64, 32), (30, 30)]):
        _save_png(folder / f"p{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image: ignored")
    result = _run(pair, data=folder, steps=3, eval_samples=folder)
    assert result["steps"] == 3 and result["error_after"]["worst"] > 0

    # the preprocessing: letterboxed with grey 114 / 255 (YOLO's) where the image does not reach
    from edgelr.io.model import load
    from edgelr.train.data import load_data

    data = load_data(folder, load(pair / "teacher.onnx"))
    plain = data.batch(np.array([0]), None)["x"]
    assert plain.shape == (1, 3, SIZE, SIZE)
    assert np.allclose(plain[0, :, 0, :], 114 / 255)  # a 40x60 photo leaves the top rows grey
    augmented = data.batch(np.array([0, 0]), np.random.default_rng(0))["x"]
    assert not np.array_equal(augmented[0], augmented[1])


def test_preprocess_spec_from_the_folder(pair):
    folder = pair / "photos"
    folder.mkdir()
    _save_png(folder / "a.png", np.full((16, 16, 3), 200, dtype=np.uint8))
    (folder / "preprocess.json").write_text('{"letterbox": false, "mean": 0.5, "std": 0.25, "channel_order": "BGR"}')
    from edgelr.io.model import load
    from edgelr.train.data import load_data

    x = load_data(folder, load(pair / "teacher.onnx")).batch(np.array([0]), None)["x"]
    assert np.allclose(x, (200 / 255 - 0.5) / 0.25, atol=1e-5)


def _photo_folder(pair, count: int = 4) -> Path:
    rng = np.random.default_rng(11)
    folder = pair / "photos"
    folder.mkdir()
    for i in range(count):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        _save_png(folder / f"p{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return folder


def test_strong_augmentation_is_seeded_varied_and_in_range(pair):
    from edgelr.io.model import load
    from edgelr.train.data import Augment, hue_matrix, load_data

    data = load_data(_photo_folder(pair), load(pair / "teacher.onnx"))
    data.strong = Augment(mosaic=0.5, mixup=0.5)
    idx = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    a = data.batch(idx, np.random.default_rng([0, 5, 1]))["x"]
    b = data.batch(idx, np.random.default_rng([0, 5, 1]))["x"]
    c = data.batch(idx, np.random.default_rng([0, 6, 1]))["x"]
    assert a.shape == (8, 3, SIZE, SIZE) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # a pure function of the generator
    assert a.min() >= 0 and a.max() <= 1
    assert not np.array_equal(a[0], a[4])  # the same photo twice in a batch: two different views
    plain = data.batch(np.array([0]), None)["x"]  # no generator: the plain letterboxed photo, as before
    assert np.array_equal(plain, load_data(pair / "photos", load(pair / "teacher.onnx")).batch(np.array([0]), None)["x"])
    hue = hue_matrix(1.0)
    assert np.allclose(hue @ np.ones(3), 1, atol=1e-5)  # a hue rotation keeps greys grey
    with pytest.raises(EdgelrError, match="augment"):
        _run(pair, data=pair / "photos", augment="heavy")


def test_strong_augmentation_gives_grey_photos_colour():
    from edgelr.train.data import Augment, colour

    grey = np.repeat(np.linspace(0, 255, 64, dtype=np.float32).reshape(8, 8, 1), 3, axis=2)
    rng = np.random.default_rng(3)
    casts = [colour(grey, rng, Augment(grey=0.0)) for _ in range(8)]
    assert all(x.shape == (3, 8, 8) and x.min() >= 0 and x.max() <= 255 for x in casts)
    assert all(np.abs(x[0] - x[2]).max() > 1 for x in casts)  # a colour cast: the channels part
    untinted = colour(grey, rng, Augment(grey=0.0, tint=0.0))
    assert np.abs(untinted[0] - untinted[2]).max() < 1e-3  # brightness, contrast, saturation, hue keep grey grey


def test_strong_augmentation_bf16_resume_bit_identical(pair):
    calls, hook = _crash_hook()

    folder = _photo_folder(pair)
    common = {"data": folder, "steps": 4, "checkpoint_every": 2, "augment": "strong", "train_precision": "bf16",
              "lr": 1e-3, "task_loss": hook}
    first = _run(pair, "a.onnx", checkpoint=pair / "a.ckpt", **common)
    assert first["steps"] == 4 and all(v <= 1e-4 for v in first["parity"].values())  # saved float32, same outputs
    state = torch.load(pair / "a.ckpt", weights_only=True)
    assert state["meta"]["precision"] == "bf16" and "Augment(" in state["meta"]["augment"]
    calls.update(n=0, stop_at=3)  # dies during step 4, after the checkpoint at step 2
    with pytest.raises(_Interrupt):
        _run(pair, "b.onnx", checkpoint=pair / "b.ckpt", **common)
    calls.update(n=0, stop_at=None)
    resumed = _run(pair, "b.onnx", checkpoint=pair / "b.ckpt", resume=True, **common)
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
    files = [_weights(pair / f"{k}.onnx") for k in "ab"]
    assert all(np.array_equal(files[0][k], files[1][k]) for k in files[0])
    assert not np.array_equal(files[0]["w2"], _weights(pair / "student.onnx")["w2"])
    with pytest.raises(EdgelrError, match="another run"):  # a checkpoint made with another augmentation
        _run(pair, "c.onnx", checkpoint=pair / "a.ckpt", resume=True, **{**common, "augment": True})
    with pytest.raises(EdgelrError, match="DistillConfig.train_precision"):
        _run(pair, "d.onnx", **{**common, "train_precision": "fp16"})


def test_scores_are_compared_by_binary_kl(pair):
    from edgelr.train.losses import binary_kl, output_loss, output_scales

    logits = torch.tensor([-8.0, -2.0, 0.5, 3.0])
    p = torch.sigmoid(logits)
    q_logits = (logits + torch.tensor([1.0, -0.5, 0.2, 0.0])).requires_grad_()
    kl = binary_kl(p, torch.sigmoid(q_logits))
    assert float(binary_kl(p, p)) == pytest.approx(0.0, abs=1e-7) and float(kl.detach()) > 0
    kl.backward()
    assert torch.allclose(q_logits.grad, (torch.sigmoid(q_logits) - p).detach() / 4, atol=1e-6)  # the logit's distance

    teacher = np.concatenate([np.full((2, 4, 5), 100.0), np.full((2, 2, 5), 0.01)], axis=1).astype(np.float32)
    scale = output_scales([[teacher]], None, scores=(4, None))[0]
    assert float(scale) == pytest.approx(100.0)  # the scores stay out of the boxes' scale
    t = torch.from_numpy(teacher)
    student = t.clone()
    student[:, 4:] = 0.02
    loss = output_loss(student, t, torch.from_numpy(scale), (4, None), 25.0)
    assert float(loss) == pytest.approx(25 * float(binary_kl(t[:, 4:], student[:, 4:])), rel=1e-5)

    result = _run(pair, steps=3, scores=(4, None), score_weight=25.0)
    assert result["steps"] == 3 and np.isfinite(result["final_loss"])
    with pytest.raises(EdgelrError, match="scores"):
        _run(pair, "x.onnx", steps=3, scores=4)


def test_each_channel_group_weighs_alike_in_the_loss():
    from edgelr.core.objective import Objective as Groups
    from edgelr.train.losses import output_loss, output_scales

    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 320, (2, 4, 50))
    classes = rng.uniform(0, 1e-2, (2, 18, 50))
    classes[:, 5] = 1e-3  # a class rarely lit: its group's scale, not its own, divides it
    teacher = np.concatenate([boxes, classes], axis=1).astype(np.float32)
    groups = Groups.of([{"y": teacher}]).groups
    assert [g.name for g in groups] == ["y[0:4]", "y[4:22]"]
    scale = torch.from_numpy(output_scales([[teacher]], [groups])[0])
    assert tuple(scale.shape) == (1, 22, 1)
    t = torch.from_numpy(teacher)
    wrong_classes, wrong_boxes = t.clone(), t.clone()
    wrong_classes[:, 4:] = 0
    wrong_boxes[:, :4] = 0
    # zeroing either head is a relative error of 1 on that group: the same loss, 1/2 (of two groups)
    assert float(output_loss(wrong_classes, t, scale)) == pytest.approx(0.5, rel=1e-4)
    assert float(output_loss(wrong_boxes, t, scale)) == pytest.approx(0.5, rel=1e-4)
    whole = torch.from_numpy(output_scales([[teacher]], None)[0])
    assert float(output_loss(wrong_classes, t, whole)) < 1e-8  # one scale for both cannot see the classes


def test_anneal_by_time_decays_to_zero_at_the_limit():
    from edgelr.train.loop import schedule

    spent = [0.0]
    factor = schedule(1000, 10, clock=lambda: spent[0])
    assert factor(0) == pytest.approx(0.1) and factor(50) == pytest.approx(schedule(1000, 10)(50))
    spent[0] = 0.5
    assert factor(50) == pytest.approx(0.5)  # half the time gone: the cosine's midpoint, whatever the step
    spent[0] = 1.2
    assert factor(60) == 0.0


def test_time_limit_with_anneal_by_time_still_writes(pair):
    result = _run(pair, steps=10_000, time_limit=1.0, anneal_by_time=True)
    assert result["stopped_early"] and 0 < result["steps"] < 10_000 and (pair / "out.onnx").exists()


# --- bad input ---------------------------------------------------------------------------------
def _bad_student(tmp, change: str) -> None:
    model = _tiny(np.random.default_rng(0))
    if change == "input":
        model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32
    elif change == "output":
        model.graph.output[1].name = "scores"
        model.graph.node[-1].output[0] = "scores"
    onnx.save(model, tmp / "student.onnx")


@pytest.mark.parametrize("case, match", [
    ("empty folder", "no images"),
    ("corrupt image", "broken.png"),
    ("student input", "input 'x' has shape"),
    ("student output", "outputs"),
    ("npz missing input", "missing"),
    ("no steps", "how long"),
    ("zero steps", "positive"),
    ("negative epochs", "positive"),
    ("both", "not both"),
    ("out is student", "input"),
    ("out is teacher", "input"),
])
def test_bad_input(pair, case, match):
    kw: dict = {}
    out = "out.onnx"
    if case == "empty folder":
        (pair / "empty").mkdir()
        kw["data"] = pair / "empty"
    elif case == "corrupt image":
        (pair / "imgs").mkdir()
        _save_png(pair / "imgs" / "fine.png", np.zeros((8, 8, 3), np.uint8))
        (pair / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
        kw["data"] = pair / "imgs"
    elif case == "student input":
        _bad_student(pair, "input")
    elif case == "student output":
        _bad_student(pair, "output")
    elif case == "npz missing input":
        np.savez(pair / "wrong.npz", y=_images(np.random.default_rng(0), 4))
        kw["data"] = pair / "wrong.npz"
    elif case == "no steps":
        kw["steps"] = None
    elif case == "zero steps":
        kw["steps"] = 0
    elif case == "negative epochs":
        kw.update(steps=None, epochs=-1)
    elif case == "both":
        kw.update(steps=3, epochs=1)
    elif case == "out is student":
        out = "student.onnx"
    elif case == "out is teacher":
        out = "teacher.onnx"
    before = {p.name: p.read_bytes() for p in pair.glob("*.onnx")}
    with pytest.raises(EdgelrError, match=match) as caught:
        _run(pair, out, **kw)
    assert "\n" not in str(caught.value)
    assert not (pair / "out.onnx").exists()
    assert {p.name: p.read_bytes() for p in pair.glob("*.onnx")} == before


# --- YOLOv8n -----------------------------------------------------------------------------------
def _yolo() -> Path:
    nudenet = pytest.importorskip("nudenet")
    return Path(nudenet.__file__).parent / "320n.onnx"


@pytest.mark.slow
def test_yolo_to_torch_matches_ort():
    path = _yolo()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.data import HELD_OUT, samples

    module = to_torch(path)
    info = onnx_info(module)
    conv_weights = [n.input[1] for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    assert len(conv_weights) == 64 and all(info.params[w].requires_grad for w in conv_weights)
    x = samples(HELD_OUT[:2], 320, crops=0)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(x))[0].numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.slow
def test_yolo_factorized_distilled_on_photos(tmp_path):
    """YOLOv8n factorized to half its conv parameters, then distilled on real photos from an image folder."""
    from edgelr import FactorizeConfig, compress

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.data import CALIBRATION, HELD_OUT, photo, samples

    path = _yolo()
    np.savez(tmp_path / "calib.npz", images=samples(CALIBRATION[:4], 320, crops=1))
    np.savez(tmp_path / "heldout.npz", images=samples(HELD_OUT[:2], 320, crops=0))
    compress(path, tmp_path / "small.onnx", FactorizeConfig(params=0.5), calib=tmp_path / "calib.npz", progress=False)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in CALIBRATION[:6]:
        _save_png(folder / f"{name}.png", photo(name))
    (folder / "preprocess.json").write_text('{"size": 320}')  # this model's input size is dynamic
    result = distill(path, tmp_path / "small.onnx", folder, tmp_path / "tuned.onnx",
                     DistillConfig(steps=10, batch=4, device="cpu"), progress=False,
                     eval_samples=tmp_path / "heldout.npz")
    assert result["steps"] == 10 and np.isfinite(result["final_loss"])
    assert result["parity"]["output0"] <= 1e-4
    assert result["error_after"]["worst"] < 2 * result["error_before"]["worst"]  # 10 steps: sane, not yet better
    small, tuned = onnx.load(str(tmp_path / "small.onnx")), onnx.load(str(tmp_path / "tuned.onnx"))
    assert [n.name for n in tuned.graph.node] == [n.name for n in small.graph.node]


# --- the command line ---------------------------------------------------------------------------------------
def test_distill_from_the_command_line(pair):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edgelr", "-q", "distill", str(pair / "teacher.onnx"),
                               str(pair / "student.onnx"), *args], capture_output=True, text=True)

    done = cli("--data", str(pair / "data.npz"), "-o", str(pair / "cli.onnx"), "--steps", "20", "--batch", "4",
               "--lr", "3e-3", "--eval", str(pair / "eval.npz"))
    assert done.returncode == 0, done.stderr
    import re

    before, after = (float(x) for x in re.search(r"error: ([\d.]+) before, ([\d.]+) after", done.stdout).groups())
    assert after < before and "20 steps" in done.stdout and (pair / "cli.onnx").exists()
    (pair / "empty").mkdir()
    bad = cli("--data", str(pair / "empty"), "-o", str(pair / "bad.onnx"), "--steps", "5")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert not (pair / "bad.onnx").exists()
    assert cli("--data", str(pair / "data.npz"), "-o", str(pair / "bad.onnx")).returncode == 2  # no --steps/--epochs
    options = cli("--data", str(pair / "data.npz"), "-o", str(pair / "opts.onnx"), "--steps", "2", "--augment", "none",
                  "--train-precision", "bf16", "--quantization-aware")
    assert options.returncode == 0, options.stderr
    # --precision is export's deployed format; distill's training compute is --train-precision
    wrong = cli("--data", str(pair / "data.npz"), "-o", str(pair / "bad.onnx"), "--steps", "2", "--precision", "bf16")
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "--train-precision" in wrong.stderr
    zero = cli("--data", str(pair / "data.npz"), "-o", str(pair / "bad.onnx"), "--steps", "2", "--batch", "0")
    assert zero.returncode == 1 and "--batch must be >= 1" in zero.stderr and zero.stderr.count("\n") == 1
    unfactorized = cli("--data", str(pair / "data.npz"), "-o", str(pair / "bad.onnx"), "--steps", "2", "--align-factorized")
    assert unfactorized.returncode == 1 and "no factorized pairs" in unfactorized.stderr
    both = cli("--data", str(pair / "data.npz"), "-o", str(pair / "bad.onnx"), "--steps", "2", "--align-factorized",
               "--feature", "a2")
    assert both.returncode == 2 and not (pair / "bad.onnx").exists()


def test_a_worse_student_is_not_written_unless_asked(pair):
    """With eval samples, training that raises the held-out error writes the student unchanged (and says so);
    keep_worse writes the trained one. A learning rate of 3 wrecks this student in a few steps."""
    wrecked = _run(pair, "kept.onnx", lr=3.0, eval_samples=pair / "eval.npz")
    assert wrecked["error_after"]["worst"] > wrecked["error_before"]["worst"] and wrecked["kept"] == "student"
    assert all(np.array_equal(a, _weights(pair / "kept.onnx")[k]) for k, a in _weights(pair / "student.onnx").items())
    forced = _run(pair, "forced.onnx", lr=3.0, keep_worse=True, eval_samples=pair / "eval.npz")
    assert forced["kept"] == "trained"
    assert any(not np.array_equal(a, _weights(pair / "forced.onnx")[k]) for k, a in _weights(pair / "student.onnx").items())
