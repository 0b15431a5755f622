"""`edgelr profile`: latency end to end and per node, here or on a device over SSH. Parses, calls the library, prints."""

from __future__ import annotations

import argparse

from edgelr.cli.args import ssh_flags


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="latency on this machine, end to end and per node (ONNX Runtime CPU)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--vs", metavar="OTHER.onnx", help="also profile this model, interleaved, and print ratios")
    p.add_argument("--calib", metavar="DATA.npz", help="real inputs (the first sample is used)")
    p.add_argument("--runs", type=int, default=50, metavar="N")
    p.add_argument("--warmup", type=int, default=5, metavar="N")
    p.add_argument("--threads", type=int, default=1, metavar="N")
    p.add_argument("--json", metavar="OUT.json", help="write the measurements here")
    p.add_argument("--on", metavar="USER@HOST", help="run on this device over SSH (needs python3, numpy, onnxruntime there)")
    ssh_flags(p, "--on")


def run(args) -> int:
    from edgelr.graph.layers import find_layers
    from edgelr.io import model as model_io
    from edgelr.measure.profile import (
        compare_models,
        layer_aliases,
        per_layer_ratios,
        sample_feed,
    )
    from edgelr.report.tables import human, table, write_json

    if args.json:
        model_io.check_output_path(args.json, args.model, args.vs, args.calib)
    feed = sample_feed(args.model, args.calib)
    models = {"A": args.model} | ({"B": args.vs} if args.vs else {})
    for path in models.values():
        model_io.load(path)  # a clear error for a missing or broken file before any timing
    aliases = layer_aliases(find_layers(model_io.load(args.model))[0])  # kernels named after outputs -> layers
    if args.on:
        found = _remote(args, models, feed)
    else:
        found = compare_models(models, feed, args.runs, args.warmup, args.threads)
    stats = ["min", "p50", "p90", "p99", "mean", "std"]
    rows = [[name, p.model] + [f"{p.latency_ms[k]:.3f}" for k in stats] + [f"{p.throughput_per_s:.1f}"] for name, p in found.items()]
    print(table(["", "model"] + [f"{k} ms" for k in stats] + ["runs/s"], rows, "ll" + "r" * 7))
    a = found["A"]
    print(f"\nslowest nodes of A ({len(a.nodes)} in all, ONNX Runtime's names after its optimizations):")
    top = [[r["name"], r["op"], f"{r['mean_ms']:.3f}", f"{100 * r['share']:.1f}%"] for r in a.nodes[:15]]
    print(table(["node", "op", "mean ms", "share"], top, "llrr"))
    data = {name: p.to_json() for name, p in found.items()}
    if args.vs:
        b = found["B"]
        ratio = b.latency_ms["p50"] / a.latency_ms["p50"]
        print(f"\nB / A end to end (p50): {ratio:.3f}  (B is {1 / ratio:.2f}x the speed of A)")
        layers = per_layer_ratios(a, b, aliases)
        rows = [[r["layer"], f"{r['a_ms']:.3f}", f"{r['b_ms']:.3f}", f"{r['ratio']:.2f}"] for r in layers[:15]]
        print(table(["layer", "A ms", "B ms", "B/A"], rows, "lrrr"))
        data["ratio_p50"] = ratio
        data["layers"] = layers
    print(f"peak resident memory: {human(a.peak_rss_mb * 1e6)}B; onnxruntime {a.onnxruntime}, {a.threads} thread(s)")
    if args.json:
        write_json(data, args.json)
        print(f"wrote {args.json}")
    return 0


def _remote(args, models: dict, feed: dict) -> dict:
    """Each model profiled on the device in turn (not interleaved: one SSH session per model)."""
    from pathlib import Path

    from edgelr.measure.remote import RemoteRunError, check_host, profile_remote
    from edgelr.report.tables import write_json

    check_host(args.on)
    found = {}
    for name, path in models.items():
        try:
            found[name] = profile_remote(
                args.on, Path(path), feed, args.runs, args.warmup, args.threads, port=args.port,
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
