"""Per-layer latency tables, measured on the target runtime (ONNX Runtime CPU, here and now).

Each factorizable layer is timed alone, at its real input shape, dense and factorized at a few ranks
per form; ranks in between are interpolated (latency is close to affine in rank). Tables are cached
per runtime, version, thread count and layer signature, so compressing the same model again on the
same target measures nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from edgelr import lowrank, runner
from edgelr.layers import Layer, Use

POINTS_PER_FORM = 4  # ranks timed per form; the rest are interpolated


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELR_CACHE", Path.home() / ".cache" / "edgelr")) / "latency"


@dataclass
class LatencyBudget:
    """What FactorizeConfig(latency=F) needs: the tables, and how many seconds the layers must save.

    For a quantized target, `table` times the layers' INT8 kernels; `float_layers` (layer name ->
    (seconds, error^2)) are layers that may stay in float instead: what that adds to the quantized
    model's time and takes off its error^2, both measured on the whole model (a float layer between
    INT8 neighbours breaks their fused layout, which a layer timed alone does not show). Which layers to
    quantize is then chosen on the same budget as the ranks."""

    table: LatencyTable
    seconds: float
    float_layers: Mapping[str, tuple[float, float]] | None = None


def _read_cache(path: Path) -> dict[str, float]:
    """The cached timings, or none if the file is missing or unreadable (it is only a cache)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


class LatencyTable:
    """Seconds per layer configuration on one target, measured once and cached on disk."""

    def __init__(self, threads: int = 1, cache: Path | None = None, quantize: str | None = None):
        self.threads = threads
        self.quantize = quantize  # time the layers as this quantization scheme runs them (edgelr.quantize)
        self.target = f"ort-{ort.__version__}-cpu-t{threads}" + (f"-{quantize}" if quantize else "")
        self.path = (cache or cache_dir()) / f"{self.target}.json"
        self.entries: dict[str, float] = _read_cache(self.path)
        self.measured = 0  # configurations timed by this table (0 when everything came from the cache)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
        os.replace(tmp, self.path)

    def cost(self, layer: Layer, form: str | None, rank: int, grid: list[int]) -> float:
        """Seconds of the layer dense (form None) or factorized at `rank`, interpolated over `grid`."""
        if form is None:
            return sum(self._time(layer, use, None, 0) for use in layer.uses)
        points = _sample(grid)
        if rank in points:
            return sum(self._time(layer, use, form, rank) for use in layer.uses)
        times = [sum(self._time(layer, use, form, r) for use in layer.uses) for r in points]
        return float(np.interp(rank, points, times))

    def _time(self, layer: Layer, use: Use, form: str | None, rank: int) -> float:
        key = _signature(layer, use, form, rank)
        if key not in self.entries:
            self.entries[key] = _measure(layer, use, form, rank, self.threads, self.quantize)
            self.measured += 1
        return self.entries[key]


def interleaved_latency(models: dict, feed: dict, threads: int = 1, rounds: int = 30, per_round: int = 3,
                        warmup: int = 5) -> dict[str, float]:
    """Median seconds per run of each model (a path), timed A B C A B C ... so drift hits all alike."""
    sessions = {name: runner.session(path, threads) for name, path in models.items()}
    times = runner.time_runs(sessions, feed, rounds * per_round, warmup)
    return {name: float(np.median(t)) for name, t in times.items()}


def _sample(grid: list[int]) -> list[int]:
    """A few ranks spread over the grid, ends included."""
    if len(grid) <= POINTS_PER_FORM:
        return list(grid)
    index = np.linspace(0, len(grid) - 1, POINTS_PER_FORM).round().astype(int)
    return sorted({grid[i] for i in index})


def _signature(layer: Layer, use: Use, form: str | None, rank: int) -> str:
    node = use.node
    attrs = {k: v.value for k, v in sorted(node.attributes.items())}
    weight = tuple(ir.convenience.get_const_tensor(layer.weight).shape)
    dtype = layer.weight.dtype.name if layer.weight.dtype is not None else "FLOAT"
    bias = len(node.inputs) > 2 and node.inputs[2] is not None
    return f"{node.op_type}|{use.input_shape}|{weight}|{dtype}|{attrs}|bias={bias}|{form or 'dense'}|{rank}"


