"""The package's shape: imports point one way, with no circles (lazy imports count too)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import regression_model_template

PACKAGE = "regression_model_template"
ROOT = Path(regression_model_template.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that this file imports, at any depth of the code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in modules}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}

    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    # and the arrows point the documented way
    assert f"{PACKAGE}.containers" not in graph[f"{PACKAGE}.config"]
    assert f"{PACKAGE}.jobs" not in graph[f"{PACKAGE}.containers"]
    assert all(target.startswith(f"{PACKAGE}.io") for target in graph[f"{PACKAGE}.io.services"])


def test_the_checker_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_wheel_names_every_package_of_the_source_tree() -> None:
    # pyproject.toml lists the packages by hand (the profiles map from containers/): a new
    # subpackage missing from the list would be left out of the wheel.
    pyproject = tomllib.loads((ROOT.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    in_tree = {
        ".".join((PACKAGE, *init.parent.relative_to(ROOT).parts))
        for init in ROOT.rglob("__init__.py")
    }
    assert in_tree | {f"{PACKAGE}.profiles"} == listed
