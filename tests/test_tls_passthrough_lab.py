"""TLS passthrough by SNI through `v6lb run --proxy builtin|haproxy` in a namespace:
`openssl s_server` backends holding their own certificates (trustme), `openssl s_client`
with several SNIs reading the certificate it got, garbage and a silent client counted in
`v6lb status`, per-backend counters, and `v6lb ctl drain` of a route's only backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trustme

from netns_helpers import batch, namespaces, wait_for
from v6lb.cli import main
from v6lb.engines.control import ControlError, query

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]

VIP = "2001:db8:7f::80"
BE = "2001:db8:7f::1"
CERTS = {8441: "a.example.com", 8442: "*.example.com", 8443: "default.example.net"}

CONFIG = """
lb: {{instance: sni{tag}, control_socket: {sock}}}
vips:
  - name: pass
    address: "{vip}"
    ports: [443]
    mode: proxy-l4
    timeouts: {{connect: 1}}
    health: {{type: tcp, interval: 1}}
    backends:
      - {{address: "{be}", port: 8441}}
      - {{address: "{be}", port: 8442}}
      - {{address: "{be}", port: 8443}}
    sni_routes:
      - names: [a.example.com]
        backends: ["[{be}]:8441"]
      - names: ["*.example.com"]
        backends: ["[{be}]:8442"]
"""

# In the namespace: garbage and a silent client, each timed until the proxy closes it.
PROBE = textwrap.dedent(
    """
    import json, socket, sys, time
    out = []
    for first in (b"GET / HTTP/1.1\\r\\n\\r\\n", b""):
        s = socket.create_connection((sys.argv[1], 443), timeout=10)
        t0 = time.monotonic()
        s.sendall(first)
        try:
            got = s.recv(100)
        except ConnectionResetError:
            got = b""
        out.append([round(time.monotonic() - t0, 2), got.hex()])
    print(json.dumps(out))
    """
)


def _ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def _seen(ns: str, ca: Path, sni: str | None) -> str:
    """The DNS name of the certificate `openssl s_client` got through the VIP (or '')."""
    name = ["-servername", sni] if sni else ["-noservername"]
    hello = subprocess.run(
        _ns(ns, "openssl", "s_client", "-connect", f"[{VIP}]:443", *name,
            "-CAfile", str(ca), "-verify_return_error"),
        input="", capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    if hello.returncode != 0:
        return ""
    x509 = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName"],
        input=hello.stdout, capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return x509.stdout.split("DNS:", 1)[1].strip() if "DNS:" in x509.stdout else ""


def _status(sock: str) -> dict[str, Any]:
    """The VIP's part of the instance's status (what `v6lb status --json` prints)."""
    (vip,) = [v for v in query(sock)["proxy"]["vips"] if v["name"] == "pass"]
    return vip  # type: ignore[no-any-return]


@pytest.mark.parametrize("engine", ["builtin", "haproxy"])
def test_tls_passthrough_in_a_namespace(engine: str, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root (CI runs as root)"
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for port, name in CERTS.items():
        cert = ca.issue_cert(name)
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{port}.crt"))
        cert.private_key_pem.write_to_path(str(tmp_path / f"{port}.key"))
    tag = f"{os.getpid() % 10000}{engine[0]}"
    sock = f"/run/v6lb/sni-{tag}.sock"
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(CONFIG.format(tag=tag, sock=sock, vip=VIP, be=BE))
    (tmp_path / "probe.py").write_text(PROBE)
    assert main(["check", str(cfg)]) == 0
    procs: list[subprocess.Popen[str]] = []
    with namespaces("lb", tag="sni") as names:
        ns = names["lb"]
        batch(ns, *(f"address add {a}/128 dev lo nodad" for a in (VIP, BE)))
        try:
            for port in CERTS:
                procs.append(subprocess.Popen(
                    _ns(ns, "openssl", "s_server", "-accept", f"[{BE}]:{port}", "-www",
                        "-cert", str(tmp_path / f"{port}.crt"),
                        "-key", str(tmp_path / f"{port}.key")),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                ))  # fmt: skip
            lb = subprocess.Popen(
                [sys.executable, "-m", "v6lb.cli", "run", str(cfg), "--netns", ns, "--proxy", engine],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(lb)
            wait_for(
                "the VIP to serve",
                lambda: _seen(ns, tmp_path / "ca.pem", "a.example.com") or lb.poll() is not None,
                20,
                (ControlError, OSError),
            )
            assert lb.poll() is None, lb.communicate()[1]
            seen = [_seen(ns, tmp_path / "ca.pem", n)
                    for n in ("a.example.com", "x.example.com", "a.b.example.com", None)]  # fmt: skip
            # each backend's own certificate: by exact name, wildcard, default pool (twice)
            assert seen == ["a.example.com", "*.example.com"] + ["default.example.net"] * 2

            r = subprocess.run(_ns(ns, sys.executable, str(tmp_path / "probe.py"), VIP),
                               capture_output=True, text=True, timeout=30)  # fmt: skip
            assert r.returncode == 0, r.stderr
            (garbage, garbage_got), (silent, silent_got) = json.loads(r.stdout)
            assert garbage < 0.8 and garbage_got == ""  # closed at once, nothing relayed
            assert 0.95 <= silent < 3 and silent_got == ""  # at timeouts.connect (1 s)

            vip = _status(sock)
            counts = [b["connections"] for b in vip["backends"]]
            assert counts[0] >= 2 and counts[1] >= 1 and counts[2] >= 2, vip["backends"]
            if engine == "builtin":
                assert vip["errors"]["tls_hello_not_tls"] == 1, vip["errors"]
                assert vip["errors"]["tls_hello_timeout"] == 1, vip["errors"]
            else:
                assert vip["errors"]["dreq"] >= 2, vip["errors"]  # HAProxy's denied requests

            # `v6lb ctl drain`: the route's only backend takes no new connection
            r = subprocess.run(
                [sys.executable, "-m", "v6lb.cli", "ctl", "drain", "pass", f"[{BE}]:8441",
                 "--control-socket", sock],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert _seen(ns, tmp_path / "ca.pem", "a.example.com") == ""
            assert _seen(ns, tmp_path / "ca.pem", "b.example.com") == "*.example.com"
            assert [b["drain"] for b in _status(sock)["backends"]] == [True, False, False]
            if engine == "builtin":
                assert _status(sock)["errors"]["no_healthy_backend"] == 1
            lb.send_signal(signal.SIGTERM)
            assert lb.wait(20) == 0, lb.communicate()[1]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
    assert not os.path.exists(sock)
