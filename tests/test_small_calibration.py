"""Small calibration sets: each layer's input rows are counted against its width, a run whose samples
cannot determine some layer's Gram says so, and the damping can adapt to the rows (FactorizeConfig.adapt_damping)."""

from __future__ import annotations

import graphs
import numpy as np
import onnx

from edgelr import FactorizeConfig, compress
from edgelr.calibration.grams import Grams, collect_grams
from edgelr.core import lowrank
from edgelr.graph.layers import find_layers
from edgelr.graph.lowrank_pair import pair_of
from edgelr.io.samples import samples_from_arrays
from edgelr.passes.factorize import factorize


def _convnet_grams(count: int) -> tuple[graphs.Built, Grams]:
    built = graphs.convnet(np.random.default_rng(0))
    model = built.ir()
    layers, _ = find_layers(model)
    samples = samples_from_arrays(built.inputs(np.random.default_rng(1), count=count), model)
    return built, collect_grams(model, layers, samples, progress=False)


def test_rows_are_the_patches_and_token_rows_that_went_in():
    _, grams = _convnet_grams(3)
    # per sample a batch of 2; conv0 (3x3, stride 2, SAME_UPPER on 9x8) has 5x4 outputs, conv1 5x2, head one row
    assert grams.rows == {"conv0": 3 * 2 * 20, "conv1": 3 * 2 * 10, "head": 3 * 2}
    built = graphs.mlp(np.random.default_rng(0))  # x: (batch 2, seq 3, width 8): 6 token rows a sample
    model = built.ir()
    samples = samples_from_arrays(built.inputs(np.random.default_rng(1), count=5), model)
    assert collect_grams(model, find_layers(model)[0], samples, progress=False).rows == {"fc0": 30, "fc1": 30, "fc2": 30}


def _compress(tmp_path, count: int, name: str) -> list[str]:
    built = graphs.convnet(np.random.default_rng(0))
    onnx.save(built.proto, tmp_path / "m.onnx")
    np.savez(tmp_path / f"{name}.npz", **built.inputs(np.random.default_rng(1), count=count))
    report = compress(tmp_path / "m.onnx", tmp_path / f"{name}.onnx", FactorizeConfig(params=0.5),
                      calib=tmp_path / f"{name}.npz", progress=False, max_output_error=10, metric="none")
    return [w for w in report.result.warnings if "fewer input rows" in w]


def test_too_few_samples_warn_once_naming_the_worst_layer(tmp_path):
    # 2 samples: head sees 4 rows for its 7 inputs (the worst), conv1 40 for 36, conv0 80 for 27
    expected = ("3 layers saw fewer input rows than 4x their width (worst: head, 4 rows for 7 inputs): the "
                "whitening is fit to these samples")
    for _ in range(2):  # the second run reads the counts back from the calibration cache
        warned = _compress(tmp_path, 2, "few")
        assert len(warned) == 1 and warned[0].startswith(expected), warned
    assert _compress(tmp_path, 64, "many") == []  # head: 128 rows for 7 inputs, conv1: 1280 for 36


def test_damping_grows_only_where_rows_run_out():
    rng = np.random.default_rng(0)
    k = 24
    mix = rng.standard_normal((k, k))
    dampings = {}
    for rows in (6, 24, 96, 10_000):
        x = rng.standard_normal((rows, k)) @ mix
        dampings[rows] = lowrank.adapted_damping(0.1, x.T @ x, rows)
    assert dampings[6] > dampings[24] > dampings[96] >= 0.1
    assert dampings[10_000] == 0.1  # a well determined Gram keeps the damping as configured
    assert lowrank.adapted_damping(0.1, x.T @ x, None) == 0.1  # rows unknown


def test_factorize_whitens_a_poorly_determined_gram_closer_to_plain_svd():
    """With few rows the adapted whitening is better conditioned and its factors lie between the fixed
    damping's and plain SVD's; a Gram without row counts (a plain dict) is whitened as before."""
    built, grams = _convnet_grams(2)
    gram = grams["head"]
    fixed, adapted = (lowrank.cholesky_factor(gram, d) for d in (0.1, lowrank.adapted_damping(0.1, gram, grams.rows["head"])))
    assert np.linalg.cond(adapted) < np.linalg.cond(fixed)

    def head_weight(config: FactorizeConfig, given) -> np.ndarray:
        """The factorized head's weight, down @ up (Gemm, transB=0: in x out)."""
        model = built.ir()
        factorize(model, config, given, progress=False)
        down, up = pair_of({node.name: node for node in model.graph}, "head")
        return down.inputs[1].const_value.numpy() @ up.inputs[1].const_value.numpy()

    ranks = {"head": 2}
    weights = {name: head_weight(FactorizeConfig(ranks=ranks, adapt_damping=adapt), given)
               for name, adapt, given in (("adapted", True, grams), ("fixed", False, grams),
                                          ("no rows", True, dict(grams)), ("plain", True, None))}
    np.testing.assert_allclose(weights["no rows"], weights["fixed"], rtol=1e-5, atol=1e-6)
    gap = {name: np.linalg.norm(weights[name] - weights["plain"]) for name in ("adapted", "fixed")}
    assert gap["adapted"] < gap["fixed"]
