"""The shape of the package, read with ast: imports point one way (lower stages never import higher
ones), no import cycle between modules, no `_private` name imported from another module, and every
subpackage says what it owns and what it may import."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgelr"
# Stages, lowest first: a module may import its own stage and the ones before it (train and deploy sit
# side by side and import neither each other). errors and version are below everything.
STAGES = [("errors", "version"), ("core",), ("graph",), ("io",), ("calibration",), ("measure",), ("passes",),
          ("search",), ("train", "deploy"), ("report",), ("recipe",), ("api",), ("demo",), ("cli",), ("__main__",)]
RANK = {name: i for i, names in enumerate(STAGES) for name in names}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every edgelr import, lazy ones too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "edgelr"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "edgelr":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (node.module, a.name, node.lineno))
    return out


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "edgelr"


def _edges() -> dict[str, set[str]]:
    edges = {}
    for module, path in MODULES.items():
        if module == "edgelr":  # the package's front door re-exports the verbs; nothing inside imports it
            continue
        edges[module] = {target for target, _, _ in _imports(path) if target in MODULES and target != module}
    return edges


def test_no_module_imports_the_package_front_door():
    offenders = [f"{m}:{line}" for m, p in MODULES.items() if m != "edgelr"
                 for target, _, line in _imports(p) if target == "edgelr"]
    assert not offenders, f"import edgelr.version (or the module itself), not the package: {offenders}"


def test_imports_point_one_way():
    wrong = []
    for module, targets in _edges().items():
        for target in targets:
            a, b = _stage(module), _stage(target)
            if a == b:
                continue
            if RANK[b] > RANK[a] or (RANK[b] == RANK[a]):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "a lower stage imports a higher one (see edgelr/__init__.py's layout): " + ", ".join(sorted(wrong))


def test_no_import_cycles():
    edges = _edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    private = [f"{m}:{line} imports {name} from {target}" for m, p in MODULES.items()
               for target, name, line in _imports(p)
               if name is not None and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))]
    assert not private, "make the name public (it is shared) or keep it in its module: " + "; ".join(private)


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 40 and "import" in doc.lower(), f"{init}: open with a docstring saying what it owns and may import"


def test_the_checks_can_fail(tmp_path):
    """The cycle and private-name finders see what they look for (on a tiny package of their own)."""
    global MODULES
    saved = MODULES
    try:
        pkg = tmp_path / "edgelr"
        (pkg / "core").mkdir(parents=True)
        (pkg / "core" / "a.py").write_text("from edgelr.core.b import _x\n")
        (pkg / "core" / "b.py").write_text("def f():\n    from edgelr.core import a\n")
        MODULES = {"edgelr.core.a": pkg / "core" / "a.py", "edgelr.core.b": pkg / "core" / "b.py"}
        edges = _edges()
        assert edges == {"edgelr.core.a": {"edgelr.core.b"}, "edgelr.core.b": {"edgelr.core.a"}}
        assert [name for _, name, _ in _imports(pkg / "core" / "a.py")] == ["_x"]
    finally:
        MODULES = saved


def test_every_tool_with_a_main_runs_as_a_script():
    """docs/ give `python tools/NAME.py ...` commands: a tool that defines main() must call it when run."""
    silent = []
    for path in sorted((PACKAGE.parent / "tools").glob("*.py")):
        tree = ast.parse(path.read_text())
        defines_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        guarded = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        if defines_main and not guarded:
            silent.append(path.name)
    assert not silent, f"tools that do nothing when run: {silent}"
