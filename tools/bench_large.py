"""Time and memory of `edgelr compress` on a ~100 M-parameter transformer-like ONNX model.

    python tools/bench_large.py                        # 100 M params, plain and --calib, prints a table
    python tools/bench_large.py --params-millions 30 --out-json bench.json --phases

Builds (onnx.helper + numpy only) a pre-LN transformer encoder: a token-embedding Gather, then blocks of
LayerNormalization, Q/K/V/O MatMuls with biases, 12-head softmax attention, LayerNormalization and a
d -> 4d -> d Gelu MLP, with residual Adds; fp32. Every MatMul weight is U diag(s) V^T with s_i ~ i^-0.7
(U, V orthonormal), so the spectra decay as trained weights' do. The model is saved in a temporary
folder and `edgelr compress MODEL -o OUT --params 0.5` runs as a subprocess, once without and once
with a small calibration set; its wall time and peak resident memory come from `/usr/bin/time -v`
(or getrusage(RUSAGE_CHILDREN) in a fresh Python child where that tool is missing).

Acceptance: under 60 s wall and peak RSS under 3x the model file size.

--phases additionally runs the same compress() in a fresh child with each phase (load, calibrate,
spectra, allocation, factorize, save, verify and their parts) timed and its peak RSS measured
(Linux VmHWM, reset between phases), by wrapping edgelr's functions in that child only.
Everything temporary is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The edgelr runs get the environment as it was; this process builds the weights with one BLAS thread
# (OpenBLAS threads on a busy small machine can make a QR 10x slower, and the build is not what we time).
CHILD_ENV = dict(os.environ)
if "--phase-child" not in sys.argv:
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ALPHA = 0.7  # singular values s_i ~ i^-ALPHA
INIT_STD = 0.02  # weight RMS, as in GPT-2 / BERT initialisation
HEAD_DIM = 64
TIME_TOOL = Path("/usr/bin/time")  # GNU time; without it, getrusage(RUSAGE_CHILDREN) in a Python child
TIME_LIMIT_S = 60.0
MEMORY_LIMIT_X = 3.0


# --- the model ----------------------------------------------------------------------------------
def layout(params_millions: float, d: int) -> tuple[int, int]:
    """(blocks, vocab) so the model has about params_millions: ~85% in blocks, the rest in the embedding."""
    target = params_millions * 1e6
    ff = 4 * d
    block = 4 * d * d + 2 * d * ff + (4 * d + ff + d) + 4 * d  # weights, biases, two LayerNorms
    blocks = max(1, round(0.85 * target / block))
    vocab = max(256, round((target - blocks * block - 2 * d) / d))
    return blocks, vocab


class _Orthonormal:
    """Random matrices with orthonormal columns, fast: a few QRs per shape, then signed row permutations
    and column permutations of them (still orthonormal, and a different subspace per layer)."""

    def __init__(self, rng: np.random.Generator, pool: int = 3):
        self.rng = rng
        self.pool = pool
        self.bases: dict[tuple[int, int], list[np.ndarray]] = {}

    def __call__(self, n: int, k: int) -> np.ndarray:
        bases = self.bases.get((n, k))
        if bases is None:
            bases = [np.linalg.qr(self.rng.standard_normal((n, k), dtype=np.float32))[0] for _ in range(self.pool)]
            self.bases[(n, k)] = bases
        q = bases[self.rng.integers(len(bases))]
        rows = self.rng.permutation(n)
        cols = self.rng.permutation(k)
        signs = self.rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(n, 1))
        return q[rows][:, cols] * signs


def decaying_weight(ortho: _Orthonormal, n_in: int, n_out: int) -> np.ndarray:
    """(n_in x n_out) float32 W = U diag(s) V^T, s_i ~ i^-ALPHA, RMS INIT_STD."""
    k = min(n_in, n_out)
    s = np.arange(1, k + 1, dtype=np.float64) ** -ALPHA
    s *= INIT_STD * math.sqrt(n_in * n_out) / np.linalg.norm(s)
    u = ortho(n_in, k)
    v = ortho(n_out, k)
    return np.ascontiguousarray((u * s.astype(np.float32)) @ v.T, dtype=np.float32)


def build_model(path: Path, params_millions: float, d: int = 768, seq: int = 128, inputs: str = "ids",
                seed: int = 0) -> dict:
    """Write the model to PATH; return its sizes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    ortho = _Orthonormal(rng)
    blocks, vocab = layout(params_millions, d)
    heads, ff = d // HEAD_DIM, 4 * d
    nodes: list = []
    inits: list = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def linear(x: str, name: str, n_in: int, n_out: int) -> str:
        w = const(f"{name}.weight", decaying_weight(ortho, n_in, n_out))
        b = const(f"{name}.bias", (0.01 * rng.standard_normal(n_out)).astype(np.float32))
        return node("Add", [node("MatMul", [x, w], f"{name}/matmul"), b], f"{name}/out")

    def layernorm(x: str, name: str) -> str:
        g = const(f"{name}.weight", np.ones(d, np.float32))
        b = const(f"{name}.bias", np.zeros(d, np.float32))
        return node("LayerNormalization", [x, g, b], f"{name}/out", axis=-1, epsilon=1e-5)

    split = const("shape.split_heads", np.array([0, 0, heads, HEAD_DIM], np.int64))
    merge = const("shape.merge_heads", np.array([0, 0, d], np.int64))
    scale = const("attn.scale", np.array(1.0 / math.sqrt(HEAD_DIM), np.float32))

    if inputs == "ids":
        graph_input = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
        table = const("embed.weight", (INIT_STD * rng.standard_normal((vocab, d), dtype=np.float32)))
        h = node("Gather", [table, "input_ids"], "embed/out", axis=0)
    else:
        graph_input = helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", "seq", d])
        h = "hidden_states"
        vocab = 0

    for i in range(blocks):
        p = f"blocks.{i}"
        a = layernorm(h, f"{p}.ln1")
        q, k, v = (linear(a, f"{p}.attn.{n}", d, d) for n in "qkv")
        qh = node("Transpose", [node("Reshape", [q, split], f"{p}.attn/q_split")], f"{p}.attn/q_heads", perm=[0, 2, 1, 3])
        kh = node("Transpose", [node("Reshape", [k, split], f"{p}.attn/k_split")], f"{p}.attn/k_heads", perm=[0, 2, 3, 1])
        vh = node("Transpose", [node("Reshape", [v, split], f"{p}.attn/v_split")], f"{p}.attn/v_heads", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [qh, kh], f"{p}.attn/qk"), scale], f"{p}.attn/scores")
        probs = node("Softmax", [scores], f"{p}.attn/probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, vh], f"{p}.attn/pv")], f"{p}.attn/ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge], f"{p}.attn/ctx")
        h = node("Add", [h, linear(ctx, f"{p}.attn.o", d, d)], f"{p}/res1")
        m = layernorm(h, f"{p}.ln2")
        m = node("Gelu", [linear(m, f"{p}.mlp.up", d, ff)], f"{p}.mlp/gelu")
        h = node("Add", [h, linear(m, f"{p}.mlp.down", ff, d)], f"{p}/res2")
    out = layernorm(h, "final_ln")
    nodes[-1].output[0] = "last_hidden_state"
    del out

    graph = helper.make_graph(
        nodes, "bench_large", [graph_input],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", d])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="edgelr-bench")
    model.ir_version = 9  # opset 20 <-> IR 9
    params = sum(int(np.prod(t.dims)) for t in inits if t.data_type == TensorProto.FLOAT)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return {
        "params": params,
        "factorizable_params": blocks * (4 * d * d + 2 * d * ff),
        "blocks": blocks,
        "d_model": d,
        "vocab": vocab,
        "seq": seq,
        "inputs": inputs,
        "file_bytes": model_file_bytes(path),
    }


def model_file_bytes(path: Path) -> int:
    """The .onnx file plus any external data beside it."""
    extra = Path(str(path) + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def write_calib(path: Path, info: dict, samples: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    if info["inputs"] == "ids":
        arrays = {"input_ids": rng.integers(0, info["vocab"], size=(samples, info["seq"]), dtype=np.int64)}
    else:
        arrays = {"hidden_states": rng.standard_normal((samples, info["seq"], info["d_model"]), dtype=np.float32)}
    np.savez(path, **arrays)
    return {name: list(a.shape) for name, a in arrays.items()}


# --- measuring a subprocess ---------------------------------------------------------------------
_RUSAGE_CHILD = r"""
import resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.call(sys.argv[1:])
wall = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
scale = 1 if sys.platform.startswith("linux") else 1 / 1024  # macOS reports bytes
print(f"BENCH rc={rc} wall={wall} maxrss_kb={ru.ru_maxrss * scale} user={ru.ru_utime} sys={ru.ru_stime}", file=sys.stderr)
sys.exit(rc)
"""


def edgelr_command() -> list[str]:
    """The `edgelr` console script of this interpreter (else `python -m edgelr`)."""
    script = Path(sys.executable).with_name("edgelr")
    if script.is_file():
        return [str(script)]
    found = shutil.which("edgelr")
    return [found] if found else [sys.executable, "-m", "edgelr"]


def measure(cmd: list[str], workdir: Path, env: dict[str, str]) -> dict:
    """Run CMD; wall seconds and peak RSS (KB) of it and its children."""
    time_tool = TIME_TOOL
    stdout, stderr = workdir / "stdout.txt", workdir / "stderr.txt"
    timing = workdir / "time.txt"
    if time_tool.exists():
        full = [str(time_tool), "-v", "-o", str(timing), *cmd]
        method = "/usr/bin/time -v"
    else:
        full = [sys.executable, "-c", _RUSAGE_CHILD, *cmd]
        method = "getrusage(RUSAGE_CHILDREN)"
    start = time.perf_counter()
    with open(stdout, "w") as out, open(stderr, "w") as err:
        # its own process group: if this script is stopped, edgelr (a grandchild under `time`) stops too
        proc = subprocess.Popen(full, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
    wall = time.perf_counter() - start
    result = {"method": method, "rc": rc, "wall_s": wall, "stdout": stdout.read_text(), "stderr": stderr.read_text()}
    if time_tool.exists():
        text = timing.read_text() if timing.exists() else ""
        result["peak_rss_kb"] = _field(text, r"Maximum resident set size \(kbytes\):\s*(\d+)")
        result["user_s"] = _field(text, r"User time \(seconds\):\s*([\d.]+)")
        result["sys_s"] = _field(text, r"System time \(seconds\):\s*([\d.]+)")
        result["cpu_percent"] = _field(text, r"Percent of CPU this job got:\s*(\d+)%")
        elapsed = re.search(r"Elapsed \(wall clock\) time.*?:\s*([\d:.]+)\s*$", text, re.M)
        if elapsed:  # h:mm:ss or m:ss.ss
            parts = [float(p) for p in elapsed.group(1).split(":")]
            result["wall_s"] = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    else:
        line = re.search(r"BENCH rc=(-?\d+) wall=([\d.e+-]+) maxrss_kb=([\d.]+) user=([\d.]+) sys=([\d.]+)", result["stderr"])
        if line:
            result["wall_s"] = float(line.group(2))
            result["peak_rss_kb"] = float(line.group(3))
            result["user_s"], result["sys_s"] = float(line.group(4)), float(line.group(5))
    inner = re.search(r" in ([\d.]+) s\s*$", result["stdout"], re.M)
    result["edgelr_reported_s"] = float(inner.group(1)) if inner else None
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _field(text: str, pattern: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


# --- phase profile (runs in a fresh child) ------------------------------------------------------
class _PhaseClock:
    """Nested phase timer; peak RSS per phase from VmHWM, which is reset at every phase boundary."""

    def __init__(self):
        self.stats: dict[str, dict] = {}
        self.order: list[str] = []
        self.active: list[str] = []
        self.peak_kb = 0  # the whole run's peak (ru_maxrss would also count the parent's, inherited at exec)
        self.resettable = self._reset()

    @staticmethod
    def _status(key: str) -> int:
        try:
            with open("/proc/self/status") as f:
                m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
            return int(m.group(1)) if m else 0
        except OSError:
            return 0

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _checkpoint(self) -> int:
        hwm = self._status("VmHWM")  # without a reset it is monotone: then an upper bound per phase
        for name in self.active:
            self.stats[name]["peak_kb"] = max(self.stats[name]["peak_kb"], hwm)
        self.peak_kb = max(self.peak_kb, hwm)
        self._reset()
        return self._status("VmRSS")

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return
        clock = self

        def timed(*args, **kwargs):
            if any(key[-1] == name for key in clock.active):  # recursion: count once
                return original(*args, **kwargs)
            rss = clock._checkpoint()
            key = (clock.active[-1] if clock.active else ()) + (name,)  # the call path: a tree of phases
            row = clock.stats.get(key)
            if row is None:
                row = clock.stats[key] = {"calls": 0, "seconds": 0.0, "rss_start_kb": rss, "peak_kb": 0}
                clock.order.append(key)
            row["calls"] += 1
            row["peak_kb"] = max(row["peak_kb"], rss)
            clock.active.append(key)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                row["seconds"] += time.perf_counter() - start
                row["rss_end_kb"] = clock._checkpoint()
                clock.active.pop()

        setattr(owner, attr, timed)


def _phase_child(model: str, output: str, calib: str | None, fraction: float) -> None:
    """Run edgelr.api in this process with each phase timed; print one JSON line."""
    import importlib

    t0 = time.perf_counter()
    C = importlib.import_module("edgelr.api")  # noqa: N806 (edgelr.api the attribute is the function)
    t_import = time.perf_counter() - t0
    import onnx_ir

    calibrate, factorize, layers, lowrank, model_io = (
        importlib.import_module(f"edgelr.{m}")
        for m in ("calibration.grams", "passes.factorize", "graph.layers", "core.lowrank", "io.model")
    )
    FactorizeConfig = factorize.FactorizeConfig  # noqa: N806
    clock = _PhaseClock()
    wrap = clock.wrap
    wrap(model_io, "load", "load")
    wrap(C, "load_samples", "load_samples")
    wrap(factorize, "find_layers", "find_layers")
    wrap(calibrate, "collect_grams", "calibrate")
    wrap(onnx_ir, "to_proto", "ir.to_proto (model -> protobuf)")
    if calib is not None:  # the plain CLI path never imports onnxruntime: keep it out of the baseline
        import onnxruntime

        wrap(onnxruntime.InferenceSession, "__init__", "ORT session init")
        wrap(onnxruntime.InferenceSession, "run", "ORT run")
    wrap(calibrate, "input_gram", "gram accumulation")
    wrap(factorize, "factorize", "factorize (total)")
    wrap(factorize, "layer_options", "spectra (layer_options)")
    wrap(layers.Layer, "matrix", "weight read + float64 (Layer.matrix)")
    wrap(lowrank, "cholesky_factor", "cholesky_factor")
    wrap(lowrank, "decompose", "eigendecomposition (lowrank.decompose)")
    wrap(factorize, "choose_ranks", "allocation (choose_ranks)")
    wrap(factorize, "_apply", "factorize layers (_apply)")
    wrap(factorize, "measured_error", "measured error")
    wrap(factorize, "rewrite_pair", "graph rewrite")
    wrap(model_io, "save", "save")
    wrap(onnx_ir, "save", "ir.save")
    wrap(C, "output_error", "verify (output_error)")

    start = time.perf_counter()
    clock._checkpoint()
    C.compress(model, output, FactorizeConfig(params=fraction), calib=calib, progress=False)
    total = time.perf_counter() - start
    clock._checkpoint()
    phases = []
    for key in _tree_order(clock.order):
        row = clock.stats[key]
        phases.append({
            "phase": key[-1],
            "path": " > ".join(key),
            "depth": len(key) - 1,
            "calls": row["calls"],
            "seconds": round(row["seconds"], 3),
            "rss_start_mb": round(row["rss_start_kb"] / 1024, 1),
            "rss_end_mb": round(row.get("rss_end_kb", 0) / 1024, 1),
            "peak_rss_mb": round(row["peak_kb"] / 1024, 1),
        })
    print("PHASES " + json.dumps({
        "import_edgelr_s": round(t_import, 3),
        "compress_s": round(total, 3),
        "process_peak_rss_mb": round(clock.peak_kb / 1024, 1),
        "hwm_resettable": clock.resettable,
        "phases": phases,
    }))


def _tree_order(keys: list[tuple]) -> list[tuple]:
    """Call paths in first-seen order, each followed by its descendants."""
    children: dict[tuple, list[tuple]] = {}
    for key in keys:
        children.setdefault(key[:-1], []).append(key)
    out: list[tuple] = []

    def visit(parent: tuple) -> None:
        for key in children.get(parent, []):
            out.append(key)
            visit(key)

    visit(())
    return out


def run_phases(model: Path, output: Path, calib: Path | None, fraction: float, env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase-child", str(model), str(output),
           str(calib) if calib else "-", str(fraction)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PHASES ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"phase profile failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(line[len("PHASES "):])


# --- report -------------------------------------------------------------------------------------
def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def print_table(info: dict, rows: list[dict]) -> None:
    head = ["case", "params", "model MB", "wall s", "peak RSS MB", "RSS/model", "<60 s", "<3x", "ok"]
    lines = [head]
    for r in rows:
        lines.append([
            r["case"],
            f"{info['params'] / 1e6:.1f} M",
            _mb(info["file_bytes"]),
            f"{r['wall_s']:.1f}",
            _mb(r["peak_rss_bytes"]),
            "-" if r["rss_over_model"] is None else f"{r['rss_over_model']:.2f}x",
            "yes" if r["time_ok"] else "NO",
            "yes" if r["memory_ok"] else "NO",
            "PASS" if r["accepted"] else ("FAIL" if r["rc"] == 0 else f"rc {r['rc']}"),
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for j, line in enumerate(lines):
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_phases(case: str, prof: dict) -> None:
    print(f"\nphases, {case}: compress() {prof['compress_s']:.1f} s (+ import edgelr {prof['import_edgelr_s']:.2f} s), "
          f"process peak RSS {prof['process_peak_rss_mb']:.0f} MB")
    print(f"  {'phase':<44} {'calls':>6} {'seconds':>8} {'RSS start':>10} {'RSS end':>8} {'peak RSS':>9}")
    for p in prof["phases"]:
        name = "  " * p["depth"] + p["phase"]
        print(f"  {name:<44} {p['calls']:>6} {p['seconds']:>8.2f} {p['rss_start_mb']:>10.0f} {p['rss_end_mb']:>8.0f} "
              f"{p['peak_rss_mb']:>9.0f}")


def environment() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    versions = {}
    for mod in ("numpy", "scipy", "onnx", "onnx_ir", "onnxruntime", "edgelr"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    return {"cpus": os.cpu_count(), "loadavg": load, "python": platform.python_version(),
            "machine": platform.machine(), "versions": versions, "edgelr_git": _edgelr_git()}


def _edgelr_git() -> str | None:
    """The commit edgelr runs from (with '+dirty' when edgelr/ has uncommitted changes): results change with it."""
    try:
        import edgelr

        package = Path(edgelr.__file__).resolve().parent
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 (no git, not a checkout)
        return None


def _exit_cleanly_on_signals() -> None:
    """SIGTERM / SIGHUP exit through SystemExit, so the temporary folder (~1 GB) is still removed."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--phase-child":
        model, output, calib, fraction = argv[1:5]
        _phase_child(model, output, None if calib == "-" else calib, float(fraction))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-millions", type=float, default=100.0, help="model size (default 100)")
    parser.add_argument("--out-json", type=Path, help="write the measurements here")
    parser.add_argument("--fraction", type=float, default=0.5, help="edgelr --params F (default 0.5)")
    parser.add_argument("--samples", type=int, default=4, help="calibration samples (default 4)")
    parser.add_argument("--seq", type=int, default=128, help="calibration sequence length (default 128)")
    parser.add_argument("--d-model", type=int, default=768, help="hidden size, a multiple of 64 (default 768)")
    parser.add_argument("--inputs", choices=("ids", "hidden"), default="ids",
                        help="int64 token ids through an embedding Gather, or float hidden states (default ids)")
    parser.add_argument("--cases", default="plain,calib", help="comma list of plain, calib (default both)")
    parser.add_argument("--phases", action="store_true", help="also profile the phases in-process, per case")
    parser.add_argument("--blas-threads", type=int, help="set OPENBLAS/OMP/MKL_NUM_THREADS for the edgelr runs")
    parser.add_argument("--tmp-dir", type=Path, help="where the temporary folder goes (default: system temp)")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or any(c not in ("plain", "calib") for c in cases):
        parser.error("--cases takes plain, calib or both")
    if args.d_model % HEAD_DIM:
        parser.error(f"--d-model must be a multiple of {HEAD_DIM}")

    _exit_cleanly_on_signals()
    env = dict(CHILD_ENV)
    if args.blas_threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.blas_threads)
    report: dict = {"environment": environment(), "fraction": args.fraction, "blas_threads": args.blas_threads,
                    "limits": {"seconds": TIME_LIMIT_S, "peak_rss_over_model": MEMORY_LIMIT_X}, "cases": []}

    with tempfile.TemporaryDirectory(prefix="edgelr-bench-", dir=args.tmp_dir) as tmp:
        tmp = Path(tmp)
        model = tmp / "model.onnx"
        start = time.perf_counter()
        info = build_model(model, args.params_millions, d=args.d_model, seq=args.seq, inputs=args.inputs)
        info["build_s"] = round(time.perf_counter() - start, 2)
        report["model"] = info
        envi = report["environment"]
        print(f"edgelr {envi['versions']['edgelr']} at {envi['edgelr_git']}, {envi['cpus']} CPUs"
              + (f", load average {envi['loadavg'][0]:.1f} before starting" if envi["loadavg"] else ""))
        print(f"model: {info['params'] / 1e6:.1f} M params ({info['blocks']} blocks, d {info['d_model']}, "
              f"vocab {info['vocab']}), {info['file_bytes'] / 2**20:.0f} MB, built in {info['build_s']} s",
              flush=True)
        calib = None
        if "calib" in cases:
            calib = tmp / "calib.npz"
            report["calib_shapes"] = write_calib(calib, info, args.samples)

        rows = []
        for case in cases:
            out = tmp / f"out-{case}.onnx"
            cmd = [*edgelr_command(), "-q", "compress", str(model), "-o", str(out), "--params", str(args.fraction)]
            if case == "calib":
                cmd += ["--calib", str(calib)]
            shown = " ".join(["edgelr", *cmd[cmd.index("compress"):]]).replace(str(tmp), "$TMP")
            print(f"running: {shown}", flush=True)
            run = measure(cmd, tmp, env)
            peak = run["peak_rss_kb"] * 1024 if run.get("peak_rss_kb") is not None else None
            ratio = peak / info["file_bytes"] if peak is not None else None
            row = {
                "case": case,
                "command": shown,
                "rc": run["rc"],
                "method": run["method"],
                "wall_s": round(run["wall_s"], 2),
                "edgelr_reported_s": run["edgelr_reported_s"],
                "user_s": run.get("user_s"),
                "sys_s": run.get("sys_s"),
                "cpu_percent": run.get("cpu_percent"),
                "peak_rss_bytes": peak,
                "rss_over_model": None if ratio is None else round(ratio, 3),
                "output_bytes": model_file_bytes(out) if out.exists() else None,
                "time_ok": run["rc"] == 0 and run["wall_s"] < TIME_LIMIT_S,
                "memory_ok": run["rc"] == 0 and ratio is not None and ratio < MEMORY_LIMIT_X,
            }
            row["accepted"] = row["time_ok"] and row["memory_ok"]
            if run["rc"] != 0:
                row["stderr_tail"] = run["stderr"][-2000:]
                print(f"  edgelr failed (rc {run['rc']}):\n{run['stderr'][-2000:]}", file=sys.stderr)
            else:
                summary = [ln for ln in run["stdout"].splitlines() if ln.startswith(("whole-model", "wrote"))]
                row["stdout_summary"] = summary
                print("  " + "\n  ".join(summary).replace(str(tmp), "$TMP"), flush=True)
            for path in (out, Path(str(out) + ".data")):
                path.unlink(missing_ok=True)
            if args.phases and run["rc"] == 0:
                print(f"profiling phases ({case}) ...", flush=True)
                row["phases"] = run_phases(model, out, calib if case == "calib" else None, args.fraction, env)
                for path in (out, Path(str(out) + ".data")):
                    path.unlink(missing_ok=True)
            rows.append(row)
            report["cases"].append(row)

    report["environment"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print()
    print_table(info, rows)
    for row in rows:
        if "phases" in row:
            print_phases(row["case"], row["phases"])
    load = report["environment"]["loadavg"]
    if load and load[0] > 1.0:  # taken before this script did anything
        print(f"\nnote: load average {load[0]:.1f} on {report['environment']['cpus']} CPUs before the run: other "
              "work competed for the CPUs, so the times are pessimistic", file=sys.stderr)
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out_json}")
    return 0 if all(r["accepted"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
