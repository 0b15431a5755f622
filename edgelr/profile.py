"""Latency profiling on this machine: end to end and per node, from ONNX Runtime's own profiler.

    report = profile_model("model.onnx", feed, runs=50)            # one model
    both = compare_models("a.onnx", "b.onnx", feed, runs=50)        # interleaved, with ratios

Timings are ONNX Runtime CPU with a fixed intra-op thread count. Node names are ORT's after its graph
optimizations (fused nodes get new names, e.g. `conv1_nchwc`), which is what really ran.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelr.errors import EdgelrError


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

    def to_json(self) -> dict:
        return asdict(self)


def _session(path: str | Path, threads: int, profile_dir: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "ort")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own types for unreadable or unsupported models
        raise EdgelrError(f"{path}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "min": float(ms.min()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "std": float(ms.std()),
    }


def _node_table(path: str | Path, feed: dict, runs: int, warmup: int, threads: int) -> list[dict]:
    """Per-node time from ORT's profiler, over `runs` runs after `warmup` (which are dropped)."""
    with tempfile.TemporaryDirectory(prefix="edgelr-profile-") as tmp:
        session = _session(path, threads, profile_dir=tmp)
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first = starts[warmup] if len(starts) > warmup else 0
    total: dict[str, float] = defaultdict(float)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first:
            continue
        name = e["name"][: -len("_kernel_time")]
        total[name] += e["dur"] / 1e3  # microseconds -> ms
        ops[name] = e.get("args", {}).get("op_name", "?")
    whole = sum(total.values()) or 1.0
    rows = [
        {"name": n, "op": ops[n], "total_ms": t, "mean_ms": t / runs, "share": t / whole}
        for n, t in total.items()
    ]
    return sorted(rows, key=lambda r: -r["total_ms"])


def _time(sessions: dict[str, ort.InferenceSession], feed: dict, runs: int, warmup: int) -> dict[str, list[float]]:
    """Each session run `runs` times, interleaved A B A B ..., after `warmup` runs each."""
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return times


def profile_model(path: str | Path, feed: dict, runs: int = 50, warmup: int = 5, threads: int = 1) -> Profile:
    return compare_models({"model": path}, feed, runs, warmup, threads)["model"]


def compare_models(models: dict[str, str | Path], feed: dict, runs: int = 50, warmup: int = 5,
                   threads: int = 1) -> dict[str, Profile]:
    """End-to-end latency of each model, measured interleaved in one run, and each one's node table."""
    if runs < 1 or warmup < 0 or threads < 1:
        raise EdgelrError(f"--runs {runs}, --warmup {warmup}, --threads {threads}: need runs >= 1, warmup >= 0, threads >= 1")
    sessions = {name: _session(path, threads) for name, path in models.items()}
    try:
        times = _time(sessions, feed, runs, warmup)
    except Exception as exc:
        raise EdgelrError(f"the model does not run on these inputs ({str(exc).strip().splitlines()[0][:200]})") from None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {}
    for name, path in models.items():
        stats = _stats(times[name])
        out[name] = Profile(
            model=os.fspath(path), runs=runs, warmup=warmup, threads=threads, latency_ms=stats,
            throughput_per_s=1e3 / stats["mean"], peak_rss_mb=peak,
            nodes=_node_table(path, feed, runs, warmup, threads),
        )
    return out


def layer_of(node_name: str) -> str:
    """The source layer a runtime node belongs to: factorized pairs and ORT's renamed kernels folded."""
    name = node_name
    for suffix in ("/lowrank_down", "/lowrank_up", "/lowrank_mid"):
        name = name.replace(suffix, "")
    for suffix in ("_nchwc", "_token"):
        if suffix in name:
            name = name[: name.index(suffix)]
    return name


def per_layer_ratios(a: Profile, b: Profile) -> list[dict]:
    """Mean ms per source layer in A and B, and B / A, for layers present in both; slowest in A first."""
    def by_layer(p: Profile) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for row in p.nodes:
            out[layer_of(row["name"])] += row["mean_ms"]
        return out

    ta, tb = by_layer(a), by_layer(b)
    rows = [{"layer": k, "a_ms": ta[k], "b_ms": tb[k], "ratio": tb[k] / ta[k]} for k in ta if k in tb and ta[k] > 0]
    return sorted(rows, key=lambda r: -r["a_ms"])


def sample_feed(path: str | Path, calib: str | Path | None = None, seed: int = 0) -> dict:
    """The first calibration sample, or random inputs where every input dim is fixed."""
    from edgelr import model_io
    from edgelr.calibrate import load_samples, model_inputs

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
