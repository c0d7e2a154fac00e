"""Helpers for root tests that drive a lab through the `v6lb lab` CLI, as a user does.

``v6lb(...)`` runs the CLI of this checkout; ``lab_name(prefix)`` is a fixture factory's
unique lab name; ``leftovers(name)`` lists what a lab left (namespaces, its directory);
``get(name, url)`` is curl from the lab's client, with the JSON body the lab's servers
answer with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from v6lb.lab.plan import LAB_ROOT

V6LB = [sys.executable, "-m", "v6lb.cli"]


def v6lb(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*V6LB, *args], capture_output=True, text=True, timeout=timeout)
    assert not check or r.returncode == 0, f"v6lb {' '.join(args)}: {r.stdout}{r.stderr}"
    return r


def leftovers(name: str) -> list[str]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out = [line for line in ns.splitlines() if line.startswith(f"v6lb-{name}-")]
    if (LAB_ROOT / name).exists():
        out.append(str(LAB_ROOT / name))
    return out


@contextmanager
def lab_named(prefix: str) -> Iterator[str]:
    """A unique lab name (``prefix`` + pid); ``lab down`` afterwards, nothing left."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"{prefix}{os.getpid() % 100000}"
    try:
        yield name
    finally:
        v6lb("lab", "down", "--name", name, check=False)
    assert leftovers(name) == []


def get(name: str, url: str) -> tuple[str, dict[str, Any]]:
    """curl's HTTP status and the JSON body the lab's servers answer with."""
    r = v6lb(
        "lab", "exec", "--name", name, "client", "--",
        "curl", "-6", "-s", "-m", "5", "-w", "\n%{http_code}", url,
        check=False,
    )  # fmt: skip
    body, _, code = r.stdout.rpartition("\n")
    try:
        return code, json.loads(body)
    except ValueError:
        return code, {"raw": body, "stderr": r.stderr}
