"""`edgelr inspect`: list the layers the passes can rewrite. Parses, calls the library, prints."""

from __future__ import annotations

import argparse

from edgelr.cli.args import add_calib, add_shapes


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list factorizable layers with shapes, params and FLOPs")
    p.add_argument("model", metavar="MODEL.onnx")
    add_calib(p)
    add_shapes(p)


def run(args) -> int:
    from edgelr.calibration.grams import observe_shapes
    from edgelr.graph.einsum import lower_weight_einsums
    from edgelr.graph.layers import find_layers
    from edgelr.io import model as model_io
    from edgelr.io.samples import load_samples
    from edgelr.io.shapes import SizesUnknown, parse_shapes, sizing_samples
    from edgelr.report.tables import inspect_table

    shapes = parse_shapes(args.shapes, args.model)
    model = model_io.load(args.model)
    model_io.infer_shapes(model)
    if lower_weight_einsums(model):  # as compress sees them: one MatMul layer per weight matrix
        model_io.infer_shapes(model)
    layers, skipped = find_layers(model)
    samples = load_samples(args.calib, model) if args.calib else None
    try:
        found, unknown = sizing_samples(model, samples=samples, shapes=shapes, where=args.model), None
    except SizesUnknown as exc:  # inspect needs sizes only for FLOPs: the table without them, and how to get them
        found, unknown = None, exc
    if found is not None:
        observe_shapes(model, layers, found)
    print(inspect_table(layers, skipped))
    if unknown is not None and any(layer.dense_flops() is None for layer in layers):
        print(f"\nFLOPs need the input sizes: {unknown.hint}")
    return 0
