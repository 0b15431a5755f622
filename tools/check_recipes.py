"""The recipe form of a job writes the same bytes as its flag form, on YOLOv8n, for the shipped flows.

    python tools/check_recipes.py --json docs/check_recipes.json

Each flow runs first with its flags (which also warms the caches and the latency tables, and writes the
recipe they stand for with --write-recipe), then with --recipe on that file, then with --recipe on the
shipped recipe in recipes/; the three models must be byte for byte the same. The calibration photos
are models/data.py's; the caches are a fresh folder of this run's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.data import CALIBRATION, samples, yolo_path  # noqa: E402

FLOWS = {
    "params50": (["--params", "0.5"], "yolov8n-params50.yaml"),
    "prune25-params60": (["--prune", "0.25", "--params", "0.6"], "yolov8n-prune25-params60.yaml"),
    "latency50-int8": (["--latency", "0.5", "--quantize", "int8"], "yolov8n-latency50-int8.yaml"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", nargs="+", choices=list(FLOWS), default=list(FLOWS))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", images=samples(CALIBRATION, 320, 3, seed=0))
        env = dict(os.environ, EDGELR_CACHE=str(tmp / "cache"))
        for name in args.flows:
            flags, shipped = FLOWS[name]
            report = tmp / f"{name}.report.json"
            runs = {"flags": [*flags, "--write-recipe", str(tmp / f"{name}.yaml"), "--report", str(report)],
                    "recipe": ["--recipe", str(tmp / f"{name}.yaml")],
                    "shipped recipe": ["--recipe", str(ROOT / "recipes" / shipped)]}
            digests, seconds = {}, {}
            for form, extra in runs.items():
                out = tmp / f"{name}-{form.replace(' ', '-')}.onnx"
                start = time.perf_counter()
                cmd = [sys.executable, "-m", "edgelr", "-q", "compress", str(yolo_path()), "-o", str(out),
                       "--calib", str(tmp / "calib.npz"), *extra]
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                seconds[form] = round(time.perf_counter() - start, 1)
                digests[form] = hashlib.sha256(out.read_bytes()).hexdigest()
            done = json.loads(report.read_text())
            rows[name] = {"flags": " ".join(flags), "same_bytes": len(set(digests.values())) == 1,
                          "sha256": digests, "seconds": seconds,
                          "factorized_layers": sum(row["form"] != "dense" for row in done["layers"]),
                          "latency_rounds": done.get("latency", {}).get("rounds")}
            print(f"{name}: {'same bytes' if rows[name]['same_bytes'] else 'DIFFERENT'} {seconds}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "flows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