def _measure(layer: Layer, use: Use, form: str | None, rank: int, threads: int, quantize: str | None = None) -> float:
    """Median seconds of one run of the layer alone (dense or as a factorized pair) in ORT; with
    `quantize`, as the quantized model runs it (Q/DQ around it and between the pair, integer kernels)."""
    from edgelr.factorize import _rewrite  # the same graph surgery as the real pass
    from edgelr.layers import find_layers

    rng = np.random.default_rng(0)
    model = _single_layer_model(layer, use, rng)
    if form is not None:
        tiny = find_layers(model)[0][0]
        n = tiny.in_features if form != "spatial" else tiny.in_channels * tiny.kernel[0]
        m = tiny.out_features if form != "spatial" else tiny.out_features * tiny.kernel[1]
        factors = lowrank.Factors(up=rng.normal(size=(m, rank)), down=rng.normal(size=(rank, n)))
        _rewrite(model.graph, tiny, form, factors)
    x = model.graph.inputs[0]
    feed = {x.name: rng.normal(size=use.input_shape).astype(x.dtype.numpy())}
    serialized = ir.to_proto(model).SerializeToString() if not quantize else _quantized(model, quantize, feed, rng)
    session = runner.session(serialized, threads)
    session.run(None, feed)
    start = time.perf_counter()
    session.run(None, feed)
    once = time.perf_counter() - start
    runs = int(min(200, max(7, 0.05 / max(once, 1e-6))))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _quantized(model: ir.Model, scheme: str, feed: dict, rng: np.random.Generator) -> bytes:
    """The tiny model quantized as edgelr.quantize does the whole one (its calibration: random inputs)."""
    import tempfile

    from edgelr.calibrate import samples_from_arrays
    from edgelr.quantize import quantize

    name, x = next(iter(feed.items()))
    samples = samples_from_arrays({name: np.concatenate([x, rng.normal(size=x.shape).astype(x.dtype)])}, model)
    with tempfile.TemporaryDirectory(prefix="edgelr-layer-") as tmp:
        ir.save(model, Path(tmp) / "layer.onnx")
        quantize(Path(tmp) / "layer.onnx", Path(tmp) / "layer.q.onnx", scheme, samples, progress=False, prepare=False)
        return (Path(tmp) / "layer.q.onnx").read_bytes()


def _single_layer_model(layer: Layer, use: Use, rng: np.random.Generator | None) -> ir.Model:
    """A model of this one node fed at the real input shape: with random weights of the same shapes
    (timing), or with the layer's own weights when `rng` is None."""
    node = use.node
    dtype = use.input.dtype or ir.DataType.FLOAT
    x = ir.Value(name="x", shape=ir.Shape(use.input_shape), type=ir.TensorType(dtype))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": use.opset}, name="layer")

    def random(tensor) -> np.ndarray:  # shape and dtype only: a large external weight is not read
        return rng.normal(size=tuple(tensor.shape)).astype(tensor.dtype.numpy())

    stored = ir.convenience.get_const_tensor(layer.weight)
    inputs = [x, _const(graph, "w", layer.weight_array() if rng is None else random(stored))]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = ir.convenience.get_const_tensor(node.inputs[2])
        if bias is None:  # a computed bias: zeros stand in
            bias = ir.tensor(np.zeros(layer.out_features, stored.dtype.numpy()))
        inputs.append(_const(graph, "b", bias.numpy() if rng is None else random(bias)))
    attrs = {k: v.value for k, v in node.attributes.items()}
    copy = ir.node(node.op_type, inputs, attrs, name=node.name)
    graph.append(copy)
    copy.outputs[0].name = "y"
    graph.outputs.append(copy.outputs[0])
    return ir.Model(graph, ir_version=8)


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value
