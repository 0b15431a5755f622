"""The PyTorch side of low-rank factorization (edgelr.train.lowrank), against real torch and ONNX Runtime.

At full rank a low-rank module is its dense layer; a torch model and its ONNX export get the same ranks
and the same factor weights from the torch side and from the ONNX pass; whitening beats plain SVD on
correlated inputs; a budget is met and the result exports with parity; bad input is one EdgelrError.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgelr import EdgelrError, collect_grams, find_layers, load
from edgelr.graph.layers import Layer
from edgelr.io.samples import samples_from_arrays
from edgelr.passes.factorize import FactorizeConfig, factorize
from edgelr.train.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    export_onnx,
    factorize_module,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest element error over the largest element of the reference."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def _decaying_(module: nn.Module, seed: int, decay: float = 0.85) -> nn.Module:
    """Give each Linear/Conv2d a trained-like weight: singular values falling geometrically."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight.data.reshape(m.weight.shape[0], -1)
            u, _, vt = torch.linalg.svd(torch.randn(w.shape, generator=g), full_matrices=False)
            s = decay ** torch.arange(len(u[0]), dtype=torch.float32)
            m.weight.data = (u * s @ vt).reshape(m.weight.shape) / math.sqrt(w.shape[1]) * 4
    return module


def _smooth_images(count: int, seed: int, size: int = 8, channels: int = 3) -> torch.Tensor:
    """Correlated (low-pass) images: neighbouring pixels and channels move together."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 1, size // 4, size // 4, generator=g)
    base = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    mix = torch.rand(1, channels, 1, 1, generator=g) + 0.5
    return base * mix + 0.05 * torch.randn(count, channels, size, size, generator=g)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, (3, 3), padding=(1, 2), dilation=(1, 2))
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(F.relu(self.fc(x.flatten(1))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return _decaying_(Net(), seed).eval()


# --- full rank is exact ------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_linear_full_rank_is_the_dense_layer(bias):
    torch.manual_seed(1)
    dense = nn.Linear(24, 10, bias=bias)
    x = torch.randn(7, 3, 24)
    gram = (x.reshape(-1, 24).T @ x.reshape(-1, 24)).numpy()
    for g in (None, gram):
        low = LowRankLinear.from_dense(dense, 10, gram=g)
        assert isinstance(low.down, nn.Linear) and low.down.bias is None and (low.up.bias is not None) == bias
        assert low.down.weight.shape == (10, 24) and low.up.weight.shape == (10, 10)
        assert _rel(low(x), dense(x)) < 1e-5
        assert _rel(low.dense(), dense.weight) < 1e-5


CONVS = [
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3},
    {"in_channels": 4, "out_channels": 6, "kernel_size": (3, 5), "stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)},
    {"in_channels": 5, "out_channels": 3, "kernel_size": (5, 3), "stride": 2, "padding": 2, "dilation": (2, 1), "bias": False},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": "same", "dilation": 2},
    {"in_channels": 4, "out_channels": 6, "kernel_size": (3, 2), "padding": "valid"},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"in_channels": 4, "out_channels": 8, "kernel_size": 1},
]


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items() if k != "in_channels"))
def test_conv_full_rank_is_the_dense_layer_in_each_form(spec):
    torch.manual_seed(2)
    dense = nn.Conv2d(**spec)
    kh, kw = dense.kernel_size
    x = torch.randn(2, spec["in_channels"], 11, 13)
    n, c = dense.out_channels, dense.in_channels
    forms = {"channel": min(n, c * kh * kw)}
    if min(kh, kw) > 1:
        forms["spatial"] = min(n * kw, c * kh)
    for form, rank in forms.items():
        low = LowRankConv2d.from_dense(dense, rank, form)
        assert low.form == form and low.down.bias is None
        assert _rel(low(x), dense(x)) < 1e-5, form
        assert _rel(low.dense(), dense.weight) < 1e-5, form
        if form == "spatial":
            assert low.down.kernel_size == (kh, 1) and low.up.kernel_size == (1, kw)
        else:
            assert low.down.kernel_size == (kh, kw) and low.up.kernel_size == (1, 1)


def test_conv_full_rank_whitened_is_exact_too():
    """With a Gram the factors change (whitened), the product at full rank does not."""
    torch.manual_seed(3)
    dense = nn.Conv2d(4, 6, 3, padding=1)
    gram = np.cov(np.random.default_rng(0).normal(size=(36, 200))) * 200 + np.eye(36)
    x = torch.randn(2, 4, 9, 9)
    for form, rank in (("channel", 6), ("spatial", 12)):
        low = LowRankConv2d.from_dense(dense, rank, form, gram=gram)
        assert _rel(low(x), dense(x)) < 1e-5


# --- the torch side and the ONNX pass agree ----------------------------------------------------
@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same model and samples through factorize_module and through the ONNX pass (edgelr.passes.factorize)."""
    folder = tmp_path_factory.mktemp("agree")
    samples = _smooth_images(24, seed=5)
    net = _net()
    onnx_path = folder / "net.onnx"
    export_onnx(net, onnx_path, (samples[:2],), input_names=["image"], output_names=["logits"])

    model = load(onnx_path)
    layers, _ = find_layers(model)
    grams = collect_grams(model, layers, samples_from_arrays({"image": samples.numpy()}, model), progress=False)
    by_weight = {layer.weight.name.removesuffix(".weight"): layer for layer in layers}
    dense = {name: layer.matrix() for name, layer in by_weight.items()}
    result = factorize(model, FactorizeConfig(params=0.5), grams, layers=layers, progress=False)
    factor = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    onnx_rows = {by_name: row for row in result.layers
                 for by_name, layer in by_weight.items() if layer.name == row.name}
    small_path = folder / "net.small.onnx"
    ir.save(model, small_path)

    report = factorize_module(net, params=0.5, samples=samples, progress=False)
    torch_rows = {row["name"]: row for row in report["layers"]}
    return {"net": net, "samples": samples, "onnx_rows": onnx_rows, "torch_rows": torch_rows, "grams": grams,
                "by_weight": by_weight, "dense": dense, "factor": factor, "small_path": small_path, "report": report}


