"""`v6lb run --proxy builtin` in a network namespace: a proxy-l4 VIP with PROXY v2, for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from v6lb.cli import main
from v6lb.core.proxyproto import decode

VIP = "2001:db8:77::80"
BACKEND = "2001:db8:77::1"
CLIENT = "2001:db8:77::100"

CONFIG = f"""
lb: {{instance: prx, control_socket: /run/v6lb/prx-test.sock}}
vips:
  - name: web
    address: "{VIP}"
    ports: [8080]
    mode: proxy-l4
    scheduler: round-robin
    proxy_protocol: v2
    health: {{type: none}}
    backends: [{{address: "{BACKEND}", port: 9000}}]
"""

BACKEND_SERVER = textwrap.dedent(
    f"""
    import socket, sys
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("{BACKEND}", 9000)); s.listen(8)
    print("ready", flush=True)
    c, _ = s.accept()
    data = b""
    while not data.endswith(b"ping"):
        chunk = c.recv(4096)
        if not chunk: break
        data += chunk
    sys.stdout.write(data.hex() + "\\n"); sys.stdout.flush()
    c.sendall(b"pong"); c.close()
    """
)

CLIENT_PROG = textwrap.dedent(
    f"""
    import socket, sys
    c = socket.socket(socket.AF_INET6)
    c.bind(("{CLIENT}", 0))
    c.settimeout(10)
    c.connect(("{VIP}", 8080))
    c.sendall(b"ping")
    print(c.getsockname()[1], c.recv(100).decode(), flush=True)
    """
)


def _ns(name: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", name, *cmd]


@pytest.mark.root
def test_builtin_proxy_l4_sends_proxy_v2_in_a_namespace(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root (CI runs as root)"
    ns = f"v6lb-x-{os.getpid()}"
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(CONFIG)
    procs: list[subprocess.Popen[str]] = []
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(_ns(ns, "ip", "link", "set", "lo", "up"), check=True)
        for a in (VIP, BACKEND, CLIENT):
            subprocess.run(
                _ns(ns, "ip", "-6", "addr", "add", f"{a}/128", "dev", "lo", "nodad"), check=True
            )
        backend = subprocess.Popen(
            _ns(ns, sys.executable, "-c", BACKEND_SERVER), stdout=subprocess.PIPE, text=True
        )
        procs.append(backend)
        assert backend.stdout is not None and backend.stdout.readline().strip() == "ready"
        lb = subprocess.Popen(
            [sys.executable, "-m", "v6lb.cli", "run", str(cfg), "--netns", ns, "--proxy", "builtin"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(lb)
        out = ""
        for _ in range(50):  # the listener comes up within a few hundred ms
            r = subprocess.run(
                _ns(ns, sys.executable, "-c", CLIENT_PROG), capture_output=True, text=True
            )
            if r.returncode == 0:
                out = r.stdout
                break
            time.sleep(0.2)
        assert out, "the proxy never accepted a connection"
        cport, reply = out.split()
        assert reply == "pong"
        raw = bytes.fromhex(backend.stdout.readline().strip())
        decoded = decode(raw)
        assert decoded is not None
        header, consumed = decoded
        assert raw[consumed:] == b"ping"
        assert (str(header.src), header.src_port) == (CLIENT, int(cport))
        assert (str(header.dst), header.dst_port) == (VIP, 8080)
        lb.send_signal(signal.SIGTERM)
        assert lb.wait(15) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_proxy_flag_without_a_proxy_vip_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "nat.yaml"
    cfg.write_text(
        'vips: [{name: n, address: "2001:db8::80", ports: [80], mode: nat, '
        'backends: [{address: "fd00::1"}]}]\n'
    )
    assert main(["run", str(cfg), "--proxy", "haproxy"]) == 2
    err = capsys.readouterr().err
    assert "--proxy haproxy needs a proxy-l4 or proxy-l7 VIP" in err
