"""`edgelr demo`: the whole flow on a small model that edgelr builds itself, offline, in seconds.

The model is a little CNN classifier whose weights have the decaying singular spectra trained
networks have, fed smooth synthetic images (correlated pixels, like photos): the setting where
data-aware whitening beats plain SVD.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgelr.api import compress
from edgelr.graph.layers import find_layers
from edgelr.io import model as model_io
from edgelr.io.samples import load_samples
from edgelr.measure.verify import output_error
from edgelr.passes.factorize import FactorizeConfig
from edgelr.report.tables import compression_table, inspect_table

SIZE = 32


def _spectral(rng: np.random.Generator, rows: int, cols: int, decay: float = 1.0) -> np.ndarray:
    """A random matrix with singular values falling as i^-decay, scaled like He initialisation."""
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.normal(size=(rows, k)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, k)))
    s = np.arange(1, k + 1, dtype=np.float64) ** -decay
    s *= np.sqrt(2 * rows / np.sum(s**2))  # per-entry variance 2 / fan_in, as He initialisation
    return (u * s) @ v.T


def build_model(seed: int = 0) -> onnx.ModelProto:
    """image [N,3,32,32] -> 3x3 convs -> 1x1 convs -> max-pool -> Gemm -> MatMul -> logits [N,10]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def weight(name, array):
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(x, out, cin, cout, k, stride):
        w = _spectral(rng, cout, cin * k * k).reshape(cout, cin, k, k)
        b = rng.normal(0, 0.01, cout)
        nodes.append(helper.make_node(
            "Conv", [x, weight(f"{out}.w", w), weight(f"{out}.b", b)], [f"{out}.pre"], name=out,
            kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
        ))
        nodes.append(helper.make_node("Relu", [f"{out}.pre"], [out]))
        return out

    x = conv("image", "conv1", 3, 32, 3, 1)
    x = conv(x, "conv2", 32, 64, 3, 2)
    x = conv(x, "conv3", 64, 64, 3, 1)
    x = conv(x, "conv4", 64, 128, 1, 1)
    x = conv(x, "conv5", 128, 8, 1, 1)
    nodes.append(helper.make_node("MaxPool", [x], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    fc = _spectral(rng, 128, 8 * 8 * 8)
    nodes.append(helper.make_node("Gemm", ["flat", weight("fc.w", fc), weight("fc.b", rng.normal(0, 0.01, 128))],
                                  ["fc.pre"], name="fc", transB=1))
    nodes.append(helper.make_node("Relu", ["fc.pre"], ["fc"]))
    head = _spectral(rng, 10, 128).T
    nodes.append(helper.make_node("MatMul", ["fc", weight("head.w", head)], ["logits"], name="head"))
    graph = helper.make_graph(
        nodes, "edgelr_demo",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgelr-demo")
    onnx.checker.check_model(model)
    return model


def synthetic_images(count: int, seed: int) -> np.ndarray:
    """Smooth random images: white noise blurred in Fourier space, so neighbouring pixels correlate."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(count, 3, SIZE, SIZE))
    f = np.fft.fftfreq(SIZE)
    falloff = 1.0 / (1.0 + (np.hypot(*np.meshgrid(f, f)) * 4) ** 2)
    images = np.real(np.fft.ifft2(np.fft.fft2(noise) * falloff))
    images /= images.std(axis=(1, 2, 3), keepdims=True)
    return images.astype(np.float32)


def run_demo(progress: bool = True, folder: str | Path | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="edgelr-demo-") as tmp:
        out = Path(folder or tmp)
        source, calib, heldout = out / "demo.onnx", out / "calib.npz", out / "heldout.npz"
        onnx.save(build_model(), source)
        np.savez(calib, image=synthetic_images(64, seed=1))
        np.savez(heldout, image=synthetic_images(32, seed=2))

        print(f"== edgelr inspect {source.name}")
        model = model_io.load(source)
        model_io.infer_shapes(model)
        print(inspect_table(*find_layers(model)))

        print(f"\n== edgelr compress {source.name} -o demo.small.onnx --params 0.5 --calib {calib.name}")
        config = FactorizeConfig(params=0.5)
        done = compress(source, out / "demo.small.onnx", config, calib=calib, progress=progress)
        print(compression_table(done.result))
        plain = compress(source, out / "demo.plain.onnx", config, progress=progress)

        print("\n== verify on held-out images (relative output error of the whole model)")
        held = load_samples(heldout, model)
        err = output_error(source, done.output, held)["worst"]
        err_plain = output_error(source, plain.output, held)["worst"]
        print(f"data-aware (whitened) SVD: {err:.3g}")
        print(f"plain SVD, same budget:    {err_plain:.3g}  ({err_plain / err:.1f}x the error)")
        size0, size1 = source.stat().st_size, done.output.stat().st_size
        print(f"file size: {size0 / 1e6:.2f} MB -> {size1 / 1e6:.2f} MB")
        if folder:
            print(f"\nfiles in {out}")
    return 0
