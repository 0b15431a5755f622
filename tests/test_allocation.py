"""Rank allocation on a model with trained-like spectra: budgets are met, the error gate holds,
more budget buys less error, and data-aware SVD beats plain SVD on held-out inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgelr import FactorizeConfig, compress, load_samples, output_error
from edgelr.core.allocate import Choice, allocate
from edgelr.demo import build_model, synthetic_images
from edgelr.io import model as model_io


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    onnx.save(build_model(), folder / "m.onnx")
    np.savez(folder / "calib.npz", image=synthetic_images(48, seed=1))
    np.savez(folder / "held.npz", image=synthetic_images(24, seed=2))
    return folder


def _budget_and_total(done, metric: str):
    rows = done.result.layers
    fixed = sum(getattr(r, f"{metric}_before") for r in rows if r.note == "below break-even")
    free = sum(getattr(r, f"{metric}_before") for r in rows if r.note != "below break-even")
    return fixed + done.result.fraction * free, sum(getattr(r, f"{metric}_after") for r in rows)


@pytest.mark.parametrize("metric", ["params", "flops"])
def test_budget_is_met_and_more_budget_buys_less_error(demo, metric):
    errors = []
    for fraction in (0.3, 0.5, 0.8):
        done = compress(demo / "m.onnx", demo / f"{metric}{fraction}.onnx", FactorizeConfig(**{metric: fraction}),
                        calib=demo / "calib.npz", progress=False)
        budget, after = _budget_and_total(done, metric)
        assert done.result.budget_reached and after <= budget
        assert after >= 0.9 * budget  # the leftover is spent, not wasted
        errors.append(done.output_error["worst"])
    assert errors[0] > errors[1] > errors[2]


def test_large_layers_get_ranks_in_multiples_of_8(demo):
    done = compress(demo / "m.onnx", demo / "r8.onnx", FactorizeConfig(params=0.5), calib=demo / "calib.npz", progress=False)
    large = [r for r in done.result.factorized if min(r.weight_shape[0], int(np.prod(r.weight_shape[1:]))) >= 64]
    assert large and all(r.rank % 8 == 0 for r in large)


def test_error_gate_keeps_every_layer_under_it(demo):
    done = compress(demo / "m.onnx", demo / "gate.onnx", FactorizeConfig(max_error=0.05), calib=demo / "calib.npz", progress=False)
    assert done.result.factorized
    assert all(r.error <= 0.05 for r in done.result.factorized)
    assert done.result.total("params_after") < done.result.total("params_before")


def test_error_gate_with_budget_stops_short_and_says_so(demo):
    done = compress(demo / "m.onnx", demo / "short.onnx", FactorizeConfig(params=0.1, max_error=0.01),
                    calib=demo / "calib.npz", progress=False)
    assert not done.result.budget_reached and done.result.warnings
    assert all(r.error <= 0.01 for r in done.result.factorized)


def test_whitened_beats_plain_on_held_out_inputs(demo):
    config = FactorizeConfig(params=0.5)
    compress(demo / "m.onnx", demo / "w.onnx", config, calib=demo / "calib.npz", progress=False)
    compress(demo / "m.onnx", demo / "p.onnx", config, progress=False)
    held = load_samples(demo / "held.npz", model_io.load(demo / "m.onnx"))
    whitened = output_error(demo / "m.onnx", demo / "w.onnx", held)["worst"]
    plain = output_error(demo / "m.onnx", demo / "p.onnx", held)["worst"]
    assert whitened < 0.75 * plain


def test_allocate_spends_the_budget_greedily_to_the_end():
    """After allocation no single affordable upgrade is left that would lower the error."""
    rng = np.random.default_rng(0)
    options = []
    for _ in range(12):
        ranks = np.arange(1, 9)
        error2 = np.sort(rng.random(8))[::-1] * rng.random()
        costs = ranks * rng.integers(1, 20)
        layer = [Choice(None, 0, float(costs[-1] * 1.5), 0.0)]
        layer += [Choice("svd", int(r), float(c), float(e)) for r, c, e in zip(ranks, costs, error2)]
        options.append(layer)
    budget = 0.4 * sum(o[0].cost for o in options)
    result = allocate(options, budget)
    assert result.reached and result.cost <= budget
    left = budget - result.cost
    for pick, layer in zip(result.choices, options):
        assert not any(c.error2 < pick.error2 and 0 < c.cost - pick.cost <= left for c in layer)


def test_demo_command_runs_offline():
    run = subprocess.run([sys.executable, "-m", "edgelr", "-q", "demo"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "factorized" in run.stdout and "plain SVD" in run.stdout
