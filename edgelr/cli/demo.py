"""`edgelr demo`: the whole flow on a built-in example. Parses, calls the library, prints."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("demo", help="the whole flow on a built-in example model")


def run(args) -> int:
    from edgelr.demo import run_demo

    return run_demo(progress=not args.quiet)
