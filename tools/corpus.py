"""Run every model of the corpus (models/corpus.py: real trained ONNX models from registry packages) through
the real `edgelr` command, flow by flow, and measure what it wrote on the model's held-out inputs.

    python tools/corpus.py --out runs/corpus --markdown docs/corpus.md    # all models, all flows: the table
    python tools/corpus.py --out runs/corpus --only magika --flows params int8    # some of them

For each model it writes NAME.onnx, NAME.calib.npz and NAME.heldout.npz into --out, then runs, each as
`python -m edgelr -q ...` in a subprocess of its own:

    inspect      edgelr inspect NAME.onnx --calib NAME.calib.npz
    params       edgelr compress NAME.onnx -o NAME.params.onnx --params 0.5 --calib .. --heldout ..
    flops        ... --flops 0.5
    latency      ... --latency 0.7
    int8         ... --quantize int8
    params-int8  ... --params 0.5 --quantize int8
    export       edgelr export NAME.FLOW.onnx --target rpi5 -o NAME.rpi5 --calib NAME.calib.npz
                 (the first compress flow that wrote a model, in EXPORT_FROM's order; else the original)

with `--metric TASK` where the entry names the task metric that reads it (models/corpus.py). Each run is
judged by the acceptance of issue 19: no traceback; exit 0 and every output within the ceiling (or the task
metric over its floor) on the held-out inputs, as measured here again on the written file loaded in ONNX
Runtime; or exit 1 with one line on stderr and nothing written. Anything else is listed as a violation.
Results go to results.json in --out, the table to --markdown (between BEGIN and END where that file has
them: docs/corpus.md does); a crash's whole stderr to NAME.FLOW.stderr.txt.

edgelr caches calibration statistics and latency tables (EDGELR_CACHE): a second run is quicker. `--cold`
gives the run a new, empty cache inside --out, for honest times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.corpus import BY_NAME, ENTRIES, CorpusUnavailable, Entry, get

COMPRESS_FLOWS = {  # flow -> the compress flags beside -o, --calib, --heldout and --metric
    "params": ["--params", "0.5"],
    "flops": ["--flops", "0.5"],
    "latency": ["--latency", "0.7"],
    "int8": ["--quantize", "int8"],
    "params-int8": ["--params", "0.5", "--quantize", "int8"],
}
FLOWS = ["inspect", *COMPRESS_FLOWS, "export"]
EXPORT_FROM = ["params", "flops", "params-int8", "latency", "int8"]  # which written model export takes
EXPORT_TARGET = "rpi5"
CACHE_DIR = ".edgelr-cache"  # --cold's cache inside --out (not an output of any run)
# --markdown into a file that has these lines (docs/corpus.md) replaces what is between them
BEGIN = "<!-- corpus results: written by tools/corpus.py --markdown -->"
END = "<!-- end of corpus results -->"


def describe(path: Path) -> dict:
    """Opset, producer, parameter count, and input/output names, dtypes and shapes of an ONNX file."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}

    def value(v) -> dict:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        dims = [d if isinstance(d, int) or len(d) <= 8 else "?" for d in dims]  # exporters' long symbols: ?
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "producer": f"{model.producer_name} {model.producer_version}".strip() or "?",
        "params": _params(model),
        "nodes": len(model.graph.node),
        "bytes": path.stat().st_size,
        "inputs": [value(v) for v in model.graph.input if v.name not in inits],
        "outputs": [value(v) for v in model.graph.output],
    }


def _params(model) -> int:
    """Weights in initializers and in Constant nodes (Paddle's exporter writes them as Constants)."""
    consts = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in [*model.graph.initializer, *consts])


def prepare(entry: Entry, out: Path) -> dict:
    """Write NAME.onnx, NAME.calib.npz and NAME.heldout.npz; the entry's row without results."""
    model = out / f"{entry.name}.onnx"
    shutil.copyfile(entry.model_path(), model)
    calib, heldout = entry.calibration(), entry.heldout()
    np.savez(out / f"{entry.name}.calib.npz", **calib)
    np.savez(out / f"{entry.name}.heldout.npz", **heldout)
    row = {"name": entry.name, "family": entry.family, "package": entry.spec, "path": entry.path, "task": entry.task,
           "notes": entry.notes, "calib_samples": len(next(iter(calib.values()))),
           "heldout_samples": len(next(iter(heldout.values())))}
    row.update(describe(model))
    return row


# ------------------------------------------------------------------------------------------------ runs


