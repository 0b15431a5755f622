"""Latency profiling on this machine: end to end and per node, from ONNX Runtime's own profiler.

    feed = sample_feed("model.onnx")                                # --calib's first sample, or sized random inputs
    report = profile_model("model.onnx", feed, runs=50)            # one model
    both = compare_models({"A": "a.onnx", "B": "b.onnx"}, feed, settings=run_settings(load_target("rpi5")))
    comparison(both["A"], both["B"])                                # B / A end to end, and per layer

Timings are ONNX Runtime CPU with a fixed intra-op thread count (a target's, with run_settings, which also
says when the target is not this machine). Node names are ORT's after its graph
optimizations (fused nodes get new names, e.g. `conv1_nchwc`), which is what really ran.
The measurement itself lives in `edgelr.measure.runner` (self-contained, also run on remote devices by
`edgelr.remote.profile_remote`); this module wraps it in `Profile` objects and compares them.
"""

from __future__ import annotations

import platform
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import onnxruntime as ort

from edgelr.errors import EdgelrError
from edgelr.graph.lowrank_pair import unpaired
from edgelr.io.shapes import input_feed
from edgelr.measure import runner

CPU = "CPUExecutionProvider"


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
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    target: str | None = None  # the target whose settings (threads) it ran with

    def to_json(self) -> dict:
        return asdict(self)


def profile_model(path: str | Path, feed: dict, runs: int = 50, warmup: int = 5, threads: int = 1) -> Profile:
    return compare_models({"model": path}, feed, runs, warmup, threads)["model"]


def compare_models(models: dict[str, str | Path], feed: dict, runs: int = 50, warmup: int = 5,
                   threads: int = 1, *, settings: RunSettings | None = None) -> dict[str, Profile]:
    """End-to-end latency of each model, measured interleaved in one run, and each one's node table.
    `settings` (run_settings: a target's threads) replaces `threads`."""
    if settings is not None:
        threads = settings.threads
    try:
        found = runner.measure(models, feed, runs, warmup, threads)
    except runner.RunnerError as exc:
        raise EdgelrError(str(exc)) from None
    target = settings.target if settings is not None else None
    return {name: Profile(**data, target=target) for name, data in found.items()}


def layer_of(node_name: str) -> str:
    """The source layer a runtime node belongs to: factorized pairs and ORT's renamed kernels folded."""
    name = node_name.removeprefix("fused ")  # Gemm + Relu -> FusedGemm "fused fc"
    name = unpaired(name)
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


def sample_feed(path: str | Path, calib: str | Path | None = None, seed: int = 0, shapes: dict | None = None) -> dict:
    """The first calibration sample, or random inputs at the sizes `shapes` or the model's metadata give
    (edgelr.io.shapes.input_feed on the model file; SizesUnknown names --shapes when nothing does)."""
    from edgelr.io import model as model_io
    from edgelr.io.samples import load_samples

    model = model_io.load(path)
    samples = load_samples(calib, model) if calib is not None else None
    return input_feed(model, samples=samples, shapes=shapes, where=path, seed=seed)


# --- where and how it runs ---------------------------------------------------------------------------------
_ARCH_NAMES = {"amd64": "x86_64", "x86_64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


def host_arch() -> str:
    """This machine's CPU architecture, named as targets name it (x86_64, aarch64)."""
    machine = platform.machine().lower()
    return _ARCH_NAMES.get(machine, machine)


@dataclass(frozen=True)
class RunSettings:
    """How a profile runs: intra-op threads and execution providers, and what to tell the user about them."""

    threads: int
    providers: tuple[str, ...] = (CPU,)  # those the timed sessions use
    target: str | None = None
    notes: tuple[str, ...] = ()          # e.g. the target is another architecture: these timings are this host's


def run_settings(target=None, threads: int | None = None, remote: str | None = None) -> RunSettings:
    """Threads and providers for profiling: `threads` if given, else the target's (a deploy Target, or any
    object with name, arch, backend, threads, providers), else 1. With no `remote` (USER@HOST), notes say
    when the target is not this machine, so the timings are this host's, not the device's."""
    if threads is not None and threads < 1:
        raise EdgelrError(f"--threads {threads}: need threads >= 1")
    if target is None:
        return RunSettings(threads or 1)
    notes = []
    backend = getattr(target, "backend", "onnxruntime")
    if remote is None and backend != "onnxruntime":
        notes.append(f"target '{target.name}' runs {backend} on its GPU; these are ONNX Runtime CPU timings on this "
                     f"host ({host_arch()}), not the device's: export it and time it there")
    elif remote is None and target.arch != host_arch():
        notes.append(f"target '{target.name}' is {target.arch} and this host is {host_arch()}: these timings are "
                     "this host's, not the device's (add --on USER@HOST to time it on the device)")
    # edgelr.measure.runner (which also runs on devices) opens CPU sessions: other providers are not timed
    others = [p for p in getattr(target, "providers", ()) if p != CPU]
    if others and backend == "onnxruntime":
        lacking = [p for p in others if p not in ort.get_available_providers()]
        why = (f"this onnxruntime ({ort.__version__}) lacks {', '.join(lacking)}" if lacking == others else
               "edgelr's profiler times CPU sessions only")
        notes.append(f"target '{target.name}' prefers {', '.join(others)}; {why}: timed on {CPU}")
    return RunSettings(threads or target.threads, (CPU,), target.name, tuple(notes))


def end_to_end_ratio(a: Profile, b: Profile, stat: str = "p50") -> float:
    """B's latency over A's (below 1: B is faster)."""
    return b.latency_ms[stat] / a.latency_ms[stat]


def comparison(a: Profile, b: Profile, aliases: dict[str, str] | None = None) -> dict:
    """{"ratio_p50": B / A end to end, "speedup": A / B, "layers": per_layer_ratios(a, b, aliases)}."""
    ratio = end_to_end_ratio(a, b)
    return {"ratio_p50": ratio, "speedup": 1 / ratio, "layers": per_layer_ratios(a, b, aliases)}
