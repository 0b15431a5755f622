"""cli/: the `edgelr` command: one file per verb (add: its arguments; run: call the library, print) and the
argument groups they share (args). No logic lives here. May import anything; nothing imports it."""

from __future__ import annotations

import argparse
import os
import sys

from edgelr.cli import compress, demo, distill, export, inspect, profile, report
from edgelr.cli.args import add_quiet
from edgelr.errors import EdgelrError
from edgelr.version import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgelr", description="Make ONNX models smaller and faster for edge devices.")
    parser.add_argument("--version", action="version", version=f"edgelr {__version__}")
    add_quiet(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect.add(sub)
    compress.add(sub)
    profile.add(sub)
    export.add(sub)
    distill.add(sub)
    report.add(sub)
    demo.add(sub)
    for command in sub.choices.values():  # -q before or after the verb; after it, it must not reset one given before
        add_quiet(command, default=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except EdgelrError as exc:
        print(f"edgelr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `edgelr ... | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"edgelr {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


COMMANDS = {"inspect": inspect, "compress": compress, "profile": profile, "export": export, "distill": distill, "report": report, "demo": demo}


if __name__ == "__main__":
    sys.exit(main())
