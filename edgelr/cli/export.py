"""`edgelr export`: the files that run a model on a device. Parses, calls the library, prints."""

from __future__ import annotations

import argparse
import sys

from edgelr.cli.args import ssh_flags
from edgelr.errors import EdgelrError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the files that run a model on a device (Pi bundle, TensorRT engine)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--target", required=True, metavar="NAME",
                   help="a device from targets/ (rpi5, rpi4, x86-cpu, rtx, jetson-orin, gpu) or your own .toml file")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the folder to write (new, empty, or an earlier bundle)")
    p.add_argument("--calib", metavar="DATA.npz", help="real inputs: reference outputs, INT8 calibration, TensorRT shapes")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="override the target's precision (TensorRT)")
    p.add_argument("--shapes", action="append", default=[], metavar="NAME=MIN:OPT:MAX",
                   help="TensorRT profile for an input with dynamic dims, e.g. images=1x3x320x320:4x3x320x320:8x3x640x640")
    p.add_argument("--sparsity", choices=["2:4"], help="TensorRT: prune weights to 2:4 and build with sparse kernels")
    p.add_argument("--to", metavar="USER@HOST:PATH", help="copy the bundle to the device over SSH and run its check there")
    ssh_flags(p, "--to")


def run(args) -> int:
    from pathlib import Path

    from edgelr.deploy.export import SshOptions, export
    from edgelr.deploy.targets import parse_shape
    from edgelr.report.tables import human

    shapes = {}
    for text in args.shapes:
        name, _, triple = text.partition("=")
        parts = triple.split(":")
        if not name or len(parts) != 3:
            raise EdgelrError(f"--shapes {text!r}: write NAME=MIN:OPT:MAX, e.g. images=1x3x320x320:4x3x320x320:8x3x640x640")
        shapes[name] = tuple(parse_shape(p, f"--shapes {name}") for p in parts)
    ssh = SshOptions(port=args.port, identity=Path(args.identity) if args.identity else None,
                     known_hosts=Path(args.known_hosts) if args.known_hosts else None, timeout=args.timeout,
                     python=args.python)
    done = export(args.model, args.target, args.output, calib=args.calib, precision=args.precision,
                  shapes=shapes or None, to=args.to, ssh=ssh, sparsity=args.sparsity, progress=not args.quiet)
    files = done.manifest.get("files", {})
    print(f"{done.target.name}: {done.target.description}")
    for name, entry in sorted(files.items()):
        size = entry.get("bytes") if isinstance(entry, dict) else None
        print(f"  {name}" + (f"  {human(size)}B" if size is not None else ""))
    sparse = done.manifest.get("sparsity")
    if sparse:
        error = f", output error {sparse['output_error']:.3f}" if sparse.get("output_error") is not None else ""
        print(f"2:4 sparse weights in {sparse['layers']} layers{error}")
    print(f"wrote {done.out_dir} in {done.seconds:.1f} s")
    if done.destination:
        print(f"copied to {done.destination}")
    if done.remote is not None:
        r = done.remote
        parity = r.get("parity", {})
        lat = r.get("latency_ms", {})
        print(f"on the device: onnxruntime {r.get('onnxruntime')} ({r.get('machine')}), parity "
              f"{'passed' if parity.get('passed') else 'FAILED'} (max relative error {parity.get('max_rel_error', float('nan')):.2e})"
              + (f", p50 {lat['p50']:.2f} ms" if 'p50' in lat else ""))
        if not r.get("ok"):
            print(f"edgelr export: error: the model's outputs on {done.destination} do not match the reference",
                  file=sys.stderr)
            return 1
    return 0
