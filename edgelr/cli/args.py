"""Argument types and groups shared by every command: one flag, one meaning."""

from __future__ import annotations

import argparse


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]: give the fraction to keep, e.g. 0.5")
    return value


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive, e.g. 0.05")
    return value


def removed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1): give the fraction of channels to remove, e.g. 0.25")
    return value


def ssh_flags(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument("--port", type=int, metavar="N", help=f"SSH port (with {flag})")
    p.add_argument("--identity", metavar="FILE", help=f"SSH private key (with {flag})")
    p.add_argument("--known-hosts", metavar="FILE", help=f"known_hosts file to verify the device's host key (with {flag})")
    p.add_argument("--timeout", type=float, default=60, metavar="S", help="limit for each remote step (default 60)")
    p.add_argument("--python", default="python3", metavar="PATH", help=f"the device's Python (with {flag}; default python3)")
