"""The package's layering: every import (function-level and TYPE_CHECKING ones included) goes
down the layer order of docs/architecture.md, and no two modules import each other in a cycle.

Built-in plugins (``plugins/``, imported as ``adaptkit_plugins``) are held to what a third-party
plugin may import: the top-level ``adaptkit`` package, the contract, recipes, errors and files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Lowest first. A module may import from its own layer or any layer below it.
LAYERS: list[tuple[str, ...]] = [
    ("adaptkit.errors", "adaptkit.files", "adaptkit.version"),
    ("adaptkit.recipe",),
    ("adaptkit.contract",),
    ("adaptkit.host",),
    ("adaptkit.data",),
    ("adaptkit.kernels",),
    ("adaptkit.adapt",),
    ("adaptkit.estimate",),
    ("adaptkit.train",),
    ("adaptkit.compare",),
    (
        "adaptkit.runs",
        "adaptkit.export",
        "adaptkit.testing",
        "adaptkit.listing",
        "adaptkit.cli",
        "adaptkit.__main__",
        "adaptkit",
    ),
]

#: What a plugin may import from adaptkit: its public plugin API and the types hooks receive.
PLUGIN_API = ("adaptkit", "adaptkit.contract", "adaptkit.recipe", "adaptkit.errors", "adaptkit.files")


def module_name(path: Path) -> str:
    """``adaptkit/train/loop.py`` -> ``adaptkit.train.loop``; ``plugins/x.py`` -> ``adaptkit_plugins.x``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] == "plugins":
        parts[0] = "adaptkit_plugins"
    return ".".join(parts)


def imports_of(source: str, me: str, is_package: bool) -> set[str]:
    """Every module name ``source`` imports, anywhere in the file (``from a import b`` gives a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = me.split(".") if is_package else me.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (resolved to modules that exist)."""
    files = sorted([*(ROOT / "adaptkit").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])
    modules = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for target in imports_of(path.read_text(), name, path.name == "__init__.py"):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def layer_of(module: str) -> int | None:
    """The index of the layer that owns ``module`` (the longest matching prefix wins)."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def in_api(module: str) -> bool:
    """Whether a plugin may import ``module``."""
    return module == "adaptkit" or any(
        module == p or module.startswith(p + ".") for p in PLUGIN_API if p != "adaptkit"
    )


def layering_problems(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports, plugins reaching past the plugin API, adaptkit importing a plugin, and cycles."""
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if module.startswith("adaptkit_plugins"):
                if not (target.startswith("adaptkit_plugins") or in_api(target)):
                    problems.append(f"{module} -> {target}: a plugin imports only adaptkit's plugin API")
                continue
            if target.startswith("adaptkit_plugins"):
                problems.append(f"{module} -> {target}: the host loads plugins by name, never imports them")
                continue
            mine, theirs = layer_of(module), layer_of(target)
            if mine is None:
                problems.append(f"{module}: in no layer (add it to LAYERS and docs/architecture.md)")
            elif theirs is not None and theirs > mine:
                problems.append(f"{module} -> {target}: imports upward (layer {mine} -> {theirs})")
    problems.extend(f"import cycle: {' <-> '.join(c)}" for c in cycles(graph))
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_goes_down_the_layers_and_none_forms_a_cycle():
    assert layering_problems(import_graph()) == []


def test_every_module_belongs_to_a_layer():
    graph = import_graph()
    orphans = [m for m in graph if not m.startswith("adaptkit_plugins") and layer_of(m) is None]
    assert orphans == []


@pytest.mark.parametrize(
    ("module", "added", "expected"),
    [
        ("adaptkit.contract.strategy", "adaptkit.train.loop", "imports upward"),
        ("adaptkit.recipe.schema", "adaptkit.adapt.stack", "imports upward"),
        ("adaptkit.estimate.estimator", "adaptkit.compare.plan", "imports upward"),
        ("adaptkit.train.loop", "adaptkit_plugins.tasks", "never imports them"),
        ("adaptkit_plugins.strategies.lora", "adaptkit.train.loop", "plugin API"),
        ("adaptkit.train.evaluate", "adaptkit.train.loop", "import cycle"),
    ],
)
def test_the_checker_catches_an_added_upward_import(module, added, expected):
    """The real graph plus one bad edge fails, so the test above could fail too."""
    graph = import_graph()
    assert module in graph and added in graph
    graph[module] = graph[module] | {added}
    problems = layering_problems(graph)
    assert any(expected in p and module in p for p in problems), problems


def test_function_level_and_type_checking_imports_count():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from adaptkit.train.loop import Loop\n"
        "def f():\n    from adaptkit.compare import plan\n    import adaptkit.cli\n"
    )
    found = imports_of(source, "adaptkit.contract.x", is_package=False)
    assert {"adaptkit.train.loop", "adaptkit.compare", "adaptkit.compare.plan", "adaptkit.cli"} <= found


def test_relative_imports_resolve_to_their_package():
    assert "adaptkit.train.state" in imports_of("from .state import X\n", "adaptkit.train.loop", False)
    assert "adaptkit.train.state" in imports_of("from .state import X\n", "adaptkit.train", True)
    assert "adaptkit.errors" in imports_of("from ..errors import E\n", "adaptkit.train.loop", False)


def test_every_package_ships_in_the_wheel():
    """pyproject.toml lists packages by hand; one left out would be missing from a real install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent / "__init__.py") for p in ROOT.glob("adaptkit/**/__init__.py")}
    found |= {module_name(p.parent / "__init__.py") for p in ROOT.glob("plugins/**/__init__.py")}
    assert found == listed
