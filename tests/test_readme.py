"""README as a test: the commands of README's tour, as written, in one fresh folder, on the real YOLOv8n.

README's tour is a series of console blocks: `$ COMMAND` lines, each followed by what it printed. Each
command runs with bash in a temporary folder (the repo's tools/ and recipes/ linked in, as a reader's
checkout has them), in README's order; its output (stdout and stderr interleaved, as a terminal shows
them) is compared with README's, line by line:
- every number is a wildcard (timings, errors, sizes, ranks: 0.0186, 1.5M, 3.5, 1x3x320x320), so a
  layer name or a form may differ in its numbers only;
- a line `...` stands for any run of lines, and `...` inside a line for any text;
- whitespace and the dashes of a table's rule are collapsed: columns may widen, but a renamed column,
  message or word, a removed line, and a line too many fail;
- progress bars are dropped;
- a command must exit 0, unless the next one is `echo $?`, whose printed code it must exit with.

A command ending in `# not run by the test: REASON` is not run (a real Pi over SSH). Commands that
measure latency, train, profile or export are the slow tier (SLOW_COMMAND); the fast test runs the rest,
and the slow test runs after it in the same folder (or runs it first when run alone).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINKED = ("tools", "recipes")  # repo folders the tour's commands name by relative path
NOT_RUN = re.compile(r"\s+# not run by the test: (?P<reason>.+)$")
SLOW_COMMAND = re.compile(r"--latency|--recipe|\bedgelr (distill|profile|report|export)\b|aarch64_env|--images")
NEEDS = {  # a command word -> (what it needs on this machine, how to get it)
    "aarch64_env.py": (lambda: shutil.which("qemu-aarch64-static") is not None,
                       "needs qemu-aarch64-static (apt-get install -y qemu-user-static)"),
    "edgelr distill": (lambda: _importable("onnx2torch"), "needs onnx2torch (pip install --no-deps onnx2torch==1.5.15)"),
}
NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*(?:e[-+]?\d+)?[kMG]?")
PROGRESS = re.compile(r"\d+%\|")  # tqdm's bar: " 40%|████      | 4/10 [00:01<00:02]"
GAP = "..."


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)  # README's output lines
    not_run: str | None = None  # why the test cannot run it

    @property
    def slow(self) -> bool:
        return bool(SLOW_COMMAND.search(self.command))

    @property
    def shows_exit_code(self) -> bool:
        return self.command == "echo $?"


def tour_steps(text: str) -> list[Step]:
    """The `$ ` commands of the console blocks in README's "A tour" section, each with its output lines."""
    tour = text.split("\n## A tour\n", 1)[1].split("\n## ", 1)[0]
    steps: list[Step] = []
    for block in re.findall(r"^```\n(.*?)^```$", tour, flags=re.MULTILINE | re.DOTALL):
        lines = block.splitlines()
        if not lines or not lines[0].startswith("$ "):
            continue  # not a console block
        for line in lines:
            if line.startswith("$ "):
                command = line[2:]
                reason = NOT_RUN.search(command)
                steps.append(Step(command, not_run=reason["reason"] if reason else None))
            else:
                steps[-1].expected.append(line)
    return steps


def normalise(line: str) -> str:
    """A line as compared: numbers as '#', dash rules and runs of whitespace collapsed."""
    line = NUMBER.sub("#", line.rstrip())
    if line.strip() and set(line) <= {"-", " "}:
        line = re.sub(r"-+", "-", line)
    return " ".join(line.split())


def printed_lines(output: str, cache: Path) -> list[str]:
    """What a terminal would show, less blank lines: each line's last carriage-return segment, progress bars
    dropped, the test's cache folder written as README's (~/.cache/edgelr)."""
    shown = (line.rsplit("\r", 1)[-1] for line in output.replace(str(cache), "~/.cache/edgelr").splitlines())
    return [line for line in shown if line.strip() and not PROGRESS.search(line)]  # blank: a bar cleared


