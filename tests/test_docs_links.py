"""The docs and the code name each other by path; every path named must exist.

- every ``docs/<page>.md`` named in a source file (docstrings, comments, help texts),
  in README.md or in a page under docs/ exists;
- every link from README.md or a docs page to another ``.md`` page exists;
- every source path named in docs/architecture.md and docs/extending.md exists, written
  either from the repository root (``src/v6lb/engines/daemon.py``) or from the package
  (``engines/daemon.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "v6lb"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CODE_PAGES = [DOCS / "architecture.md", DOCS / "extending.md"]

_DOC_PATH = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.md)\b")
_LINK = re.compile(r"\]\(([A-Za-z0-9_./-]+\.md)(?:#[^)]*)?\)")
_FULL = re.compile(r"\bsrc/v6lb/[A-Za-z0-9_/]+\.py\b")
_SHORT = re.compile(r"(?<![/\w.])(?:wire|core|model|render|engines|lab|cli)/[A-Za-z0-9_/]+\.py\b")


def _named_pages(text: str) -> set[str]:
    return set(_DOC_PATH.findall(text))


def test_the_pattern_finds_paths() -> None:
    """The checker itself."""
    text = "see docs/run.md and (docs/nat.md), [x](dsr.md#a), src/v6lb/cli/run.py, engines/plane.py"
    assert _named_pages(text) == {"run.md", "nat.md"}
    assert _LINK.findall(text) == ["dsr.md"]
    assert _FULL.findall(text) == ["src/v6lb/cli/run.py"]
    assert _SHORT.findall(text) == ["engines/plane.py"]
    assert _SHORT.findall("src/v6lb/cli/run.py") == []


def test_every_docs_page_named_in_the_source_exists() -> None:
    missing = {
        f"{path.relative_to(ROOT)}: docs/{page}"
        for path in sorted(SRC.rglob("*.py"))
        for page in _named_pages(path.read_text(encoding="utf-8"))
        if not (DOCS / page).is_file()
    }
    assert missing == set()


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_every_page_a_doc_names_exists(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    missing = {f"docs/{p}" for p in _named_pages(text) if not (DOCS / p).is_file()}
    missing |= {
        link for link in _LINK.findall(text) if not (path.parent / link).resolve().is_file()
    }
    assert missing == set()


@pytest.mark.parametrize("path", CODE_PAGES, ids=lambda p: p.name)
def test_every_source_path_in_the_code_pages_exists(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    full = set(_FULL.findall(text))
    short = set(_SHORT.findall(text))
    assert full or short, f"{path.name} names no source file"
    missing = {p for p in full if not (ROOT / p).is_file()}
    missing |= {p for p in short if not (SRC / p).is_file()}
    assert missing == set()
