"""Refit (edgelr.passes.refit) on YOLOv8n (`nudenet`): the same allocation with the factors as fitted on the
original's inputs and refit on the compressed model's own, in float and with static INT8 (refit there
on the quantized model's inputs).

    python tools/bench_refit.py --params 0.4 --json docs/bench_refit.json

Both models come from `compress` with the same budget and calibration photos (the allocation does not
depend on the refit, which runs after it; the JSON checks the ranks agree). Held-out error and
detection mAP@0.5 against the original as tools/bench_yolo.py measures them; the calibration error
shows how much of the gain is fit rather than generalisation. The two INT8 models are timed
interleaved (ONNX Runtime CPU, 1 thread): refit must not cost speed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgelr import (
    FactorizeConfig,  # noqa: E402
    compress,
)
from edgelr.io.model import load  # noqa: E402
from edgelr.io.samples import load_samples, samples_from_arrays  # noqa: E402
from edgelr.measure.detection import detection_agreement  # noqa: E402
from edgelr.measure.latency import interleaved_latency  # noqa: E402
from edgelr.measure.verify import output_error  # noqa: E402
from models.data import (  # noqa: E402
    CALIBRATION,
    HELD_OUT,
    detection_heldout,
    samples,
    yolo_path,  # noqa: E402
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--params", type=float)
    budget.add_argument("--flops", type=float)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    chosen = {"flops": args.flops} if args.flops else {"params": args.params or 0.4}
    source = yolo_path()
    rows, ranks, refit = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", images=samples(CALIBRATION, 320, 3, seed=0))
        np.savez(tmp / "heldout.npz", images=samples(HELD_OUT, 320, 3, seed=1))
        calib, heldout = (load_samples(tmp / f"{name}.npz", load(source)) for name in ("calib", "heldout"))
        scenes = samples_from_arrays({"images": detection_heldout()}, load(source))
        for on in (False, True):
            name = "refit" if on else "fitted_on_original_inputs"
            for kind in ("float", "int8"):
                path = tmp / f"{name}.{kind}.onnx"
                done = compress(source, path, FactorizeConfig(**chosen), refit=on, calib=tmp / "calib.npz",
                                quantize=None if kind == "float" else kind, progress=False)
                ranks[name, kind] = [(r.name, r.form, r.rank) for r in done.result.layers]
                refit[f"{name}, {kind}"] = len(done.result.refit)
                rows[f"{name}, {kind}"] = {"heldout_error": output_error(source, path, heldout)["worst"],
                                           "calibration_error": output_error(source, path, calib)["worst"],
                                           "map50": detection_agreement(source, path, scenes)["map50"]}
        # refit rewrites int8 weights and their scales: ONNX Runtime must still fuse every layer
        int8 = {name: tmp / f"{name}.int8.onnx" for name in ("fitted_on_original_inputs", "refit")}
        int8_ms = {name: t * 1e3 for name, t in interleaved_latency(int8, heldout.feed(0), rounds=30).items()}
    result = {"command": "python tools/bench_refit.py " + shlex.join(sys.argv[1:]), "budget": chosen,
              "same_ranks": len({tuple(r) for r in ranks.values()}) == 1,
              "factorized_layers": sum(r[2] > 0 for r in ranks["refit", "float"]),
              "layers_refit": {name: n for name, n in refit.items() if name.startswith("refit")},
              "models": rows, "int8_latency_ms": int8_ms}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
