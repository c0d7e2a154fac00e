"""`v6lb ctl` against a real `v6lb run` (kernel plane, a nat VIP) in private namespaces.

The lab of tests/test_run_kernel.py: a client, the LB and three TCP backends.
Thirty connections are held open; ``v6lb ctl drain`` (a real subprocess) must
refill the nft map at once (no slot of the drained backend in the kernel's map,
status shows it), new connections avoid the backend while the held ones keep it
(conntrack); ``undrain`` gives it its slots back. The socket is 0660 for group
nogroup (``lb.control_group``), so a client run as nobody (a forked child that
drops to uid/gid 65534) reads the status and is refused ``ctl`` by SO_PEERCRED.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from netns_helpers import batch, client_behind, link, nsx, sh
from test_run_kernel import (
    BACKENDS,
    CLIENT,
    CLIENTS,
    SERVER,
    V6LB,
    connect,
    flows,
    lab_file,
    namespaces,
    predicted,
    status,
    wait_for,
    write,
)
from v6lb.engines.control import query
from v6lb.model.config import load_config
from v6lb.model.pools import pool_for


def as_nobody(sock: str, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """``query`` from a forked child that runs as uid/gid 65534 (nobody/nogroup)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                out = query(sock, cmd, args=args, timeout=10.0)
            except Exception as exc:
                out = {"client_error": str(exc)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    return result


def map_text(ns: str, instance: str) -> str:
    return nsx(ns, "nft", "list", "map", "ip6", f"v6lb_{instance}", "v0_web")


@pytest.mark.root
def test_ctl_drain_kernel_plane_and_peer_refusal(tmp_path: Path) -> None:
    sock = f"/tmp/v6lb-ctl-{os.getpid()}.sock"
    instance = f"k{os.getpid() % 100000}"
    path = tmp_path / "lb.yaml"
    write(path, lab_file(tmp_path, instance=instance, sock=sock, control_group="nogroup"))
    config = load_config(path)
    pool = pool_for(config.vips[0], config.lb.flow_hash_seed)
    drained = BACKENDS[0]
    procs: list[subprocess.Popen[str]] = []
    with namespaces("client", "lb", "backend") as ns:
        c, lb, b = ns["client"], ns["lb"], ns["backend"]
        client_behind(c, lb, CLIENTS)
        link(lb, "l1", b, "b0")
        batch(lb, "address add 2001:db8:b::1/64 dev l1 nodad")
        batch(
            b,
            *(f"address add {a}/64 dev b0 nodad" for a in BACKENDS),
            "route add default via 2001:db8:b::1",
        )
        try:
            for addr in BACKENDS:
                p = subprocess.Popen(
                    ["ip", "netns", "exec", b, sys.executable, "-c", SERVER, addr],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                procs.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            run = subprocess.Popen(
                [V6LB, "run", str(path), "--netns", lb],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(run)
            wait_for("the control socket", lambda: query(sock))
            assert os.stat(sock).st_mode & 0o777 == 0o660 and os.stat(sock).st_gid == 65534
            assert drained in map_text(lb, instance)

            # long-lived flows, some on the backend about to be drained
            held = subprocess.Popen(
                ["ip", "netns", "exec", c, sys.executable, "-c", CLIENT, "hold"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(held)
            assert held.stdin is not None and held.stdout is not None
            held.stdin.write(json.dumps(flows(random.Random(6), 30)) + "\n")
            held.stdin.flush()
            before = json.loads(held.stdout.readline())
            assert all(r[4] is not None for r in before), before
            on_drained = sum(r[4][0] == drained for r in before)
            assert on_drained > 0

            # another uid: status yes (group), ctl no (SO_PEERCRED)
            st = as_nobody(sock, "status")
            assert st.get("instance") == instance, st
            refused = as_nobody(
                sock, "ctl", {"action": "drain", "vip": "web", "backend": BACKENDS[1]}
            )
            assert refused["exit"] == 1 and "refused for uid 65534" in refused["error"], refused
            assert all(x["drain"] is False for x in status(sock)["vips"][0]["backends"])

            # drain: the map is refilled by the time the command returns
            t = time.monotonic()
            out = sh(V6LB, "ctl", "drain", "web", drained, "--control-socket", sock)
            took = time.monotonic() - t
            assert "draining; map refilled" in out, out
            assert drained not in map_text(lb, instance)
            web = status(sock)["vips"][0]
            assert (web["backends"][0]["drain"], web["backends"][0]["slots"]) == (True, 0)
            assert web["backends"][0]["override"] == "drain (file: no drain)"
            text = sh(V6LB, "status", "--control-socket", sock)
            assert "ctl: drain (file: no drain)" in text

            # new flows avoid it and land where the core puts them; held flows stay
            pool.set_drain(0, True)
            for src, sport, _d, _p, reply, error in connect(c, flows(random.Random(7), 40)):
                assert reply is not None, error
                assert reply[0] != drained and reply[0] == predicted(pool, src, sport)
            held.stdin.write("\n")
            held.stdin.flush()
            again = json.loads(held.stdout.readline())
            assert [a[0] if isinstance(a, list) else a for a in again] == [
                r[4][0] for r in before
            ], again
            print(
                f"ctl: `v6lb ctl drain` returned in {took * 1000:.0f} ms, map refilled;"
                f" {on_drained} held flows on the drained backend kept it; 40 new avoided it"
            )

            # undrain: the slots come back
            sh(V6LB, "ctl", "undrain", "web", drained, "--control-socket", sock)
            assert drained in map_text(lb, instance)
            assert status(sock)["vips"][0]["backends"][0]["slots"] > 0

            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=30) == 0
            _, err = run.communicate()
            assert "ctl drain web 2001:db8:b::10: map refilled" in err, err
            assert "Traceback" not in err, err
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
