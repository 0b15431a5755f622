"""At full rank a factorized layer is the dense layer: the rewritten model must match the original.

Property tests (hypothesis) over small random MatMul, Gemm and Conv graphs, run in real ONNX Runtime
sessions, with and without calibration data (data-aware whitened SVD vs plain SVD). Each rewrite is
also checked structurally: the dense node is gone (one node became two), the dense weight is gone,
the factor weights have the shapes of the form, the model passes the ONNX checker with strict shape
inference, and the graph's inputs and outputs (names, dtypes, shapes) are untouched.

Below full rank, the error that `factorize` reports for a layer must be the error one measures with
ONNX Runtime on the calibration samples: the report is only useful if it is honest.

Tolerances. float32: 1e-5 relative (norm-wise, and the largest element error against the largest
output). The factors are computed in float64 and rounded to float32 once, and the factorized layer
does one more float32 product, so a correct rewrite lands near 1e-7; 1e-5 leaves room for BLAS
summation order and nothing else. float16: 2e-3, because the rewrite adds three float16 roundings that
the dense layer has not (each factor weight and the intermediate activation, unit roundoff 2^-11 ~
4.9e-4 each), on top of the float16 rounding of both outputs; measured worst cases are ~8e-4.

Set EDGELR_HYPOTHESIS_EXPLORE=1 to draw new random examples (10x as many) instead of the fixed,
derandomized ones that keep CI reproducible.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import graphs as G
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelr.calibration.grams import collect_grams
from edgelr.errors import EdgelrError
from edgelr.graph.layers import Layer, find_layers
from edgelr.io.samples import Samples
from edgelr.passes.factorize import FactorizeConfig, FactorizeResult, factorize

EXPLORE = bool(os.environ.get("EDGELR_HYPOTHESIS_EXPLORE"))


def hsettings(examples: int):
    return settings(
        max_examples=examples * (10 if EXPLORE else 1),
        deadline=None,
        derandomize=not EXPLORE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


FP32_TOL = 1e-5
FP16_TOL = 2e-3  # see the module docstring
FP64_TOL = 1e-10
CALIB_SAMPLES = 3

seeds = st.integers(0, 2**32 - 1)
opsets = st.sampled_from(G.OPSETS)
weight_places = st.sampled_from(["initializer", "constant"])
scales = st.one_of(st.just(1.0), st.floats(0.1, 3.0), st.floats(-3.0, -0.1))


# --- running and comparing -------------------------------------------------------------------
def ort_run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_errors(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(||ref - got|| / ||ref||, max|ref - got| / max|ref|), in float64."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert ref.shape == got.shape
    diff = ref - got
    norm = np.linalg.norm(ref)
    peak = np.abs(ref).max() if ref.size else 0.0
    return (float(np.linalg.norm(diff) / norm) if norm else float(np.linalg.norm(diff)),
            float(np.abs(diff).max() / peak) if peak else float(np.abs(diff).max(initial=0.0)))


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds, tol: float) -> None:
    refs, gots = ort_run(before, feeds), ort_run(after, feeds)
    assert len(refs) == len(gots)
    for out, ref, got in zip(before.graph.output, refs, gots):
        assert got.dtype == ref.dtype, out.name
        assert got.shape == ref.shape, out.name
        norm_err, peak_err = rel_errors(ref, got)
        assert norm_err <= tol and peak_err <= tol, (
            f"output {out.name}: relative error {norm_err:.3g} (norm), {peak_err:.3g} (peak) > {tol}"
        )


# --- factorizing -----------------------------------------------------------------------------
def full_form(layer: Layer, conv_form: str) -> str:
    """The form `factorize` uses for a layer under conv_form channel/spatial."""
    if not layer.is_conv:
        return "svd"
    return conv_form if conv_form in layer.forms() else "channel"


def make_samples(built: G.Built, rng: np.random.Generator, batched: bool = False, count: int = CALIB_SAMPLES) -> Samples:
    """`count` calibration samples; batched: the model's (symbolic, axis 0) batch axis is the sample axis."""
    arrays = built.inputs(rng, count)
    if batched:  # (count, b, ...) -> (count * b, ...): each sample is a batch of one
        assert all(built.dynamic.get(name) == 0 for name in arrays)
        arrays = {k: v.reshape((-1,) + v.shape[2:]) for k, v in arrays.items()}
    return Samples(arrays, {name: batched for name in arrays})