def flow_args(entry: Entry, flow: str, source: str | None = None) -> tuple[list[str], str]:
    """The edgelr arguments of FLOW for ENTRY (paths relative to --out) and the path it writes."""
    name = entry.name
    if flow == "inspect":
        return ["inspect", f"{name}.onnx", "--calib", f"{name}.calib.npz"], ""
    if flow == "export":
        dest = f"{name}.{EXPORT_TARGET}"
        return ["export", source or f"{name}.onnx", "--target", EXPORT_TARGET, "-o", dest,
                "--calib", f"{name}.calib.npz"], dest
    dest = f"{name}.{flow}.onnx"
    metric = ["--metric", entry.task] if entry.task else []
    return ["compress", f"{name}.onnx", "-o", dest, *COMPRESS_FLOWS[flow], "--calib", f"{name}.calib.npz",
            "--heldout", f"{name}.heldout.npz", *metric], dest


def run_cli(args: list[str], out: Path, timeout: float, log: Path) -> dict:
    """`python -m edgelr -q ARGS` in --out: its exit, its stderr's last line, whether it crashed (its whole
    stderr then goes to LOG), and which files it left in --out that were not there before."""
    before = _listing(out)
    start = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "edgelr", "-q", *args], cwd=out, capture_output=True, text=True,
                             timeout=timeout, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
        code, stdout, stderr = run.returncode, run.stdout, run.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = None, _text(exc.stdout), _text(exc.stderr) + f"\n(killed after {timeout:.0f} s)"
    lines = [line for line in stderr.splitlines() if line.strip()]
    verb = args[0]
    # a refusal is one line, "edgelr VERB: error: ...": anything else on exit 1 is a crash too
    refused = code == 1 and bool(lines) and lines[-1].startswith(f"edgelr {verb}: error: ")
    traceback = "Traceback (most recent call last)" in stderr
    status = "CRASH" if traceback or code is None or (code != 0 and not refused) else "ok" if code == 0 else "refused"
    result = {"command": "edgelr " + " ".join(args), "exit": code, "status": status,
              "seconds": round(time.perf_counter() - start, 1), "new_files": sorted(_listing(out) - before),
              "stdout_tail": stdout.strip().splitlines()[-3:]}
    if refused:
        result["refusal"] = lines[-1].removeprefix(f"edgelr {verb}: error: ")
        result["stderr_lines"] = len(lines)
    if status == "CRASH":
        result |= {"traceback": traceback, "stderr_tail": lines[-8:]}
        log.write_text(stderr)
    return result


def _listing(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.name != CACHE_DIR}


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def violations(result: dict, dest: str) -> list[str]:
    """What breaks the acceptance: a crash; a refusal that wrote something or said more than one line; a
    success that wrote something other than DEST."""
    found = []
    if result["status"] == "CRASH":
        found.append("crash" + (" (traceback)" if result["traceback"] else f" (exit {result['exit']})"))
    if result["status"] == "refused":
        if result["new_files"]:
            found.append(f"refused but wrote {', '.join(result['new_files'])}")
        if result["stderr_lines"] != 1:
            found.append(f"refusal of {result['stderr_lines']} lines on stderr")
    expected = [dest] if dest else []
    if result["status"] == "ok" and result["new_files"] != expected:
        found.append(f"wrote {', '.join(result['new_files']) or 'nothing'} (expected {dest or 'nothing'})")
    return found


# ---------------------------------------------------------------------------------------------- measures


def measure(entry: Entry, out: Path, dest: str, rounds: int) -> dict:
    """A written model against the original on the held-out inputs: each output's error (edgelr's
    objective: each channel group on its own scale), the task metric, whether it passes the floor or the
    ceiling, the speed-up timed interleaved on 1 thread, its parameter count and its size."""
    from edgelr.io.model import load
    from edgelr.io.samples import load_samples
    from edgelr.measure.latency import interleaved_latency
    from edgelr.measure.task import recognise, task_score
    from edgelr.measure.verify import Verdict, ceiling_for, compare_outputs

    src, new = out / f"{entry.name}.onnx", out / dest
    original = load(src)
    heldout = load_samples(out / f"{entry.name}.heldout.npz", original)
    task = recognise(original, entry.task or "none")
    runs: list = []  # both models' outputs per sample: the task metric and the CTC reading come from them
    errors = compare_outputs(src, new, heldout, keep=runs).errors()
    score = task_score(task, [a for a, _ in runs], [b for _, b in runs]) if task is not None else None
    verdict = Verdict(errors, score, len(heldout), ceiling_for(task, None))
    found = {"heldout_error": errors, "verdict": verdict.line(), "passed": verdict.passed,
             "params_after": _params(_onnx(new)), "bytes_after": new.stat().st_size}
    if score is not None:
        found["task"] = {"metric": score.metric, "value": score.value, "floor": score.floor}
    if entry.family == "text recognizer":  # no edgelr metric reads CTC scores: the share of lines read alike
        first = next(iter(runs[0][0]))
        found["same_text"] = float(np.mean([_ctc(x) == _ctc(y) for a, b in runs
                                            for x, y in zip(_steps(a[first]), _steps(b[first]))]))
    times = interleaved_latency({"original": src, "new": new}, heldout.feed(0), threads=1, rounds=rounds,
                                per_round=3, warmup=3)
    found["speed"] = times["original"] / times["new"]
    found["ms"] = {k: round(v * 1e3, 3) for k, v in times.items()}
    return found


