"""The latency measurement core: ONNX Runtime sessions, interleaved timing, statistics, per-node table.

SELF-CONTAINED on purpose: it imports only the standard library, numpy and onnxruntime, so the same file
runs on an edge device that has nothing else (`edgelr.measure.remote` copies it there):

    python3 runner.py MODEL.onnx --inputs INPUTS.npz --runs 50 --warmup 5 --threads 1
    python3 runner.py --identity                    what this device is (a latency table's key)
    python3 runner.py --batch MANIFEST.json         the models a manifest lists, timed (edgelr.measure.device)

prints JSON lines to stdout as it goes (each flushed at once):

    {"run": 0, "ms": 1.23}                 one per timed run
    {"node_run": 0}                        one per run of the per-node (ORT profiler) pass: keep-alive
    {"layer": "0"}                         one per model of a batch timed alone: keep-alive
    {"done": true, "profile": {...}}       the same structure as edgelr.profile.Profile.to_json()
    {"done": true, "identity": {...}}      with --identity; with --batch, "batch": seconds per run per model
    {"error": "...", "missing": "numpy"}   instead of "done" when it fails ("missing" only for an import)

Exit status: 0 done, 2 a measurement error, 3 numpy or onnxruntime missing. `edgelr.measure.profile` imports
`measure` from here, so local and remote profiles come from one implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as _exc:  # on a bare device: say which package is missing, as one JSON line
    if __name__ == "__main__":
        print(json.dumps({"error": f"python module {_exc.name} is not installed ({_exc})", "missing": _exc.name}),
              flush=True)
        sys.exit(3)
    raise

try:
    import resource
except ImportError:  # not on Windows
    resource = None


class RunnerError(Exception):
    """A model that cannot be loaded or run, or bad settings: one line for the user."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def session(path, threads: int, profile_dir: str | None = None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(profile_dir, "ort")
    try:
        model = path if isinstance(path, bytes) else str(path)  # a file, or a serialized model
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  (ORT raises its own types for unreadable or unsupported models)
        where = "the model" if isinstance(path, bytes) else path
        raise RunnerError(f"{where}: ONNX Runtime cannot load it ({_first_line(exc)})") from None


def stats(seconds) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "min": float(ms.min()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "std": float(ms.std()),
    }


def node_table(path, feed: dict, runs: int, warmup: int, threads: int, on_run=None) -> list:
    """Per-node time from ORT's profiler, over `runs` runs after `warmup` (which are dropped)."""
    with tempfile.TemporaryDirectory(prefix="edgelr-profile-") as tmp:
        sess = session(path, threads, profile_dir=tmp)
        for i in range(warmup + runs):
            sess.run(None, feed)
            if on_run is not None:
                on_run(i)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first = starts[warmup] if len(starts) > warmup else 0
    total = defaultdict(float)
    ops = {}
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


def time_runs(sessions: dict, feed: dict, runs: int, warmup: int, on_run=None) -> dict:
    """Each session run `runs` times, interleaved A B A B ..., after `warmup` runs each (seconds)."""
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times = {name: [] for name in sessions}
    for i in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            if on_run is not None:
                on_run(name, i, elapsed)
    return times


def alone_runs(session, feed: dict, budget_s: float = 0.05) -> int:
    """How many runs of a model timed alone fill about `budget_s` (7 to 200), after one warm-up run: a layer
    runs for microseconds, and too few runs of it leave the interpreter's jitter in the median."""
    session.run(None, feed)
    start = time.perf_counter()
    session.run(None, feed)
    once = time.perf_counter() - start
    return int(min(200, max(7, budget_s / max(once, 1e-6))))