@dataclass
class Rewrite:
    before: onnx.ModelProto
    after: onnx.ModelProto
    result: FactorizeResult
    layers: list[Layer]
    forms: dict[str, str]
    constant_weights: int  # dense weights that were Constant nodes
    samples: Samples | None
    dtype: type


def rewrite(
    built: G.Built,
    rng: np.random.Generator,
    *,
    conv_form: str = "channel",
    data_aware: bool = False,
    batched: bool = False,
    ranks=None,  # None: full rank; else layer -> rank
) -> Rewrite:
    model = built.ir()
    layers, skipped = find_layers(model)
    assert layers and not skipped, skipped
    samples = grams = None
    if data_aware:
        samples = make_samples(built, rng, batched)
        grams = collect_grams(model, layers, samples, progress=False)
        assert set(grams) == {layer.name for layer in layers}
        # calibration adds graph outputs while it runs; they must be gone again
        assert [v.name for v in model.graph.outputs] == [o.name for o in built.proto.graph.output]
    forms = {layer.name: full_form(layer, conv_form) for layer in layers}
    chosen = {l.name: (l.max_rank(forms[l.name]) if ranks is None else ranks(l)) for l in layers}
    constant_weights = sum(
        1 for l in layers if l.weight.producer() is not None and l.weight.producer().op_type == "Constant"
    )
    config = FactorizeConfig(ranks=chosen, conv_form=conv_form)
    result = factorize(model, config, grams, layers=layers, progress=False)
    after = ir.to_proto(model)
    G.check(after)  # a valid model at its opset, shapes consistent
    assert result.data_aware == data_aware
    for row in result.layers:
        assert (row.form, row.rank) == (forms[row.name], chosen[row.name]), row
    return Rewrite(built.proto, after, result, layers, forms, constant_weights, samples, np.dtype(built.dtype))


def assert_structure(rw: Rewrite) -> None:
    """Each use became two nodes of its op reading two fresh factor weights; the interface is untouched."""
    before, after = rw.before, rw.after
    assert G.interface(after) == G.interface(before)

    expected = Counter(G.op_counts(before))
    for layer in rw.layers:
        expected[layer.op] += len(layer.uses)
    expected["Constant"] -= rw.constant_weights
    assert +G.op_counts(after) == +expected

    dense_weights = {l.weight.name for l in rw.layers}
    read = {name for node in after.graph.node for name in node.input}
    produced = {name for node in after.graph.node for name in node.output}
    inits = {t.name: t for t in after.graph.initializer}
    assert not dense_weights & (read | produced | set(inits)), "a dense weight is still in the graph"

    for layer in rw.layers:
        old_names = {use.node.name for use in layer.uses}
        downs = [n for n in after.graph.node if n.name in {f"{x}/lowrank_down" for x in old_names}]
        ups = [n for n in after.graph.node if n.name in {f"{x}/lowrank_up" for x in old_names}]
        assert len(downs) == len(ups) == len(layer.uses)
        assert not old_names & {n.name for n in after.graph.node}, "a dense node is still in the graph"
        # all uses of a shared weight read the same pair of factor initializers
        assert len({n.input[1] for n in downs}) == 1 and len({n.input[1] for n in ups}) == 1
        down = onnx.numpy_helper.to_array(inits[downs[0].input[1]])
        up = onnx.numpy_helper.to_array(inits[ups[0].input[1]])
        assert down.dtype == up.dtype == rw.dtype
        rank = next(r.rank for r in rw.result.layers if r.name == layer.name)
        n, c = layer.out_features, layer.in_channels
        if not layer.is_conv:
            assert (down.shape, up.shape) == ((layer.in_features, rank), (rank, layer.out_features))
        elif rw.forms[layer.name] == "channel":
            ones = (1,) * len(layer.kernel)
            assert (down.shape, up.shape) == ((rank, c, *layer.kernel), (n, rank, *ones))
        else:
            kh, kw = layer.kernel
            assert (down.shape, up.shape) == ((rank, c, kh, 1), (n, rank, 1, kw))
        for node in downs + ups:  # MatMul -> 2 MatMul, Gemm -> 2 Gemm, Conv -> 2 Conv
            assert node.op_type == layer.op


