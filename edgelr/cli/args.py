"""Argument types and groups shared by every command: one flag, one meaning."""

from __future__ import annotations

import argparse


def _number(text: str, fits, why: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not fits(value):
        raise argparse.ArgumentTypeError(f"{text} {why}")
    return value


def fraction(text: str) -> float:
    return _number(text, lambda v: 0 < v <= 1, "is outside (0, 1]: give the fraction to keep, e.g. 0.5")


def unit_fraction(text: str) -> float:
    return _number(text, lambda v: 0 < v <= 1, "is outside (0, 1]: give the least the metric may be, e.g. 0.9")


def positive(text: str) -> float:
    return _number(text, lambda v: v > 0, "must be positive, e.g. 0.05")


def removed(text: str) -> float:
    return _number(text, lambda v: 0 <= v < 1, "is outside [0, 1): give the fraction of channels to remove, e.g. 0.25")


def ssh_flags(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument("--port", type=int, metavar="N", help=f"SSH port (with {flag})")
    p.add_argument("--identity", metavar="FILE", help=f"SSH private key (with {flag})")
    p.add_argument("--known-hosts", metavar="FILE", help=f"known_hosts file to verify the device's host key (with {flag})")
    p.add_argument("--timeout", type=float, default=60, metavar="S", help="limit for each remote step (default 60)")
    p.add_argument("--python", default="python3", metavar="PATH", help=f"the device's Python (with {flag}; default python3)")


# --- argument groups: each flag defined once, with one meaning, for every command that takes it ----------------
def add_quiet(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")


def add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", metavar="DATA.npz",
                   help="sample inputs: an .npz with one array per model input, named after it, samples on the first "
                        "axis (sizes of dynamic dims, reference outputs, calibration)")


def add_judge(p: argparse.ArgumentParser) -> None:
    """What the result is judged by, and on what: every verb that writes a compressed model."""
    from edgelr.measure.verify import MAX_OUTPUT_ERROR

    p.add_argument("--heldout", metavar="DATA.npz",
                   help="inputs the fit does not see, to judge the result on (as --calib; default: the --calib samples)")
    p.add_argument("--metric", choices=["detect", "classify", "embed", "mask", "none"],
                   help="the task metric that gates the result: detect (mAP@0.5 agreement), classify (top-1 "
                        "agreement), embed (cosine), mask (IoU); default: what the model's metadata says, else none")
    p.add_argument("--floor", type=unit_fraction, metavar="F",
                   help="the least the task metric may be (default: 0.90 detect and mask, 0.95 classify, 0.98 embed)")
    p.add_argument("--max-output-error", type=positive, metavar="E",
                   help="the most any output (or channel group of one) may be off, relative to its own scale, on the "
                        f"judged samples (default: {MAX_OUTPUT_ERROR:g} where no task metric judges the result)")


def add_shapes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", action="append", default=[], metavar="NAME=DIMS",
                   help="the size of an input with dynamic dims, e.g. images=1x3x640x640, or NAME=MIN:OPT:MAX for a "
                        "TensorRT range (ONNX Runtime runs at OPT); repeat for each input. Default: --calib's "
                        "samples, else the model's own metadata (Ultralytics' imgsz and batch)")


def add_target(p: argparse.ArgumentParser, required: bool = False) -> None:
    from edgelr.deploy.targets import builtin_targets

    p.add_argument("--target", required=required, metavar="NAME",
                   help=f"the device: one of targets/ ({', '.join(builtin_targets())}) or your own .toml file; "
                        "it sets the backend, precision, threads and execution providers")


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: need 1 or more")
    return value


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=count, metavar="N",
                   help="ONNX Runtime intra-op threads (default: the target's, else 1)")


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                   help="the deployed model's numeric format (default: the target's)")
