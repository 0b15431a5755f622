"""Compression flows judged by what the model is for: the task metric and each output group's error on
held-out inputs, and the speed of each model beside the original and ONNX Runtime's INT8 alone.

    python tools/photos.py --detector --out calib.npz --heldout heldout.npz
    python tools/bench_task.py MODEL.onnx --calib calib.npz --heldout heldout.npz \\
        --flow "latency=0.5" --flow "latency=0.5 quantize=int8" --json docs/bench_task_yolov8n.json

`--model NAME=PATH` judges and times a model made elsewhere (an earlier edgelr, another tool) beside them.
A flow is `key=value` words: a budget (params, flops, latency), prune, quantize, metric/floor and
max_output_error. Every model is timed in the same interleaved runs (ONNX Runtime CPU, 1 thread,
median), so the ratios are comparable; a flow the gate refuses is reported with what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelr.api import compress
from edgelr.errors import EdgelrError
from edgelr.io.model import load
from edgelr.io.samples import load_samples
from edgelr.measure.latency import interleaved_latency
from edgelr.measure.task import recognise
from edgelr.measure.verify import judge
from edgelr.passes.factorize import FactorizeConfig


def run_flow(source: Path, out: Path, flow: str, calib: str, heldout: str, metric: str | None, floor: float | None) -> dict:
    words = dict(word.split("=", 1) for word in flow.split())
    budget = {k: float(words.pop(k)) for k in ("params", "flops", "latency", "max_error") if k in words}
    start = time.perf_counter()
    try:
        done = compress(source, out, FactorizeConfig(**budget) if budget else None, calib=calib, heldout=heldout,
                        quantize=words.pop("quantize", None), prune=float(words["prune"]) if "prune" in words else None,
                        metric=words.pop("metric", metric), floor=float(words.pop("floor", floor or 0)) or None,
                        max_output_error=float(words["max_output_error"]) if "max_output_error" in words else None,
                        progress=False)
    except EdgelrError as exc:
        return {"refused": str(exc), "seconds": time.perf_counter() - start}
    return {"seconds": done.seconds, "latency": done.latency and {k: done.latency[k] for k in ("rounds", "kept_round", "within_budget")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_path", metavar="model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--flow", action="append", default=[], help='e.g. "latency=0.5 quantize=int8"')
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="a model made elsewhere (e.g. by an earlier edgelr), judged and timed beside the flows")
    parser.add_argument("--metric", help="task metric (default: the model's metadata)")
    parser.add_argument("--floor", type=float)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not args.flow and not args.model:
        parser.error("give at least one --flow or --model")
    source = Path(args.model_path).resolve()
    model = load(source)
    task = recognise(model, args.metric, args.floor)
    heldout = load_samples(args.heldout, model)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"original": source, "int8 alone": Path(tmp) / "int8.onnx"}
        # the reference every flow is compared with: written whatever it measures (no metric, no ceiling)
        rows["int8 alone"] = run_flow(source, paths["int8 alone"], "quantize=int8 max_output_error=inf", args.calib,
                                      args.heldout, "none", None)
        for i, flow in enumerate(args.flow):
            paths[flow] = Path(tmp) / f"flow{i}.onnx"
            rows[flow] = run_flow(source, paths[flow], flow, args.calib, args.heldout, args.metric, args.floor)
            print(f"{flow}: {rows[flow].get('refused', 'written')} ({rows[flow]['seconds']:.0f} s)", flush=True)
        for given in args.model:
            name, path = given.rsplit("=", 1)
            if not Path(path).is_file():
                parser.error(f"--model {given}: no model file {path}")
            paths[name], rows[name] = Path(path), {"path": path}
        written = {name: path for name, path in paths.items() if path.exists()}
        times = interleaved_latency(written, heldout.feed(0), threads=1, rounds=args.rounds)
        for name, path in written.items():
            if name == "original":
                continue
            verdict = judge(source, path, heldout, task)
            rows[name].update({"speedup": times["original"] / times[name], "latency_ms": times[name] * 1e3,
                               "errors": verdict.errors, "task": verdict.to_json()})
    rows["original"] = {"latency_ms": times["original"] * 1e3}
    for name in (name for name in rows if name != "original"):
        r = rows[name]
        if "refused" in r:
            print(f"{name:32s} refused: {r['refused']}")
            continue
        t = r["task"]
        vs_int8 = times["int8 alone"] / times[name] if "int8 alone" in times else float("nan")
        print(f"{name:32s} {r['speedup']:.2f}x ({vs_int8:.2f}x int8 alone)  worst error {r['errors']['worst']:.3f}  "
              + (f"{t['metric']} {t['value']:.3f}" if "metric" in t else "")
              + "".join(f"  {k} {t[k]:.3f}" for k in ("top_class_agreement", "class_score_error") if k in t))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "model": str(args.model_path),
                                               "task": task and task.kind, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