def check_full_rank(built: G.Built, rng, *, conv_form="channel", data_aware=False, batched=False, tol=None) -> Rewrite:
    rw = rewrite(built, rng, conv_form=conv_form, data_aware=data_aware, batched=batched)
    assert_structure(rw)
    for row in rw.result.layers:  # the measured weight/output error of an exact factorization is ~0
        assert row.error < 1e-6, row
    tol = tol or {np.float16: FP16_TOL, np.float64: FP64_TOL}.get(built.dtype, FP32_TOL)
    size = 3 if built.dynamic else None  # another size than the declared/calibrated one
    for _ in range(2):
        assert_same_outputs(rw.before, rw.after, built.inputs(rng, dynamic_size=size), tol)
    return rw


# --- strategies ------------------------------------------------------------------------------
@st.composite
def matmul_cases(draw, dtype=np.float32):
    rank = draw(st.sampled_from([2, 3, 2, 3, 1, 4]))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(rank - 1)) + (draw(st.integers(1, 12)),)
    return dict(
        in_shape=shape,
        out_features=draw(st.integers(1, 12)),
        opset=draw(opsets),
        weight_as=draw(weight_places),
        symbolic_batch=draw(st.booleans()),
        node_name=draw(st.sampled_from(["mm", ""])),
        dtype=dtype,
    )


@st.composite
def gemm_cases(draw, dtype=np.float32):
    return dict(
        m=draw(st.integers(1, 8)),
        k=draw(st.integers(1, 12)),
        n=draw(st.integers(1, 12)),
        trans_a=draw(st.integers(0, 1)),
        trans_b=draw(st.integers(0, 1)),
        alpha=draw(scales),
        beta=draw(scales),
        bias=draw(st.sampled_from([None, "1d", "2d"])),
        opset=draw(opsets),
        weight_as=draw(weight_places),
        symbolic_batch=draw(st.booleans()),
        dtype=dtype,
    )


@st.composite
def conv_cases(draw, spatial_form: bool = False, dtype=np.float32):
    """Group-1 convs; spatial_form: 2-D with both kernel sides > 1, so the spatial form applies."""
    nd = 2 if spatial_form else draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(2 if spatial_form else 1, 5)) for _ in range(nd))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad.startswith("SAME"):  # ONNX Runtime refuses dilations with SAME_*
        dilations = (1,) * nd
    else:
        dilations = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    k_eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    pads = None
    if auto_pad == "NOTSET" and draw(st.integers(0, 4)):  # mostly explicit, asymmetric pads
        pads = tuple(draw(st.integers(0, k - 1)) for k in k_eff * 2)
    spatial = []
    for i, k in enumerate(k_eff):
        if auto_pad.startswith("SAME"):
            spatial.append(draw(st.integers(1, 9)))
        else:
            padded = 0 if pads is None else pads[i] + pads[i + nd]
            spatial.append(max(1, k - padded) + draw(st.integers(0, 4)))
    return dict(
        batch=draw(st.integers(1, 2)),
        in_channels=draw(st.integers(1, 5)),
        out_channels=draw(st.integers(1, 8)),
        spatial=tuple(spatial),
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        pads=pads,
        auto_pad=auto_pad,
        bias=draw(st.booleans()),
        opset=draw(opsets),
        weight_as=draw(weight_places),
        symbolic_batch=draw(st.booleans()),
        explicit_kernel_shape=draw(st.booleans()),
        dtype=dtype,
    )


