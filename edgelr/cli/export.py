"""`edgelr export`: the files that run a model on a device. Parses, calls the library, prints."""

from __future__ import annotations

import argparse
import sys

from edgelr.cli.args import (
    add_calib,
    add_precision,
    add_shapes,
    add_target,
    add_threads,
    ssh_flags,
)


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the files that run a model on a device (Pi bundle, TensorRT engine, "
                                      "diffusion pipeline)",
                       epilog="A pipeline folder with a TensorRT target (e.g. --target rtx) gets its ONNX folder plus "
                              "an engine for the denoiser (engines/unet/); --shapes batch=MIN:OPT:MAX sets the "
                              "engine's batch range (default 1:1:8, or 1:2:8 for text to image: guidance doubles it)")
    p.add_argument("model", metavar="MODEL.onnx", help="an ONNX model, a diffusers pipeline folder (model_index.json), "
                                                      "or a pipeline folder edgelr export or compress wrote")
    add_target(p, required=True)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the folder to write (new, empty, or an earlier bundle)")
    add_calib(p)
    add_shapes(p)
    add_precision(p)
    add_threads(p)
    p.add_argument("--sparsity", choices=["2:4"], help="TensorRT: prune weights to 2:4 and build with sparse kernels")
    p.add_argument("--to", metavar="USER@HOST:PATH", help="copy the bundle to the device over SSH and run its check there")
    ssh_flags(p, "--to")


def run(args) -> int:
    from pathlib import Path

    if Path(args.model).is_dir():
        return _pipeline(args)
    from edgelr.deploy.export import SshOptions, export
    from edgelr.io.shapes import parse_shapes
    from edgelr.report.tables import human

    shapes = parse_shapes(args.shapes, args.model)
    ssh = SshOptions(port=args.port, identity=Path(args.identity) if args.identity else None,
                     known_hosts=Path(args.known_hosts) if args.known_hosts else None, timeout=args.timeout,
                     python=args.python)
    done = export(args.model, args.target, args.output, calib=args.calib, precision=args.precision,
                  shapes=shapes or None, threads=args.threads, to=args.to, ssh=ssh, sparsity=args.sparsity,
                  progress=not args.quiet)
    files = done.manifest.get("files", {})
    print(f"{done.target.name}: {done.target.description}")
    for name, entry in sorted(files.items()):
        size = entry.get("bytes") if isinstance(entry, dict) else None
        print(f"  {name}" + (f"  {human(size)}B" if size is not None else ""))
    sparse = done.manifest.get("sparsity")
    if sparse:
        error = f", output error {sparse['output_error']:.3f}" if sparse.get("output_error") is not None else ""
        print(f"2:4 sparse weights in {sparse['layers']} layers{error}")
    if done.inputs:
        print(f"inputs: {done.inputs}")
    parity = done.manifest.get("parity")
    if done.target.is_tensorrt and isinstance(parity, str):
        why = " on this machine (the engine was built ahead of time: check it on the GPU that runs it)"
        print(f"GPU parity check {parity}" + (why if parity == "skipped: no GPU" else ""))
    elif done.target.is_tensorrt and isinstance(parity, dict):
        print(f"GPU parity: relative output error {parity['relative_error']:.2e} over {parity['samples']} input(s)")
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


def _pipeline(args) -> int:
    from edgelr.deploy.pipeline import export_pipeline
    from edgelr.errors import EdgelrError
    from edgelr.io.shapes import parse_shapes
    from edgelr.report.tables import human

    given = [flag for flag, value in (("--calib", args.calib), ("--sparsity", args.sparsity), ("--to", args.to)) if value]
    if given:
        raise EdgelrError(f"{args.model}: {', '.join(given)} {'is' if len(given) == 1 else 'are'} for ONNX models; a pipeline folder exports with "
                          "--target, -o and --threads (and --shapes, --precision for a TensorRT target's engine)")
    done = export_pipeline(args.model, args.target, args.output, threads=args.threads,
                           shapes=parse_shapes(args.shapes) or None, precision=args.precision, progress=not args.quiet)
    m = done.manifest
    print(f"{done.target.name}: {done.target.description}")
    print(f"{m['source']['class']} ({m['kind']}), exported with {next(iter(m['components'].values()))['exporter']}")
    for name, c in m["components"].items():
        p = c["parity"]
        print(f"  {c['file']}  parity {p['relative_error']:.1e} relative, {p['max_abs_error']:.1e} max abs "
              f"(tolerance {p['tolerance']:.0e})" + (f": {p['of']}" if "of" in p else ""))
    for name, e in m.get("engines", {}).items():
        batch = e["batch"]
        print(f"  {e['file']}  {human(e['bytes'])}B, {e['precision']}, batch {batch['min']}..{batch['max']} "
              f"(opt {batch['opt']}), built in {e['build_seconds']:.1f} s with {e['tensorrt']['module']} "
              f"{e['tensorrt']['version']}")
        parity = e["parity"]
        if isinstance(parity, dict):
            print(f"  GPU parity of the {name} engine: relative output error {parity['relative_error']:.2e}")
        else:
            print(f"  GPU parity check of the {name} engine {parity}" + (" on this machine (check it on the GPU "
                  "that runs it)" if parity == "skipped: no GPU" else ""))
    print(f"wrote {done.out_dir} in {done.seconds:.1f} s; run it there: python run.py --steps 25"
          + (' --prompt "..."' if m["run"]["conditional"] else "")
          + (" (the ONNX models, on ONNX Runtime)" if m.get("engines") else ""))
    return 0
