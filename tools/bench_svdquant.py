"""The low-rank branch beside INT8 (edgelr.passes.svdquant) on YOLOv8n (`nudenet`): per-layer table and whole model.

    python tools/bench_svdquant.py --json docs/bench_svdquant.json

Per layer: each conv alone, with its real weights and its real activations on the calibration photos,
quantized by ONNX Runtime plainly and with the float low-rank branch; the relative output error of both
on held-back activations, sorted by how uneven the layer's input channels are (max over median of the
per-channel max |x|). Whole model: ORT's INT8 and int8-lowrank of the original, held-out error, top-class
agreement and CPU latency (1 thread, interleaved, median).
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
from edgelr.io.samples import samples_from_arrays  # noqa: E402
from edgelr.measure.latency import interleaved_latency  # noqa: E402
from edgelr.measure.verify import output_error  # noqa: E402
from edgelr.passes.quantize import quantize  # noqa: E402
from models.data import (  # noqa: E402
    CALIBRATION,
    HELD_OUT,
    samples,
    yolo_path,  # noqa: E402
)
from tools.bench_yolo import _channel_errors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    source = yolo_path()
    model = load(source)
    calib = samples_from_arrays({"images": samples(CALIBRATION, 320, 3, seed=0)}, model)
    heldout = samples_from_arrays({"images": samples(HELD_OUT, 320, 3, seed=1)}, model)
    with tempfile.TemporaryDirectory() as tmp:
        plain, branched = Path(tmp) / "int8.onnx", Path(tmp) / "int8-lowrank.onnx"
        quantize(source, plain, "int8", calib, progress=False)
        info = quantize(source, branched, "int8-lowrank", calib, progress=False)
        rows = sorted(info["low_rank_branches"], key=lambda r: -r["outlier_ratio"])
        whole = {name: {"heldout_error": output_error(source, path, heldout)["worst"],
                        "top_class_agreement": _channel_errors(source, path, heldout)["top_class_agreement"]}
                 for name, path in (("int8", plain), ("int8-lowrank", branched))}
        lat = interleaved_latency({"original": source, "int8": plain, "int8-lowrank": branched}, heldout.feed(0),
                                  rounds=args.rounds)
    for name in whole:
        whole[name]["speedup_over_fp32"] = lat["original"] / lat[name]
    result = {"layers": rows, "chosen": sum(r["chosen"] for r in rows), "whole_model": whole,
              "latency_ms": {k: v * 1e3 for k, v in lat.items()}}
    print(f"{'layer':42s} {'outliers':>8s} {'int8':>7s} {'+branch':>7s}  alpha  chosen")
    for r in rows[:12]:
        print(f"{r['name']:42s} {r['outlier_ratio']:8.1f} {r['int8_error']:7.4f} {r['branch_error']:7.4f}  "
              f"{r['alpha']:5.1f}  {r['chosen']}")
    print(json.dumps(result["whole_model"], indent=2), json.dumps(result["latency_ms"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