def calib_mode(draw_batched: bool, built: G.Built) -> bool:
    """Samples on the batch axis only where every input's symbolic axis is axis 0."""
    return draw_batched and bool(built.dynamic) and all(a == 0 for a in built.dynamic.values())


# --- full rank: exact --------------------------------------------------------------------------
@hsettings(40)
@given(case=matmul_cases(), data_aware=st.booleans(), batched=st.booleans(), seed=seeds)
def test_matmul_full_rank_is_exact(case, data_aware, batched, seed):
    rng = np.random.default_rng(seed)
    built = G.matmul(rng, **case)
    check_full_rank(built, rng, data_aware=data_aware, batched=calib_mode(batched, built))


@hsettings(40)
@given(case=gemm_cases(), data_aware=st.booleans(), batched=st.booleans(), seed=seeds)
def test_gemm_full_rank_is_exact(case, data_aware, batched, seed):
    rng = np.random.default_rng(seed)
    built = G.gemm(rng, **case)
    rw = check_full_rank(built, rng, data_aware=data_aware, batched=calib_mode(batched, built))
    # alpha, beta and transA carried over; the bias (if any) is added once, by the second Gemm
    down, up = (n for n in rw.after.graph.node if n.op_type == "Gemm")
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in (down, up)}
    assert attrs[down.name].get("transA", 0) == case["trans_a"]
    assert attrs[down.name].get("transB", 0) == attrs[up.name].get("transB", 0) == 0
    assert attrs[down.name].get("alpha", 1.0) == 1.0 and len(down.input) == 2
    assert np.float32(attrs[up.name].get("alpha", 1.0)) == np.float32(case["alpha"])
    assert len(up.input) == (3 if case["bias"] else 2)


@hsettings(40)
@given(case=conv_cases(), data_aware=st.booleans(), batched=st.booleans(), seed=seeds)
def test_conv_channel_form_full_rank_is_exact(case, data_aware, batched, seed):
    rng = np.random.default_rng(seed)
    built = G.conv(rng, **case)
    check_full_rank(built, rng, conv_form="channel", data_aware=data_aware, batched=calib_mode(batched, built))


@hsettings(40)
@given(case=conv_cases(spatial_form=True), data_aware=st.booleans(), batched=st.booleans(), seed=seeds)
def test_conv_spatial_form_full_rank_is_exact(case, data_aware, batched, seed):
    rng = np.random.default_rng(seed)
    built = G.conv(rng, **case)
    rw = check_full_rank(built, rng, conv_form="spatial", data_aware=data_aware, batched=calib_mode(batched, built))
    assert [r.form for r in rw.result.layers] == ["spatial"]


@pytest.mark.parametrize("kernel", [(1, 3), (4, 1), (1, 1), (3,)])
def test_spatial_form_falls_back_to_channel_where_it_does_not_apply(kernel):
    rng = np.random.default_rng(7)
    built = G.conv(rng, batch=1, in_channels=3, out_channels=4, spatial=(6,) * len(kernel), kernel=kernel, bias=True)
    rw = check_full_rank(built, rng, conv_form="spatial", data_aware=True)
    assert [r.form for r in rw.result.layers] == ["channel"]


def test_conv_3d_full_rank_is_exact():
    rng = np.random.default_rng(8)
    built = G.conv(
        rng, batch=2, in_channels=2, out_channels=5, spatial=(4, 5, 6), kernel=(2, 3, 2),
        strides=(1, 2, 1), pads=(1, 0, 1, 0, 2, 1), bias=True, symbolic_batch=True,
    )
    for data_aware in (False, True):
        check_full_rank(built, rng, data_aware=data_aware)