def test_same_ranks_and_forms_per_layer(both):
    onnx_rows, torch_rows = both["onnx_rows"], both["torch_rows"]
    assert set(onnx_rows) == set(torch_rows) == {"conv1", "conv2", "conv3", "fc", "head"}
    chosen = {name: (row.form, row.rank) for name, row in onnx_rows.items()}
    assert chosen == {name: (row["form"], row["rank"]) for name, row in torch_rows.items()}
    assert sum(form != "dense" for form, _ in chosen.values()) >= 2  # a real allocation, not all dense
    for name, row in onnx_rows.items():
        mine = torch_rows[name]
        assert (mine["params_before"], mine["params_after"]) == (row.params_before, row.params_after)
        assert (mine["flops_before"], mine["flops_after"]) == (row.flops_before, row.flops_after)
        assert mine["error"] == pytest.approx(row.error, rel=1e-3, abs=1e-6)


def _torch_factors(module: nn.Module, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The factors in the ONNX pass's layout: (in x r, r x out) for a Linear, OIHW for a conv."""
    down, up = module.down.weight.detach().double().numpy(), module.up.weight.detach().double().numpy()
    return (down.T, up.T) if kind == "linear" else (down, up)


def test_same_factor_weights_from_the_same_gram(both):
    """from_dense on the ONNX pass's own Gram gives the ONNX pass's factor initializers."""
    net, factor = both["net"], both["factor"]
    for name, row in both["onnx_rows"].items():
        if row.form == "dense":
            continue
        layer: Layer = both["by_weight"][name]
        dense = getattr(_net(), name)  # a fresh copy of the dense layer (the same seed)
        kind = "linear" if isinstance(dense, nn.Linear) else "conv"
        cls = LowRankLinear if kind == "linear" else LowRankConv2d
        low = cls.from_dense(dense, row.rank, row.form, gram=both["grams"][layer.name])
        down, up = _torch_factors(low, kind)
        np.testing.assert_allclose(down, factor[f"{layer.name}.lowrank_down"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(up, factor[f"{layer.name}.lowrank_up"], rtol=0, atol=1e-6)
        # and factorize_module's own, from Grams of torch's activations (batched): the same factors
        mine = getattr(net, name)
        assert type(mine) is cls and mine.rank == row.rank
        _assert_same_factors(_torch_factors(mine, kind), (down, up))


def _assert_same_factors(mine, ref, atol: float = 1e-4) -> None:
    """Equal up to the sign of each rank component (an SVD's only freedom with distinct singular values).
    Factors in the ONNX pass's layout: a Linear's (in x r, r x out) as 2-D arrays, a conv's OIHW as 4-D."""
    (d1, u1), (d2, u2) = mine, ref
    if d1.ndim == 2:  # Linear: rank components are down's columns and up's rows
        d1, d2, u1, u2 = d1.T, d2.T, u1.T, u2.T
    r = d1.shape[0]
    d1, d2 = d1.reshape(r, -1), d2.reshape(r, -1)
    u1, u2 = u1.reshape(u1.shape[0], r, -1), u2.reshape(u2.shape[0], r, -1)
    signs = np.sign(np.sum(d1 * d2, axis=1))
    np.testing.assert_allclose(d1 * signs[:, None], d2, rtol=0, atol=atol)
    np.testing.assert_allclose(u1 * signs[None, :, None], u2, rtol=0, atol=atol)


def test_spatial_form_same_factors_both_ways(both, tmp_path):
    """Explicit ranks in the spatial form: the ONNX pass and factorize_module write the same kh x 1, 1 x kw pair."""
    model = load(both["small_path"].with_name("net.onnx"))
    layers, _ = find_layers(model)
    names = {layer.weight.name.removesuffix(".weight"): layer.name for layer in layers}
    ranks = {"conv2": 16, "conv3": 24}
    grams = collect_grams(model, layers, samples_from_arrays({"image": both["samples"].numpy()}, model), progress=False)
    result = factorize(model, FactorizeConfig(ranks={names[k]: v for k, v in ranks.items()}, conv_form="spatial"),
                       grams, layers=layers, progress=False)
    assert {r.name: (r.form, r.rank) for r in result.factorized} == {names[k]: ("spatial", v) for k, v in ranks.items()}
    factor = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    net = _net()
    report = factorize_module(net, ranks=ranks, conv_form="spatial", samples=both["samples"], progress=False)
    assert {r["name"]: (r["form"], r["rank"]) for r in report["layers"] if r["form"] != "dense"} == \
        {k: ("spatial", v) for k, v in ranks.items()}
    for name in ranks:
        mine = getattr(net, name)
        assert mine.down.kernel_size == (3, 1) and mine.up.kernel_size == (1, 3)
        ref = (factor[f"{names[name]}.lowrank_down"], factor[f"{names[name]}.lowrank_up"])
        _assert_same_factors(_torch_factors(mine, "conv"), ref)
    onnx_errors = {r.name: r.error for r in result.factorized}
    for row in report["layers"]:
        if row["form"] != "dense":
            assert row["error"] == pytest.approx(onnx_errors[names[row["name"]]], rel=1e-3)
    out = tmp_path / "spatial.onnx"
    assert export_onnx(net, out, (both["samples"][:2],))["parity"] <= 1e-4


def test_same_outputs_as_the_onnx_pass(both):
    session = ort.InferenceSession(str(both["small_path"]), providers=["CPUExecutionProvider"])
    x = _smooth_images(8, seed=9)
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        mine = both["net"](x)
    assert _rel(mine, got) < 1e-3


# --- whitening ---------------------------------------------------------------------------------
def _correlated(count: int, seed: int, draw: int = 0, dim: int = 48) -> torch.Tensor:
    """Inputs from one fixed mixing (by `seed`) of independent draws (by `draw`): few strong directions."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) * (0.7 ** torch.arange(dim, dtype=torch.float32))[:, None]
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(1000 + draw)) @ mixing


def test_whitened_beats_plain_on_correlated_inputs():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8))
    calib, held = _correlated(256, seed=1, draw=1), _correlated(128, seed=1, draw=2)
    with torch.no_grad():
        want = net(held)
    errors = {}
    for name, samples in (("whitened", calib), ("plain", None)):
        copy = nn.Sequential(nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8))
        copy.load_state_dict(net.state_dict())
        report = factorize_module(copy, ranks={"0": 6}, samples=samples, progress=False)
        assert report["data_aware"] == (samples is not None)
        assert isinstance(copy[0], LowRankLinear) and copy[0].rank == 6
        with torch.no_grad():
            errors[name] = float((copy(held) - want).norm() / want.norm())
    assert errors["whitened"] < 0.5 * errors["plain"], errors


def test_whitened_from_dense_beats_plain_per_layer():
    torch.manual_seed(5)
    dense = nn.Linear(48, 32)
    x = _correlated(512, seed=3)
    gram = (x.T @ x).double().numpy()
    with torch.no_grad():
        want = dense(x)
        white = float((LowRankLinear.from_dense(dense, 8, gram=gram)(x) - want).norm() / want.norm())
        plain = float((LowRankLinear.from_dense(dense, 8)(x) - want).norm() / want.norm())
    assert white < 0.5 * plain


# --- a budget, then export ---------------------------------------------------------------------
def test_half_the_params_and_export_parity(tmp_path):
    net = _net(seed=1)
    samples = _smooth_images(16, seed=6)
    factorizable = {n: m.weight.numel() for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    report = factorize_module(net, params=0.5, samples=samples, progress=False)
    rows = {r["name"]: r for r in report["layers"]}
    assert set(rows) == set(factorizable) and report["budget_reached"] and not report["warnings"]
    assert report["params_before"] == sum(factorizable.values())
    # the budget is a fraction of the layers that can pay off; the ones below break-even stay as they are
    fixed = sum(r["params_before"] for r in rows.values() if r["note"] == "below break-even")
    budget = fixed + 0.5 * (report["params_before"] - fixed)
    assert 0.9 * budget <= report["params_after"] <= budget
    done = [r for r in rows.values() if r["form"] != "dense"]
    assert done
    for r in done:
        module = net.get_submodule(r["name"])
        assert isinstance(module, (LowRankLinear, LowRankConv2d)) and module.rank == r["rank"]
        assert module.down.weight.numel() + module.up.weight.numel() == r["params_after"] < r["params_before"]
        assert 0 < r["error"] < 0.5
    out = tmp_path / "small.onnx"
    info = export_onnx(net, out, (samples[:3],), input_names=["image"])
    assert info["path"] == str(out) and info["parity"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]
    graph = onnx.load(out).graph
    names = [n.name for n in graph.node]
    for r in done:
        ops = [n.op_type for n in graph.node if n.name.startswith(f"/{r['name']}/")]
        assert any(n.startswith(f"/{r['name']}/down/") for n in names), names
        assert any(n.startswith(f"/{r['name']}/up/") for n in names), names
        assert len(ops) == 2 and set(ops) <= {"Conv", "MatMul", "Gemm"}, ops
    # a dynamic batch: another batch size runs too
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _smooth_images(5, seed=7)
    with torch.no_grad():
        assert _rel(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), net(x)) < 1e-4


def test_flops_budget_and_tuple_samples():
    net = _net(seed=2)
    samples = _smooth_images(8, seed=8)
    report = factorize_module(net, flops=0.6, samples=(samples,), progress=False)
    assert report["metric"] == "flops" and report["flops_after"] < report["flops_before"]
    assert any(r["form"] != "dense" for r in report["layers"])


def test_skips_grouped_convs_and_attention():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 64, 1), nn.Flatten(2), nn.Linear(36, 36))
    report = factorize_module(net, params=0.5, samples=torch.randn(4, 8, 8, 8), progress=False)
    assert {r["name"] for r in report["skipped"]} == {"0"}
    assert {r["name"] for r in report["layers"]} == {"1", "3"}

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    model = Attn().eval()
    x = torch.randn(2, 5, 32)
    report = factorize_module(model, ranks={"fc": 4}, progress=False)  # no samples: plain SVD
    assert {r["name"] for r in report["skipped"]} == {"attn.out_proj"}
    assert isinstance(model.fc, LowRankLinear) and isinstance(model.attn.out_proj, nn.Linear)
    model(x)  # still runs


# --- errors ------------------------------------------------------------------------------------
def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize("kwargs, says", [
    ({"params": 0.0}, "(0, 1]"),
    ({"params": 1.5}, "(0, 1]"),
    ({"flops": -1}, "(0, 1]"),
    ({"params": 0.5, "flops": 0.5}, "one budget"),
    ({}, "how far"),
    ({"flops": 0.5}, "samples"),
    ({"params": 0.5, "samples": torch.randn(2, 5)}, "does not run"),
    ({"params": 0.5, "samples": []}, "samples"),
    ({"ranks": {"nope": 3}}, "unknown layers"),
    ({"ranks": {"0": 999}}, "must be in 1.."),
])
def test_bad_factorize_input_is_one_error_line(kwargs, says):
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(EdgelrError) as exc:
        factorize_module(net, progress=False, **kwargs)
    assert says in _one_line(exc)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched


def test_nothing_factorizable_is_one_error_line():
    for model in (nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4)), nn.Linear(8, 8)):
        with pytest.raises(EdgelrError) as exc:
            factorize_module(model, params=0.5, progress=False)
        assert "no factorizable" in _one_line(exc)


def test_bad_from_dense_input_is_one_error_line():
    conv = nn.Conv2d(4, 6, 3)
    cases = [
        lambda: LowRankConv2d.from_dense(conv, 0),
        lambda: LowRankConv2d.from_dense(conv, 7),
        lambda: LowRankConv2d.from_dense(conv, 3, "svd"),
        lambda: LowRankConv2d.from_dense(nn.Conv2d(4, 6, 1), 3, "spatial"),
        lambda: LowRankConv2d.from_dense(nn.Conv2d(4, 8, 3, groups=2), 3),
        lambda: LowRankConv2d.from_dense(conv, 3, gram=np.eye(5)),
        lambda: LowRankLinear.from_dense(conv, 3),
        lambda: LowRankLinear.from_dense(nn.Linear(4, 4), 2, "channel"),
    ]
    for case in cases:
        with pytest.raises(EdgelrError) as exc:
            case()
        _one_line(exc)


class Drifting(nn.Module):
    """Adds how often it has been called: tracing bakes a different constant than torch's first run."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x) + float(self.calls)


def test_export_out_of_tolerance_leaves_no_file(tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(EdgelrError) as exc:
        export_onnx(Drifting(), out, torch.randn(2, 4))
    assert "tolerance" in _one_line(exc)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EdgelrError) as exc:
        export_onnx(nn.Linear(4, 4), tmp_path / "missing" / "m.onnx", torch.randn(2, 4))
    assert "does not exist" in _one_line(exc)
    with pytest.raises(EdgelrError):
        export_onnx(nn.Linear(4, 4), out, (torch.randn(2, 4),), input_names=["a", "b"])
    assert list(tmp_path.iterdir()) == []


def test_tied_weights_stay_and_keyword_samples():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(32, 32)
            self.dec = nn.Linear(32, 32)
            self.dec.weight = self.enc.weight
            self.fc = nn.Linear(32, 32)

        def forward(self, x, scale):
            return self.fc(self.dec(self.enc(x))) * scale

    torch.manual_seed(7)
    model = _decaying_(Tied(), seed=7).train()
    report = factorize_module(model, params=0.5, samples={"x": torch.randn(8, 32), "scale": torch.ones(8, 1)},
                              progress=False)
    assert {r["name"] for r in report["skipped"]} == {"enc", "dec"}
    assert isinstance(model.fc, LowRankLinear) and model.training and model.fc.training