def identity() -> dict:
    """What timings taken here depend on, and nothing that names this one unit: devices alike share tables."""
    return {"machine": platform.machine(), "cpu": _cpu_model(), "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "providers": sorted(ort.get_available_providers())}


def _cpu_model() -> str:
    """The board's name where the device tree gives one (a Pi, a Jetson), else the CPU's from /proc/cpuinfo."""
    try:
        with open("/proc/device-tree/model", "rb") as f:
            return f.read().decode(errors="replace").strip("\0\n ")
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        fields = {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    named = fields.get("model name") or fields.get("Hardware") or fields.get("Model")
    parts = [f"{fields[k]}" for k in ("CPU implementer", "CPU part") if k in fields]  # ARM cores without a name
    return named or ("ARM " + "/".join(parts) if parts else platform.processor() or "unknown")


def run_batch(manifest: dict, emit) -> dict:
    """Time what MANIFEST lists, with its "threads": each of its "layers" ({"id", "model", "input"}, the input's
    array in "layer_inputs" under its id) alone, and its "interleaved" models ({"models": {name: file}, "inputs",
    "runs", "warmup"}) A B A B. Seconds per run, per id and per name; emit(obj) keeps the caller's connection alive."""
    threads = int(manifest["threads"])
    layers = {}
    if manifest.get("layers"):
        with np.load(manifest["layer_inputs"], allow_pickle=False) as arrays:
            for item in manifest["layers"]:
                sess, feed = session(item["model"], threads), {item["input"]: arrays[item["id"]]}
                layers[item["id"]] = time_runs({"": sess}, feed, alone_runs(sess, feed), 0)[""]
                emit({"layer": item["id"]})
    interleaved = None
    job = manifest.get("interleaved")
    if job:
        with np.load(job["inputs"], allow_pickle=False) as z:
            feed = {k: z[k] for k in z.files}
        sessions = {name: session(path, threads) for name, path in job["models"].items()}
        first = next(iter(sessions))
        interleaved = time_runs(sessions, feed, int(job["runs"]), int(job["warmup"]),
                                on_run=lambda name, i, sec: emit({"run": i}) if name == first else None)
    return {"layers": layers, "interleaved": interleaved}


def peak_rss_mb() -> float:
    if resource is None:
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def check_settings(runs: int, warmup: int, threads: int) -> None:
    if runs < 1 or warmup < 0 or threads < 1:
        raise RunnerError(
            f"--runs {runs}, --warmup {warmup}, --threads {threads}: need runs >= 1, warmup >= 0, threads >= 1"
        )


def measure(models: dict, feed: dict, runs: int, warmup: int, threads: int, on_run=None, on_node_run=None) -> dict:
    """{name: Profile.to_json()-shaped dict} for each model: timed interleaved, then each one's node table.

    on_run(name, i, seconds) is called after each timed run, on_node_run(i) after each profiler run.
    """
    check_settings(runs, warmup, threads)
    sessions = {name: session(path, threads) for name, path in models.items()}
    try:
        times = time_runs(sessions, feed, runs, warmup, on_run)
    except Exception as exc:  # noqa: BLE001  (any failure of a run)
        raise RunnerError(f"the model does not run on these inputs ({_first_line(exc)})") from None
    peak = peak_rss_mb()
    out = {}
    for name, path in models.items():
        s = stats(times[name])
        out[name] = {
            "model": os.fspath(path), "runs": runs, "warmup": warmup, "threads": threads, "latency_ms": s,
            "throughput_per_s": 1e3 / s["mean"], "peak_rss_mb": peak,
            "nodes": node_table(path, feed, runs, warmup, threads, on_node_run),
            "onnxruntime": ort.__version__,
        }
    return out


def _batch_file(path: str) -> dict:
    try:
        with open(path) as f:
            return run_batch(json.load(f), _emit)
    except RunnerError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise RunnerError(f"{path}: not a batch this runner can time ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001  (a model that does not run: ORT raises its own types)
        raise RunnerError(f"a model of the batch does not run ({_first_line(exc)})") from None


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="time an ONNX model with ONNX Runtime; JSON lines on stdout")
    parser.add_argument("model", nargs="?")
    parser.add_argument("--inputs", help=".npz with one array per model input")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--identity", action="store_true", help="say what this device is, and nothing else")
    parser.add_argument("--batch", metavar="MANIFEST.json", help="time the models a manifest lists (run_batch)")
    args = parser.parse_args(argv)
    if args.identity:
        _emit({"done": True, "identity": identity()})
        return 0
    if args.batch is None and (args.model is None or args.inputs is None):
        parser.error("give MODEL and --inputs INPUTS.npz (or --identity, or --batch MANIFEST.json)")
    try:
        if args.batch is not None:
            _emit({"done": True, "batch": _batch_file(args.batch)})
            return 0
        try:
            with np.load(args.inputs, allow_pickle=False) as z:
                feed = {k: z[k] for k in z.files}
        except Exception as exc:  # noqa: BLE001  (numpy raises many types for a bad file)
            raise RunnerError(f"{args.inputs}: cannot read the inputs ({_first_line(exc)})") from None
        found = measure(
            {"model": args.model}, feed, args.runs, args.warmup, args.threads,
            on_run=lambda name, i, sec: _emit({"run": i, "ms": sec * 1e3}),
            on_node_run=lambda i: _emit({"node_run": i}),
        )
    except RunnerError as exc:
        _emit({"error": str(exc)})
        return 2
    _emit({"done": True, "profile": found["model"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