KINDS = ["matmul2d", "matmul3d", "gemm", "conv1d", "conv-channel", "conv-spatial"]


def build_kind(kind: str, rng, *, opset=17, dtype=np.float32, weight_as="initializer") -> tuple[G.Built, str]:
    """A fixed, non-trivial example of each kind, and the conv_form to factorize it with."""
    common = dict(opset=opset, dtype=dtype, weight_as=weight_as)
    if kind == "matmul2d":
        return G.matmul(rng, (5, 12), 9, symbolic_batch=True, **common), "channel"
    if kind == "matmul3d":
        return G.matmul(rng, (2, 4, 10), 7, **common), "channel"
    if kind == "gemm":
        return G.gemm(rng, 4, 11, 6, trans_a=1, trans_b=1, alpha=0.5, beta=-1.5, bias="2d", **common), "channel"
    if kind == "conv1d":
        return G.conv(rng, batch=1, in_channels=3, out_channels=6, spatial=(11,), kernel=(4,), strides=(2,),
                      pads=(2, 1), bias=True, symbolic_batch=True, **common), "channel"
    if kind == "conv-channel":
        return G.conv(rng, batch=1, in_channels=3, out_channels=8, spatial=(7, 9), kernel=(3, 2), strides=(2, 1),
                      auto_pad="SAME_LOWER", bias=True, **common), "channel"
    if kind == "conv-spatial":
        return G.conv(rng, batch=1, in_channels=3, out_channels=8, spatial=(8, 9), kernel=(3, 4), strides=(1, 2),
                      dilations=(2, 1), pads=(0, 2, 1, 1), bias=True, **common), "spatial"
    raise ValueError(kind)


@pytest.mark.parametrize("data_aware", [False, True], ids=["svd", "data-aware"])
@pytest.mark.parametrize("opset", G.OPSETS)
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_at_each_opset(kind, opset, data_aware):
    rng = np.random.default_rng(opset)
    built, form = build_kind(kind, rng, opset=opset, weight_as="constant" if opset == 13 else "initializer")
    rw = check_full_rank(built, rng, conv_form=form, data_aware=data_aware)
    assert rw.after.opset_import[0].version == opset


@pytest.mark.parametrize("data_aware", [False, True], ids=["svd", "data-aware"])
@pytest.mark.parametrize("weight_as", ["initializer", "constant"])
def test_shared_weight_is_factorized_once_for_both_nodes(weight_as, data_aware):
    rng = np.random.default_rng(11)
    built = G.shared_matmul(rng, rows=3, seq=4, k=10, n=7, weight_as=weight_as)
    rw = check_full_rank(built, rng, data_aware=data_aware)
    assert len(rw.layers) == 1 and len(rw.layers[0].uses) == 2
    assert G.op_counts(rw.after) == Counter({"MatMul": 4})
    assert len(rw.after.graph.initializer) == 2  # one down, one up, read by both pairs


@hsettings(30)
@given(
    kind=st.sampled_from(["matmul", "gemm", "conv-channel", "conv-spatial"]),
    data=st.data(),
    data_aware=st.booleans(),
    seed=seeds,
)
def test_fp16_full_rank_is_close(kind, data, data_aware, seed):
    rng = np.random.default_rng(seed)
    if kind == "matmul":
        built = G.matmul(rng, **data.draw(matmul_cases(dtype=np.float16)))
    elif kind == "gemm":
        built = G.gemm(rng, **data.draw(gemm_cases(dtype=np.float16)))
    else:
        built = G.conv(rng, **data.draw(conv_cases(spatial_form=kind == "conv-spatial", dtype=np.float16)))
    check_full_rank(built, rng, conv_form="spatial" if kind == "conv-spatial" else "channel", data_aware=data_aware)


@pytest.mark.parametrize("kind", ["matmul2d", "matmul3d", "gemm"])
def test_fp64_full_rank_is_exact_to_double_precision(kind):
    """Factors are computed in float64, so a double model loses nothing (ORT's CPU Conv has no double kernel)."""
    rng = np.random.default_rng(12)
    built, form = build_kind(kind, rng, dtype=np.float64)
    for data_aware in (False, True):
        check_full_rank(built, rng, conv_form=form, data_aware=data_aware)


