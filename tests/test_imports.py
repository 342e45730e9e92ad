"""The project's modules import each other without cycles.

Every import is counted, the ones inside functions too: a lazy import hides a cycle from Python at
load time but not from a reader, and moving it to the top turns it into a crash."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kd_sweeps", "analysis", "hydra_plugins")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the project (packages as their ``__init__``)."""
    modules = {"launch": ROOT / "launch.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` (a dotted import target) is or lies inside."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file (functions included)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # A relative import counts from the package holding the module (or the package itself).
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved and resolved != module:
                found.add(resolved)
    # `from pkg import mod` also resolves `pkg` itself; a package's __init__ is empty here, so only
    # keep a package when nothing inside it was named.
    return {name for name in found if not any(other.startswith(name + ".") for other in found)}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]], within: set[str] | None = None) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]`` among the modules ``within`` (default: all), or None
    when there is none (depth-first, iterative)."""
    within = set(graph) if within is None else within
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for start in sorted(within):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start] & within))]
        state[start] = 1
        while stack:
            successor = next(stack[-1], None)
            if successor is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            elif successor not in state:
                state[successor] = 1
                path.append(successor)
                stack.append(iter(sorted(graph[successor] & within)))
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per group of modules that import each other (a strongly connected component): a
    failure names every group to untangle, not only the first one found."""
    reach = {}
    for module in graph:  # modules reachable from each one (the graph has ~100 nodes)
        seen, todo = set(), [module]
        while todo:
            for successor in graph[todo.pop()]:
                if successor not in seen:
                    seen.add(successor)
                    todo.append(successor)
        reach[module] = seen
    groups = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph if m in reach[m]}
    return [find_cycle(graph, set(group)) for group in sorted(groups, key=sorted)]


def test_graph_sees_every_kind_of_import(tmp_path):
    """The parser finds top-level, in-function, `from . import` and `from pkg.mod import name` imports."""
    modules = {"pkg": tmp_path / "__init__.py", "pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py",
               "pkg.c": tmp_path / "c.py", "pkg.d": tmp_path / "d.py", "other": tmp_path / "other.py"}
    modules["pkg.a"].write_text(
        "import other\n"
        "from . import b\n"
        "def f():\n"
        "    from pkg.c import thing\n"
        "    from .d import x\n"
        "    import json\n")
    assert imported_modules("pkg.a", modules["pkg.a"], modules) == {"other", "pkg.b", "pkg.c", "pkg.d"}


def test_find_cycles_reports_one_cycle_per_tangle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_project_has_no_import_cycle():
    graph = import_graph()
    assert "kd_sweeps.run" in graph and "launch" in graph, sorted(graph)
    cycles = find_cycles(graph)
    if cycles:
        pytest.fail("import cycles (imports inside functions count):\n" + "\n".join(" -> ".join(c) for c in cycles))
