"""Einsums with a constant weight (edgelr.graph.einsum): rewritten exactly as MatMuls, for any arrangement of
the letters, and then factorized like any MatMul, one pair per batch index of the weight (SS2D's x_proj)."""

from __future__ import annotations

import random
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from graphs import make_model, value_info
from onnx import helper, numpy_helper

from edgelr import compress
from edgelr.graph.einsum import lower_weight_einsums, parse
from edgelr.graph.layers import find_layers
from edgelr.io.model import ort_session
from edgelr.passes.factorize import FactorizeConfig
from edgelr.train.lowrank import export_onnx


def _einsum_model(equation: str, x_shape, w: np.ndarray, weight_first=False, as_constant=False, opset=13):
    """One Einsum of input X (first dim dynamic) and constant W (an initializer, or a Constant node)."""
    inputs = ["W", "X"] if weight_first else ["X", "W"]
    nodes = [helper.make_node("Einsum", inputs, ["Y"], equation=equation, name="mix")]
    inits = [numpy_helper.from_array(w, "W")]
    if as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=inits.pop()))
    x = np.zeros(x_shape, w.dtype)
    rank = np.einsum(equation, *((w, x) if weight_first else (x, w))).ndim
    y = value_info("Y", w.dtype, [f"y{i}" for i in range(rank)])  # symbolic: the first dim of X moves
    return make_model(nodes, [value_info("X", w.dtype, ["n", *x_shape[1:]])], [y], inits, opset=opset)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    with ort_session(ir.serde.deserialize_model(model)) as ort:
        return ort.run(None, {"X": x})[0]


def _lowered(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    ir_model = ir.serde.deserialize_model(model)
    names = lower_weight_einsums(ir_model)
    return ir.serde.serialize_model(ir_model), names


def _random_equation(rng: random.Random) -> tuple[str, dict, bool]:
    """Letters by role: batch (weight, data, output), free (data, output), contracted (weight, data), out
    (weight, output); each term in a shuffled order; sometimes the implicit output form."""
    letters = iter("abcdefghij")
    roles = {role: [next(letters) for _ in range(rng.randint(lo, 2))]
             for role, lo in (("batch", 0), ("free", 1), ("contracted", 1), ("out", 1))}
    data = roles["batch"] + roles["free"] + roles["contracted"]
    weight = roles["batch"] + roles["contracted"] + roles["out"]
    out = roles["batch"] + roles["free"] + roles["out"]
    for term in (data, weight, out):
        rng.shuffle(term)
    data.remove(roles["free"][0])
    data.insert(0, roles["free"][0])  # the data's first axis is a batch of samples: a free letter
    implicit = not roles["batch"] and rng.random() < 0.3
    equation = f"{''.join(data)},{''.join(weight)}" + ("" if implicit else f"->{''.join(out)}")
    sizes = {c: rng.randint(1, 4) for term in (data, weight) for c in term}
    return equation, sizes, implicit


@pytest.mark.parametrize("seed", range(24))
def test_lowering_is_exact_for_any_arrangement(seed):
    rng = random.Random(seed)
    equation, sizes, _ = _random_equation(rng)
    data_term, weight_term = equation.split("->")[0].split(",")
    weight_first = rng.random() < 0.5
    if weight_first:
        equation = f"{weight_term},{data_term}" + (equation[equation.index("->"):] if "->" in equation else "")
    gen = np.random.default_rng(seed)
    w = gen.standard_normal([sizes[c] for c in weight_term]).astype(np.float32)
    x = gen.standard_normal([3] + [sizes[c] for c in data_term[1:]]).astype(np.float32)  # first dim: batch 3
    sizes_x = [3] + [sizes[c] for c in data_term[1:]]
    model = _einsum_model(equation, sizes_x, w, weight_first=weight_first, as_constant=seed % 3 == 0)
    lowered, names = _lowered(model)
    assert names == ["mix"], equation
    assert "Einsum" not in {n.op_type for n in lowered.graph.node}
    expected = _run(model, x)
    assert np.abs(_run(lowered, x) - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max()), equation
    # the other batch size too: nothing of the first one was baked in
    x2 = np.concatenate([x, x[:1]])
    assert np.allclose(_run(lowered, x2), _run(model, x2), atol=1e-5)


@pytest.mark.parametrize("equation", ["...d,cd->...c", "bii,ij->bj", "bd,d->b", "bd,cd,ce->be", "bdl,kcd->bcl",
                                      "bd,dc->b"])
def test_einsums_it_cannot_express_are_left_alone(equation):
    """Ellipsis, a repeated letter, nothing produced, three operands, a letter summed over the weight alone, a
    produced letter summed away."""
    assert parse(equation, weight_first=False) is None


def test_fp16_weight():
    w = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float16)
    x = np.random.default_rng(1).standard_normal((2, 4, 5, 6)).astype(np.float16)
    model = _einsum_model("bkdl,kcd->bkcl", x.shape, w)
    lowered, _ = _lowered(model)
    assert np.allclose(_run(lowered, x), _run(model, x), atol=1e-2)


class _DirectionMix(torch.nn.Module):
    """SS2D's x_proj: one (c x d) matrix per scan direction, as torch.einsum, then a plain Linear."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 12, 16, generator=g) / 4)
        self.head = torch.nn.Linear(12, 8)

    def forward(self, x):  # (b, 4, 16, l)
        return self.head(torch.einsum("bkdl,kcd->bkcl", x, self.weight).transpose(-1, -2))


@pytest.fixture
def einsum_model(tmp_path):
    x = torch.randn(64, 4, 16, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(_DirectionMix().eval(), tmp_path / "mix.onnx", (x[:2],), input_names=["x"])
    assert "Einsum" in {n.op_type for n in onnx.load(tmp_path / "mix.onnx").graph.node}
    np.savez(tmp_path / "calib.npz", x=x[:48].numpy())
    np.savez(tmp_path / "heldout.npz", x=x[48:].numpy())
    return tmp_path


def _outputs(path, x):
    with ort_session(path) as ort:
        return ort.run(None, {"x": x})[0]


def test_factorized_exactly_at_full_rank(einsum_model):
    """Each direction's matrix is a layer; at full rank (explicit ranks) every pair reproduces it."""
    model = ir.load(einsum_model / "mix.onnx")
    lower_weight_einsums(model)
    layers = [layer for layer in find_layers(model)[0] if layer.in_features == 16]  # not the head (12 -> 8)
    assert len(layers) == 4 and all((layer.out_features, layer.in_features) == (12, 16) for layer in layers)
    ranks = {layer.name: 12 for layer in layers}
    compress(einsum_model / "mix.onnx", einsum_model / "full.onnx", FactorizeConfig(ranks=ranks),
             calib=einsum_model / "calib.npz", progress=False, refit=False)
    x = np.load(einsum_model / "heldout.npz")["x"]
    got, expected = _outputs(einsum_model / "full.onnx", x), _outputs(einsum_model / "mix.onnx", x)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    nodes = onnx.load(einsum_model / "full.onnx").graph.node
    assert sum("lowrank" in n.name for n in nodes) == 8  # a down and an up per direction


def test_compress_reduces_the_einsum_weights(einsum_model):
    report = compress(einsum_model / "mix.onnx", einsum_model / "half.onnx", FactorizeConfig(params=0.5),
                      calib=einsum_model / "calib.npz", heldout=einsum_model / "heldout.npz", progress=False,
                      max_output_error=1.0)
    assert report.result.factorized and onnx.load(einsum_model / "half.onnx")
