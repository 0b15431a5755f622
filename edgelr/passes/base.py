"""The pass interface: a frozen config, the pass it selects, and the context passes share.

    @register_pass(PruneConfig)                 # dispatch by config type, as torchao's quantize_ does
    class PrunePass(EdgelrPass): ...

A config is a small frozen dataclass with a `kind` (its name in a recipe) and a `version`; it
serialises to {"_type": kind, "_version": version, field: value, ...} with only the fields that differ
from their defaults, and `config_from_dict` reads that back, naming any unknown field or wrong type.
Passes are onnx-ir passes (`ir.passes.InPlacePass`): `pass_(model)` checks `requires`, runs `call`,
and returns a PassResult; ours carry the pass's own typed result beside it. What passes leave
for the ones after them (the calibration samples, the factorization, the float model before
quantization) lives on the Context, which the pipeline (edgelr.api) owns.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import onnx_ir as ir

from edgelr.errors import EdgelrError
from edgelr.io.samples import Samples


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass's options. Subclasses set `kind` and may raise EdgelrError in __post_init__."""

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def needs_calibration(self) -> str | None:
        """Why this pass cannot run without calibration samples (None: it can)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"_type": self.kind, "_version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != _default(f):
                data[f.name] = _plain(value)
        return data


@dataclass
class PassDetails(ir.passes.PassResult):
    """onnx-ir's PassResult plus the pass's own typed result (FactorizeResult, PruneResult, the quantizer's
    summary, the names refit)."""

    result: Any = None


@dataclass
class Context:
    """What the passes of one pipeline share. The pipeline fills the first block; passes the rest."""

    source: Path  # the model as the user gave it: errors are measured against it
    samples: Samples | None
    calib: Path | None  # where the samples came from (cache keys)
    workdir: Path  # scratch files, removed with the pipeline
    target: Any = None  # an edgelr.deploy.targets.Target, or None: ONNX Runtime CPU here, 1 thread
    progress: bool = True
    path: Path | None = None  # a file holding the model as the current pass receives it
    task: Any = None  # edgelr.measure.task.Task: the metric that gates the result (None: none known)
    ceiling: float | None = None  # the most any output group's error may be (edgelr.measure.verify.ceiling_for)
    judged: Samples | None = None  # the samples the result is judged on (held-out when given)
    later: tuple[PassConfig, ...] = ()  # the configs still to run after the current one
    pristine: bool = True  # no pass has changed the model yet
    device: Any = None  # an edgelr.measure.device.DeviceTimer: a latency search times there, not here
    # left by passes for the ones after them
    factorized: Any = None  # edgelr.passes.factorize.Factorized
    float_model: ir.Model | None = None  # the model before quantization
    quantized: dict | None = None  # what the quantize pass did
    pruned: dict | None = None  # what the prune pass did
    latency: dict | None = None  # what a latency search did
    distilled: dict | None = None  # what a distill pass did
    blocks_removed: dict | None = None  # what a remove_blocks pass did
    references: list | None = None  # the original's outputs on the samples, while still pristine
    objective: Any = None  # edgelr.core.objective.Objective: the output groups every error is measured by
    block_judge: Any = None  # model -> error: how a pipeline judges a model by what it makes (remove_blocks)

    def scratch(self, stem: str) -> Path:
        """A new file name in the pipeline's scratch folder (removed with it)."""
        return self.workdir / f"{stem}-{len(list(self.workdir.iterdir()))}.onnx"

    def following(self, config_type: type) -> PassConfig | None:
        """The first config of this type still to run (a search times the model as it will be run)."""
        return next((c for c in self.later if isinstance(c, config_type)), None)


class EdgelrPass(ir.passes.InPlacePass):
    """A pass built from its config and the pipeline's context."""

    def __init__(self, config: PassConfig, context: Context):
        self.config = config
        self.context = context

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class FunctionalEdgelrPass(ir.passes.FunctionalPass):
    """A pass that returns a new model (quantization writes its model through ONNX Runtime's tools)."""

    __init__ = EdgelrPass.__init__
    __repr__ = EdgelrPass.__repr__


_PASSES: list[tuple[type[PassConfig], Callable[[PassConfig], bool] | None, type]] = []
CONFIGS: dict[str, type[PassConfig]] = {}


