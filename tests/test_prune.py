"""Structured channel pruning (edgelr.passes.prune) on real models, run in real ONNX Runtime sessions.

- ratio 0 changes nothing: YOLOv8n (the detector nudenet ships), a torch ResNet (residual adds,
  BatchNorm, a Linear head) and a torch TransformerEncoderLayer give bit-identical outputs;
- ratio 0.5 gives valid models (ONNX checker with strict shape inference, ORT runs) with the same
  output shapes and fewer parameters, channel counts rounded to multiples of 8, and residual groups
  that keep one channel set;
- exactness: channels whose weights are zero are the ones removed, and the outputs do not move
  (a hand-built graph with BatchNorm, Concat, Split, a per-channel Mul and a depthwise conv; and
  factorized pairs whose inner rank is larger than the weight's true rank).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import graphs as G
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

from edgelr.errors import EdgelrError
from edgelr.io.model import ort_session
from edgelr.io.samples import samples_from_arrays
from edgelr.passes.factorize import FactorizeConfig, factorize
from edgelr.passes.prune import PruneResult, prune


# --- models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolo() -> Path:
    nudenet = pytest.importorskip("nudenet")
    return Path(nudenet.__file__).parent / "320n.onnx"


def _export(net, args, path: Path, names: dict, dynamic: dict, **kw) -> Path:
    import torch

    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, args, str(path), dynamo=False, opset_version=17, input_names=names["in"],
            output_names=names["out"], dynamic_axes=dynamic, **kw,
        )
    return path


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> Path:
    """Two stages of basic blocks (conv-BN-relu-conv-BN + identity or 1x1 conv-BN shortcut), global pool,
    Flatten, Linear. BatchNorm stays a node (TrainingMode.PRESERVE on an eval model), with random
    statistics so it is not an identity."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.layers = nn.Sequential(Block(16, 16), Block(16, 16), Block(16, 32, 2), Block(32, 32))
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    net = ResNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("prune") / "resnet.onnx"
    return _export(net.eval(), (torch.randn(2, 3, 16, 16),), path, {"in": ["x"], "out": ["y"]},
                   {"x": {0: "batch"}, "y": {0: "batch"}}, training=torch.onnx.TrainingMode.PRESERVE)


