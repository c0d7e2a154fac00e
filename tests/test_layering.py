"""The sans-IO rule: wire/, core/ and render/ import no I/O modules (ARCHITECTURE.md)."""

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
PURE = ["wire", "core", "render"]


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


def test_imports_flow_one_way() -> None:
    """wire imports nothing from v6lb's upper layers; core/model never import engines, lab or cli."""
    for f in (SRC / "wire").rglob("*.py"):
        text = f.read_text()
        for upper in (
            "v6lb.core",
            "v6lb.model",
            "v6lb.engines",
            "v6lb.lab",
            "v6lb.render",
            "v6lb.cli",
        ):
            assert upper not in text, f"{f} imports {upper}"
    for pkg in ("core", "model", "render"):
        for f in (SRC / pkg).rglob("*.py"):
            text = f.read_text()
            for upper in ("v6lb.engines", "v6lb.lab", "v6lb.cli"):
                assert upper not in text, f"{f} imports {upper}"
