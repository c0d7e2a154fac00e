"""Shell and network-namespace helpers shared by the root tests.

Every namespace gets a unique name (``v6lb-<tag>-<pid>-<n>``) and is deleted
afterwards, whatever happens in the test.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_counter = itertools.count()


def sh(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 or not check, f"{' '.join(argv)}: {r.stderr}"
    return r.stdout


def nsx(ns: str, *argv: str, stdin: str | None = None) -> str:
    return sh("ip", "netns", "exec", ns, *argv, stdin=stdin)


@contextmanager
def namespaces(*roles: str, tag: str = "t") -> Iterator[dict[str, str]]:
    """Fresh namespaces, one per role, with lo up; deleted afterwards whatever happens."""
    names = {role: f"v6lb-{tag}-{os.getpid()}-{next(_counter)}" for role in roles}
    made: list[str] = []
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            made.append(ns)
            nsx(ns, "ip", "link", "set", "lo", "up")
        yield names
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def link(a: str, a_if: str, b: str, b_if: str) -> None:
    """A veth pair between namespaces ``a`` and ``b``, both ends up."""
    sh("ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
    nsx(a, "ip", "link", "set", a_if, "up")
    nsx(b, "ip", "link", "set", b_if, "up")


def batch(ns: str, *lines: str) -> None:
    nsx(ns, "ip", "-6", "-batch", "-", stdin="\n".join(lines) + "\n")


def client_behind(client: str, lb: str, clients: object) -> None:
    """The client namespace behind the LB's ``l0`` (``c0`` 2001:db8:a::2, ``l0`` ::1).

    The LB forwards; the client may bind any address of ``clients`` (a local route on
    its ``lo``, ``ip_nonlocal_bind``), and the LB routes ``clients`` back to it.
    """
    link(client, "c0", lb, "l0")
    nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    nsx(client, "sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1")
    batch(
        client,
        "address add 2001:db8:a::2/64 dev c0 nodad",
        "route add default via 2001:db8:a::1",
        f"route add local {clients} dev lo",
    )
    batch(lb, "address add 2001:db8:a::1/64 dev l0 nodad", f"route add {clients} via 2001:db8:a::2")


def wait_for(
    what: str,
    fn: Callable[[], Any],
    timeout: float,
    retry_on: tuple[type[BaseException], ...],
    step: float = 0.1,
) -> Any:
    """Call ``fn`` every ``step`` s until it returns something true, and return that.

    ``retry_on``: the exceptions that mean "not yet" (each caller names its own).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except retry_on as exc:
            last = exc
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


# The nat lab of the data-plane root tests (client — LB — backends over l0/l1): one VIP,
# three backends, the LB's own address. Each test passes what it changes.
NAT_LAB_VIP = "2001:db8:f::80"
NAT_LAB_BACKENDS = ["2001:db8:b::10", "2001:db8:b::11", "2001:db8:b::12"]


def nat_lab_file(
    instance: str,
    sock: str,
    *,
    health: dict[str, Any] | None = None,
    npt: list[dict[str, str]] | None = None,
    **lb: Any,
) -> dict[str, Any]:
    """The v6lb file of that lab; ``lb`` adds or overrides keys of its ``lb:`` section."""
    data: dict[str, Any] = {
        "lb": {
            "instance": instance,
            "flow_hash_seed": 0x5EED,
            "interfaces": ["l0", "l1"],
            "addresses": ["2001:db8:a::1"],
            "control_socket": sock,
            **lb,
        },
        "vips": [
            {
                "name": "web",
                "address": NAT_LAB_VIP,
                "ports": [80],
                "mode": "nat",
                "health": health or {"type": "none"},
                "backends": [{"address": a} for a in NAT_LAB_BACKENDS],
            }
        ],
    }
    if npt:
        data["npt"] = npt
    return data


CLONE_NEWNET = 0x40000000


@contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """This thread in namespace ``ns`` for the block (sockets made there stay there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        assert libc.setns(target, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
        yield
    finally:
        assert libc.setns(home, CLONE_NEWNET) == 0
        os.close(home)
        os.close(target)
