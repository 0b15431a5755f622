"""Compress every model of the corpus (models/corpus.py: real trained ONNX models from registry packages)
and measure each on its held-out inputs.

    python tools/corpus.py --out runs/corpus                      # all models
    python tools/corpus.py --out runs/corpus --only magika --only open-nsfw
    python tools/corpus.py --out runs/corpus --markdown table.md  # also the results table as Markdown

For each model it writes NAME.onnx, NAME.calib.npz and NAME.heldout.npz into --out, then runs the
equivalent of `edgelr compress NAME.onnx --params 0.5 --calib NAME.calib.npz -o NAME.lr.onnx` through the
Python API, in a child process of its own (a crash of one model cannot take the others down), and
measures the relative output error of NAME.lr.onnx against NAME.onnx on the held-out inputs. Results go
to results.json in --out: opset, producer, parameters, input and output shapes, whether compress
succeeded, its one-line error if not (`error` for an EdgelrError, `crash` for anything else, with the
traceback in NAME.traceback.txt), the seconds it took, and the held-out error: ||y - y'|| / ||y|| per
output (`heldout_relative`) and edgelr.measure.verify.output_error's dict (`heldout_error`).

edgelr caches calibration statistics and results (EDGELR_CACHE): a second run of the same models is quick.
`--cold` gives the run a new, empty cache inside --out, for honest times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.corpus import ENTRIES, CorpusUnavailable, Entry, get


def describe(path: Path) -> dict:
    """Opset, producer, parameter count, and input/output names, dtypes and shapes of an ONNX file."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    params = _params(model)

    def value(v) -> dict:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        dims = [d if isinstance(d, int) or len(d) <= 8 else "?" for d in dims]  # exporters' long symbols: ?
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "producer": f"{model.producer_name} {model.producer_version}".strip() or "?",
        "params": params,
        "nodes": len(model.graph.node),
        "bytes": path.stat().st_size,
        "inputs": [value(v) for v in model.graph.input if v.name not in inits],
        "outputs": [value(v) for v in model.graph.output],
    }


def prepare(entry: Entry, out: Path) -> dict:
    """Write NAME.onnx, NAME.calib.npz and NAME.heldout.npz; the entry's row without results."""
    src = entry.model_path()
    model = out / f"{entry.name}.onnx"
    shutil.copyfile(src, model)
    calib, heldout = entry.calibration(), entry.heldout()
    np.savez(out / f"{entry.name}.calib.npz", **calib)
    np.savez(out / f"{entry.name}.heldout.npz", **heldout)
    row = {"name": entry.name, "family": entry.family, "package": entry.spec, "path": entry.path, "task": entry.task,
           "notes": entry.notes, "calib_samples": len(next(iter(calib.values()))),
           "heldout_samples": len(next(iter(heldout.values())))}
    row.update(describe(model))
    return row


def compress_one(name: str, out: Path, params: float) -> dict:
    """In this process: compress NAME.onnx and measure it on the held-out inputs."""
    from edgelr.api import compress
    from edgelr.errors import EdgelrError
    from edgelr.io.model import load
    from edgelr.io.samples import load_samples
    from edgelr.measure.verify import output_error
    from edgelr.passes.factorize import FactorizeConfig

    src, dst = out / f"{name}.onnx", out / f"{name}.lr.onnx"
    result: dict = {"command": f"edgelr compress {src.name} --params {params} --calib {name}.calib.npz -o {dst.name}"}
    start = time.perf_counter()
    try:
        report = compress(src, dst, FactorizeConfig(params=params), calib=out / f"{name}.calib.npz", progress=False)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["calib_error"] = report.output_error
        if report.result is not None:
            result["params_after"] = _params_after(dst)
        heldout = load_samples(out / f"{name}.heldout.npz", load(src))
        result["heldout_error"] = output_error(src, dst, heldout)
        entry = get(name)
        task = "ctc" if entry.family == "text recognizer" else entry.task
        result["heldout_relative"], result["heldout_task"] = relative_errors(src, dst, heldout, task)
        result["status"] = "ok"
    except EdgelrError as exc:
        result.update(status="error", message=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 -- a traceback is a product bug: kept whole beside the results
        text = traceback.format_exc()
        (out / f"{name}.traceback.txt").write_text(text)
        result.update(status="crash", message=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                      traceback_tail=text.strip().splitlines()[-6:])
    result.setdefault("seconds", round(time.perf_counter() - start, 1))
    return result


def relative_errors(original: Path, compressed: Path, samples, task: str | None = None
                    ) -> tuple[dict[str, float], dict[str, float]]:
    """||y - y'|| / ||y|| of each float output over all samples (the plain measure, whatever grouping
    edgelr's output_error applies), and the task agreement of the first output: top-1 agreement
    (classify), IoU of the maps thresholded at 0.5 (mask), mAP@0.5 against the original's detections
    (detect), the share of samples read as the same text (ctc: greedy decoding, blank 0, of [N, T, C])."""
    import onnxruntime as ort

    ref, new = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (original, compressed))
    names = [o.name for o in new.get_outputs()]
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    firsts: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(len(samples)):
        feed = samples.feed(i)
        outputs = list(zip(names, ref.run(names, feed), new.run(names, feed)))
        firsts.append((np.asarray(outputs[0][1]), np.asarray(outputs[0][2])))
        for name, a, b in outputs:
            if np.asarray(a).dtype.kind != "f":
                continue
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            num[name] = num.get(name, 0.0) + float(np.sum((a - b) ** 2))
            den[name] = den.get(name, 0.0) + float(np.sum(a**2))
    errors = {name: float(np.sqrt(num[name] / den[name])) if den[name] > 0 else float(np.sqrt(num[name]))
              for name in num}
    return errors, task_agreement(task, firsts)


