"""Run this bundle's model with ONNX Runtime: check its outputs against reference.npz, time it, print JSON.

    python3 run.py [--runs 20] [--warmup 3] [--threads N]

Needs only Python 3.8+, numpy and onnxruntime (see manifest.json for the version it was made for). Prints
ONE JSON object on stdout:

    {"ok": true, "parity": {"passed": true, "max_rel_error": 2e-07, ...}, "latency_ms": {"p50": ..., "p90": ...}, ...}
    {"ok": false, "error": "..."}                      when it cannot run (version, files, model)

Exit status: 0 the outputs match the reference (relative error ||a-b||/||b|| <= the manifest's tolerance,
for every output), 1 they do not, 2 an error, 3 numpy or onnxruntime is not installed.

Which onnxruntime runs the bundle: for model.ort, one with the same major version and a minor version at
least the one it was made for (ONNX Runtime reads ORT-format files written by its own or older releases, not
newer ones); for model.onnx, any of the same major version (ONNX Runtime itself rejects an opset it does not
know). XNNPACK is used when the manifest asks for it and this onnxruntime has it; the CPU provider otherwise.

This file is edgelr/export/ort_run.py, shipped as run.py; runner.py beside it is edgelr's timing core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
XNNPACK = "XNNPACKExecutionProvider"
CPU = "CPUExecutionProvider"


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


try:
    import numpy as np
    import onnxruntime as ort
except ImportError as _exc:  # a bare device: say which package is missing, still as one JSON object
    if __name__ == "__main__":
        emit({"ok": False, "error": f"python module {_exc.name} is not installed ({_exc}); "
              "pip install numpy and the onnxruntime version in manifest.json", "missing": _exc.name})
        sys.exit(3)
    raise


class BundleError(Exception):
    """Why the bundle cannot run here: one line for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # bad options are reported as JSON too, not as argparse's usage text
        raise BundleError(f"run.py: {message}")


def version_key(text: str) -> tuple:
    """'1.19.2' -> (1, 19, 2); '1.20.0.dev20240601+cpu' -> (1, 20, 0)."""
    key = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        key.append(int(digits or 0))
    return tuple(key + [0] * (3 - len(key)))


def check_version(installed: str, made_for: str, model_format: str) -> None:
    have, want = version_key(installed), version_key(made_for)
    if model_format == "ort":
        ok = have[0] == want[0] and have[:2] >= want[:2]
        need = f"onnxruntime>={want[0]}.{want[1]},<{want[0] + 1}"
    else:
        ok = have[0] == want[0]
        need = f"onnxruntime>={want[0]},<{want[0] + 1}"
    if not ok:
        raise BundleError(
            f"onnxruntime {installed} is installed, but this bundle's model.{model_format} was made for onnxruntime "
            f"{made_for}: pip install \"{need}\" (e.g. onnxruntime=={made_for}), or export the bundle again "
            f"for runtime_version = \"{installed}\""
        )


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(bundle: str, manifest: dict, names) -> None:
    """The files this run reads are the ones the bundle was made with (a copy can be cut short or edited)."""
    for name in names:
        entry = manifest["files"].get(name)
        path = os.path.join(bundle, name)
        if entry is None or not os.path.isfile(path):
            raise BundleError(f"{name}: missing from the bundle; copy the whole bundle folder again")
        if os.path.getsize(path) != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise BundleError(f"{name}: does not match its checksum in manifest.json (changed, or copied "
                              "incompletely); copy the bundle folder again")


