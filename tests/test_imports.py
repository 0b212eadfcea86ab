"""Imports only point down: the module import graph of src/fedlora, read from the source (AST,
nothing imported), has no circle. Imports under `if TYPE_CHECKING:` are left out: they name
types for annotations and never run."""

from __future__ import annotations

import ast
from pathlib import Path

import fedlora

PACKAGE = Path(fedlora.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None) if isinstance(child, ast.If) else None
            if test is not None and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imported_names(path: Path, name: str) -> set[tuple[str, ...]]:
    """What `path` (module `name`) imports anywhere, function bodies included: for each
    import, the dotted names it may mean, most specific first (`from m import x`: m.x, m)."""
    is_package = path.name == "__init__.py"
    out: set[tuple[str, ...]] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update((alias.name,) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + int(is_package)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.update((f"{module}.{alias.name}", module) for alias in node.names)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (`from m import x` is the submodule m.x
    when there is one, else m; a package's parents, which Python imports first, are left out)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for candidates in imported_names(path, name):
            imported = next((c for c in candidates if c in files), candidates[-1])
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle_in_the_package():
    graph = import_graph(PACKAGE)
    assert "fedlora.config" in graph and graph["fedlora.cli"], "the graph was not read"
    assert cycles(graph) == []


def test_nothing_imports_the_command_line():
    """The command line is the top floor: no module below it imports it."""
    graph = import_graph(PACKAGE)
    above = {name for name in graph if name in ("fedlora.cli", "fedlora.cli_common", "fedlora.flower.cli")}
    users = {name: sorted(edges & above) for name, edges in graph.items() if name not in above and edges & above}
    assert users == {}


def test_the_check_sees_circles_through_function_level_imports(tmp_path):
    """Which wrong check would pass a circle: one that reads only top-level imports, or that
    drops relative imports, or that counts TYPE_CHECKING imports."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub.b\n"
                              "from pkg import a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n")
    (pkg / "e.py").write_text("import pkg.d\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
