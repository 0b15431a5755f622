"""`edgelr profile`: latency end to end and per node, here or on a device over SSH. Parses, calls the library, prints."""

from __future__ import annotations

import argparse

from edgelr.cli.args import add_calib, add_shapes, add_target, add_threads, ssh_flags


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="latency end to end and per node (ONNX Runtime CPU), here or on a device")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--vs", metavar="OTHER.onnx", help="also profile this model, interleaved, and print ratios")
    add_calib(p)
    add_shapes(p)
    add_target(p)
    add_threads(p)
    p.add_argument("--runs", type=int, default=50, metavar="N")
    p.add_argument("--warmup", type=int, default=5, metavar="N")
    p.add_argument("--json", metavar="OUT.json", help="write the measurements here")
    p.add_argument("--on", metavar="USER@HOST", help="run on this device over SSH (needs python3, numpy, onnxruntime there)")
    ssh_flags(p, "--on")


def run(args) -> int:
    from edgelr.deploy.targets import load_target
    from edgelr.graph.layers import find_layers
    from edgelr.io import model as model_io
    from edgelr.io.samples import load_samples
    from edgelr.io.shapes import input_feed, parse_shapes, resolve_shapes
    from edgelr.measure.profile import (
        compare_models,
        comparison,
        layer_aliases,
        run_settings,
    )
    from edgelr.report.tables import human, table, write_json

    if args.json:
        model_io.check_output_path(args.json, args.model, args.vs, args.calib)
    target = load_target(args.target) if args.target else None
    settings = run_settings(target, args.threads, remote=args.on)
    shapes = parse_shapes(args.shapes, args.model)
    models = {"A": args.model} | ({"B": args.vs} if args.vs else {})
    for path in models.values():
        model_io.load(path)  # a clear error for a missing or broken file before any timing
    model = model_io.load(args.model)
    samples = load_samples(args.calib, model) if args.calib else None
    sizes = resolve_shapes(model, samples=samples, shapes=shapes, where=args.model)
    feed = input_feed(model, samples=samples, shapes=shapes, where=args.model)
    aliases = layer_aliases(find_layers(model)[0])  # kernels named after outputs -> layers
    del model
    print(f"inputs: {sizes.describe()}")
    for note in settings.notes:
        print(f"note: {note}")
    if args.on:
        found = _remote(args, models, feed, settings.threads)
    else:
        found = compare_models(models, feed, args.runs, args.warmup, settings=settings)
    stats = ["min", "p50", "p90", "p99", "mean", "std"]
    rows = [[name, p.model] + [f"{p.latency_ms[k]:.3f}" for k in stats] + [f"{p.throughput_per_s:.1f}"] for name, p in found.items()]
    print(table(["", "model"] + [f"{k} ms" for k in stats] + ["runs/s"], rows, "ll" + "r" * 7))
    a = found["A"]
    print(f"\nslowest nodes of A ({len(a.nodes)} in all, ONNX Runtime's names after its optimizations):")
    top = [[r["name"], r["op"], f"{r['mean_ms']:.3f}", f"{100 * r['share']:.1f}%"] for r in a.nodes[:15]]
    print(table(["node", "op", "mean ms", "share"], top, "llrr"))
    data = {name: p.to_json() for name, p in found.items()}
    if args.vs:
        both = comparison(a, found["B"], aliases)
        print(f"\nB / A end to end (p50): {both['ratio_p50']:.3f}  (B is {both['speedup']:.2f}x the speed of A)")
        rows = [[r["layer"], f"{r['a_ms']:.3f}", f"{r['b_ms']:.3f}", f"{r['ratio']:.2f}"] for r in both["layers"][:15]]
        print(table(["layer", "A ms", "B ms", "B/A"], rows, "lrrr"))
        data["ratio_p50"], data["layers"] = both["ratio_p50"], both["layers"]
    where = f" on {a.host}" if a.host else ""
    print(f"peak resident memory: {human(a.peak_rss_mb * 1e6)}B; onnxruntime {a.onnxruntime}{where}, {a.threads} thread(s)"
          + (f" (target {target.name})" if target is not None else ""))
    if args.json:
        write_json(data, args.json)
        print(f"wrote {args.json}")
    return 0


def _remote(args, models: dict, feed: dict, threads: int) -> dict:
    """Each model profiled on the device in turn (not interleaved: one SSH session per model)."""
    from pathlib import Path

    from edgelr.measure.remote import RemoteRunError, check_host, profile_remote
    from edgelr.report.tables import write_json

    check_host(args.on)
    found = {}
    for name, path in models.items():
        try:
            found[name] = profile_remote(
                args.on, Path(path), feed, args.runs, args.warmup, threads, port=args.port,
                identity=Path(args.identity) if args.identity else None,
                known_hosts=Path(args.known_hosts) if args.known_hosts else None, timeout=args.timeout,
                python=args.python,
            )
        except RemoteRunError as exc:
            if args.json:  # keep what was measured, and say it is partial
                write_json({"complete": False, "error": str(exc), "model": str(path), "partial_ms": exc.partial,
                            **{k: p.to_json() for k, p in found.items()}}, args.json)
            raise
    return found
