"""engine/ is grouped by concept and its import graph has no cycle (type-only and function-level imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every engine module ``path`` imports anywhere in it (module level, functions, TYPE_CHECKING blocks)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from engine.metering import sinks`` imports engine.metering.sinks
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = sorted(ENGINE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {}
    for f in files:
        name = _module_name(f)
        # a package's __init__ is imported by its children implicitly: only real edges count
        graph[name] = {m for m in _imports(f, modules) if m not in (name, "engine")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_engine_has_no_import_cycle() -> None:
    graph = _graph()
    assert "engine.metering.meter" in graph and "engine.repository.local" in graph
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


SERVING = ("engine.model", "engine.pool", "engine.dataplane", "engine.repository", "engine.optimize")


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # a repository is read without sessions, the pool or metering
        ("engine.repository", ("engine.model", "engine.pool", "engine.runtime", "engine.session", "engine.metering")),
        # metering knows records, not how requests are served
        (
            "engine.metering",
            ("engine.model", "engine.pool", "engine.dataplane", "engine.repository", "engine.optimize"),
        ),
        ("engine.optimize", ("engine.metering",)),
    ],
)
def test_packages_import_only_what_their_docstring_allows(package: str, forbidden: tuple[str, ...]) -> None:
    graph = _graph()
    members = [m for m in graph if m == package or m.startswith(package + ".")]
    assert members
    bad = {(m, dep) for m in members for dep in graph[m] if dep.startswith(forbidden)}
    assert not bad


def test_core_modules_are_flat_and_subsystems_are_packages() -> None:
    flat = {p.stem for p in ENGINE.glob("*.py")}
    assert {"config", "errors", "tensors", "model", "pool", "session", "dataplane", "runtime"} <= flat
    for gone in ("records", "batch", "sinks", "metering", "metrics", "repository", "s3repo", "manifest", "publish"):
        assert gone not in flat
    for package in ("repository", "metering", "optimize"):
        doc = ast.get_docstring(ast.parse((ENGINE / package / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "import" in doc, f"engine/{package}/__init__.py must say what it holds and may import"
