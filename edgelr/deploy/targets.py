"""Devices as data: one TOML file per target under `targets/` (rpi5, rtx, ...), or the user's own file.

    target = load_target("rpi5")               # a built-in name
    target = load_target("./mydevice.toml")    # or any file with the same keys

A target says which runtime runs the model on the device (`backend`), in which precision and file
format, for which runtime version, with how many threads. `edgelr export` and the latency search read it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgelr.errors import EdgelrError
from edgelr.io.shapes import parse_dims

TARGETS_DIR = Path(__file__).resolve().parents[2] / "targets"

BACKENDS = {"onnxruntime": {"ort", "onnx"}, "tensorrt": {"engine"}, "tensorrt-rtx": {"engine"}}
PRECISIONS = {"fp32", "fp16", "int8"}
ARCHES = {"x86_64", "aarch64"}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    backend: str              # onnxruntime | tensorrt | tensorrt-rtx
    precision: str            # fp32 | fp16 | int8
    format: str               # ort | onnx (onnxruntime), engine (tensorrt*)
    runtime_version: str      # the device's runtime version, or "installed" for the one beside edgelr
    threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # TensorRT optimization profile for dynamic dims: input name -> (min, opt, max) shapes
    shapes: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def is_tensorrt(self) -> bool:
        return self.backend in ("tensorrt", "tensorrt-rtx")


_REQUIRED = {"description": str, "arch": str, "backend": str, "precision": str, "format": str,
             "runtime_version": str}
_OPTIONAL = {"threads": int, "providers": list, "shapes": dict}


def builtin_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name_or_path: str | Path) -> Target:
    """The target named NAME (a file in targets/) or the TOML file at a path; EdgelrError if bad."""
    text = str(name_or_path)
    looks_like_path = text.endswith(".toml") or "/" in text or "\\" in text
    path = Path(text) if looks_like_path else TARGETS_DIR / f"{text}.toml"
    if not path.is_file():
        if looks_like_path:
            raise EdgelrError(f"{text}: no such target file; give a .toml file or one of: {', '.join(builtin_targets())}")
        raise EdgelrError(f"unknown target '{text}'; known targets: {', '.join(builtin_targets())} "
                          "(or give the path of your own .toml file)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgelrError(f"{path}: not a valid TOML target file ({exc})") from None
    return _parse(data, path)


def _parse(data: dict, path: Path) -> Target:
    def bad(msg: str) -> EdgelrError:
        return EdgelrError(f"{path}: {msg}; see targets/rpi5.toml for an example")

    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}; the keys are {', '.join([*_REQUIRED, *_OPTIONAL])}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise bad(f"missing key(s) {', '.join(missing)}")
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            raise bad(f"'{key}' must be a {kind.__name__}, not {data[key]!r}")
    if data["backend"] not in BACKENDS:
        raise bad(f"backend '{data['backend']}' is not one of {', '.join(BACKENDS)}")
    if data["format"] not in BACKENDS[data["backend"]]:
        raise bad(f"format '{data['format']}' does not go with backend '{data['backend']}' "
                  f"(use {' or '.join(sorted(BACKENDS[data['backend']]))})")
    if data["precision"] not in PRECISIONS:
        raise bad(f"precision '{data['precision']}' is not one of {', '.join(sorted(PRECISIONS))}")
    if data["arch"] not in ARCHES:
        raise bad(f"arch '{data['arch']}' is not one of {', '.join(sorted(ARCHES))}")
    threads = data.get("threads", 1)
    if threads < 1:
        raise bad(f"threads must be >= 1, not {threads}")
    providers = data.get("providers", ["CPUExecutionProvider"])
    if not all(isinstance(p, str) for p in providers):
        raise bad("'providers' must be a list of execution provider names")
    return Target(
        name=path.stem, description=data["description"], arch=data["arch"], backend=data["backend"],
        precision=data["precision"], format=data["format"], runtime_version=data["runtime_version"],
        threads=threads, providers=tuple(providers), shapes=_shapes(data.get("shapes", {}), bad), path=path,
    )


def _shapes(table: dict, bad) -> dict[str, tuple[tuple[int, ...], ...]]:
    """[shapes] images = ["1x3x320x320", "4x3x320x320", "8x3x640x640"]  (min, opt, max), as --shapes gives them."""
    out = {}
    for name, triple in table.items():
        if not (isinstance(triple, list) and len(triple) == 3):
            raise bad(f"shapes.{name} must list three shapes: min, opt, max (e.g. [\"1x3x320x320\", ...])")
        try:
            out[name] = tuple(parse_dims(s, f"shapes.{name}") for s in triple)
        except EdgelrError as exc:
            raise bad(str(exc)) from None
    return out
