"""1 GB each way through a proxy-l7 VIP, on both engines: real curl, nginx, the proxy's RSS.

nginx (Debian, one worker) on [::1] serves a 1 GiB file of random bytes and stores
uploads (``dav_methods PUT``), logging method, status, ``$request_length``,
``$bytes_sent``, ``Transfer-Encoding`` and ``Expect`` of each request. The proxy runs in a process of
its own: the builtin engine (``ProxyServer`` on uvloop, as ``v6lb run`` serves it, default
``write_high`` of 256 KiB, no ``max_request_bytes``) or HAProxy 2.6 with the config v6lb
renders. Through it, with curl:

* a 1 GiB download, checksummed as it arrives (coreutils ``cksum``): the file's CRC-32
  and size;
* a 1 GiB chunked upload (curl sends ``Expect: 100-continue`` and gets the 100 from the
  proxy, or from nginx through HAProxy): the file nginx stored has the same CRC and size;
* a slow reader: a client that asks for the 1 GiB file, reads 1 MiB and then stops for
  a second; nginx's log then shows it sent a few MB on that request, not the file.

The proxy's peak RSS (``VmHWM`` in /proc) over the whole run stays within
``RSS_GROWTH`` of its RSS when it started listening (the bound docs/proxy.md states).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from netns_helpers import wait_for
from v6lb.model.config import parse_config
from v6lb.render.haproxy import render_haproxy

pytestmark = [
    pytest.mark.tool,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("nginx", "curl", "haproxy")),
        reason="needs nginx, curl and haproxy (make apt)",
    ),
]

GIB = 1 << 30
MIB = 1 << 20
BLOCK = 64 * MIB
RSS_GROWTH = 16 * MIB  # what either proxy may add to its RSS while moving 2 GiB

NGINX = """
{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    log_format seen '$request_method $uri $status $request_length $bytes_sent '
                    '"$http_transfer_encoding" "$http_expect"';
    access_log {d}/access.log seen;
    client_body_temp_path {d}/body;
    proxy_temp_path {d};
    fastcgi_temp_path {d};
    uwsgi_temp_path {d};
    scgi_temp_path {d};
    client_max_body_size 0;
    sendfile on;
    server {{
        listen [::1]:{port};
        root {d}/www;
        location /files/ {{ dav_methods PUT; }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(100):
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            socket.create_connection(("::1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on [::1]:{port}")


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


class Nginx:
    def __init__(self, d: Path) -> None:
        self.d = d
        self.port = _free_port()
        (d / "www" / "files").mkdir(parents=True)
        (d / "body").mkdir()
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = d / "nginx.conf"
        conf.write_text(NGINX.format(d=d, port=self.port, user=user))
        self.proc = subprocess.Popen(["nginx", "-c", str(conf)], stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc)

    def log(self) -> list[list[str]]:
        return [line.split() for line in (self.d / "access.log").read_text().splitlines()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _cksum(path: Path | None = None, stdin: object = None) -> str:
    """coreutils' ``cksum``: the CRC-32 and the size (0.3 s for 1 GiB, where Python's
    SHA-256 takes 2 s on this machine)."""
    argv = ["cksum"] if path is None else ["cksum", str(path)]
    out = subprocess.run(argv, stdin=stdin, capture_output=True, check=True, text=True)
    return " ".join(out.stdout.split()[:2])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, str]]:
    """nginx, the 1 GiB file it serves (16 different rotations of 64 MiB of random bytes)
    and the file's checksum."""
    # In memory (tmpfs) when there is one: writing 1 GiB to this machine's disk takes 8 s
    shm = Path("/dev/shm")
    where = tmp_path_factory.mktemp("nginx")
    if shm.is_dir() and shutil.disk_usage(shm).free > 4 * GIB:
        where = Path(tempfile.mkdtemp(prefix="v6lb-stream-", dir=shm))
    nginx = Nginx(where)
    path = nginx.d / "www" / "files" / "big.bin"
    base = os.urandom(BLOCK)
    buf = bytearray(BLOCK)
    with open(path, "wb") as f:
        for i in range(GIB // BLOCK):
            k = i * 4099
            buf[: BLOCK - k] = base[k:]
            buf[BLOCK - k :] = base[:k]
            f.write(buf)
    try:
        yield nginx, _cksum(path)
    finally:
        nginx.stop()
        if where.parent == shm:
            shutil.rmtree(where)


def serve_builtin(backend_port: int) -> None:
    """The proxy process: the builtin engine on uvloop; prints its port, runs until SIGTERM."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_proxy_fixtures import l7_vip
    from v6lb.engines.proxy import ProxyServer, install_uvloop

    stop = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with ProxyServer([l7_vip([backend_port], max_request_bytes=None)]) as server:
            print(server.addresses("web")[0][1], flush=True)
            await stop.wait()

    install_uvloop()
    asyncio.run(main())


class Proxy:
    """The engine under test in a process of its own, in front of nginx."""

    def __init__(self, engine: str, backend_port: int, d: Path) -> None:
        if engine == "builtin":
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(backend_port)], stdout=subprocess.PIPE
            )
            assert self.proc.stdout is not None
            self.port = int(self.proc.stdout.readline())
        else:
            self.port = _free_port()
            raw = {"vips": [{"name": "web", "address": "fd00:5::1", "ports": [self.port],
                             "mode": "proxy-l7", "scheduler": "round-robin",
                             "health": {"type": "none"},
                             "backends": [{"address": "::1", "port": backend_port}]}]}  # fmt: skip
            config = parse_config(raw, "stream.yaml")
            loopback = replace(config.vips[0], address=IPv6Address("::1"))  # refused in a file
            cfg = d / "haproxy.cfg"
            cfg.write_text(render_haproxy(replace(config, vips=(loopback,))))
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)])
        _wait_port(self.port, self.proc)
        self.rss0 = _status(self.proc.pid, "VmRSS")

    def peak_growth(self) -> int:
        return _status(self.proc.pid, "VmHWM") - self.rss0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _download(url: str) -> str:
    """curl's output, checksummed by cksum as it arrives."""
    curl = subprocess.Popen(
        ["curl", "-sS", "--fail", "--http1.1", "-o", "-", url], stdout=subprocess.PIPE
    )
    try:
        sum_ = _cksum(stdin=curl.stdout)
    finally:
        assert curl.stdout is not None
        curl.stdout.close()
    assert curl.wait(60) == 0
    return sum_


async def _upload(url: str, path: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        *("curl", "-sS", "-v", "--fail", "--http1.1", "-o", "/dev/null"),
        *("-H", "Transfer-Encoding: chunked", "-T", str(path), url),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    return err.decode(errors="replace")


async def _slow_reader(port: int, path: str) -> None:
    """Ask for the big file, read 1 MiB, then read nothing for a second; then hang up."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("::1", port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = 0
    while got < MIB:
        data = await loop.sock_recv(sock, 65536)
        assert data
        got += len(data)
    await asyncio.sleep(1.0)
    sock.close()


@pytest.mark.parametrize("engine", ["builtin", "haproxy"])
def test_1gib_each_way_and_a_slow_reader_in_bounded_memory(
    site: tuple[Nginx, str], engine: str, tmp_path: Path
) -> None:
    nginx, digest = site
    proxy = Proxy(engine, nginx.port, tmp_path)
    big = nginx.d / "www" / "files" / "big.bin"
    stored = nginx.d / "www" / "files" / f"up-{engine}.bin"
    base = f"http://[::1]:{proxy.port}/files"
    paths = ("/files/big.bin", f"/files/up-{engine}.bin")

    def logged() -> list[list[str]]:
        return [x for x in nginx.log() if x[1] in paths]

    before = len(logged())
    try:
        assert _download(f"{base}/big.bin") == digest
        err = asyncio.run(_upload(f"{base}/up-{engine}.bin", big))
        assert "< HTTP/1.1 100 Continue" in err, err[-2000:]
        assert _cksum(stored) == digest
        asyncio.run(_slow_reader(proxy.port, "/files/big.bin"))
        # nginx logs the slow request once the proxy has closed its connection
        wait_for("nginx's three log lines", lambda: len(logged()) >= before + 3, 10, ())
        growth = proxy.peak_growth()
    finally:
        proxy.stop()
        stored.unlink(missing_ok=True)
    lines = logged()
    assert len(lines) == before + 3, lines[before:]
    download, upload, slow = lines[-3:]
    assert download[:3] == ["GET", "/files/big.bin", "200"] and int(download[4]) > GIB
    assert upload[:3] == ["PUT", f"/files/up-{engine}.bin", "201"]
    assert upload[5] == '"chunked"' and int(upload[3]) > GIB
    # the builtin answers Expect itself and never forwards it; HAProxy forwards it
    assert upload[6] == ('"-"' if engine == "builtin" else '"100-continue"'), upload
    assert slow[:2] == ["GET", "/files/big.bin"]
    assert int(slow[4]) < 64 * MIB, slow  # backpressure reached nginx: it stopped sending
    print(f"{engine}: RSS {proxy.rss0 / MIB:.1f} MiB at start, peak +{growth / MIB:.1f} MiB;"
          f" slow reader: nginx sent {slow[4]} bytes")  # fmt: skip
    assert growth < RSS_GROWTH, growth


if __name__ == "__main__":
    serve_builtin(int(sys.argv[1]))
