"""The import graph of the product: no circle, counting the imports written inside functions.

An import inside a function still makes a circle: it only moves the failure from import time to the first call
that takes that path. So the graph here holds every `import` / `from … import` of `sft_core`, `tasks` and `flows`,
wherever it is written. `python tests/test_imports.py` prints the graph's figures (imports inside functions, by
module) and any circle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sft_core", "tasks", "flows")


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted name -> file, for every module of the product packages (a package is its `__init__.py`)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """The project modules `module` imports, each with whether the import is written inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node, path.name == "__init__.py")
            # `from pkg import sub` imports the module pkg.sub where there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            while target and target not in modules:  # `import a.b.c` of a name inside a module: its module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.append((target, id(node) in inner))
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {m: {t for t, _ in imports_of(m, p, modules)} for m, p in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def inner_import_count(root: Path = REPO) -> dict[str, int]:
    """Imports written inside functions (of anything, not only the project), by module."""
    counts = {}
    for module, path in project_modules(root).items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        counts[module] = sum(isinstance(n, (ast.Import, ast.ImportFrom)) for f in ast.walk(tree)
                             if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f))
    return counts


def test_the_product_has_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles (imports inside functions count): " + "; ".join(" <-> ".join(c) for c in found)


def test_a_circle_hidden_inside_a_function_is_found(tmp_path):
    """The check itself: two modules importing each other, one of them inside a function, is a circle."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("", encoding="utf-8")
    (tmp_path / "sft_core" / "a.py").write_text("from sft_core.b import run\n", encoding="utf-8")
    (tmp_path / "sft_core" / "b.py").write_text("def run():\n    from . import a\n", encoding="utf-8")
    (tmp_path / "flows" / "c.py").write_text("import sft_core.a\n", encoding="utf-8")
    graph = import_graph(tmp_path)
    assert graph["flows.c"] == {"sft_core.a"} and graph["sft_core.b"] == {"sft_core.a"}
    assert circles(graph) == [["sft_core.a", "sft_core.b"]]
    assert inner_import_count(tmp_path)["sft_core.b"] == 1


@pytest.mark.parametrize("package", PACKAGES)
def test_every_product_package_is_in_the_graph(package):
    assert any(m == package or m.startswith(package + ".") for m in import_graph())


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    counts = inner_import_count(root)
    for module, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        if n:
            print(f"{n:4d}  {module}")
    print(f"{sum(counts.values()):4d}  imports inside functions in {', '.join(PACKAGES)}")
    for group in circles(import_graph(root)):
        print("circle:", " <-> ".join(group))
