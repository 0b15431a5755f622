"""YOLOv8n (`nudenet`) INT8 with single layers left in float: held-out error and time vs all-INT8.

    python tools/bench_float_layers.py --json docs/bench_float_layers.json

Each model is the original quantized by edgelr.passes.quantize (static INT8, calibration photos) with the named
convs excluded (`keep_float`); errors on the held-out photos, times interleaved (ONNX Runtime CPU, 1 thread).
This is what `compress --latency F --quantize int8` measures for its float candidates, shown layer by layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelr.io.model import load  # noqa: E402
from edgelr.io.samples import load_samples  # noqa: E402
from edgelr.measure.latency import interleaved_latency  # noqa: E402
from edgelr.measure.verify import output_error  # noqa: E402
from edgelr.passes.quantize import quantize  # noqa: E402
from models.data import (  # noqa: E402
    CALIBRATION,
    HELD_OUT,
    samples,
    yolo_path,  # noqa: E402
)

HEAD = ["/model.22/cv3.0/cv3.0.2/Conv", "/model.22/cv3.1/cv3.1.2/Conv", "/model.22/cv2.2/cv2.2.2/Conv",
        "/model.22/cv3.2/cv3.2.2/Conv"]
SETS = {
    "none": [],
    "/model.2/cv1/conv": ["/model.2/cv1/conv/Conv"],
    "/model.1/conv": ["/model.1/conv/Conv"],
    "/model.0/conv": ["/model.0/conv/Conv"],
    "four last head convs": HEAD,
    "DFL conv": ["/model.22/dfl/conv/Conv"],
    "these seven": ["/model.0/conv/Conv", "/model.2/cv1/conv/Conv", *HEAD, "/model.22/dfl/conv/Conv"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    source = yolo_path()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", images=samples(CALIBRATION, 320, 3, seed=0))
        np.savez(tmp / "heldout.npz", images=samples(HELD_OUT, 320, 3, seed=1))
        model = load(source)
        calib, heldout = load_samples(tmp / "calib.npz", model), load_samples(tmp / "heldout.npz", model)
        paths = {"fp32": source}
        for i, (name, nodes) in enumerate(SETS.items()):
            paths[name] = tmp / f"{i}.onnx"
            quantize(source, paths[name], "int8", calib, progress=False, keep_float=nodes)
        errors = {name: output_error(source, path, heldout)["worst"] for name, path in paths.items() if name != "fp32"}
        times = interleaved_latency(paths, heldout.feed(0), rounds=args.rounds)
    result = {"command": "python tools/bench_float_layers.py" + (f" --json {args.json}" if args.json else ""),
              "ms": {k: v * 1e3 for k, v in times.items()},
              "rows": [{"float": name, "heldout_error": errors[name], "time_vs_all_int8": times[name] / times["none"]}
                       for name in SETS]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