def line_pattern(expected: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in normalise(expected).split(GAP)))


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether the actual lines match README's, a '...' line standing for any run of lines (blank lines aside)."""
    patterns = [GAP if line.strip() == GAP else line_pattern(line) for line in expected if line.strip()]
    actual = [normalise(line) for line in actual]
    # reachable[j]: the patterns seen so far can match exactly actual[:j]
    reachable = [True] + [False] * len(actual)
    for pattern in patterns:
        if pattern == GAP:
            for j in range(1, len(actual) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            reachable = [False] + [reachable[j] and bool(pattern.fullmatch(actual[j])) for j in range(len(actual))]
    return reachable[-1]


class Tour:
    """One folder the tour's commands run in, in README's order, each at most once."""

    def __init__(self, folder: Path, cache: Path):
        self.folder, self.cache = folder, cache
        for name in LINKED:
            (folder / name).symlink_to(ROOT / name)
        self.steps = tour_steps(README.read_text(encoding="utf-8"))
        self.done: set[int] = set()
        self.exit_codes: dict[int, int] = {}
        self.env = dict(os.environ, EDGELR_CACHE=str(cache),
                        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))

    def run(self, slow: bool) -> list[str]:
        """Run each step not yet run, of the fast tier (and of the slow one with slow=True); the mismatches."""
        problems, skipped = [], []
        for i, step in enumerate(self.steps):
            if i in self.done or (step.slow and not slow):
                continue
            self.done.add(i)
            if step.shows_exit_code:
                continue  # checked with the command before it
            why_not = step.not_run or next((reason for word, (have, reason) in NEEDS.items()
                                            if word in step.command and not have()), None)
            if why_not:
                skipped.append(f"$ {step.command}: {why_not}")
                continue
            problems += self.check(i, step)
        for line in skipped:
            print(f"not run: {line}")
        return problems

    def check(self, i: int, step: Step) -> list[str]:
        started = time.monotonic()
        proc = subprocess.run(step.command, shell=True, executable="/bin/bash", cwd=self.folder, env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        print(f"{time.monotonic() - started:6.1f} s  $ {step.command}")
        shown = printed_lines(proc.stdout, self.cache)
        following = self.steps[i + 1] if i + 1 < len(self.steps) else None
        expected_code = int(following.expected[0]) if following and following.shows_exit_code else 0
        problems = []
        if proc.returncode != expected_code:
            problems.append(f"exit code {proc.returncode}, README shows {expected_code}")
        if not matches(step.expected, shown):
            problems.append("README shows:\n" + "\n".join(step.expected) + "\nprinted:\n" + "\n".join(shown))
        return [f"$ {step.command}\n" + "\n".join(problems)] if problems else []


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    return Tour(tmp_path_factory.mktemp("tour"), tmp_path_factory.getbasetemp() / "edgelr-cache")


def test_parsed_tour_is_runnable():
    """The parser finds the tour, and every command it will skip says why."""
    steps = tour_steps(README.read_text(encoding="utf-8"))
    assert len(steps) > 10 and any(s.slow for s in steps) and any(not s.slow for s in steps)
    for i, step in enumerate(steps):
        if step.shows_exit_code:
            assert i > 0 and len(step.expected) == 1 and step.expected[0].isdigit(), "echo $? shows one exit code"


def test_matching_rules():
    readme = ["layer  op  rank", "-----  --  ----", "a.1    Conv  16", GAP, 'wrote x in 3.5 s', '{"ok": true, ..., "n": 2}']
    printed = ["layer     op    rank", "--------  ----  ----", "a.12      Conv   8", "b  Conv  8", "c", "wrote x in 97 s",
               '{"ok": true, "machine": "aarch64", "n": 7}']
    assert matches(readme, printed)
    assert not matches(readme, printed[:-1])  # a removed line
    assert not matches(readme, [*printed, "extra"])  # a line too many
    assert not matches(readme, [p.replace("wrote", "saved") for p in printed])  # a renamed message
    assert not matches(readme, [p.replace("rank", "ranks") for p in printed])  # a renamed column
    assert printed_lines("\r 10%|#  | 1/10\r100%|###| 10/10\nwrote /c/x\n", Path("/c")) == ["wrote ~/.cache/edgelr/x"]


# The tour on the real model takes about 10 minutes of CPU on a quiet machine (its --latency step refuses, rightly,
# on a busy one: timings spread too far to pick ranks by): the slow tier, in CI too.
@pytest.mark.slow
def test_readme_tour_fast_commands(tour):
    problems = tour.run(slow=False)
    assert not problems, "README's tour drifted from the tool:\n\n" + "\n\n".join(problems)


@pytest.mark.slow
def test_readme_tour_slow_commands(tour):
    problems = tour.run(slow=True)
    assert not problems, "README's tour drifted from the tool:\n\n" + "\n\n".join(problems)