def load_manifest(bundle: str) -> dict:
    path = os.path.join(bundle, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable bundle manifest ({exc}); copy the bundle folder again") from None
    missing = [k for k in ("model", "files", "inputs", "outputs", "onnxruntime", "parity") if k not in manifest]
    if missing:
        raise BundleError(f"{path}: not a bundle manifest (no {', '.join(missing)}); copy the bundle folder again")
    return manifest


def load_reference(bundle: str, manifest: dict):
    try:
        with np.load(os.path.join(bundle, "reference.npz"), allow_pickle=False) as z:
            feed = {spec["name"]: z[spec["reference"]] for spec in manifest["inputs"]}
            expected = {spec["name"]: z[spec["reference"]] for spec in manifest["outputs"]}
    except Exception as exc:  # noqa: BLE001  (numpy raises many types for a bad file)
        raise BundleError(f"reference.npz: cannot read it ({exc})") from None
    return feed, expected


def make_session(path: str, threads: int, wanted):
    """A session on the providers the manifest asks for that this onnxruntime has (CPU always last)."""
    available = ort.get_available_providers()
    providers = [p for p in wanted if p in available and p != CPU] + [CPU]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    options = []
    for provider in providers:
        if provider == XNNPACK:
            # XNNPACK has its own thread pool: size it, and keep ORT's pool from spinning against it (ORT's XNNPACK docs)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.append({"intra_op_num_threads": str(threads)})
        else:
            options.append({})
    try:
        session = ort.InferenceSession(path, opts, providers=providers, provider_options=options)
    except Exception as exc:  # noqa: BLE001  (ORT raises its own types for models it cannot load)
        detail = " ".join(str(exc).split())[:1000]
        raise BundleError(f"{os.path.basename(path)}: onnxruntime {ort.__version__} cannot load it: {detail}") from None
    return session, [p for p in wanted if p not in available]


def rel_error(got, want) -> float:
    """||got - want|| / ||want|| (the plain norm of the difference when the reference is all zeros)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    diff = float(np.linalg.norm((got - want).ravel()))
    scale = float(np.linalg.norm(want.ravel()))
    err = diff / scale if scale > 0 else diff
    return err if np.isfinite(err) else float("inf")


def parity(session, feed: dict, expected: dict, tolerance: float) -> dict:
    names = [o.name for o in session.get_outputs()]
    try:
        got = dict(zip(names, session.run(names, feed)))
    except Exception as exc:  # noqa: BLE001
        raise BundleError(f"the model does not run on the reference inputs: {' '.join(str(exc).split())[:1000]}") from None
    errors = {name: rel_error(got[name], want) for name, want in expected.items()}
    worst = max(errors.values()) if errors else 0.0
    return {"passed": worst <= tolerance, "tolerance": tolerance, "max_rel_error": worst, "rel_error": errors}


def main(argv=None) -> int:
    info = {"machine": platform.machine(), "python": platform.python_version(), "onnxruntime": ort.__version__}
    try:
        parser = _Parser(description="check and time this bundle's model; one JSON object on stdout")
        parser.add_argument("--runs", type=int, default=20, help="timed runs (0: only the parity check)")
        parser.add_argument("--warmup", type=int, default=3)
        parser.add_argument("--threads", type=int, default=None, help="default: the target's, from manifest.json")
        parser.add_argument("--dir", default=HERE, help="the bundle folder (default: where run.py is)")
        args = parser.parse_args(argv)
        manifest = load_manifest(args.dir)
        target = manifest.get("target", {})
        threads = args.threads if args.threads is not None else int(target.get("threads", 1))
        info.update(target=target.get("name"), model=manifest["model"], made_for=manifest["onnxruntime"]["runtime_version"])
        if args.runs < 0 or args.warmup < 0 or threads < 1:
            raise BundleError(f"--runs {args.runs}, --warmup {args.warmup}, --threads {threads}: "
                              "need runs >= 0, warmup >= 0, threads >= 1")
        model_format = manifest["model"].rsplit(".", 1)[-1]
        check_version(ort.__version__, info["made_for"], model_format)
        verify_files(args.dir, manifest, [manifest["model"], *manifest.get("model_data", []), "reference.npz", "runner.py"])
        sys.path.insert(0, args.dir)
        import runner  # edgelr's timing core (runner.py, shipped beside this file and checked above)

        feed, expected = load_reference(args.dir, manifest)
        session, unavailable = make_session(os.path.join(args.dir, manifest["model"]), threads,
                                            target.get("providers", [CPU]))
        info.update(providers=session.get_providers(), providers_unavailable=unavailable, threads=threads)
        result = parity(session, feed, expected, float(manifest["parity"]["tolerance"]))
        info.update(runs=args.runs, warmup=args.warmup)
        if args.runs:
            try:
                seconds = runner.time_runs({"model": session}, feed, args.runs, args.warmup)["model"]
            except Exception as exc:  # noqa: BLE001
                raise BundleError(f"a timed run failed: {' '.join(str(exc).split())[:1000]}") from None
            info.update(latency_ms=runner.stats(seconds), peak_rss_mb=runner.peak_rss_mb())
    except BundleError as exc:
        emit({"ok": False, "error": str(exc), **info})
        return 2
    emit({"ok": result["passed"], **info, "parity": result})
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
