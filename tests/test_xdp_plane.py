"""`v6lb run --dataplane xdp` on a real kernel: attach, forward, swap a table, detach.

A one-armed LB (``lb``) behind a router (``rtr``) that also sends the client traffic, and
two backends (``be1``, ``be2``) behind the router; every link a veth. The router's end of
the LB's link has the XDP_PASS program (``pass.c``): a native XDP_TX on a veth reaches a
peer with an XDP program only (docs/dataplane-xdp.md, "veth").

* a config larger than the maps is refused naming the limit, before anything is attached;
* UDP flows from the router to the VIP arrive at the backend the core picks, IPv6-in-IPv6
  from the VIP's tunnel source, the inner packet as sent (hop limit one less);
* the health probe of ``be1`` fails (its listener is closed): the table is swapped and
  the same flows arrive at ``be2``; the status counts the transmitted packets, and the
  metrics export them;
* SIGHUP: a new generation of program and maps, the link switched to it, the same flows
  arrive at ``be2`` (be1 is still known down);
* SIGTERM: no XDP program on the interface, nothing pinned under /sys/fs/bpf;
* an interface without native XDP (a bridge): attached in generic mode, with a warning;
* dsr-l2 and npt (a second test, the router, the LB and a backend on one link): the
  placement each needs is checked before anything is attached, a backend's MAC is
  learned from the neighbour table and followed when it changes.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from netns_helpers import batch, in_netns, link, namespaces, nsx, sh, wait_for
from v6lb.engines.metrics import metric_families
from v6lb.engines.xdp.run import PASS_OBJECT, pin_dirs, pin_tag
from v6lb.lab.offload import tx_checksum_off
from v6lb.model.config import parse_config
from v6lb.model.pools import pool_for
from v6lb.model.status import InstanceStatus

pytestmark = [pytest.mark.root]

V6LB = [sys.executable, "-m", "v6lb.cli"]
VIP = "2001:db8:100::53"
LB = "2001:db8:2::10"
BACKENDS = ["fd00:61::1", "fd00:62::1"]
SEED = 0x5EED


def _config(path: Path, vips: int = 1) -> dict[str, object]:
    health = {"type": "tcp", "port": 9, "interval": 0.2, "timeout": 0.1, "rise": 1, "fall": 1}
    doc = {
        "lb": {
            "instance": "xp",
            "addresses": [LB],
            "interfaces": ["x0"],
            "flow_hash_seed": SEED,
            "control_socket": str(path.with_suffix(".sock")),
        },
        "vips": [
            {
                "name": f"dns{n}" if n else "dns",
                "address": VIP if not n else f"2001:db8:100::{n + 0x100:x}",
                "ports": [53],
                "protocol": "udp",
                "mode": "dsr-ip6ip6",
                "tunnel_source": LB,
                "table_size": 251 if not n else 3,
                "health": health if not n else {"type": "none"},
                "backends": [{"address": a} for a in (BACKENDS if not n else BACKENDS[:1])],
            }
            for n in range(vips)
        ],
    }
    path.write_text(yaml.safe_dump(doc))
    return doc


def _network(ns: dict[str, str]) -> None:
    lb, rtr, be1, be2 = ns["lb"], ns["rtr"], ns["be1"], ns["be2"]
    link(lb, "x0", rtr, "r0")
    link(rtr, "r1", be1, "b0")
    link(rtr, "r2", be2, "b0")
    nsx(rtr, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    batch(lb, f"address add {LB}/64 dev x0 nodad", "route add default via 2001:db8:2::1")
    batch(
        rtr,
        "address add 2001:db8:2::1/64 dev r0 nodad",
        "address add fd00:61::fe/64 dev r1 nodad",
        "address add fd00:62::fe/64 dev r2 nodad",
        f"route add 2001:db8:100::/64 via {LB}",
    )
    for be, (addr, gw) in (
        (be1, (BACKENDS[0], "fd00:61::fe")),
        (be2, (BACKENDS[1], "fd00:62::fe")),
    ):
        batch(be, f"address add {addr}/64 dev b0 nodad", f"route add default via {gw}")
    sh("ip", "-n", rtr, "link", "set", "dev", "r0", "xdpdrv", "obj", str(PASS_OBJECT), "sec", "xdp")


def _status(sock: str) -> dict[str, object]:
    out = subprocess.run(
        [*V6LB, "status", "--json", "--control-socket", sock], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _attached(sock: str) -> str:
    """Wait until the instance answers with its program attached; the attach mode."""

    def mode() -> str:
        if not os.path.exists(sock):
            return ""
        xdp = _status(sock).get("xdp")
        return str(xdp["mode"]) if isinstance(xdp, dict) else ""

    return str(wait_for("the program attached", mode, 20, (AssertionError, ValueError)))


def _listen(ns: str) -> socket.socket:
    """The backend's health-check port (the probes connect to it)."""
    with in_netns(ns):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", 9))
    s.listen(64)
    return s