def _onnx(path: Path):
    import onnx

    return onnx.load(str(path))


def _steps(scores: np.ndarray) -> np.ndarray:
    """CTC scores as [lines, T, C]: [N, T, C] as is, ddddocr's [T, N, C] transposed."""
    return scores if scores.shape[0] == 1 or scores.ndim != 3 or scores.shape[1] != 1 else scores.transpose(1, 0, 2)


def _ctc(scores: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC decoding of [T, C] scores: best class per step, repeats merged, blanks (0) dropped."""
    best = scores.reshape(len(scores), -1).argmax(-1)
    return tuple(int(c) for i, c in enumerate(best) if c != 0 and (i == 0 or c != best[i - 1]))


def check_bundle(folder: Path) -> dict:
    """A bundle written whole: manifest.json lists every other file with its size and sha256, each matches,
    and the export's own parity check under the target's onnxruntime is recorded."""
    from edgelr.deploy.files import file_entry

    manifest = json.loads((folder / "manifest.json").read_text())
    listed = manifest.get("files", {})
    present = {p.name for p in folder.iterdir() if p.name != "manifest.json"}
    problems = [f"{name}: {'missing' if name not in present else 'differs from the manifest'}"
                for name, want in listed.items() if name not in present or file_entry(folder / name) != want]
    problems += [f"{name}: not in the manifest" for name in sorted(present - set(listed))]
    return {"files": len(listed), "bytes": sum(f["bytes"] for f in listed.values()),
            "parity": manifest.get("parity", {}).get("checked", {}), "problems": problems}


def run_model(entry: Entry, out: Path, flows: list[str], rounds: int, timeout: float) -> dict:
    """Every flow of FLOWS asked for, on one model: what each run did, and what it wrote, measured."""
    results: dict[str, dict] = {}
    for flow in flows:
        source = next((results[f]["output"] for f in EXPORT_FROM if results.get(f, {}).get("passed")), None)
        args, dest = flow_args(entry, flow, source)
        log = out / f"{entry.name}.{flow}.stderr.txt"
        for stale in (out / dest, log) if dest else (log,):  # an earlier run's output would hide a missing one
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        result = run_cli(args, out, timeout, log)
        problems = violations(result, dest)
        if result["status"] == "ok" and dest and not problems:
            result["output"] = dest
            try:
                result |= check_bundle(out / dest) if flow == "export" else measure(entry, out, dest, rounds)
            except Exception as exc:  # noqa: BLE001 -- a written file that does not load or run is a finding
                result["passed"] = False
                problems.append(f"unloadable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if flow == "export":
                result["exported"] = source or entry.name + ".onnx"
                problems += result.get("problems", [])
            elif not result["passed"]:
                problems.append(f"written but fails on held-out: {result['verdict']}")
        result["violations"] = problems
        results[flow] = result
        print(f"  {flow}: {result['status']} {result['seconds']} s "
              + (result.get("refusal") or result.get("verdict") or "") + "".join(f" [{p}]" for p in problems),
              flush=True)
    return results


# ---------------------------------------------------------------------------------------------- table


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(rows: list[dict]) -> str:
    """One line per model and flow."""
    def per_output(r: dict, outputs: list[str]) -> str:
        errs = r.get("heldout_error", {})
        return ", ".join(f"`{_short(o, 18)}` {errs[o]:.3g}" for o in outputs if o in errs) if len(outputs) > 1 else ""

    def task(r: dict) -> str:
        if "task" in r:
            t = r["task"]
            return f"{t['metric']} {t['value']:.3f} (floor {t['floor']:.2f})"
        return f"same text {r['same_text']:.2f} (not gated)" if "same_text" in r else ""

    def note(flow: str, r: dict) -> str:
        said = [r["refusal"]] if "refusal" in r else []
        if flow == "export" and r["status"] == "ok" and "files" in r:
            parity = r["parity"].get("max_rel_error") if isinstance(r["parity"], dict) else None
            said.append(f"{r['exported']}: {r['files']} files, {r['bytes'] / 1e6:.1f} MB"
                        + (f", parity under onnxruntime {r['parity'].get('onnxruntime')}: {parity:.1e}" if parity is not None
                           else f", parity {r['parity']}"))
        if r["status"] == "CRASH":
            said.append(r["stderr_tail"][-1] if r["stderr_tail"] else f"exit {r['exit']}")
        said += [f"**{p}**" for p in r.get("violations", [])]
        return _short("; ".join(said), 240).replace("|", "\\|")

    lines = [("| model | flow | exit | held-out worst | per output | task metric | speed × | params | size | s | "
              "refusal / note |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("status") == "unavailable":
            lines.append(f"| {row['name']} | | unavailable | | | | | | | | {row['message']} |")
            continue
        outputs = [o["name"] for o in row.get("outputs", [])]
        for flow, r in row.get("flows", {}).items():
            worst = r.get("heldout_error", {}).get("worst")
            after = f"{r['params_after'] / row['params']:.2f}×" if r.get("params_after") and row.get("params") else ""
            speed = f"{r['speed']:.2f}" if "speed" in r else ""
            size = f"{r['bytes_after'] / row['bytes']:.2f}×" if r.get("bytes_after") and row.get("bytes") else ""
            lines.append(f"| {row['name']} | {flow} | {r['status']} | {'' if worst is None else f'{worst:.3g}'} | "
                         f"{per_output(r, outputs)} | {task(r)} | "
                         f"{speed} | {after} | {size} | {r['seconds']} | {note(flow, r)} |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, block: str) -> None:
    """BLOCK into PATH: between BEGIN and END where PATH has them, else as the whole file."""
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text.split(BEGIN, 1)[1]:
        head, rest = text.split(BEGIN, 1)
        text = f"{head}{BEGIN}\n{block}{END}{rest.split(END, 1)[1]}"
    else:
        text = block
    path.write_text(text)


def provenance() -> str:
    """The command as run and the commit it ran at (marked where the library had uncommitted changes)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip() or "?"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "edgelr"], cwd=ROOT, check=False).returncode
    argv = " ".join(Path(a).relative_to(ROOT).as_posix() if a.startswith(str(ROOT)) else a for a in sys.argv)
    return f"`python {argv}`, edgelr at {commit}{' with uncommitted changes' if dirty else ''}"


