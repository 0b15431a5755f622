"""Layer sensitivity: the probing surgery is exact, and weighting by it predicts and lowers whole-model error."""

from __future__ import annotations

import math

import graphs
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgelr import FactorizeConfig, compress
from edgelr.calibration.sensitivity import _add_probe
from edgelr.graph.layers import find_layers


def _run(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([o.name for o in session.get_outputs()], feed)


@pytest.mark.parametrize("name, build", [
    ("mlp", lambda rng: graphs.mlp(rng)),                       # MatMul, Gemm transB + alpha + Constant weight
    ("convnet", lambda rng: graphs.convnet(rng)),               # Conv with auto_pad, dilations; the output layer
    ("shared", lambda rng: graphs.shared_matmul(rng, rows=3, seq=2, k=6, n=5)),   # one weight, two nodes
    ("gemm9", lambda rng: graphs.gemm(rng, 4, 12, 10, opset=9, bias="1d", trans_b=1)),  # C required before 11
])
def test_a_probe_adds_exactly_the_layers_weight_change(name, build):
    """Closed gates: the model's own outputs. One open gate: the model with that weight plus delta."""
    rng = np.random.default_rng(0)
    built = build(rng)
    feed = built.inputs(rng)
    base = _run(built.proto, feed)
    for target in [layer.name for layer in find_layers(built.ir())[0]]:
        model = built.ir()
        layer = next(layer for layer in find_layers(model)[0] if layer.name == target)
        stored = layer.weight_array()
        delta = rng.standard_normal(stored.shape).astype(stored.dtype) * 0.1
        gate = _add_probe(model.graph, layer, delta, 0)
        probed = ir.to_proto(model)
        closed = _run(probed, feed | {gate: np.zeros((), np.float32)})
        opened = _run(probed, feed | {gate: np.ones((), np.float32)})
        for a, b in zip(closed, base):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        changed = built.ir()
        weight = next(layer for layer in find_layers(changed)[0] if layer.name == target).weight
        if weight.producer() is not None:  # a Constant node's weight
            weight.producer().attributes["value"] = ir.AttrTensor("value", ir.tensor(stored + delta))
        else:
            weight.const_value = ir.tensor(stored + delta)
        for a, b in zip(opened, _run(ir.to_proto(changed), feed)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        assert [o.name for o in probed.graph.output] == [o.name for o in built.proto.graph.output]


@pytest.mark.slow
def test_weighted_allocation_predicts_and_lowers_the_whole_model_error(tmp_path):
    """YOLOv8n at half the FLOPs: weighted, the predicted error is the measured one (first order) and
    held-out error drops well below the unweighted allocation's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgelr.io.model import load
    from edgelr.io.samples import load_samples
    from edgelr.measure.verify import output_error
    from models.data import CALIBRATION, HELD_OUT, samples, yolo_path

    np.savez(tmp_path / "calib.npz", images=samples(CALIBRATION[:6], 320, 2, seed=0))
    np.savez(tmp_path / "held.npz", images=samples(HELD_OUT, 320, 1, seed=1))
    held = load_samples(tmp_path / "held.npz", load(yolo_path()))
    errors = {}
    for weighted in (False, True):
        out = tmp_path / f"{weighted}.onnx"
        done = compress(yolo_path(), out, FactorizeConfig(flops=0.6, sensitivity=weighted), calib=tmp_path / "calib.npz", metric="none",
                        progress=False, max_output_error=math.inf)  # the errors are what this test compares
        errors[weighted] = output_error(yolo_path(), out, held)["worst"]
        if weighted:
            assert done.result.weighted
            predicted = done.result.predicted_error2 ** 0.5
            assert 0.5 < predicted / done.output_error["worst"] < 2.0
    assert errors[True] < 0.8 * errors[False]
