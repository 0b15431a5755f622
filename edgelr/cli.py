"""The `edgelr` command: parses arguments, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import argparse
import sys

from edgelr import __version__
from edgelr.errors import EdgelrError


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]: give the fraction to keep, e.g. 0.5")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive, e.g. 0.05")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgelr", description="Make ONNX models smaller and faster for edge devices.")
    parser.add_argument("--version", action="version", version=f"edgelr {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="list factorizable layers with shapes, params and FLOPs")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--calib", metavar="DATA.npz", help="sample inputs, to learn the sizes of dynamic dims")

    p = sub.add_parser("compress", help="low-rank factorize a model against a budget")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--params", type=_fraction, metavar="F", help="keep this fraction of the factorizable params")
    budget.add_argument("--flops", type=_fraction, metavar="F", help="keep this fraction of the factorizable FLOPs")
    budget.add_argument("--latency", type=_fraction, metavar="F",
                        help="keep this fraction of the model's latency, measured on this machine (ONNX Runtime CPU, 1 thread)")
    p.add_argument("--max-error", type=_positive, metavar="E", help="per-layer relative output error gate")
    p.add_argument("--calib", metavar="DATA.npz", help="one array per model input, first axis = samples")
    p.add_argument("--report", metavar="REPORT.json", help="write the per-layer results as JSON")

    sub.add_parser("demo", help="the whole flow on a built-in example model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except EdgelrError as exc:
        print(f"edgelr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgelr {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


def _inspect(args) -> int:
    from edgelr import calibrate, model_io
    from edgelr.layers import find_layers
    from edgelr.report import inspect_table

    model = model_io.load(args.model)
    model_io.infer_shapes(model)
    layers, skipped = find_layers(model)
    if args.calib:
        samples = calibrate.load_samples(args.calib, model)
        calibrate.observe_shapes(model, layers, samples)
    print(inspect_table(layers, skipped))
    return 0


def _compress(args) -> int:
    from edgelr.compress import compress
    from edgelr.factorize import FactorizeConfig
    from edgelr.report import compression_table

    config = FactorizeConfig(params=args.params, flops=args.flops, latency=args.latency, max_error=args.max_error)
    done = compress(args.model, args.output, config, calib=args.calib, report=args.report, progress=not args.quiet)
    print(compression_table(done.result))
    for warning in done.result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if done.latency:
        for r in done.latency["rounds"]:
            print(f"latency round {r['round']}: predicted {r['predicted_ratio']:.3f}, measured {r['measured_ratio']:.3f} "
                  "of the original")
        print(f"latency tables: {done.latency['layer_timings']} layer timings new, cached in {done.latency['table']}")
    if done.output_error:
        print(f"whole-model relative output error on the calibration set: {done.output_error['all']:.4f}")
    else:
        print("no calibration data: plain SVD, whole-model error not measured (pass --calib DATA.npz)")
    print(f"wrote {done.output}" + (f" and {args.report}" if args.report else "") + f" in {done.seconds:.1f} s")
    return 0


def _demo(args) -> int:
    from edgelr.demo import run_demo

    return run_demo(progress=not args.quiet)


_COMMANDS = {"inspect": _inspect, "compress": _compress, "demo": _demo}


if __name__ == "__main__":
    sys.exit(main())
