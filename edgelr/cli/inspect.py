"""`edgelr inspect`: list the layers the passes can rewrite. Parses, calls the library, prints."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list factorizable layers with shapes, params and FLOPs")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--calib", metavar="DATA.npz", help="sample inputs, to learn the sizes of dynamic dims")


def run(args) -> int:
    from edgelr.calibration.grams import observe_shapes
    from edgelr.graph.layers import find_layers
    from edgelr.io import model as model_io
    from edgelr.io.samples import load_samples
    from edgelr.report.tables import inspect_table

    model = model_io.load(args.model)
    model_io.infer_shapes(model)
    layers, skipped = find_layers(model)
    if args.calib:
        samples = load_samples(args.calib, model)
        observe_shapes(model, layers, samples)
    print(inspect_table(layers, skipped))
    return 0
