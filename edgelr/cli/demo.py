"""`edgelr demo`: the whole flow on a built-in example. Parses, calls the library, prints."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole flow on a built-in example model")
    p.add_argument("--keep", metavar="DIR", help="keep the example's files (demo.onnx, calib.npz, heldout.npz and the "
                   "compressed models) in this new or empty folder, to try other commands on")


def run(args) -> int:
    from pathlib import Path

    from edgelr.demo import run_demo
    from edgelr.errors import EdgelrError

    if args.keep is not None:
        keep = Path(args.keep)
        if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            raise EdgelrError(f"--keep {keep}: give a new or empty folder (nothing is overwritten)")
        keep.mkdir(parents=True, exist_ok=True)
    return run_demo(progress=not args.quiet, folder=args.keep)