def _send_and_collect(
    rtr: str, catchers: list[socket.socket], ports: range, tag: bytes
) -> dict[int, tuple[int, bytes]]:
    """One UDP datagram per source port from the router; source port -> (backend, packet)."""
    with in_netns(rtr):
        tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    got: dict[int, tuple[int, bytes]] = {}
    try:
        for port in ports:
            tx.close()
            with in_netns(rtr):
                tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            tx.bind(("2001:db8:2::1", port))
            tx.sendto(tag + port.to_bytes(2, "big"), (VIP, 53))
        deadline = time.monotonic() + 3
        while len(got) < len(ports) and time.monotonic() < deadline:
            ready, _, _ = select.select(catchers, [], [], 0.2)
            for s in ready:
                inner = s.recv(2048)  # a raw IPPROTO_IPV6 socket: the inner packet
                if inner[40 + 8 : 40 + 8 + len(tag)] == tag:
                    sport = int.from_bytes(inner[40:42], "big")
                    got[sport] = (catchers.index(s), inner)
    finally:
        tx.close()
    return got


@contextmanager
def _no_leftover_pins(tag: str) -> Iterator[None]:
    """Whatever happens, nothing of ``tag`` stays pinned (a run killed mid-install)."""
    try:
        yield
    finally:
        for d in pin_dirs(tag):
            shutil.rmtree(d, ignore_errors=True)


