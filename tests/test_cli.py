"""The command line's shared behaviour: flags that mean the same wherever they appear."""

from __future__ import annotations

import pytest

from edgelr.cli import COMMANDS, _parser


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_quiet_goes_before_or_after_the_verb(command):
    parser = _parser()
    args = {"inspect": ["m.onnx"], "compress": ["m.onnx", "-o", "o.onnx"], "profile": ["m.onnx"],
            "export": ["m.onnx", "--target", "rpi5", "-o", "d"], "distill": ["t.onnx", "s.onnx", "--data", "x",
                                                                           "-o", "o.onnx", "--steps", "1"],
            "report": ["run", "-o", "r.html"], "demo": []}[command]
    assert parser.parse_args([command, *args]).quiet is False
    assert parser.parse_args(["-q", command, *args]).quiet is True
    assert parser.parse_args([command, *args, "-q"]).quiet is True