def task_agreement(task: str | None, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    if task == "classify":
        hits = [np.mean(a.reshape(len(a), -1).argmax(-1) == b.reshape(len(b), -1).argmax(-1)) for a, b in pairs]
        return {"top-1 agreement": float(np.mean(hits))}
    if task == "mask":
        a = np.concatenate([p[0] for p in pairs]) > 0.5
        b = np.concatenate([p[1] for p in pairs]) > 0.5
        return {"mask IoU": float((a & b).sum() / max(1, (a | b).sum()))}
    if task == "ctc" and all(a.ndim == 3 for a, _ in pairs):
        same = [_ctc(x) == _ctc(y) for a, b in pairs for x, y in zip(a, b)]
        return {"same text": float(np.mean(same))}
    if task == "detect":
        from edgelr.measure.detection import decode_yolo, map50

        ref = [d for a, _ in pairs for d in decode_yolo(a)]
        cand = [d for _, b in pairs for d in decode_yolo(b)]
        return {"mAP50 agreement": float(map50(ref, cand))}
    return {}


def _ctc(scores: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC decoding of [T, C] scores: best class per step, repeats merged, blanks (0) dropped."""
    best = scores.argmax(-1)
    return tuple(int(c) for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1]))


def _params(model) -> int:
    """Weights in initializers and in Constant nodes (Paddle's exporter writes them as Constants)."""
    consts = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in [*model.graph.initializer, *consts])


def _params_after(path: Path) -> int:
    import onnx

    return _params(onnx.load(str(path)))


def run_child(name: str, out: Path, params: float, timeout: float) -> dict:
    """compress_one in a child process; a child killed by a signal or the timeout is a crash."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--only", name, "--params", str(params),
           "--child"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"compress ran past {timeout:.0f} s"}
    path = out / f"{name}.result.json"
    if run.returncode == 0 and path.is_file():
        return json.loads(path.read_text())
    tail = (run.stderr or run.stdout).strip().splitlines()[-6:]
    (out / f"{name}.traceback.txt").write_text(run.stderr + run.stdout)
    return {"status": "crash", "message": f"child exited {run.returncode}", "traceback_tail": tail}


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def markdown(rows: list[dict]) -> str:
    def shapes(values: list[dict]) -> str:
        return "; ".join(f"`{_short(v['name'])}` {v['dtype']} [{', '.join(map(str, v['shape']))}]" for v in values)

    def errors(row: dict) -> str:
        if row.get("status") != "ok":
            return f"**{row.get('status', '?')}**: {row.get('message', '')}".replace("|", "\\|")
        errs = row.get("heldout_relative", {})
        return ", ".join(f"`{_short(k)}` {v:.3g}" for k, v in errs.items()) or "(no float output)"

    def agreement(row: dict) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in row.get("heldout_task", {}).items())

    def worst(row: dict) -> str:
        value = row.get("heldout_error", {}).get("worst", row.get("heldout_error", {}).get("all"))
        return f"{value:.3g}" if isinstance(value, float) else ""

    lines = [("| model | family | package | opset | producer | params | after | inputs | outputs | task | "
              "compress s | held-out relative error per output | output_error worst | task agreement |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        after = f"{r['params_after'] / r['params']:.2f}x" if r.get("params_after") and r.get("params") else ""
        lines.append(f"| {r['name']} | {r['family']} | {r['package']} | {r.get('opset')} | {r.get('producer')} | "
                     f"{r.get('params', 0) / 1e6:.2f} M | {after} | {shapes(r.get('inputs', []))} | "
                     f"{shapes(r.get('outputs', []))} | {r['task'] or ''} | {r.get('seconds', '')} | {errors(r)} | "
                     f"{worst(r)} | {agreement(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the models, inputs and results.json")
    parser.add_argument("--only", action="append", metavar="NAME", help="this model only (repeatable)")
    parser.add_argument("--params", type=float, default=0.5)
    parser.add_argument("--no-compress", action="store_true", help="only write the models and their inputs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model's compress")
    parser.add_argument("--markdown", help="also write the results table here")
    parser.add_argument("--cold", action="store_true", help="a new, empty edgelr cache (honest compress times)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        entries = [get(n) for n in args.only] if args.only else ENTRIES
    except KeyError as exc:
        sys.exit(str(exc.args[0]))
    if args.child:
        (name,) = args.only
        result = compress_one(name, out, args.params)
        (out / f"{name}.result.json").write_text(json.dumps(result, indent=1))
        return
    if args.cold:
        cache = out / ".edgelr-cache"
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["EDGELR_CACHE"] = str(cache)  # the children inherit it
    rows = []
    for entry in entries:
        print(f"{entry.name}: ", end="", flush=True)
        try:
            row = prepare(entry, out)
        except CorpusUnavailable as exc:
            print(f"unavailable: {exc}")
            rows.append({"name": entry.name, "family": entry.family, "package": entry.spec, "path": entry.path,
                         "task": entry.task, "status": "unavailable", "message": str(exc)})
            continue
        if not args.no_compress:
            (out / f"{entry.name}.result.json").unlink(missing_ok=True)
            row.update(run_child(entry.name, out, args.params, args.timeout))
        print(row.get("status", "written"), row.get("seconds", ""), row.get("message", "") or
              json.dumps(row.get("heldout_error", {})), flush=True)
        rows.append(row)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
