"""Per-layer latency tables, measured on the target runtime (ONNX Runtime CPU, here and now).

Each factorizable layer is timed alone, at its real input shape, dense and factorized at a few ranks
per form; ranks in between are interpolated (latency is close to affine in rank). Tables are cached
per runtime, version, thread count and layer signature, so compressing the same model again on the
same target measures nothing. A timing whose spread stayed over SPREAD_LIMIT (the machine was busy) is
used by the run that took it and never cached: a cached mistake would mislead every later run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from edgelr.core import lowrank
from edgelr.graph.extract import single_layer_model
from edgelr.graph.layers import Layer, Use, find_layers
from edgelr.graph.lowrank_pair import (
    rewrite_pair,  # the same graph surgery as the real pass
)
from edgelr.io.samples import samples_from_arrays
from edgelr.measure import runner
from edgelr.measure.latency import LAYER_LEEWAY, Timing, spread, steadiest
from edgelr.passes.quantize import quantize

POINTS_PER_FORM = 4  # ranks timed per form; the rest are interpolated
GUESS_S_PER_FLOP = 1e-10  # a layer's time while its timing waits for the batch (LatencyTable.batched)
T = TypeVar("T")


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELR_CACHE", Path.home() / ".cache" / "edgelr")) / "latency"



def _read_cache(path: Path) -> dict[str, float]:
    """The cached timings, or none if the file is missing or unreadable (it is only a cache)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


class LatencyTable:
    """Seconds per layer configuration on one target, measured once and cached on disk."""

    def __init__(self, threads: int = 1, cache: Path | None = None, quantize: str | None = None,
                 activations: str = "uint8", timer=None):
        self.threads = threads
        self.quantize = quantize  # time the layers as this quantization scheme runs them (edgelr.passes.quantize)
        self.activations = activations  # ... with this activation type (the target's: activations_for)
        self.timer = timer  # times the layers on a device (edgelr.measure.device.DeviceTimer); None: here
        # one table per runtime (a device's: its identity), threads and kernel flavour: what the timings depend on
        runtime = timer.runtime if timer is not None else f"ort-{ort.__version__}-cpu"
        self.target = (f"{runtime}-t{threads}" + (f"-{quantize}" if quantize else "")
                       + (f"-{activations}" if quantize and activations != "uint8" else ""))
        self.path = (cache or cache_dir()) / f"{self.target}.json"
        self.entries: dict[str, float] = _read_cache(self.path)
        if timer is not None:  # what the file's timings belong to, for whoever reads it
            self.entries["device"] = timer.identity | {"threads": threads}
        self.pending: dict | None = None  # in batched(): the layer timings still to take
        self.measured = 0  # configurations timed by this table (0 when everything came from the cache)
        self.unstable: set[str] = set()  # entries timed on a busy machine: used by this run, never saved

    def record(self, key: str, value, stable: bool) -> None:
        """An entry, saved with the table only if what it came from was timed `stable`."""
        self.entries[key] = value
        if stable:
            self.unstable.discard(key)
        else:
            self.unstable.add(key)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        steady = {key: value for key, value in self.entries.items() if key not in self.unstable}
        tmp.write_text(json.dumps(steady, indent=0, sort_keys=True))
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

    def batched(self, allocate: Callable[[], T]) -> T:
        """allocate(), with the layer timings it asks for taken together: on a device, one batch (one SSH round
        trip) rather than one per layer. Meanwhile a missing timing is a guess in proportion to FLOPs, and
        allocate() runs again once they are real. Here (no timer) each layer is timed as it is asked for."""
        if self.timer is None:
            return allocate()
        while True:  # ends: every pass times what it missed, and a model has finitely many configurations
            self.pending = {}
            try:
                done = allocate()
            finally:
                pending, self.pending = self.pending, None
            if not pending:
                return done
            self._take(pending)

    def _time(self, layer: Layer, use: Use, form: str | None, rank: int) -> float:
        key = _signature(layer, use, form, rank)
        if key not in self.entries:
            if self.pending is not None:
                self.pending[key] = (layer, use, form, rank)
                return (layer.cost("flops", form, rank) or 0) / len(layer.uses) * GUESS_S_PER_FLOP
            if self.timer is not None:
                self._take({key: (layer, use, form, rank)})
            else:
                timing = _measure(layer, use, form, rank, self.threads, self.quantize, self.activations)
                self.record(key, timing.seconds["layer"], timing.stable)
                self.measured += 1
        return self.entries[key]

    def _take(self, pending: dict[str, tuple]) -> None:
        """Time `pending` ({key: (layer, use, form, rank)}) on the device, as one batch."""
        models = {key: _layer_model(*args, self.quantize, self.activations) for key, args in pending.items()}
        for key, timing in self.timer.layers(models, self.threads).items():
            self.record(key, timing.seconds["layer"], timing.stable)
        self.measured += len(models)



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


def _measure(layer: Layer, use: Use, form: str | None, rank: int, threads: int, quantize: str | None = None,
             activations: str = "uint8") -> Timing:
    """Median seconds of one run of the layer alone (dense or as a factorized pair) in ORT, as
    Timing.seconds["layer"], re-measured while unstable; with `quantize`, as the quantized model runs it
    (Q/DQ around it and between the pair, integer kernels)."""
    serialized, feed = _layer_model(layer, use, form, rank, quantize, activations)
    session = runner.session(serialized, threads)
    runs = runner.alone_runs(session, feed)

    def timed() -> Timing:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        return Timing({"layer": float(np.median(times))}, spread(times), LAYER_LEEWAY)

    return steadiest(timed)


def _layer_model(layer: Layer, use: Use, form: str | None, rank: int, quantize: str | None,
                 activations: str) -> tuple[bytes, dict]:
    """The layer alone (dense, or factorized at `rank`; quantized with `quantize`), serialized, and a feed for it."""
    rng = np.random.default_rng(0)
    model = single_layer_model(layer, use, rng)
    if form is not None:
        tiny = find_layers(model)[0][0]
        n = tiny.in_features if form != "spatial" else tiny.in_channels * tiny.kernel[0]
        m = tiny.out_features if form != "spatial" else tiny.out_features * tiny.kernel[1]
        factors = lowrank.Factors(up=rng.normal(size=(m, rank)), down=rng.normal(size=(rank, n)))
        rewrite_pair(model.graph, tiny, form, factors)
    x = model.graph.inputs[0]
    feed = {x.name: rng.normal(size=use.input_shape).astype(x.dtype.numpy())}
    serialized = ir.to_proto(model).SerializeToString() if not quantize else _quantized(model, quantize, activations, feed, rng)
    return serialized, feed


def _quantized(model: ir.Model, scheme: str, activations: str, feed: dict, rng: np.random.Generator) -> bytes:
    """The tiny model quantized as edgelr.passes.quantize does the whole one (its calibration: random inputs)."""
    name, x = next(iter(feed.items()))
    samples = samples_from_arrays({name: np.concatenate([x, rng.normal(size=x.shape).astype(x.dtype)])}, model)
    with tempfile.TemporaryDirectory(prefix="edgelr-layer-") as tmp:
        ir.save(model, Path(tmp) / "layer.onnx")
        quantize(Path(tmp) / "layer.onnx", Path(tmp) / "layer.q.onnx", scheme, samples, activations=activations,
                 progress=False, prepare=False)
        return (Path(tmp) / "layer.q.onnx").read_bytes()