@pytest.mark.parametrize("conv_form", ["channel", "spatial"])
@pytest.mark.parametrize("data_aware", [False, True], ids=["svd", "data-aware"])
def test_multi_layer_models(conv_form, data_aware):
    """All layers of a graph at once, calibration through intermediate activations, symbolic batch."""
    rng = np.random.default_rng(13)
    for built in (G.mlp(rng), G.convnet(rng)):
        rw = check_full_rank(built, rng, conv_form=conv_form, data_aware=data_aware)
        assert len(rw.result.factorized) == 3
        for size in (1, 5):  # the dynamic batch still works at other sizes
            if built.dynamic:
                assert_same_outputs(rw.before, rw.after, built.inputs(rng, dynamic_size=size), FP32_TOL)


# --- below full rank: the reported error is the real one -----------------------------------------
def measured_error(rw: Rewrite, built: G.Built) -> float:
    """ORT's relative output error over the calibration samples, all outputs together.

    The reported error is the layer's alone, relative to its linear part W x, so a bias is taken out
    of the denominator (it is in both outputs, so the difference does not see it).
    """
    num = den = 0.0
    for i in range(len(rw.samples)):
        feed = rw.samples.feed(i)
        for ref, got in zip(ort_run(rw.before, feed), ort_run(rw.after, feed)):
            ref, got = ref.astype(np.float64), got.astype(np.float64)
            num += float(np.sum((ref - got) ** 2))
            linear = ref if built.offset is None else ref - built.offset
            den += float(np.sum(linear**2))
    # a layer whose output never sees its input (all taps in the padding) has nothing to be wrong about
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def half_rank(layer: Layer, form: str) -> int:
    return max(1, layer.max_rank(form) // 2)


def check_reported_error(built: G.Built, rng, conv_form: str, ranks=None) -> Rewrite:
    rw = rewrite(built, rng, conv_form=conv_form, data_aware=True,
                 ranks=ranks or (lambda l: half_rank(l, full_form(l, conv_form))))
    assert_structure(rw)
    (row,) = rw.result.layers
    reported = row.error
    measured = measured_error(rw, built)
    assert abs(reported - measured) <= 1e-3, f"reported {reported:.5f}, ONNX Runtime measures {measured:.5f}"
    return rw


LOW_RANK_CASES = {
    "matmul2d": lambda rng: G.matmul(rng, (6, 12), 10),
    "matmul3d-dynamic": lambda rng: G.matmul(rng, (2, 5, 12), 10, symbolic_batch=True),
    "gemm-transA-transB-bias": lambda rng: G.gemm(rng, 6, 12, 10, trans_a=1, trans_b=1, alpha=1.7, beta=0.5, bias="1d"),
    "conv1d-pads": lambda rng: G.conv(rng, batch=1, in_channels=3, out_channels=8, spatial=(11,), kernel=(4,),
                                      strides=(2,), pads=(2, 1)),
    "conv-same-lower-stride": lambda rng: G.conv(rng, batch=1, in_channels=3, out_channels=8, spatial=(7, 9),
                                                 kernel=(3, 2), strides=(2, 1), auto_pad="SAME_LOWER", bias=True),
    "conv-spatial-dilated-pads": lambda rng: G.conv(rng, batch=1, in_channels=3, out_channels=8, spatial=(8, 9),
                                                    kernel=(3, 4), strides=(1, 2), dilations=(2, 1), pads=(0, 2, 1, 1)),
    "conv-spatial-same-upper": lambda rng: G.conv(rng, batch=2, in_channels=3, out_channels=8, spatial=(8, 9),
                                                  kernel=(3, 4), strides=(2, 2), auto_pad="SAME_UPPER"),
    "shared-weight": lambda rng: G.shared_matmul(rng, rows=3, seq=4, k=12, n=9),
}


@pytest.mark.parametrize("name", list(LOW_RANK_CASES))
def test_reported_error_matches_ort_below_full_rank(name):
    rng = np.random.default_rng(21)
    built = LOW_RANK_CASES[name](rng)
    rw = check_reported_error(built, rng, "spatial" if "spatial" in name else "channel")
    assert rw.result.layers[0].error > 0.05  # really lossy, so the comparison means something


@hsettings(30)
@given(
    kind=st.sampled_from(["matmul", "gemm", "conv-channel", "conv-spatial"]),
    data=st.data(),
    seed=seeds,
)
def test_reported_error_matches_ort_property(kind, data, seed):
    rng = np.random.default_rng(seed)
    if kind == "matmul":
        built = G.matmul(rng, **data.draw(matmul_cases()))
    elif kind == "gemm":
        built = G.gemm(rng, **data.draw(gemm_cases()))
    else:
        built = G.conv(rng, **data.draw(conv_cases(spatial_form=kind == "conv-spatial")))
    form = "spatial" if kind == "conv-spatial" else "channel"
    model = built.ir()
    (layer,), _ = find_layers(model)
    full = layer.max_rank(full_form(layer, form))
    rank = data.draw(st.integers(1, full), label="rank")
    check_reported_error(built, rng, form, ranks=lambda l: rank)


@pytest.mark.parametrize("kind", ["matmul2d", "gemm", "conv1d", "conv-channel", "conv-spatial"])
def test_plain_svd_reports_the_eckart_young_weight_error(kind):
    """Without data the reported error is ||W - W_r|| / ||W||: the singular-value tail of W in the form's layout."""
    rng = np.random.default_rng(22)
    built, form = build_kind(kind, rng)
    rw = rewrite(built, rng, conv_form=form, ranks=lambda l: half_rank(l, full_form(l, form)))
    assert_structure(rw)
    (row,) = rw.result.layers
    w = onnx.numpy_helper.to_array(next(t for t in built.proto.graph.initializer if t.name in ("W", "B")))
    w = w.astype(np.float64)
    if form == "spatial":  # rows (n, j), columns (c, i)
        n, c, kh, kw = w.shape
        w = w.transpose(0, 3, 1, 2).reshape(n * kw, c * kh)
    else:
        w = w.reshape(w.shape[0], -1)
    sigma = np.linalg.svd(w, compute_uv=False)
    expected = np.sqrt(np.sum(sigma[row.rank:] ** 2) / np.sum(sigma**2))
    assert row.error == pytest.approx(expected, abs=1e-6)
    assert row.error > 0.05


# --- bugs found while writing these tests (fail until edgelr is fixed) ----------------------------
@pytest.mark.parametrize("opset", [9, 10])
def test_gemm_rewrite_is_valid_before_opset_11(opset):
    """Gemm's C input is only optional from opset 11; the first factor Gemm is written without it."""
    rng = np.random.default_rng(31)
    built = G.gemm(rng, 3, 5, 4, bias="1d", opset=opset)
    check_full_rank(built, rng)


def test_auto_form_accepts_an_explicit_rank_that_only_the_channel_form_can_take():
    """C=1, N=8, 3x3: channel ranks 1..8, spatial ranks 1..3. Rank 5 is valid (channel) under conv_form auto."""
    rng = np.random.default_rng(32)
    built = G.conv(rng, batch=1, in_channels=1, out_channels=8, spatial=(6, 6), kernel=(3, 3))
    model = built.ir()
    layers, _ = find_layers(model)
    try:
        result = factorize(model, FactorizeConfig(ranks={layers[0].name: 5}), None, layers=layers, progress=False)
    except EdgelrError as exc:
        pytest.fail(f"rank 5 refused under conv_form='auto': {exc}")
    assert [(r.form, r.rank) for r in result.layers] == [("channel", 5)]
