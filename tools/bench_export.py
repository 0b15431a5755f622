"""`edgelr export` on the YOLOv8n detector that `nudenet` ships, original and factorized: every target kind.

    python tools/bench_export.py --json docs/bench_export.json

For each model: the Raspberry Pi 5 bundle (ORT format for onnxruntime 1.19.2; its parity as checked when
written, then run.py under aarch64 emulation with the Pi's onnxruntime, tools/aarch64_env.py), and TensorRT
for RTX engines at fp32, fp16 and int8 (Q/DQ, calibrated on the same photos), built on this CPU-only machine.
Times are wall seconds of the export call; sizes are the files written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelr import (
    FactorizeConfig,  # noqa: E402
    compress,
)
from edgelr.deploy.export import export  # noqa: E402
from models.data import (  # noqa: E402
    CALIBRATION,
    samples,
    yolo_path,  # noqa: E402
)
from tools.aarch64_env import ensure_env, run_bundle  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--no-emulation", action="store_true", help="skip the aarch64 run")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("EDGELR_CACHE", str(tmp / "cache"))
        calib = tmp / "calib.npz"
        np.savez(calib, images=samples(CALIBRATION, 320, 0, seed=0))
        factorized = tmp / "yolov8n.lr.onnx"
        compress(yolo_path(), factorized, FactorizeConfig(params=0.5), calib=calib, progress=False)
        env = None if args.no_emulation else ensure_env("1.19.2", progress=False)
        for name, model in (("original", yolo_path()), ("factorized --params 0.5", factorized)):
            for target, precision in (("rpi5", None), ("rtx", "fp32"), ("rtx", "fp16"), ("rtx", "int8")):
                out = tmp / f"{len(rows)}"
                start = time.perf_counter()
                done = export(model, target, out, calib=calib, precision=precision, progress=False)
                row = {"model": name, "target": target, "precision": precision or done.target.precision,
                       "seconds": round(time.perf_counter() - start, 2),
                       "files": {f: e["bytes"] for f, e in done.manifest["files"].items()}}
                if target == "rpi5":
                    row["parity_here"] = done.manifest["parity"]["checked"]
                    if env is not None:
                        emulated = run_bundle(out, ["--runs", "1", "--warmup", "0"], env, progress=False)
                        row["parity_aarch64"] = {"machine": emulated.report.get("machine"),
                                                 "onnxruntime": emulated.report.get("onnxruntime"),
                                                 **emulated.report.get("parity", {})}
                else:
                    row["build_seconds"] = done.manifest["build_seconds"]
                    row["tensorrt"] = done.manifest["tensorrt"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