def register_pass(config_type: type[PassConfig], when: Callable[[PassConfig], bool] | None = None):
    """Class decorator: configs of `config_type` (for which `when(config)` holds) run this pass.
    The latest registration that matches wins (a search registers for the configs it handles)."""

    def decorate(pass_type: type) -> type:
        if not config_type.kind:
            raise TypeError(f"{config_type.__name__} has no kind")
        CONFIGS[config_type.kind] = config_type
        _PASSES.append((config_type, when, pass_type))
        return pass_type

    return decorate


def make_pass(config: PassConfig, context: Context):
    for config_type, when, pass_type in reversed(_PASSES):
        if type(config) is config_type and (when is None or when(config)):
            return pass_type(config, context)
    raise EdgelrError(f"no pass is registered for {type(config).__name__}")


def config_from_dict(data: Mapping, where: Callable[[str | None], str] = lambda key: "config") -> PassConfig:
    """A config from its dict form. `where(key)` names the place of a key (a recipe's file and line) in errors."""
    if not isinstance(data, Mapping):
        raise EdgelrError(f"{where(None)}: a pass is a mapping with a _type, e.g. {{_type: factorize, params: 0.5}}")
    kind = data.get("_type")
    if kind not in CONFIGS:
        raise EdgelrError(f"{where('_type')}: unknown pass {kind!r}; known passes: {', '.join(sorted(CONFIGS))}")
    config_type = CONFIGS[kind]
    version = data.get("_version", config_type.version)
    if version != config_type.version:
        raise EdgelrError(f"{where('_version')}: {kind} version {version!r}; this edgelr reads version {config_type.version}")
    hints = typing.get_type_hints(config_type)
    fields = {f.name for f in dataclasses.fields(config_type)}
    values = {}
    for key, value in data.items():
        if key in ("_type", "_version"):
            continue
        if key not in fields:
            raise EdgelrError(f"{where(key)}: {kind} has no field {key!r}; its fields: {', '.join(sorted(fields))}")
        problem = _type_problem(value, hints[key])
        if problem:
            raise EdgelrError(f"{where(key)}: {kind}.{key}: {problem}")
        values[key] = _frozen(value, hints[key])
    try:
        return config_type(**values)
    except EdgelrError as exc:
        raise EdgelrError(f"{where(None)}: {kind}: {exc}") from None


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value):
    """A config value as YAML/JSON writes it (mappings as dicts, sequences as lists, a nested options
    dataclass as a mapping with its _type)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"_type": type(value).__name__.lower(), **{k: _plain(v) for k, v in dataclasses.asdict(value).items()}}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _frozen(value, hint):
    """Lists become tuples where the field is a tuple (configs are frozen and hashable where they can be)."""
    if isinstance(value, list) and "tuple" in str(hint):
        return tuple(value)
    return value


_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _type_problem(value, hint) -> str | None:
    """Why `value` does not fit the type hint (None: it fits)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if any(_type_problem(value, option) is None for option in options):
            return None
        return "expected " + " or ".join(_describe(o) for o in options) + f", got {value!r}"
    if hint is type(None):
        return None if value is None else f"expected nothing, got {value!r}"
    if hint is Any:
        return None
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else f"expected a number, got {value!r}"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"expected a whole number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if origin in (Mapping, dict, typing.get_origin(Mapping[str, int])):
        if not isinstance(value, Mapping):
            return f"expected a mapping, got {value!r}"
        key_type, value_type = typing.get_args(hint) or (Any, Any)
        for k, v in value.items():
            problem = _type_problem(k, key_type) or _type_problem(v, value_type)
            if problem:
                return f"{k!r}: {problem}"
        return None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return f"expected a list, got {value!r}"
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[A, B]: one type per position
            if len(value) != len(args):
                return f"expected {len(args)} items, got {value!r}"
            items = list(args)
        else:  # tuple[A, ...] or list[A]
            items = [args[0] if args else Any] * len(value)
        return next((f"item {i}: {p}" for i, (v, a) in enumerate(zip(value, items)) if (p := _type_problem(v, a))), None)
    return None


def _describe(hint) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return "a list"
    if origin is not None:
        return "a mapping"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))
