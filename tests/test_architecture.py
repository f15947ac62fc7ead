"""The layering of docs/architecture.md, checked from the source: no import cycles, the web only sees the service.

Every ``import`` statement counts — at module level, inside functions (lazy imports) and under
``if TYPE_CHECKING:`` — because a cycle through a type-only or lazy import is still a cycle in the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"fluidsrv": REPO / "fluidsrv", "fluidsrv_plugins": REPO / "plugins"}
WEB_MAY_IMPORT = {"fluidsrv", "fluidsrv.service", "fluidsrv.protocol", "fluidsrv.settings", "fluidsrv.errors"}
"""What fluidsrv/web/ may import from the core (besides itself): the service, the wire format, settings, errors."""
MAX_LINES = 600


def module_files() -> dict[str, Path]:
    """Every module of the two packages, by dotted name (a package by its own name, for its __init__)."""
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The known modules that ``name`` (at ``path``) imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known_prefix(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    yield target
                else:
                    yield from _known_prefix(base, known)


def _known_prefix(dotted: str, known: set[str]) -> Iterator[str]:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            yield candidate
            return


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (the parent packages a module implicitly loads are not edges)."""
    files = module_files()
    known = set(files)
    graph = {}
    for name, path in files.items():
        targets = {target for target in imported_modules(name, path, known) if target and target != name}
        graph[name] = {target for target in targets if not name.startswith(target + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_checker_finds_a_cycle_and_resolves_relative_imports(tmp_path: Path) -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import sibling\n"
                      "def f():\n    import pkg.other\n")
    known = {"pkg", "pkg.mod", "pkg.sibling", "pkg.other"}
    assert set(imported_modules("pkg.mod", source, known)) == {"pkg.sibling", "pkg.other"}


def test_no_import_cycles_among_the_core_modules() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (type-only and lazy imports included):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles)


def test_the_web_layer_reaches_the_pipeline_only_through_the_service() -> None:
    graph = import_graph()
    web = {name for name in graph if name == "fluidsrv.web" or name.startswith("fluidsrv.web.")}
    assert web, "fluidsrv/web/ not found"
    leaks = {name: sorted(targets - web - WEB_MAY_IMPORT) for name, targets in graph.items() if name in web}
    leaks = {name: targets for name, targets in leaks.items() if targets}
    assert not leaks, f"web modules importing below the service: {leaks}"


def test_nothing_below_the_service_imports_the_web_or_the_service() -> None:
    graph = import_graph()
    upper = {"fluidsrv.service", "fluidsrv.web", "fluidsrv.cli"}
    entry = {"fluidsrv.__main__"}  # ``python -m fluidsrv`` runs the command line
    below = [name for name in graph
             if name not in entry and not any(name == top or name.startswith(top + ".") for top in upper)]
    leaks = {name: sorted(target for target in graph[name]
                          if any(target == top or target.startswith(top + ".") for top in upper))
             for name in below}
    leaks = {name: targets for name, targets in leaks.items() if targets}
    assert not leaks, f"modules below the service importing it or the web: {leaks}"


def test_plugins_never_import_the_session_store_service_or_web() -> None:
    graph = import_graph()
    forbidden = ("fluidsrv.session", "fluidsrv.service", "fluidsrv.web", "fluidsrv.runtime", "fluidsrv.pipeline",
                 "fluidsrv.training")
    leaks = {name: sorted(target for target in targets if target.startswith(forbidden))
             for name, targets in graph.items() if name.startswith("fluidsrv_plugins")}
    leaks = {name: targets for name, targets in leaks.items() if targets}
    assert not leaks, f"plugins importing the layers above them: {leaks}"


def test_no_core_module_outside_models_is_over_600_lines() -> None:
    long = {str(path.relative_to(REPO)): count for name, path in module_files().items()
            if name.startswith("fluidsrv") and not name.startswith("fluidsrv.models")
            and (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
