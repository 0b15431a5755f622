"""Refit of factorized pairs on the compressed model's own inputs (edgelr.passes.refit)."""

from __future__ import annotations

import graphs
import numpy as np
import onnx
import pytest

from edgelr import FactorizeConfig, compress
from edgelr.core import lowrank
from edgelr.io.model import load
from edgelr.passes.refit import best_factors

TOY = 1.0  # max_output_error: random toy graphs at half their parameters are 0.25-0.65 off, and that is not tested here


def _loss(z: np.ndarray, x: np.ndarray, w: np.ndarray, f: lowrank.Factors) -> float:
    return float(np.sum((z @ (f.up @ f.down).T - x @ w.T) ** 2))


def test_best_factors_solve_the_reduced_rank_regression():
    """Z = X: the whitened SVD of W itself. Z a distorted X: no worse than it, and no perturbation helps."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12))
    w = rng.standard_normal((9, 12))
    same = best_factors(w, x.T @ x, x.T @ x, 4, 0.0)
    svd = lowrank.decompose(w, lowrank.cholesky_factor(x.T @ x, 0.0), 4)[1]
    np.testing.assert_allclose(same.up @ same.down, svd.up @ svd.down, rtol=1e-6, atol=1e-8)

    z = x + 0.3 * rng.standard_normal(x.shape) + 0.5 * x[:, ::-1]
    fit = best_factors(w, z.T @ z, x.T @ z, 4, 0.0)
    assert _loss(z, x, w, fit) < 0.9 * _loss(z, x, w, svd)
    for _ in range(20):
        moved = lowrank.Factors(fit.up + 1e-3 * rng.standard_normal(fit.up.shape),
                                fit.down + 1e-3 * rng.standard_normal(fit.down.shape))
        assert _loss(z, x, w, moved) >= _loss(z, x, w, fit)


@pytest.mark.parametrize("build, form", [(graphs.mlp, "auto"), (graphs.convnet, "channel"), (graphs.convnet, "spatial")],
                         ids=["mlp", "convnet-channel", "convnet-spatial"])
def test_refit_lowers_the_whole_model_error(tmp_path, build, form):
    """Same ranks, same interface; the calibration error drops (each pair is re-solved on what it sees)."""
    rng = np.random.default_rng(1)
    built = build(rng)
    source = tmp_path / "model.onnx"
    onnx.save(built.proto, source)
    np.savez(tmp_path / "calib.npz", **built.inputs(rng, count=24))
    errors, ranks = {}, {}
    for on in (False, True):
        out = tmp_path / f"refit{on}.onnx"
        done = compress(source, out, FactorizeConfig(params=0.5, conv_form=form), refit=on, calib=tmp_path / "calib.npz",
                        progress=False, max_output_error=TOY)
        errors[on] = done.output_error["worst"]
        ranks[on] = [(r.name, r.form, r.rank) for r in done.result.layers]
        assert graphs.interface(onnx.load(out)) == graphs.interface(built.proto)
        refit = done.result.refit
    assert ranks[False] == ranks[True]
    assert refit and errors[True] < errors[False]


def test_one_sequential_pass_is_a_fixed_point():
    """Upstream first: a second pass sees the inputs the first left and changes nothing. (Refitting all
    layers at once is no fixed point: each overcorrects for upstream errors the others then remove.)"""
    from edgelr.calibration.grams import collect_grams
    from edgelr.graph.layers import find_layers
    from edgelr.io.samples import samples_from_arrays
    from edgelr.passes.factorize import factorize
    from edgelr.passes.refit import _levels, refit

    rng = np.random.default_rng(2)
    built = graphs.mlp(rng, width=12)
    model = built.ir()
    samples = samples_from_arrays(built.inputs(rng, count=32), model)
    layers, _ = find_layers(model)
    assert [[layer.name for layer in level] for level in _levels(model.graph, layers)] == [["fc0"], ["fc1"], ["fc2"]]
    grams = collect_grams(model, layers, samples, progress=False)
    result = factorize(model, FactorizeConfig(params=0.4), grams, layers=layers, progress=False)
    assert len(result.factorized) >= 2
    first = refit(built.ir(), model, layers, result, samples, 0.1, progress=False)
    assert first
    assert refit(built.ir(), model, layers, result, samples, 0.1, progress=False) == []


def test_cli_refits_by_default_and_not_with_no_refit(tmp_path, capsys):
    import json

    from edgelr.cli import main

    rng = np.random.default_rng(3)
    built = graphs.mlp(rng, width=12)
    onnx.save(built.proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **built.inputs(rng, count=16))
    found = {}
    for flag in ([], ["--no-refit"]):
        report = tmp_path / f"r{len(flag)}.json"
        assert main(["-q", "compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / f"o{len(flag)}.onnx"),
                     "--params", "0.4", "--calib", str(tmp_path / "calib.npz"), "--report", str(report),
                     "--max-output-error", "1", *flag]) == 0
        found[bool(flag)] = json.loads(report.read_text())["refit"]
    assert found[False] and found[True] == []
    assert "factorized pairs on the inputs the compressed model feeds them" in capsys.readouterr().out


@pytest.mark.parametrize("build, form, helps", [(graphs.mlp, "auto", True), (graphs.convnet, "channel", False)],
                         ids=["mlp", "convnet"])
def test_refit_after_int8_reads_the_quantized_model(tmp_path, build, form, helps):
    """With --quantize int8 the pairs are refit on the INT8 model's inputs and their int8 weights
    requantized in place: the quantized model's error drops, its weights stay int8 Q/DQ. On this
    convnet the refit fits conv1's output better but the pooled output worse: the whole-model check
    undoes it, and nothing changes."""
    rng = np.random.default_rng(4)
    built = build(rng)
    source = tmp_path / "model.onnx"
    onnx.save(built.proto, source)
    np.savez(tmp_path / "calib.npz", **built.inputs(rng, count=24))
    errors = {}
    for on in (False, True):
        out = tmp_path / f"q{on}.onnx"
        done = compress(source, out, FactorizeConfig(params=0.5, conv_form=form), refit=on, calib=tmp_path / "calib.npz",
                        quantize="int8", float_output=tmp_path / f"f{on}.onnx", progress=False, max_output_error=TOY)
        errors[on] = done.output_error["worst"]
        model = onnx.load(out)
        lowrank_weights = [t for t in model.graph.initializer if "lowrank" in t.name and t.name.endswith("_quantized")]
        assert lowrank_weights and all(t.data_type == onnx.TensorProto.INT8 for t in lowrank_weights)
    assert bool(done.result.refit) == helps
    assert errors[True] < errors[False] if helps else errors[True] == errors[False]


def test_an_undone_int8_refit_restores_weights_scales_and_int32_biases(tmp_path):
    """The undo path (whole-model error did not drop): requantized int8 weights, their scales and the
    int32 biases requantized with them all go back; a bias left at the refit's scale would stop ONNX
    Runtime fusing the QDQ conv (slower, and no longer what was measured)."""
    from edgelr.graph.layers import find_layers
    from edgelr.passes.refit import _restore, _set_quantized, _snapshot

    rng = np.random.default_rng(4)
    built = graphs.convnet(rng)
    onnx.save(built.proto, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **built.inputs(rng, count=24))
    done = compress(tmp_path / "model.onnx", tmp_path / "q.onnx", FactorizeConfig(params=0.5, conv_form="channel"), refit=False,
                    calib=tmp_path / "calib.npz", quantize="int8", float_output=tmp_path / "f.onnx", progress=False,
                    max_output_error=TOY)
    quantized, compressed = load(tmp_path / "q.onnx"), load(tmp_path / "f.onnx")
    rows = {row.name: row for row in done.result.layers}
    layers = [layer for layer in find_layers(load(tmp_path / "model.onnx"))[0] if rows[layer.name].rank]
    before = {name: v.const_value.numpy().copy() for name, v in quantized.graph.initializers.items()}
    assert any(v.dtype == np.int32 for v in before.values())  # the pairs carry int32 biases
    saved = _snapshot(compressed, quantized, layers, rows)
    for layer in layers:
        row = rows[layer.name]
        n = layer.in_features
        _set_quantized(quantized, layer, row.form, lowrank.Factors(up=rng.normal(size=(layer.out_features, row.rank)),
                                                                  down=rng.normal(size=(row.rank, n))))
    changed = {name for name, v in quantized.graph.initializers.items() if not np.array_equal(v.const_value.numpy(), before[name])}
    assert any(before[name].dtype == np.int32 for name in changed)  # a bias was requantized
    _restore(saved)
    assert all(np.array_equal(v.const_value.numpy(), before[name]) for name, v in quantized.graph.initializers.items())


@pytest.mark.parametrize("build, form, scheme", [(graphs.mlp, "auto", None), (graphs.convnet, "channel", "int8")],
                         ids=["mlp-float", "convnet-int8"])
def test_a_second_run_reuses_the_refit(tmp_path, monkeypatch, build, form, scheme):
    """The same model, samples and allocation again: the refit comes from the cache (refit is not run)
    and the written models, the names refit and the layers' errors are the first run's."""
    import sys

    monkeypatch.setenv("EDGELR_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(3)
    built = build(rng)
    onnx.save(built.proto, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **built.inputs(rng, count=24))
    runs = []
    for i in range(2):
        if i:
            def fail(*args, **kwargs):
                raise AssertionError("refit ran again")
            monkeypatch.setattr(sys.modules["edgelr.passes.refit"], "refit", fail)
        out = tmp_path / f"o{i}.onnx"
        done = compress(tmp_path / "model.onnx", out, FactorizeConfig(params=0.5, conv_form=form), calib=tmp_path / "calib.npz",
                        quantize=scheme, progress=False, max_output_error=TOY)
        runs.append((out.read_bytes(), done.result.refit, [(r.name, r.error) for r in done.result.layers]))
    assert runs[0][1]  # something was refit (else there is nothing to reuse)
    assert runs[0] == runs[1]
