"""Factorization of the YOLOv8n detector that `nudenet` ships: error on held-out photos and CPU speed.

    python tools/bench_yolo.py --params 0.5 --json docs/bench_yolo.json

Calibrates on one set of scikit-image photos, measures the relative output error on another (held-out),
for whitened (data-aware) and plain SVD at the same budget, and times original vs compressed in ONNX
Runtime CPU, 1 thread, interleaved, median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from edgelr.io.samples import (
    load_samples,  # noqa: E402
    samples_from_arrays,  # noqa: E402
)
from edgelr.measure.detection import detection_agreement  # noqa: E402
from edgelr.measure.latency import interleaved_latency  # noqa: E402
from edgelr.measure.verify import output_error  # noqa: E402
from edgelr.passes.quantize import quantize  # noqa: E402
from models.data import CALIBRATION, HELD_OUT, detection_heldout, samples, yolo_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=0.5)
    parser.add_argument("--flops", type=float)
    parser.add_argument("--latency", type=float, help="latency budget: also times a second run on the cached tables")
    parser.add_argument("--crops", type=int, default=3)
    parser.add_argument("--damping", type=float, default=FactorizeConfig.damping, help="Gram damping (fraction of mean diag)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-sensitivity", action="store_true", help="weigh all layers' errors alike")
    parser.add_argument("--no-refit", action="store_true",
                        help="keep the factors fitted on the original's inputs (edgelr.passes.refit off)")
    parser.add_argument("--quantize", choices=["int8", "int8-dynamic"],
                        help="quantize the compressed model too, and time ONNX Runtime's INT8 of the original beside it")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    source = yolo_path()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", images=samples(CALIBRATION, 320, args.crops, seed=0))
        np.savez(tmp / "heldout.npz", images=samples(HELD_OUT, 320, args.crops, seed=1))
        os.environ["EDGELR_CACHE"] = str(tmp / "cache")  # a cold latency cache, for first vs second run
        budget = {"flops": args.flops} if args.flops else {"latency": args.latency} if args.latency else {"params": args.params}
        config = FactorizeConfig(**budget, damping=args.damping, sensitivity=not args.no_sensitivity)
        # the gate opened (metric "none", no ceiling): this script measures what each budget gives, on its own photos
        opened = {"metric": "none", "max_output_error": math.inf}
        whitened = compress(source, tmp / "whitened.onnx", config, calib=tmp / "calib.npz", progress=False,
                            quantize=args.quantize, refit=not args.no_refit, **opened)
        models = {"original": source, "whitened": tmp / "whitened.onnx"}
        if args.quantize:  # the bar: ONNX Runtime's own quantization of the original, same scheme and photos
            quantize(source, tmp / "quantized_only.onnx", args.quantize, load_samples(tmp / "calib.npz", load(source)),
                     progress=False)
            models["quantized_only"] = tmp / "quantized_only.onnx"
        again = compress(source, tmp / "again.onnx", config, calib=tmp / "calib.npz", progress=False,
                         quantize=args.quantize, refit=not args.no_refit, **opened) if args.latency else None
        if not args.flops and not args.latency and not args.quantize:  # plain SVD knows no layer sizes for this dynamic-size model: no FLOPs budget
            compress(source, tmp / "plain.onnx", config, progress=False)
            models["plain"] = tmp / "plain.onnx"
        heldout = load_samples(tmp / "heldout.npz", load(source))
        err = {name: output_error(source, path, heldout)["worst"] for name, path in models.items() if name != "original"}
        channels = _channel_errors(source, tmp / "whitened.onnx", heldout)
        by_photo = _photo_errors(source, models, heldout, 1 + args.crops)
        scenes = samples_from_arrays({"images": detection_heldout()}, load(source))
        detection = {name: detection_agreement(source, path, scenes)["map50"] for name, path in models.items()
                     if name != "original"}
        lat = interleaved_latency(models, heldout.feed(0), rounds=args.rounds)
    err_w, err_p = err["whitened"], err.get("plain")
    result = {
        "budget": budget,
        "damping": args.damping,
        "photos": {"calibration": CALIBRATION, "held_out": HELD_OUT, "crops_per_photo": args.crops},
        "heldout_error": {**err, "plain": err_p, "plain_over_whitened": err_p / err_w if err_p else None},
        "calibration_error": {"whitened": whitened.output_error["worst"]},
        "predicted_error": whitened.result.predicted_error2 ** 0.5,  # the allocation's own estimate
        "sensitivity": not args.no_sensitivity,
        "refit_layers": len(whitened.result.refit),  # refit on the compressed model's own inputs
        "quantize": args.quantize,
        "whitened_by_channel": channels,
        "heldout_error_by_photo": by_photo,  # each photo's views alone: which photos the error comes from
        "detection_map50": detection,  # mAP@0.5 against the original's detections (tools/photos.detection_heldout)
        "latency_ms": {k: v * 1e3 for k, v in lat.items()},
        "speedup": {name: lat["original"] / t for name, t in lat.items() if name != "original"},
        "params_kept": whitened.result.total("params_after") / whitened.result.total("params_before"),
        "factorized_layers": len(whitened.result.factorized),
        "kept_float": whitened.result.keep_float,  # with --latency --quantize int8: layers the search left in float
    }
    if args.latency:
        result["latency_search"] = {
            "first_run": {"seconds": whitened.seconds, **whitened.latency},
            "second_run": {"seconds": again.seconds, **again.latency},
        }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _outputs(path: Path, heldout) -> np.ndarray:
    """The model's first output on every held-out sample, stacked on the batch axis."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, heldout.feed(i))[0] for i in range(len(heldout))])


def _relative(new: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(new - ref) / np.linalg.norm(ref))


def _photo_errors(source: Path, models: dict, heldout, views: int) -> dict:
    """Model -> held-out photo -> relative output error over that photo's VIEWS samples (whole + crops)."""
    ref = _outputs(source, heldout)
    found = {}
    for name, path in models.items():
        if name != "original":
            new = _outputs(path, heldout)
            found[name] = {photo: round(_relative(new[i * views : (i + 1) * views], ref[i * views : (i + 1) * views]), 4)
                           for i, photo in enumerate(HELD_OUT)}
    return found


def _channel_errors(source: Path, compressed: Path, heldout) -> dict:
    """The detector's output [N, 4 box + 18 classes, anchors], split: relative error of the box channels
    and of the class scores, and how often the top class agrees where the original is confident."""
    ref, new = _outputs(source, heldout), _outputs(compressed, heldout)
    confident = ref[:, 4:].max(axis=1) > 0.25
    agree = new[:, 4:].argmax(axis=1) == ref[:, 4:].argmax(axis=1)
    return {"box_error": _relative(new[:, :4], ref[:, :4]), "class_error": _relative(new[:, 4:], ref[:, 4:]),
            "top_class_agreement": float(agree[confident].mean()), "confident_anchors": int(confident.sum())}


if __name__ == "__main__":
    main()
