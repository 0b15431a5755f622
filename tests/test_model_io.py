"""Large-model paths: external data in and out, memory-mapped weights, ORT through files."""

from __future__ import annotations

import graphs as G
import numpy as np
import onnx
import onnxruntime as ort

from edgelr import FactorizeConfig, compress
from edgelr.io import model as model_io


def _run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _mlp(tmp_path, external: bool):
    rng = np.random.default_rng(0)
    built = G.mlp(rng, width=64)
    path = tmp_path / "mlp.onnx"
    onnx.save(built.proto, path, save_as_external_data=external, all_tensors_to_one_file=True,
              location="mlp.onnx.data", size_threshold=1024)
    feed = built.inputs(rng)
    np.savez(tmp_path / "calib.npz", **built.inputs(rng, count=8))
    return path, feed


def test_external_data_model_in_and_out(tmp_path, monkeypatch):
    """An input with external data compresses; an output past the inline limit gets its own data file."""
    source, feed = _mlp(tmp_path, external=True)
    monkeypatch.setattr(model_io, "_INLINE_LIMIT_BYTES", 1)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    done = compress(source, out, FactorizeConfig(params=0.5), calib=tmp_path / "calib.npz", progress=False)
    assert done.result.factorized
    assert (out.parent / "small.onnx.data").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]  # no temp left
    y, y0 = _run(out, feed), _run(source, feed)  # both run, from their own folders' data files
    assert y.shape == y0.shape and np.isfinite(y).all()


def test_lazy_path_gives_the_same_model(tmp_path, monkeypatch):
    """Past _LAZY_BYTES weights are memory-mapped and ORT gets files: the result must not change."""
    source, feed = _mlp(tmp_path, external=False)
    config = FactorizeConfig(params=0.5)
    eager = compress(source, tmp_path / "eager.onnx", config, calib=tmp_path / "calib.npz", progress=False)
    monkeypatch.setattr(model_io, "_LAZY_BYTES", 1)
    lazy = compress(source, tmp_path / "lazy.onnx", config, calib=tmp_path / "calib.npz", progress=False)
    assert [(r.form, r.rank) for r in eager.result.layers] == [(r.form, r.rank) for r in lazy.result.layers]
    assert np.allclose(_run(tmp_path / "eager.onnx", feed), _run(tmp_path / "lazy.onnx", feed), rtol=1e-5, atol=1e-6)
    assert eager.output_error["all"] == lazy.output_error["all"] or np.isclose(
        eager.output_error["all"], lazy.output_error["all"], rtol=1e-4
    )
