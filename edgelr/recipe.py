"""Recipes: a list of pass configs plus a target, as YAML.

    # recipes/yolov8n-latency50-int8.yaml
    target: x86-cpu              # optional: what quantization and latency tables aim at
    metric: detect               # optional: the task metric that gates the result (else the model's metadata says)
    floor: 0.9                   # optional: the least that metric may be (else its default)
    max_output_error: 0.2        # optional: the most any output group's error may be (default where no metric)
    passes:
      - {_type: factorize, latency: 0.5}
      - {_type: quantize, scheme: int8}
      - {_type: refit}

Each config is written with its type and version and the fields that differ from their defaults, so
`Recipe.from_yaml(recipe.to_yaml()) == recipe`. A recipe is validated whole before anything runs: an
unknown pass or field, a wrong type, a pass that needs calibration without it gets one line naming the
file and line.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import edgelr.passes
import edgelr.search.latency  # noqa: F401
from edgelr.errors import EdgelrError
from edgelr.measure.task import TASKS
from edgelr.passes.base import PassConfig, config_from_dict
from edgelr.passes.factorize import FactorizeConfig
from edgelr.passes.quantize import QuantizeConfig

_TOP = ("target", "metric", "floor", "max_output_error", "passes")
# passes that live above the passes/ stage, imported only when a recipe names them (training imports torch)
_PROVIDERS = {"distill": "edgelr.train.distill"}


@dataclass(frozen=True)
class Recipe:
    passes: tuple[PassConfig, ...]
    target: str | None = None
    path: Path | None = field(default=None, compare=False)  # where it was read from (errors name it)
    lines: tuple[int, ...] = field(default=(), compare=False)  # each pass's line in that file
    flags: tuple[str, ...] = field(default=(), compare=False)  # or the command-line flag each pass came from
    metric: str | None = None  # a task kind (edgelr.measure.task.TASKS) or "none"
    floor: float | None = None
    max_output_error: float | None = None

    def to_dict(self) -> dict:
        data = {key: getattr(self, key) for key in ("target", "metric", "floor", "max_output_error")
                if getattr(self, key) is not None}
        return data | {"passes": [c.to_dict() for c in self.passes]}

    def to_yaml(self) -> str:
        return "# edgelr recipe\n" + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the recipe to a new file (never over an existing one)."""
        path = Path(path)
        try:
            with open(path, "x") as f:
                f.write(self.to_yaml())
        except FileExistsError:
            raise EdgelrError(f"{path}: exists; edgelr does not overwrite files, pick another name") from None
        except OSError as exc:
            raise EdgelrError(f"{path}: cannot write ({exc.strerror})") from None
        return path

    @classmethod
    def from_yaml(cls, text: str, path: str | os.PathLike | None = None) -> Recipe:
        name = str(path) if path is not None else "recipe"
        try:
            loader = yaml.SafeLoader(text)
            try:
                node = loader.get_single_node()
                data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{name}:{mark.line + 1}" if mark is not None else name
            raise EdgelrError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
        if not isinstance(data, dict):
            raise EdgelrError(f"{name}: a recipe is a mapping with a 'passes' list (and an optional 'target')")
        keys = _key_lines(node)
        for key in data:
            if key not in _TOP:
                raise EdgelrError(f"{name}:{keys.get(key, 1)}: unknown key {key!r}; a recipe has {' and '.join(_TOP)}")
        target = data.get("target")
        if target is not None and not isinstance(target, str):
            raise EdgelrError(f"{name}:{keys['target']}: target: expected a name from targets/ or a .toml path, got {target!r}")
        metric, floor = data.get("metric"), data.get("floor")
        if metric is not None and metric not in (*TASKS, "none"):
            raise EdgelrError(f"{name}:{keys['metric']}: metric: expected one of {', '.join((*TASKS, 'none'))}, got {metric!r}")
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor <= 1):
            raise EdgelrError(f"{name}:{keys['floor']}: floor: expected a number in (0, 1], got {floor!r}")
        ceiling = data.get("max_output_error")
        if ceiling is not None and (isinstance(ceiling, bool) or not isinstance(ceiling, (int, float)) or not ceiling > 0):
            raise EdgelrError(f"{name}:{keys['max_output_error']}: max_output_error: expected a number > 0, got {ceiling!r}")
        items = data.get("passes")
        if not isinstance(items, list) or not items:
            raise EdgelrError(f"{name}:{keys.get('passes', 1)}: 'passes' must be a non-empty list of passes, "
                              "e.g. - {_type: factorize, params: 0.5}")
        item_nodes = _value(node, "passes").value
        configs, lines = [], []
        for item, item_node in zip(items, item_nodes):
            if isinstance(item, dict) and item.get("_type") in _PROVIDERS:
                importlib.import_module(_PROVIDERS[item["_type"]])
            line = item_node.start_mark.line + 1
            fields = _key_lines(item_node) if isinstance(item_node, yaml.MappingNode) else {}
            configs.append(config_from_dict(item, lambda key, fields=fields, line=line: f"{name}:{fields.get(key, line)}"))
            lines.append(line)
        return cls(tuple(configs), target, Path(path) if path is not None else None, tuple(lines), metric=metric,
                   floor=float(floor) if floor is not None else None,
                   max_output_error=float(ceiling) if ceiling is not None else None)

    def where(self, index: int) -> str:
        """File and line of pass `index` (for errors); the pass's position when the recipe came from flags."""
        if self.path is not None and index < len(self.lines):
            return f"{self.path}:{self.lines[index]}"
        if index < len(self.flags) and self.flags[index]:
            return self.flags[index]
        return f"pass {index + 1} ({self.passes[index].kind})"

    def check(self, calibrated: bool) -> None:
        """Refuse, before anything runs, what cannot run: a pass that needs calibration samples without them,
        a pass whose prerequisite is missing."""
        factorized = False
        for i, config in enumerate(self.passes):
            reason = config.needs_calibration()
            if reason and not calibrated:
                if self.path is None and i < len(self.flags) and self.flags[i]:
                    raise EdgelrError(f"{self.flags[i]} needs --calib DATA.npz: {reason}")
                raise EdgelrError(f"{self.where(i)}: {config.kind} needs calibration data ({reason}): "
                                  "pass --calib DATA.npz")
            if config.kind == "refit" and not factorized:
                raise EdgelrError(f"{self.where(i)}: refit refits the pairs a factorize pass made: put a factorize pass before it")
            if config.kind == "refit" and any(isinstance(c, QuantizeConfig) and c.scheme != "int8" for c in self.passes[:i]):
                raise EdgelrError(f"{self.where(i)}: a refit reads the inputs of a static int8 model only: "
                                  "put it before the quantize pass")
            factorized = factorized or isinstance(config, FactorizeConfig)
            if isinstance(config, QuantizeConfig) and any(isinstance(c, QuantizeConfig) for c in self.passes[i + 1:]):
                raise EdgelrError(f"{self.where(i)}: quantize appears twice; a model is quantized once")


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise EdgelrError(f"{path}: recipe not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgelrError(f"{path}: cannot read the recipe ({exc})") from None
    return Recipe.from_yaml(text, path)


def _key_lines(node) -> dict:
    """A mapping node's keys -> their 1-based line."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value}


def _value(node, key: str):
    return next(v for k, v in node.value if k.value == key)
