"""The package's import graph: floors that only look down, no circles (imports inside functions count).

Every ``import``/``from ... import`` of ``vera_lightning`` anywhere in a module (top level, inside a
function, under ``TYPE_CHECKING``) is an edge. Floors, bottom to top: ``config`` < ``forward`` < ``core``
< ``ops`` < ``io`` < ``training`` < ``app``; a module may import its own floor or lower ones. The package's
``__init__`` (the public front) may import anything below the app; the app imports only the front and itself.

Inside the app the same rule holds between its sub-packages, bottom to top: ``data`` < ``generation`` <
``models`` < ``tasks`` < ``runs`` < ``commands``; ``app/__init__`` (the app's front) may import any of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vera_lightning

ROOT = Path(vera_lightning.__file__).resolve().parent
FLOORS = ["config", "forward", "core", "ops", "io", "training", "app"]
APP_FLOORS = ["data", "generation", "models", "tasks", "runs", "commands"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """``(imported vera_lightning module, line)`` for every import in ``path``, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("vera_lightning")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vera_lightning"):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            for alias in node.names:  # `from vera_lightning.forward import cost` imports a module
                sub = f"{node.module}.{alias.name}"
                found.append((sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() else node.module,
                              node.lineno))
    return found


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package front
    return FLOORS.index(parts[1]) if parts[1] in FLOORS else -2


GRAPH = {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_lives_on_a_floor():
    assert [m for m in GRAPH if floor(m) == -2] == []


def test_imports_only_look_down():
    upward = []
    for module, edges in GRAPH.items():
        if floor(module) == -1:
            continue
        for target, line in edges:
            if floor(target) == -1 and floor(module) == FLOORS.index("app"):
                continue  # the app builds on the public front
            if floor(target) == -1:
                upward.append(f"{module}:{line} imports the package front ({target}); import the defining module")
            elif floor(target) > floor(module):
                upward.append(f"{module}:{line} -> {target}")
    assert upward == []


def test_no_import_circles():
    graph = {m: {t for t, _ in edges if t in GRAPH and t != m} for m, edges in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_library_never_imports_the_app():
    assert [(m, t) for m, edges in GRAPH.items() if floor(m) != FLOORS.index("app")
            for t, _ in edges if floor(t) == FLOORS.index("app")] == []


def test_the_app_imports_only_the_public_api():
    app = FLOORS.index("app")
    assert [f"{m}:{line} -> {t}" for m, edges in GRAPH.items() if floor(m) == app
            for t, line in edges if floor(t) not in (-1, app)] == []


def test_no_private_name_crosses_modules():
    crossing = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vera_lightning"):
                crossing += [f"{module_name(path)}:{node.lineno} imports {node.module}.{a.name}"
                             for a in node.names if a.name.startswith("_")]
    assert crossing == []


def app_floor(module: str) -> int:
    """The app sub-package's floor, -1 for the app's front, -2 for a module outside every sub-package."""
    parts = module.split(".")
    if len(parts) == 2:
        return -1
    return APP_FLOORS.index(parts[2]) if parts[2] in APP_FLOORS else -2


APP = {m: edges for m, edges in GRAPH.items() if m.startswith("vera_lightning.app")}


def test_every_app_module_lives_in_a_sub_package():
    assert [m for m in APP if app_floor(m) == -2] == []


def test_app_imports_only_look_down():
    upward = [f"{m}:{line} -> {t}" for m, edges in APP.items() if app_floor(m) >= 0
              for t, line in edges if t.startswith("vera_lightning.app") and app_floor(t) > app_floor(m)]
    assert upward == []


def test_app_sub_packages_do_not_import_the_app_front():
    assert [f"{m}:{line}" for m, edges in APP.items() if app_floor(m) >= 0
            for t, line in edges if t == "vera_lightning.app"] == []


@pytest.mark.parametrize("sub", FLOORS[1:] + [f"app/{s}" for s in APP_FLOORS])
def test_subpackage_init_holds_a_docstring_not_logic(sub):
    tree = ast.parse((ROOT / sub / "__init__.py").read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"vera_lightning/{sub}/__init__.py needs a docstring saying what the folder holds"
    logic = [type(n).__name__ for n in tree.body[1:] if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign))]
    assert logic == []  # re-exports and __all__ only


TESTS = Path(__file__).resolve().parent


def _test_docstrings() -> str:
    files = TESTS.rglob("test_*.py")
    return "\n".join(ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "" for p in files)


def test_tests_mirror_the_tree():
    """Every module has tests/<package>/test_<module>.py, or a test file whose docstring names it (path or dotted)."""
    docstrings = _test_docstrings()
    untested = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "__init__.py" or "demo_data" in path.parts:
            continue
        rel = path.relative_to(ROOT)
        mirror = TESTS.joinpath(*rel.parts[:-1], f"test_{path.name}")
        dotted = module_name(path)
        if not mirror.is_file() and str(rel) not in docstrings and dotted not in docstrings:
            untested.append(str(rel))
    assert untested == []