@pytest.fixture(scope="module")
def transformer(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.layer(x))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("prune") / "encoder.onnx"
    return _export(Encoder().eval(), (torch.randn(2, 7, 32),), path, {"in": ["x"], "out": ["y"]},
                   {"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}})


def feeds(kind: str, seed: int = 0, count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    if kind == "yolo":
        return [{"images": rng.random((1, 3, 320, 320), dtype=np.float32)} for _ in range(count)]
    if kind == "resnet":
        return [{"x": rng.standard_normal((b, 3, 16, 16)).astype(np.float32)} for b in (1, 3, 2)[:count]]
    return [{"x": rng.standard_normal((b, s, 32)).astype(np.float32)} for b, s in ((1, 7), (3, 7), (2, 7))[:count]]  # the trace fixes the length


@pytest.fixture(scope="module")
def models(yolo, resnet, transformer) -> dict[str, Path]:
    return {"yolo": yolo, "resnet": resnet, "transformer": transformer}


def run(model: ir.Model, feed_list: list[dict]) -> list[list[np.ndarray]]:
    with ort_session(model) as session:
        return [session.run(None, feed) for feed in feed_list]


def checked(model: ir.Model) -> ir.Model:
    """The ONNX checker with strict shape inference: stale shapes of pruned tensors fail here."""
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    return model


def relative_error(outs, refs) -> float:
    num = sum(float(np.sum((o - r) ** 2)) for out, ref in zip(outs, refs) for o, r in zip(out, ref))
    den = sum(float(np.sum(r**2)) for ref in refs for r in ref)
    return (num / den) ** 0.5


def weight(model: ir.Model, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph if n.name == node_name)
    return ir.convenience.get_const_tensor(node.inputs[index]).numpy()


# --- ratio 0: nothing changes --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["yolo", "resnet", "transformer"])
def test_ratio_zero_is_identical(models, kind):
    path = models[kind]
    inputs = feeds(kind)
    refs = run(ir.load(path), inputs)
    model = ir.load(path)
    result = prune(model, 0.0, progress=False)
    assert isinstance(result, PruneResult)
    assert result.pruned == [] and result.params_after == result.params_before
    outs = run(checked(model), inputs)
    for out, ref in zip(outs, refs):
        assert [o.shape for o in out] == [r.shape for r in ref]
        assert all(np.array_equal(o, r) for o, r in zip(out, ref))


# --- ratio 0.5: valid, smaller, same interface ------------------------------------------------
@pytest.mark.parametrize("kind,data_aware", [("yolo", False), ("yolo", True), ("resnet", False), ("resnet", True),
                                             ("transformer", False)])
def test_half_ratio_gives_a_smaller_valid_model(models, kind, data_aware):
    path = models[kind]
    inputs = feeds(kind, seed=1)
    refs = run(ir.load(path), inputs)
    model = ir.load(path)
    samples = None
    if data_aware:
        calib = feeds(kind, seed=2, count=2)
        name = next(iter(calib[0]))
        samples = samples_from_arrays({name: np.stack([f[name][0] for f in calib])}, model)
    result = prune(model, 0.5, samples, progress=False)
    assert result.data_aware is data_aware
    assert result.params_after < result.params_before
    assert result.pruned  # the transformer's feed-forward width, the CNNs' convs
    if kind in ("yolo", "resnet"):
        assert len(result.pruned) >= 5
    for group in result.pruned:
        assert group.channels_after % 8 == 0 and 8 <= group.channels_after < group.channels_before
        assert group.channels_after >= group.channels_before // 2
    outs = run(checked(model), inputs)
    for out, ref in zip(outs, refs):
        assert [o.shape for o in out] == [r.shape for r in ref]
        assert all(np.isfinite(o).all() for o in out)
    assert relative_error(outs, refs) < 1.0  # a pruned model, not garbage (measured ~0.13 on YOLO)


def test_yolo_groups_follow_the_graph(yolo):
    model = ir.load(yolo)
    result = prune(model, 0.5, progress=False)
    names = [g.producers for g in result.groups]
    # C2f with shortcuts: the second half of cv1's channels is added to every bottleneck's output
    assert ["/model.4/cv1/conv/Conv", "/model.4/m.0/cv2/conv/Conv", "/model.4/m.1/cv2/conv/Conv"] in names
    # a Split of one conv's output: each half is its own group
    assert names.count(["/model.2/cv1/conv/Conv"]) == 1 and names.count(["/model.12/cv1/conv/Conv"]) == 2
    # the detect head's last convs are reshaped and concatenated into the output: left alone
    stuck = {p for g in result.unprunable for p in g.producers}
    assert "/model.22/cv3.0/cv3.0.2/Conv" in stuck and "/model.22/dfl/conv/Conv" in stuck
    assert all(g.reason for g in result.unprunable)
    assert result.params_after < 0.4 * result.params_before


def test_residual_group_keeps_one_channel_set(resnet):
    """The stem and the first stage's second convs feed the same adds: one group, and every BatchNorm of
    the group keeps the same channels (recognised by their running means, which are all distinct)."""
    original = ir.load(resnet)
    model = ir.load(resnet)
    result = prune(model, 0.5, progress=False)
    coupled = [g for g in result.pruned if len(g.producers) == 3]
    assert len(coupled) == 2  # stage 1: stem + 2 blocks; stage 2: shortcut conv + 2 blocks
    bn_after = {n.inputs[0].producer().name: n.name for n in model.graph if n.op_type == "BatchNormalization"}
    for group in coupled:
        kept = []
        for conv in group.producers:
            bn = bn_after[conv]
            before, after = weight(original, bn, 3), weight(model, bn, 3)
            assert len(after) == group.channels_after == group.channels_before // 2
            kept.append([int(np.flatnonzero(before == m)[0]) for m in after])
        assert all(k == kept[0] for k in kept)
    outs = run(checked(model), feeds("resnet"))
    assert [o.shape for o in outs[1]] == [(3, 10)]


# --- exactness: zero channels go, outputs stay ------------------------------------------------
def zero_channel_graph(rng: np.random.Generator):
    """conv_a -> BN -> Relu -> Concat(., b0) -> conv_c -> y1, and conv_b -> Split -> b0 | b1, with
    b1 -> Mul(per-channel) -> LeakyRelu -> MaxPool -> depthwise conv -> conv_e -> y2.

    conv_a's channels ZA and conv_b's ZB are exactly zero all the way down (zero weights, BN mean and
    bias, depthwise bias), so removing them changes nothing."""
    za = [0, 2, 5, 6, 9, 11, 13, 15]  # 8 of 16
    zb = [1, 3, 4, 6, 8, 9, 12, 15]  # 4 in each half of 16
    wa = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    wa[za] = 0
    ba = rng.standard_normal(16).astype(np.float32)
    ba[za] = 0
    mean = rng.uniform(-0.5, 0.5, 16).astype(np.float32)
    mean[za] = 0
    bias = rng.uniform(-0.2, 0.2, 16).astype(np.float32)
    bias[za] = 0
    scale, var = rng.uniform(0.5, 1.5, 16).astype(np.float32), rng.uniform(0.5, 2, 16).astype(np.float32)
    wb = rng.standard_normal((16, 4, 1, 1)).astype(np.float32)
    wb[zb] = 0
    wc = rng.standard_normal((8, 24, 3, 3)).astype(np.float32)
    mul = rng.uniform(0.5, 2, (1, 8, 1, 1)).astype(np.float32)
    wd = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    bd = rng.standard_normal(8).astype(np.float32)
    bd[[z - 8 for z in zb if z >= 8]] = 0
    we = rng.standard_normal((6, 8, 1, 1)).astype(np.float32)
    arrays = {"wa": wa, "ba": ba, "scale": scale, "bnb": bias, "mean": mean, "var": var, "wb": wb, "wc": wc,
              "mul": mul, "wd": wd, "bd": bd, "we": we, "sizes": np.array([8, 8], np.int64)}
    nodes = [
        h.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["a", "scale", "bnb", "mean", "var"], ["an"], name="bn"),
        h.make_node("Relu", ["an"], ["ar"]),
        h.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
        h.make_node("Split", ["b", "sizes"], ["b0", "b1"], axis=1, name="split"),
        h.make_node("Concat", ["ar", "b0"], ["cat"], axis=1),
        h.make_node("Conv", ["cat", "wc"], ["y1"], name="conv_c", pads=[1, 1, 1, 1]),
        h.make_node("Mul", ["b1", "mul"], ["bm"]),
        h.make_node("LeakyRelu", ["bm"], ["bl"], alpha=0.1),
        h.make_node("MaxPool", ["bl"], ["bp"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Conv", ["bp", "wd", "bd"], ["bdw"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
        h.make_node("Conv", ["bdw", "we"], ["y2"], name="conv_e"),
    ]
    proto = G.make_model(
        nodes,
        [G.value_info("x", np.float32, ("N", 4, 8, 8))],
        [G.value_info("y1", np.float32, ("N", 8, 8, 8)), G.value_info("y2", np.float32, ("N", 6, 4, 4))],
        [nh.from_array(a, k) for k, a in arrays.items()],
    )
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)  # value_info the pass must keep right
    assert len(proto.graph.value_info) >= 10
    return proto, za, zb


@pytest.mark.parametrize("data_aware", [False, True])
def test_zero_channels_are_removed_exactly(data_aware):
    rng = np.random.default_rng(0)
    proto, za, zb = zero_channel_graph(rng)
    inputs = [{"x": rng.standard_normal((b, 4, 8, 8)).astype(np.float32)} for b in (1, 2)]
    refs = run(ir.from_proto(proto), inputs)
    model = ir.from_proto(proto)
    samples = samples_from_arrays({"x": rng.standard_normal((3, 4, 8, 8)).astype(np.float32)}, model) if data_aware else None
    result = prune(model, 0.5, samples, multiple=4, progress=False)
    groups = {(tuple(g.producers), g.channels_before, g.channels_after) for g in result.pruned}
    assert groups == {(("conv_a",), 16, 8), (("conv_b",), 8, 4)} and len(result.pruned) == 3  # conv_b: 2 halves
    assert {p for g in result.unprunable for p in g.producers} == {"conv_c", "conv_e"}  # graph outputs
    keep_a = [c for c in range(16) if c not in za]
    keep_b = [c for c in range(16) if c not in zb]
    original = ir.from_proto(proto)
    np.testing.assert_array_equal(weight(model, "conv_a"), weight(original, "conv_a")[keep_a])
    np.testing.assert_array_equal(weight(model, "conv_b"), weight(original, "conv_b")[keep_b])
    np.testing.assert_array_equal(weight(model, "conv_c"), weight(original, "conv_c")[:, keep_a + [16 + c for c in keep_b[:4]]])
    np.testing.assert_array_equal(weight(model, "depthwise"), weight(original, "depthwise")[[c - 8 for c in keep_b[4:]]])
    dw = next(n for n in model.graph if n.name == "depthwise")
    assert dw.attributes.get_int("group") == 4
    split = next(n for n in model.graph if n.name == "split")
    assert ir.convenience.get_const_tensor(split.inputs[1]).numpy().tolist() == [4, 4]
    assert result.params_after < result.params_before
    outs = run(checked(model), inputs)
    for out, ref in zip(outs, refs):
        for o, r in zip(out, ref):
            assert o.shape == r.shape
            np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))


def low_rank_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """A MatMul whose 64x64 weight has rank 16 and a 3x3 Conv 8 -> 32 whose weight has rank 8."""
    w_mm = (rng.standard_normal((64, 16)) @ rng.standard_normal((16, 64))).astype(np.float32)
    w_conv = (rng.standard_normal((32, 8)) @ rng.standard_normal((8, 72))).reshape(32, 8, 3, 3).astype(np.float32)
    nodes = [
        h.make_node("MatMul", ["v", "w_mm"], ["y1"], name="fc"),
        h.make_node("Conv", ["x", "w_conv"], ["y2"], name="conv", pads=[1, 1, 1, 1]),
    ]
    return G.make_model(
        nodes,
        [G.value_info("v", np.float32, (3, 64)), G.value_info("x", np.float32, (1, 8, 6, 6))],
        [G.value_info("y1", np.float32, (3, 64)), G.value_info("y2", np.float32, (1, 32, 6, 6))],
        [nh.from_array(w_mm, "w_mm"), nh.from_array(w_conv, "w_conv")],
    )


def test_factorized_rank_is_pruned():
    """Factorized above the weights' true rank, the pair's extra inner channels carry (numerically)
    nothing: pruning half the rank removes exactly them, through the same machinery as any channel."""
    rng = np.random.default_rng(3)
    proto = low_rank_graph(rng)
    inputs = [{"v": rng.standard_normal((3, 64)).astype(np.float32), "x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)}]
    refs = run(ir.from_proto(proto), inputs)
    model = ir.from_proto(proto)
    done = factorize(model, FactorizeConfig(ranks={"fc": 32, "conv": 16}), progress=False)
    assert {r.name: r.rank for r in done.factorized} == {"fc": 32, "conv": 16}
    result = prune(model, 0.5, progress=False)
    groups = {(tuple(g.producers), g.channels_before, g.channels_after) for g in result.pruned}
    assert groups == {(("fc/lowrank_down",), 32, 16), (("conv/lowrank_down",), 16, 8)}
    assert weight(model, "fc/lowrank_up").shape == (16, 64)
    assert weight(model, "conv/lowrank_up").shape == (32, 8, 1, 1)
    outs = run(checked(model), inputs)
    for o, r in zip(outs[0], refs[0]):
        assert o.shape == r.shape
        assert np.linalg.norm(o - r) <= 1e-5 * np.linalg.norm(r)


# --- what stays, and bad input ----------------------------------------------------------------
def test_conv_feeding_a_graph_output_stays():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((16, 16, 1, 1)).astype(np.float32)
    proto = G.make_model(
        [h.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
         h.make_node("Relu", ["y"], ["r"]),
         h.make_node("Conv", ["r", "w2"], ["z"], name="conv2")],
        [G.value_info("x", np.float32, (1, 3, 8, 8))],
        [G.value_info("y", np.float32, (1, 16, 8, 8)), G.value_info("z", np.float32, (1, 16, 8, 8))],
        [nh.from_array(w, "w"), nh.from_array(w2, "w2")],
    )
    model = ir.from_proto(proto)
    result = prune(model, 0.5, progress=False)
    assert result.groups == [] and result.params_after == result.params_before
    reasons = {tuple(g.producers): g.reason for g in result.unprunable}
    assert set(reasons) == {("conv",), ("conv2",)} and "graph output" in reasons[("conv",)]
    np.testing.assert_array_equal(weight(model, "conv"), w)
    x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    for o, r in zip(run(model, [x])[0], run(ir.from_proto(proto), [x])[0]):
        np.testing.assert_array_equal(o, r)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_bad_ratio_is_one_clear_line(ratio):
    model = ir.from_proto(low_rank_graph(np.random.default_rng(0)))
    with pytest.raises(EdgelrError) as info:
        prune(model, ratio, progress=False)
    message = str(info.value)
    assert "\n" not in message and "ratio" in message and "[0, 1)" in message


def test_concat_with_a_constant_keeps_the_constant():
    """Channels that no producer makes (a constant joined by Concat) stay; the conv's zero channels go."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    zero = [1, 2, 3, 7, 8, 10, 12, 14]
    w[zero] = 0
    extra = rng.standard_normal((1, 5, 8, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 21, 1, 1)).astype(np.float32)
    proto = G.make_model(
        [h.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         h.make_node("Sigmoid", ["c"], ["s"]),
         h.make_node("Mul", ["c", "s"], ["silu"]),
         h.make_node("Concat", ["silu", "extra"], ["cat"], axis=1),
         h.make_node("Conv", ["cat", "w2"], ["y"], name="head")],
        [G.value_info("x", np.float32, (1, 3, 8, 8))],
        [G.value_info("y", np.float32, (1, 4, 8, 8))],
        [nh.from_array(w, "w"), nh.from_array(extra, "extra"), nh.from_array(w2, "w2")],
    )
    x = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}]
    ref = run(ir.from_proto(proto), x)[0][0]
    model = ir.from_proto(proto)
    result = prune(model, 0.5, progress=False)
    assert [(g.producers, g.channels_before, g.channels_after) for g in result.pruned] == [(["conv"], 16, 8)]
    keep = [c for c in range(16) if c not in zero]
    np.testing.assert_array_equal(weight(model, "head"), w2[:, keep + list(range(16, 21))])
    out = run(checked(model), x)[0][0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


# --- the command line: compress --prune ---------------------------------------------------------------------
def test_compress_prune_from_the_command_line(resnet, tmp_path):
    import subprocess
    import sys

    np.savez(tmp_path / "calib.npz", **{k: np.concatenate([f[k] for f in feeds("resnet", count=4)]) for k in feeds("resnet")[0]})

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edgelr", "-q", "compress", str(resnet), *args],
                              capture_output=True, text=True)

    done = cli("-o", str(tmp_path / "pruned.onnx"), "--prune", "0.5", "--calib", str(tmp_path / "calib.npz"),
               "--report", str(tmp_path / "report.json"), "--max-output-error", "1")  # half the channels: 0.59 off
    assert done.returncode == 0, done.stderr
    assert "channel groups" in done.stdout and "relative output error" in done.stdout
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["source"] == str(resnet) and report["pruned"]["groups_pruned"] > 0
    assert report["pruned"]["params_after"] < report["pruned"]["params_before"]
    assert 0 < report["output_error"]["worst"] < 1  # against the original, not the pruned intermediate
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "pruned.onnx", "report.json"]
    bad = cli("-o", str(tmp_path / "x.onnx"), "--prune", "1.0")
    assert bad.returncode == 2 and "outside [0, 1)" in bad.stderr and not (tmp_path / "x.onnx").exists()