def test_xdp_plane_forwards_swaps_tables_and_detaches(tmp_path: Path) -> None:
    with (
        namespaces("lb", "rtr", "be1", "be2", tag="xdp") as ns,
        _no_leftover_pins(pin_tag("xp", ns["lb"])),
    ):
        _network(ns)
        tag = pin_tag("xp", ns["lb"])

        # Refused before anything is attached: more VIPs than the maps hold.
        big = tmp_path / "big.yaml"
        _config(big, vips=257)
        r = subprocess.run(
            [*V6LB, "run", str(big), "--dataplane", "xdp", "--netns", ns["lb"]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and "257 DSR VIPs: the XDP program holds 256" in r.stderr
        assert " xdp" not in nsx(ns["lb"], "ip", "link", "show", "x0") and not pin_dirs(tag)

        cfg = tmp_path / "xp.yaml"
        doc = _config(cfg)
        sock = str(cfg.with_suffix(".sock"))
        listener = _listen(ns["be1"])
        spare = _listen(ns["be2"])
        catchers = []
        for be in ("be1", "be2"):
            with in_netns(ns[be]):
                catchers.append(socket.socket(socket.AF_INET6, socket.SOCK_RAW, 41))
        run = subprocess.Popen(
            [*V6LB, "run", str(cfg), "--dataplane", "xdp", "--netns", ns["lb"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert _attached(sock) == "native"
            shown = nsx(ns["lb"], "ip", "link", "show", "x0")
            assert " xdp " in shown and "prog/xdp" in shown, shown  # native
            (pinned,) = pin_dirs(tag)
            assert {p.name for p in pinned.iterdir()} >= {"prog", "link", "v6lb_maglev"}

            pool = pool_for(parse_config(doc, str(cfg)).vip("dns"), SEED)
            ports = range(40000, 40024)

            def expected() -> dict[int, int]:
                return {
                    p: pool.pick_flow(
                        socket.inet_pton(socket.AF_INET6, "2001:db8:2::1"),
                        socket.inet_pton(socket.AF_INET6, VIP),
                        p,
                        53,
                    )
                    for p in ports
                }

            before = expected()
            assert set(before.values()) == {0, 1}  # both backends have flows
            wait_for(  # the first probes: until they pass, the table has no backend
                "both backends up",
                lambda: (
                    [b["health"] for b in _status(sock)["vips"][0]["backends"]]  # type: ignore[index]
                    == ["up", "up"]
                ),
                10,
                (AssertionError,),
            )
            got = _send_and_collect(ns["rtr"], catchers, ports, b"xdp-before")
            assert {p: b for p, (b, _) in got.items()} == before
            inner = got[ports[0]][1]
            assert inner[7] == 63  # the router's 64, one less at the LB
            assert socket.inet_ntop(socket.AF_INET6, inner[24:40]) == VIP

            # be1's health check fails: its table is swapped, its flows go to be2.
            listener.close()
            wait_for(
                "be1 down",
                lambda: _status(sock)["vips"][0]["backends"][0]["health"] == "down",  # type: ignore[index]
                10,
                (AssertionError,),
            )
            pool.set_up(0, False)
            after = expected()
            assert set(after.values()) == {1}
            got = _send_and_collect(ns["rtr"], catchers, ports, b"xdp-after")
            assert {p: b for p, (b, _) in got.items()} == after
            st = _status(sock)
            assert st["dataplane"] == "xdp" and st["map_updates"] >= 1, st
            assert st["forward"] == {  # the stack routed nothing of the VIP's on
                "forward_denied": 0,
                "forward_unreachable": 0,
                "forward_allowed": 0,
            }, st
            counters = st["xdp"]["counters"]  # type: ignore[index]
            assert counters["tx"] >= 2 * len(ports), counters
            assert st["engine"]["xdp"]["counters"]["forwarded"] == counters["tx"]  # type: ignore[index]
            metrics = {  # what a scrape of this status exports
                (m.name, tuple(sorted(m.labels.items()))): m.value
                for fam in metric_families(InstanceStatus.from_dict(st))
                for m in fam.samples
            }
            xdp_tx = (("forwarder", "xdp"), ("verdict", "forwarded"))
            assert metrics[("v6lb_forwarder_packets_total", xdp_tx)] == counters["tx"]
            passed = (("forwarder", "xdp"), ("reason", "not-vip"))
            assert metrics[("v6lb_passed_packets_total", passed)] == counters["pass-not-vip"]

            # SIGHUP: a new generation, the link switched to it, be1 still known down.
            run.send_signal(signal.SIGHUP)
            wait_for("the reload", lambda: _status(sock)["reloads"] == 1, 10, (AssertionError,))
            assert [p.name for p in pin_dirs(tag)] == [f"v6lb-{tag}_1"]
            assert _status(sock)["xdp"]["counters"]["tx"] >= counters["tx"]  # type: ignore[index]
            got = _send_and_collect(ns["rtr"], catchers, ports, b"xdp-reload")
            assert {p: b for p, (b, _) in got.items()} == after
        finally:
            run.send_signal(signal.SIGTERM)
            out, _ = run.communicate(timeout=30)
            spare.close()
            for s in catchers:
                s.close()
        assert run.returncode == 0, out
        assert "removed xdp program on x0 (native)" in out, out
        assert " xdp" not in nsx(ns["lb"], "ip", "link", "show", "x0")
        assert not pin_dirs(tag) and not list(Path("/sys/fs/bpf").glob(f"v6lb-{tag}*"))
        assert "v6lb" not in nsx(ns["lb"], "nft", "list", "tables")  # the forward filter

        # A device without native XDP (a bridge, with a port for its carrier): generic
        # mode, with a warning.
        batch(
            ns["lb"],
            "link add d0 type bridge forward_delay 0",
            "link add d1 type veth peer name d2",
            "link set d1 master d0",
            "link set d1 up",
            "link set d2 up",
            "link set d0 up",
        )
        wait_for(
            "the bridge's carrier",
            lambda: "NO-CARRIER" not in nsx(ns["lb"], "ip", "link", "show", "d0"),
            5,
            (),
        )
        batch(ns["lb"], *(f"route add {b}/128 dev d0" for b in BACKENDS))  # the tunnels: d0
        doc["lb"]["interfaces"] = ["d0"]  # type: ignore[index]
        cfg.write_text(yaml.safe_dump(doc))
        run = subprocess.Popen(
            [*V6LB, "run", str(cfg), "--dataplane", "xdp", "--netns", ns["lb"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert _attached(sock) == "generic"
            assert "xdpgeneric" in nsx(ns["lb"], "ip", "link", "show", "d0")
        finally:
            run.send_signal(signal.SIGTERM)
            out, _ = run.communicate(timeout=30)
        assert "d0: no native XDP" in out and "attached in generic (skb) mode" in out, out
        assert "xdp" not in nsx(ns["lb"], "ip", "link", "show", "d0") and not pin_dirs(tag)


L2_VIP = "2001:db8:100::54"
L2_BACKEND = "2001:db8:2::20"


def _run_once(cfg: Path, netns: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*V6LB, "run", str(cfg), "--dataplane", "xdp", "--netns", netns],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_xdp_plane_dsr_l2_learns_and_follows_the_mac_and_checks_placement(
    tmp_path: Path,
) -> None:
    """dsr-l2 and npt on the xdp plane: the placement each needs, and a MAC learned.

    One link (a bridge in ``rtr``) holds the router, the LB and the backend. An npt
    inside prefix on the link itself and a dsr-l2 backend behind a router are refused,
    naming the field, before anything is attached. Then a dsr-l2 VIP whose backend has
    no ``mac:``: the plane learns the MAC from the neighbour table, the router's
    datagrams to the VIP reach the backend unchanged (hop limit kept); the backend's MAC
    changes and the LB's neighbour entry with it: the plane rewrites the map (logged)
    and the datagrams arrive again.
    """
    with (
        namespaces("lb", "rtr", "be", tag="xl2") as ns,
        _no_leftover_pins(pin_tag("xl", ns["lb"])),
    ):
        lb, rtr, be = ns["lb"], ns["rtr"], ns["be"]
        link(lb, "x0", rtr, "p0")
        link(be, "b0", rtr, "p1")
        batch(
            rtr,
            "link add br0 type bridge forward_delay 0",
            "link set p0 master br0",
            "link set p1 master br0",
            "link set br0 up",
            "address add 2001:db8:2::1/64 dev br0 nodad",
            f"route add 2001:db8:100::/64 via {LB}",
        )
        nsx(lb, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        batch(lb, f"address add {LB}/64 dev x0 nodad", "route add default via 2001:db8:2::1")
        batch(
            be,
            f"address add {L2_BACKEND}/64 dev b0 nodad",
            f"address add {L2_VIP}/128 dev lo",
            "route add default via 2001:db8:2::1",
        )
        pass_prog = ["xdpdrv", "obj", str(PASS_OBJECT), "sec", "xdp"]
        sh("ip", "-n", rtr, "link", "set", "dev", "p0", *pass_prog)  # XDP_TX reaches rtr
        tx_checksum_off(rtr, ["br0"])  # full checksums through XDP on a veth (lab/offload.py)
        cfg = tmp_path / "xl.yaml"
        doc: dict[str, Any] = {
            "lb": {
                "instance": "xl",
                "addresses": [LB],
                "interfaces": ["x0"],
                "control_socket": str(cfg.with_suffix(".sock")),
            },
            "vips": [
                {
                    "name": "web",
                    "address": L2_VIP,
                    "ports": [53],
                    "protocol": "udp",
                    "mode": "dsr-l2",
                    "table_size": 7,
                    "health": {"type": "none"},
                    "backends": [{"address": L2_BACKEND}],
                }
            ],
        }

        # npt: the inside prefix on the LB's link (no router): refused.
        nsx(lb, "ip", "-6", "route", "add", "fd00:21::/64", "dev", "x0")
        cfg.write_text(
            yaml.safe_dump(
                {**doc, "npt": [{"inside": "fd00:21::/64", "outside": "2001:db8:21::/64"}]}
            )
        )
        r = _run_once(cfg, lb)
        assert r.returncode != 0 and "npt[0].inside: the xdp data plane sends" in r.stderr, r.stderr
        assert "route fd00:21::/64 via a router on x0" in r.stderr, r.stderr
        # dsr-l2: a backend behind a router: refused.
        off = {**doc["vips"][0], "backends": [{"address": "fd00:99::1"}]}
        cfg.write_text(yaml.safe_dump({**doc, "vips": [off]}))
        r = _run_once(cfg, lb)
        assert r.returncode != 0, r.stderr
        assert "vips.web.backends[0]: the xdp data plane hands dsr-l2 frames" in r.stderr
        assert " xdp" not in nsx(lb, "ip", "link", "show", "x0") and not pin_dirs(pin_tag("xl", lb))

        cfg.write_text(yaml.safe_dump(doc))
        sock = str(cfg.with_suffix(".sock"))
        with in_netns(be):
            rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        rx.bind((L2_VIP, 53))
        rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        rx.settimeout(0.3)
        with in_netns(rtr):
            tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 9)

        def arrives(tag: bytes) -> int:
            """Send until one arrives (5 s); its hop limit."""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                tx.sendto(tag, (L2_VIP, 53))
                try:
                    data, anc, _, _ = rx.recvmsg(64, 64)
                except TimeoutError:
                    continue
                if data == tag:
                    return int.from_bytes(anc[0][2][:4], sys.byteorder)
            raise AssertionError(f"{tag!r} never reached the backend: {_status(sock)['xdp']}")

        run = subprocess.Popen(
            [*V6LB, "run", str(cfg), "--dataplane", "xdp", "--netns", lb],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert _attached(sock) == "native"
            assert arrives(b"first") == 9  # dsr-l2 does not route: the hop limit is kept
            new = "02:00:00:00:00:99"
            nsx(be, "ip", "link", "set", "dev", "b0", "address", new)
            nsx(lb, "ip", "-6", "neigh", "replace", L2_BACKEND, "lladdr", new, "dev", "x0")
            assert arrives(b"second") == 9
            counters = _status(sock)["xdp"]["counters"]  # type: ignore[index]
            assert counters["tx-l2"] >= 2, counters
        finally:
            run.send_signal(signal.SIGTERM)
            out, _ = run.communicate(timeout=30)
            rx.close()
            tx.close()
        assert run.returncode == 0, out
        assert f"dsr-l2 backend {L2_BACKEND}: MAC " in out and f"-> {new}" in out, out
