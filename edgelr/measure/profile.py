"""Latency profiling on this machine: end to end and per node, from ONNX Runtime's own profiler.

    report = profile_model("model.onnx", feed, runs=50)            # one model
    both = compare_models({"A": "a.onnx", "B": "b.onnx"}, feed)     # interleaved; per_layer_ratios(both["A"], both["B"])

Timings are ONNX Runtime CPU with a fixed intra-op thread count. Node names are ORT's after its graph
optimizations (fused nodes get new names, e.g. `conv1_nchwc`), which is what really ran.
The measurement itself lives in `edgelr.measure.runner` (self-contained, also run on remote devices by
`edgelr.remote.profile_remote`); this module wraps it in `Profile` objects and compares them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelr.errors import EdgelrError
from edgelr.measure import runner


@dataclass
class Profile:
    model: str
    runs: int
    warmup: int
    threads: int
    latency_ms: dict[str, float]  # min, p50, p90, p99, mean, std over the timed runs
    throughput_per_s: float
    peak_rss_mb: float  # of this process, whose only big work was these sessions
    nodes: list[dict]  # name, op, total_ms, mean_ms, share; slowest first
    onnxruntime: str = ort.__version__
    host: str | None = None  # None: this machine; else the USER@HOST it was measured on (edgelr.measure.remote)

    def to_json(self) -> dict:
        return asdict(self)


def profile_model(path: str | Path, feed: dict, runs: int = 50, warmup: int = 5, threads: int = 1) -> Profile:
    return compare_models({"model": path}, feed, runs, warmup, threads)["model"]


def compare_models(models: dict[str, str | Path], feed: dict, runs: int = 50, warmup: int = 5,
                   threads: int = 1) -> dict[str, Profile]:
    """End-to-end latency of each model, measured interleaved in one run, and each one's node table."""
    try:
        found = runner.measure(models, feed, runs, warmup, threads)
    except runner.RunnerError as exc:
        raise EdgelrError(str(exc)) from None
    return {name: Profile(**data) for name, data in found.items()}


def layer_of(node_name: str) -> str:
    """The source layer a runtime node belongs to: factorized pairs and ORT's renamed kernels folded."""
    name = node_name.removeprefix("fused ")  # Gemm + Relu -> FusedGemm "fused fc"
    for suffix in ("/lowrank_down", "/lowrank_up", "/lowrank_mid"):
        name = name.replace(suffix, "")
    for suffix in ("_nchwc", "_token"):
        if suffix in name:
            name = name[: name.index(suffix)]
    return name


def layer_aliases(layers) -> dict[str, str]:
    """Runtime names -> edgelr layer name: ORT names some fused kernels after the node's output
    (`/conv/Conv_output_0_nchwc`), so both the node and its output name lead to the layer."""
    aliases = {}
    for layer in layers:
        for use in layer.uses:
            aliases[use.node.name] = layer.name
            aliases[use.node.outputs[0].name] = layer.name
    return aliases


def layer_times(p: Profile, aliases: dict[str, str] | None = None) -> dict[str, float]:
    """Mean ms per run of each source layer (a factorized pair counts as its layer)."""
    aliases = aliases or {}
    out: dict[str, float] = defaultdict(float)
    for row in p.nodes:
        name = layer_of(row["name"])
        out[aliases.get(name, name)] += row["mean_ms"]
    return out


def per_layer_ratios(a: Profile, b: Profile, aliases: dict[str, str] | None = None) -> list[dict]:
    """Mean ms per source layer in A and B, and B / A, for layers present in both; slowest in A first."""
    ta, tb = layer_times(a, aliases), layer_times(b, aliases)
    rows = [{"layer": k, "a_ms": ta[k], "b_ms": tb[k], "ratio": tb[k] / ta[k]} for k in ta if k in tb and ta[k] > 0]
    return sorted(rows, key=lambda r: -r["a_ms"])


def sample_feed(path: str | Path, calib: str | Path | None = None, seed: int = 0) -> dict:
    """The first calibration sample, or random inputs where every input dim is fixed."""
    from edgelr.io import model as model_io
    from edgelr.io.samples import load_samples, model_inputs

    model = model_io.load(path)
    if calib is not None:
        return load_samples(calib, model).feed(0)
    rng = np.random.default_rng(seed)
    feed = {}
    for value in model_inputs(model):
        dims = list(value.shape.dims) if value.shape is not None else None
        if dims is None or any(not isinstance(d, int) or d < 0 for d in dims):
            raise EdgelrError(
                f"{path}: input '{value.name}' has dynamic dims {dims}; pass --calib DATA.npz with real inputs"
            )
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        kind = np.dtype(dtype).kind
        feed[value.name] = rng.standard_normal(dims).astype(dtype) if kind == "f" else np.zeros(dims, dtype)
    return feed