def summary(rows: list[dict]) -> str:
    runs = [r for row in rows for r in row.get("flows", {}).values()]
    counts = {s: sum(r["status"] == s for r in runs) for s in ("ok", "refused", "CRASH")}
    bad = sum(bool(r["violations"]) for r in runs)
    return (f"{len(runs)} runs: {counts['ok']} ok, {counts['refused']} refused, {counts['CRASH']} crashed; "
            f"{bad} break the acceptance")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the models, inputs, outputs and results.json")
    parser.add_argument("--only", action="append", metavar="NAME", help="this model only (repeatable)")
    parser.add_argument("--flows", nargs="+", choices=FLOWS, default=FLOWS, help="these flows only (in this order)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (3 runs each) per model")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per edgelr run")
    parser.add_argument("--markdown", help="also write the results table here")
    parser.add_argument("--cold", action="store_true", help="a new, empty edgelr cache (honest times)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the other models' rows of --out's results.json (to finish an interrupted run)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        entries = [get(n) for n in args.only] if args.only else ENTRIES
    except KeyError as exc:
        sys.exit(str(exc.args[0]))
    flows = [f for f in FLOWS if f in args.flows]
    if args.cold:
        cache = out / CACHE_DIR
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["EDGELR_CACHE"] = str(cache)  # the runs inherit it
    previous = out / "results.json"
    done = {row["name"]: row for row in json.loads(previous.read_text()) if row["name"] in BY_NAME} \
        if args.keep and previous.is_file() else {}
    rows: list[dict] = []
    start = time.perf_counter()
    for entry in entries:
        print(f"{entry.name}:", flush=True)
        try:
            row = prepare(entry, out)
            row["flows"] = run_model(entry, out, flows, args.rounds, args.timeout)
        except CorpusUnavailable as exc:
            print(f"  unavailable: {exc}")
            row = {"name": entry.name, "status": "unavailable", "message": str(exc)}
        done[entry.name] = row
        rows = [done[e.name] for e in ENTRIES if e.name in done]
        previous.write_text(json.dumps(rows, indent=1))  # after each model: an interrupted run is kept
    table = markdown(rows)
    said = f"{summary(rows)}; {time.perf_counter() - start:.0f} s"
    if args.markdown:
        write_markdown(Path(args.markdown), f"{provenance()}: {said}.\n\n{table}")
    print(table)
    print(said)


if __name__ == "__main__":
    main()
