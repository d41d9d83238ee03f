"""The import graph, derived from the code, against docs/architecture.md's layer table.

Fails on an import that points to a higher layer, on an import cycle (imports inside
functions count), on Ray in a module the document lists as Ray-free (directly or through what
it imports), and on a module the table does not place.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [*(ROOT / "cxrfactory").rglob("*.py"), *(ROOT / "jobs").glob("*.py")]
    return {_module_name(p): p for p in files}


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in it (top level, functions, TYPE_CHECKING)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule when there is one, else pkg itself.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` depends on the module a.b.c
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def imports_ray(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ray" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "ray":
            return True
    return False


def _short(module: str) -> str:
    return module.removeprefix("cxrfactory.") if module != "cxrfactory" else "cxrfactory"


def layer_table(text: str) -> list[tuple[int, list[str]]]:
    """``| 0 | foundation | `errors`, ... |`` rows -> [(0, ["errors", ...]), ...]."""
    rows = re.findall(r"^\| (\d+) \| [^|]+ \| (.+) \|$", text, flags=re.M)
    return [(int(number), re.findall(r"`([^`]+)`", cells)) for number, cells in rows]


def ray_free_list(text: str) -> list[str]:
    match = re.search(r"^Ray-free modules \(.*?\): (.*?)\n\n", text, flags=re.M | re.S)
    assert match, "docs/architecture.md lost its 'Ray-free modules (...): ...' paragraph"
    return re.findall(r"`([^`]+)`", match.group(1))


def layer_of(module: str, table: list[tuple[int, list[str]]]) -> int | None:
    """Exact name first, then the longest matching pattern."""
    name = _short(module)
    exact = [layer for layer, names in table if name in names]
    if exact:
        return exact[0]
    matches = [(len(p), layer) for layer, names in table for p in names if fnmatch.fnmatchcase(name, p)]
    return max(matches)[1] if matches else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    # A package's __init__ runs before any of its submodules: `import cxrfactory.x.y`
    # depends on cxrfactory.x only through the import system, not through the code, so
    # only explicit imports are edges.
    return {m: imports_of(p, m, known) for m, p in modules.items()}


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    table = layer_table(DOC.read_text())
    assert table, "docs/architecture.md lost its layer table"
    missing = sorted(_short(m) for m in graph if layer_of(m, table) is None)
    assert not missing, f"place these modules in docs/architecture.md's layer table: {missing}"


def test_no_import_points_up(graph: dict[str, set[str]]) -> None:
    table = layer_table(DOC.read_text())
    upward = [f"{_short(a)} (layer {layer_of(a, table)}) imports {_short(b)} (layer {layer_of(b, table)})"
              for a, targets in sorted(graph.items()) for b in sorted(targets)
              if (layer_of(a, table) or 0) < (layer_of(b, table) or 0)]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_ray_free_modules_import_no_ray(graph: dict[str, set[str]]) -> None:
    modules = project_modules()
    patterns = ray_free_list(DOC.read_text())
    ray_free = [m for m in graph if any(fnmatch.fnmatchcase(_short(m), p) for p in patterns)]
    assert len(ray_free) >= len(patterns), f"some Ray-free names match no module: {patterns}"
    offenders = []
    for module in ray_free:
        seen, todo = set(), [module]
        while todo:  # everything the module imports, transitively
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            if imports_ray(modules[current]):
                offenders.append(f"{_short(module)} -> {_short(current)} imports ray")
                break
            todo.extend(graph[current])
    assert not offenders, "Ray in modules documented as Ray-free:\n" + "\n".join(offenders)


# -- the checker itself catches what it is for ---------------------------------------------


def test_checker_finds_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    table = layer_table("| 0 | low | `errors`, `gan.config` |\n| 3 | high | `gan.*` |\n")
    assert layer_of("cxrfactory.gan.config", table) == 0
    assert layer_of("cxrfactory.gan.loop", table) == 3
    assert layer_of("cxrfactory.nowhere", table) is None
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ray import data\n")
    assert imports_ray(source)
    source.write_text("import rayon\n")
    assert not imports_ray(source)


def test_function_level_and_relative_imports_count() -> None:
    known = {"cxrfactory.gan", "cxrfactory.gan.loop", "cxrfactory.gan.step", "cxrfactory.shards"}
    path = ROOT / "tests" / "_layers_probe.py"
    path.write_text("from . import step\ndef f():\n    from cxrfactory import shards\n")
    try:
        found = imports_of(path, "cxrfactory.gan.loop", known)
    finally:
        path.unlink()
    assert found == {"cxrfactory.gan.step", "cxrfactory.shards"}
