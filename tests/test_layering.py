"""The sans-IO rule: wire/, core/ and render/ import no I/O modules (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "v6lb"
FORBIDDEN = {
    "socket",
    "asyncio",
    "os",
    "time",
    "subprocess",
    "pyroute2",
    "select",
    "selectors",
    "threading",
}
PURE = ["wire", "core", "render", "k8s"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("pkg", PURE)
def test_pure_packages_import_no_io(pkg: str) -> None:
    files = sorted((SRC / pkg).rglob("*.py"))
    assert files, f"no files under {pkg}"
    bad = {str(f.relative_to(SRC)): sorted(_imports(f) & FORBIDDEN) for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert bad == {}


def _imported_modules(path: Path) -> set[str]:
    """Every v6lb module ``path`` imports, at any depth, type-only imports included
    (a ``TYPE_CHECKING`` import still ties a lower layer to an upper one). Docstrings
    may name any module: only import statements count."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative: resolve against the file's package
                parts = list(path.relative_to(SRC.parent).with_suffix("").parts)[: -node.level]
                found.add(".".join([*parts, node.module]))
            else:
                found.add(node.module)
    return {m for m in found if m.split(".")[0] == "v6lb"}


# Each layer and the layers above it, which it must never import (ARCHITECTURE:
# cli -> engines/lab/k8s -> render/model -> core -> wire).
_ABOVE = {
    "wire": ("core", "model", "render", "engines", "lab", "k8s", "cli"),
    "core": ("model", "render", "engines", "lab", "k8s", "cli"),
    "model": ("engines", "lab", "k8s", "cli"),
    "render": ("engines", "lab", "k8s", "cli"),
    "engines": ("cli",),
    "lab": ("cli",),
    "k8s": ("engines", "lab", "cli"),
}


@pytest.mark.parametrize("pkg", sorted(_ABOVE))
def test_imports_flow_one_way(pkg: str) -> None:
    """No module imports from a layer above its own."""
    bad = {}
    for f in sorted((SRC / pkg).rglob("*.py")):
        hits = sorted(
            m for m in _imported_modules(f) if m.split(".")[1:2] and m.split(".")[1] in _ABOVE[pkg]
        )
        if hits:
            bad[str(f.relative_to(SRC))] = hits
    assert bad == {}


# --- the import graph: no cycles, no sibling-private names (issue 13) ------------------


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import executed at run time, at any depth (function-level lazy imports
    count); the body of ``if TYPE_CHECKING:`` does not, since it never runs."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_private(name: str) -> bool:
    """``_name`` is private; ``__version__`` and other dunders are public by convention."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str]]]]:
    """(module -> v6lb modules it imports, module -> [(target module, private name)])."""
    files = {_module_name(f): f for f in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    private: dict[str, list[tuple[str, str]]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges[mod].update(a.name for a in node.names if a.name in files)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("v6lb"):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in files:
                    edges[mod].add(target)
                elif base in files:
                    edges[mod].add(base)
                    if _is_private(alias.name) and base != mod:
                        private.setdefault(mod, []).append((base, alias.name))
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(edges[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def test_cycle_finder_finds_a_cycle() -> None:
    """The checker itself: a three-module ring and a self-contained tail."""
    ring = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(ring) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    """No two modules of src/ import each other, directly or around a ring, including
    imports made inside functions (docs/architecture.md: imports flow one way)."""
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_no_module_imports_a_siblings_private_names() -> None:
    """``from v6lb.x import _name`` reaches into another module's internals."""
    _, private = _graph()
    assert private == {}


def _model_imports(source: str, module: str) -> list[str]:
    """Every ``v6lb.model`` import in ``source`` (the text of ``module``), at any depth:
    inside functions and ``if TYPE_CHECKING:`` too (a type-only import still ties the
    module to the config model), relative imports resolved."""
    package = module.rpartition(".")[0].split(".")
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        hits += [n for n in names if n == "v6lb.model" or n.startswith("v6lb.model.")]
    return hits


def test_model_import_finder() -> None:
    """The checker itself: lazy, type-only and relative imports are all found."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from v6lb.model.config import Config\n"
        "def f():\n    import v6lb.model.modes\n    from ..model import pools\n"
        "from v6lb.core.backends import BackendPool\n"
    )
    assert _model_imports(src, "v6lb.core.x") == [
        "v6lb.model.config.Config",
        "v6lb.model.modes",
        "v6lb.model.pools",
    ]


def test_core_never_imports_model() -> None:
    """core/ takes plain values (its own specs); the adapter in model/pools.py builds them."""
    bad = {}
    for f in sorted((SRC / "core").rglob("*.py")):
        hits = _model_imports(f.read_text(), _module_name(f))
        if hits:
            bad[str(f.relative_to(SRC))] = hits
    assert bad == {}
