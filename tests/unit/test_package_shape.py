"""The package's shape: no import circle between its modules, no module over ~500 lines
unless its docstring says why, and no service probing the hypervisor backend."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "twarga_lab"
LONG_MODULE_LINES = 500
# The docstring line a long module carries: "Why it is long: <reason>".
WHY_LONG = re.compile(r"^\s*Why it is long: \S", re.M)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # Alembic's migration scripts are loaded by file path, never imported.
    return {name: path for name, path in found.items() if ".migrations." not in name}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports at run time, at any depth of its code
    (imports inside functions count: a lazy import only hides a circle). Imports under
    ``if TYPE_CHECKING:`` do not run and are left out."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    # A package's __init__ importing its own submodules is how packages re-export, and a
    # submodule's import implies its parent packages: neither is an edge of a circle.
    return {
        m
        for m in found
        if m in known
        and m != name
        and not m.startswith(name + ".")
        and not name.startswith(m + ".")
    }


def test_no_import_circle() -> None:
    known = modules()
    graph = {name: imported_modules(name, path, set(known)) for name, path in known.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_long_modules_say_why() -> None:
    unexplained = []
    for name, path in sorted(modules().items()):
        lines = len(path.read_text().splitlines())
        if lines <= LONG_MODULE_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not WHY_LONG.search(docstring):
            unexplained.append(f"{name}: {lines} lines")
    assert not unexplained, (
        f"modules over {LONG_MODULE_LINES} lines without 'Why it is long:' in their "
        "docstring:\n" + "\n".join(unexplained)
    )


def test_services_do_not_probe_the_backend() -> None:
    """Every backend method a service calls is declared on HypervisorBackend: no
    ``getattr``/``hasattr`` on the backend in the services."""
    probes = []
    for path in sorted((PACKAGE / "services").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(getattr|hasattr)\(\s*(self\.)?_?backend\b", line):
                probes.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not probes, "\n".join(probes)
