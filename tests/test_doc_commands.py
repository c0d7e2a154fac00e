"""Every shell command shown in README.md and docs/*.md runs as written: docs are code.

The info string of a fenced block says what it is:

- ``sh``: commands a user runs as written, without root; together they exit 0, quickly;
- ``sh root``: the same, as root; they touch only namespaces they create, and clean up;
- ``sh norun``: shell commands not run here (a real host, a long benchmark, `make test`);
- any other word (``text``, ``console``, ``yaml``, ``json``, ...): not a command.

A fence without an info string is refused, so every new block says which it is.

Each block runs as one bash script (``set -e -o pipefail``; the failing command is
named) with the venv's bin first on PATH, HOME a new empty directory and this
checkout's ``src`` first on PYTHONPATH. It runs in a copy of the repository root made
of symlinks, whose ``.venv`` is the venv running the tests: relative paths
(``examples/...``, ``. .venv/bin/activate``) resolve as in a checkout after `make demo`,
even in a git worktree without its own venv, and what the commands write
(``demo-out/``, ``out.pcap``) stays in the temporary directory. The ``sh root`` blocks
of one page run in order in one test (pmtu.md's second block uses the lab its first
built); afterwards every lab a block named with ``--name`` is taken down, and no
namespace of it may be left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LABELS = ("sh", "sh root", "sh norun")
VENV = Path(sys.prefix)
TIMEOUT_S = 60

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>.*)$")
_LAB_NAME = re.compile(r"\bv6lb lab \S+ .*--name[ =]([a-z0-9]+)")


@dataclass(frozen=True)
class Block:
    page: str  # README.md, docs/run.md, ...
    line: int  # the opening fence's line, 1-based
    info: str  # the info string, stripped
    text: str  # the body, without the fence's indentation

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path, page: str | None = None) -> list[Block]:
    """The fenced blocks of one markdown page, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = page or str(path.relative_to(ROOT))
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent = m["indent"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{page}:{i + 1}: the fenced block is never closed"
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
        found.append(Block(page, i + 1, m["info"].strip(), "\n".join(body) + "\n"))
        i = end + 1
    return found


ALL = [b for p in PAGES for b in blocks(p)]
USER = [b for b in ALL if b.info == "sh"]
# pages whose ``sh root`` blocks a test of their own runs, with more checks
OWN_TEST = {"docs/run.md": "tests/test_run_quickstart_root.py"}
ROOT_PAGES = sorted({b.page for b in ALL if b.info == "sh root"} - set(OWN_TEST))


def test_every_block_is_labelled() -> None:
    """Every fence has an info string; a shell one is one of the three labels."""
    unlabelled = [b.where for b in ALL if not b.info]
    unknown = [
        f"{b.where}: {b.info}"
        for b in ALL
        if b.info.startswith("sh") and b.info not in SHELL_LABELS
    ]
    assert unlabelled == [], "label these blocks: sh, sh root, sh norun, text, ..."
    assert unknown == [], f"a shell block is one of {SHELL_LABELS}"
    # the pages do have commands to run: the checker sees them
    assert len(USER) >= 4 and len(ROOT_PAGES) >= 2, (len(USER), ROOT_PAGES)


def test_the_parser(tmp_path: Path) -> None:
    """Indented fences, info strings and bodies, on a page of its own."""
    page = tmp_path / "sample.md"
    text = "x\n```sh\nv6lb --version\n```\n- item:\n\n  ```sh root\n  ip netns list\n  ```\n"
    page.write_text(text, encoding="utf-8")
    found = blocks(page, "sample.md")
    assert [(b.line, b.info, b.text) for b in found] == [
        (2, "sh", "v6lb --version\n"),
        (7, "sh root", "ip netns list\n"),
    ]
    assert _LAB_NAME.findall("v6lb lab up examples/lab-pmtu.yaml --name pmtu\n") == ["pmtu"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository root as symlinks, with ``.venv`` the running venv."""
    assert (VENV / "bin" / "activate").is_file(), (
        f"run the tests with the venv's python (`make test`): {VENV} is no venv"
    )
    top = tmp_path_factory.mktemp("doc-commands")
    tree = top / "repo"
    tree.mkdir()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name == "demo-out" or entry.suffix == ".pcap":
            continue  # git, caches, the venv and what the commands write
        (tree / entry.name).symlink_to(entry)
    (tree / ".venv").symlink_to(VENV)
    return tree


def run_block(block: Block, tree: Path) -> None:
    home = tree.parent / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    script = (
        "set -e -o pipefail\n"
        "trap 'echo \"doc command failed (exit $?): $BASH_COMMAND\" >&2' ERR\n" + block.text
    )
    try:
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: still running after {TIMEOUT_S} s:\n{block.text}")
    assert done.returncode == 0, (
        f"{block.where} exits {done.returncode}:\n{block.text}"
        f"--- stdout (end)\n{done.stdout[-2000:]}--- stderr (end)\n{done.stderr[-2000:]}"
    )


@pytest.mark.parametrize("block", USER, ids=lambda b: b.where)
def test_sh_block_runs(block: Block, checkout: Path) -> None:
    run_block(block, checkout)


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.root
@pytest.mark.parametrize("page", ROOT_PAGES)
def test_sh_root_blocks_run(page: str, checkout: Path) -> None:
    """A page's ``sh root`` blocks, in order; its labs are down afterwards, nothing left."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    mine = [b for b in ALL if b.page == page and b.info == "sh root"]
    labs = sorted({name for b in mine for name in _LAB_NAME.findall(b.text)})
    taken = [ns for ns in _namespaces() if any(ns.startswith(f"v6lb-{n}-") for n in labs)]
    assert taken == [], f"a lab the page builds is up already: {taken}"
    try:
        for block in mine:
            run_block(block, checkout)
    finally:
        v6lb = str(VENV / "bin" / "v6lb")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        for name in labs:
            subprocess.run(
                [v6lb, "lab", "down", "--name", name], capture_output=True, env=env, check=False
            )
    left = [ns for ns in _namespaces() if any(ns.startswith(f"v6lb-{n}-") for n in labs)]
    assert left == []
