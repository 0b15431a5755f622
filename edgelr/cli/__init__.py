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


def _removed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1): give the fraction of channels to remove, e.g. 0.25")
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
    p.add_argument("--no-refit", action="store_true", help="keep each factorized pair as fitted on the original's "
                   "inputs (default, with --calib: refit it on the inputs the compressed model feeds it)")
    p.add_argument("--calib", metavar="DATA.npz", help="one array per model input, first axis = samples")
    p.add_argument("--report", metavar="REPORT.json", help="write the per-layer results as JSON")
    p.add_argument("--float-output", metavar="FLOAT.onnx", help="with --quantize: also keep the model before quantization")
    p.add_argument("--prune", type=_removed, metavar="F",
                   help="first remove this fraction of the channels of every prunable group (structured pruning)")
    p.add_argument("--quantize", choices=["int8", "int8-lowrank", "int8-dynamic"],
                   help="then quantize with ONNX Runtime: int8 (static, calibrated on --calib), int8-lowrank "
                        "(int8 plus float low-rank branches where they measure better) or int8-dynamic")

    p = sub.add_parser("profile", help="latency on this machine, end to end and per node (ONNX Runtime CPU)")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--vs", metavar="OTHER.onnx", help="also profile this model, interleaved, and print ratios")
    p.add_argument("--calib", metavar="DATA.npz", help="real inputs (the first sample is used)")
    p.add_argument("--runs", type=int, default=50, metavar="N")
    p.add_argument("--warmup", type=int, default=5, metavar="N")
    p.add_argument("--threads", type=int, default=1, metavar="N")
    p.add_argument("--json", metavar="OUT.json", help="write the measurements here")
    p.add_argument("--on", metavar="USER@HOST", help="run on this device over SSH (needs python3, numpy, onnxruntime there)")
    _ssh_flags(p, "--on")

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
    _ssh_flags(p, "--to")

    p = sub.add_parser("distill", help="train a compressed model to match the original's outputs (no labels needed)")
    p.add_argument("teacher", metavar="TEACHER.onnx")
    p.add_argument("student", metavar="STUDENT.onnx", help="the compressed model (same inputs and outputs)")
    p.add_argument("--data", required=True, metavar="DIR_OR_NPZ",
                   help="a folder of images (with an optional preprocess.json) or an .npz of model inputs")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, metavar="N")
    length.add_argument("--epochs", type=float, metavar="N")
    p.add_argument("--batch", type=int, default=8, metavar="N")
    p.add_argument("--lr", type=_positive, default=2e-5, metavar="LR", help="AdamW's peak learning rate (default 2e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="FILE", help="save progress here (and resume from it with --resume)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--preprocess", metavar="SPEC.json", help="image size, letterbox, mean, std, scale (images only)")
    p.add_argument("--freeze", action="append", default=[], metavar="PATTERN", help="keep matching weights fixed")
    aligned = p.add_mutually_exclusive_group()
    aligned.add_argument("--feature", action="append", default=[], metavar="TENSOR",
                         help="also align this intermediate tensor (same name in both models)")
    aligned.add_argument("--align-factorized", action="store_true",
                         help="also align every factorized pair's output with the layer it replaced")
    p.add_argument("--feature-weight", type=_positive, metavar="W",
                   help="each aligned tensor's weight in the loss (default 1; with --align-factorized a "
                        "small one, edgelr.distill.FACTORIZED_FEATURE_WEIGHT)")
    p.add_argument("--augment", choices=["light", "strong", "none"], default="light",
                   help="image augmentation: light (crop, flip, colour; default), strong (crops of 5-100%%, "
                        "mosaics, colour casts, mixup: for a few dozen photos), none")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the student's forward pass (bf16: faster on CPUs with AMX or AVX-512 BF16; saved in fp32)")
    p.add_argument("--quantization-aware", action="store_true",
                   help="round Conv/Linear inputs to uint8 while training, for static INT8 after "
                        "(`edgelr compress OUT.onnx --quantize int8 --calib ...`)")
    p.add_argument("--time-limit", type=_positive, metavar="S", help="stop after this many seconds, writing the output")
    p.add_argument("--eval", metavar="DATA.npz", help="held-out inputs: report the error before and after")

    p = sub.add_parser("report", help="one self-contained HTML page from the JSON of compress --report and profile --json")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-o", "--output", required=True, metavar="report.html")

    sub.add_parser("demo", help="the whole flow on a built-in example model")
    return parser


def _ssh_flags(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument("--port", type=int, metavar="N", help=f"SSH port (with {flag})")
    p.add_argument("--identity", metavar="FILE", help=f"SSH private key (with {flag})")
    p.add_argument("--known-hosts", metavar="FILE", help=f"known_hosts file to verify the device's host key (with {flag})")
    p.add_argument("--timeout", type=float, default=60, metavar="S", help="limit for each remote step (default 60)")
    p.add_argument("--python", default="python3", metavar="PATH", help=f"the device's Python (with {flag}; default python3)")


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


def _compress(args) -> int:
    from edgelr.api import compress
    from edgelr.passes.factorize import FactorizeConfig
    from edgelr.report.tables import compression_table

    budget = {"params": args.params, "flops": args.flops, "latency": args.latency, "max_error": args.max_error}
    if all(v is None for v in budget.values()) and (args.prune is not None or args.quantize):
        budget = {"ranks": {}}  # pruning or quantization alone: every layer stays dense
    config = FactorizeConfig(**budget, refit=not args.no_refit)
    done = compress(args.model, args.output, config, calib=args.calib, report=args.report, progress=not args.quiet,
                    quantize=args.quantize, prune=args.prune, float_output=args.float_output)
    if done.pruned:
        p = done.pruned
        print(f"pruned {p['groups_pruned']} of {p['groups'] + p['unprunable_groups']} channel groups: "
              f"{p['params_before']:,} -> {p['params_after']:,} parameters")
    print(compression_table(done.result))
    if done.result.refit:
        print(f"refit {len(done.result.refit)} of {len(done.result.factorized)} factorized pairs on the inputs the "
              "compressed model feeds them")
    for warning in done.result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if done.latency:
        for r in done.latency["rounds"]:
            alone = r.get("quantized_only_ratio")
            print(f"latency round {r['round']}: predicted {r['predicted_ratio']:.3f}, measured {r['measured_ratio']:.3f} "
                  "of the original" + (f" (quantized alone, timed beside it: {alone:.3f})" if alone else ""))
        kept = done.latency["kept_round"]
        print(f"kept round {kept}" + ("" if done.latency["within_budget"] else ", the fastest: no round met the budget"))
        print(f"latency tables: {done.latency['layer_timings']} layer timings new, cached in {done.latency['table']}")
    if done.quantized:
        q = done.quantized
        kept = q.get("kept_float") or []
        print(f"quantized {q['nodes_quantized']} nodes ({q['scheme']}, {q['activations']} activations)"
              + (f"; kept in float, where INT8's error cost more than its speed: {', '.join(kept)}" if kept else ""))
    if done.output_error:
        print(f"whole-model relative output error on the calibration set: {done.output_error['all']:.4f}")
    else:
        print("no calibration data: plain SVD, whole-model error not measured (pass --calib DATA.npz)")
    print(f"wrote {done.output}" + (f" and {args.report}" if args.report else "") + f" in {done.seconds:.1f} s")
    return 0


def _profile(args) -> int:
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
        found = _profile_remote(args, models, feed)
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


def _profile_remote(args, models: dict, feed: dict) -> dict:
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


def _export(args) -> int:
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


def _distill(args) -> int:
    from edgelr.train.distill import distill

    done = distill(args.teacher, args.student, args.data, args.output, steps=args.steps, epochs=args.epochs,
                   batch=args.batch, lr=args.lr, seed=args.seed, checkpoint=args.checkpoint, resume=args.resume,
                   preprocess=args.preprocess, freeze=args.freeze,
                   features="factorized" if args.align_factorized else [(f, f) for f in args.feature] or None,
                   feature_weight=args.feature_weight,
                   augment={"light": True, "strong": "strong", "none": False}[args.augment], precision=args.precision,
                   quantization_aware=args.quantization_aware,
                   time_limit=args.time_limit, eval_samples=args.eval, progress=not args.quiet)
    print(f"{done['steps']} steps in {done['seconds']:.0f} s, final loss {done['final_loss']:.4g}"
          + (" (stopped at the time limit)" if done.get("stopped_early") else ""))
    if done.get("error_before"):
        print(f"held-out relative output error: {done['error_before']['all']:.4f} before, "
              f"{done['error_after']['all']:.4f} after")
    print(f"wrote {done['output']} (parity with torch: {max(done['parity'].values()):.1e})")
    return 0


def _report(args) -> int:
    from edgelr.report.html import write_html_report

    out = write_html_report(args.run_dir, args.output)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _demo(args) -> int:
    from edgelr.demo import run_demo

    return run_demo(progress=not args.quiet)


_COMMANDS = {"inspect": _inspect, "compress": _compress, "profile": _profile, "export": _export, "distill": _distill,
             "report": _report, "demo": _demo}


if __name__ == "__main__":
    sys.exit(main())
