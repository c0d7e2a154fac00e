"""TLS passthrough by SNI on proxy-l4: the ``sni_routes`` config, and both engines on
[::1] in front of TLS backends holding their own certificates (made by trustme). Python
ssl clients with several SNIs check which backend answered and whose certificate they
saw; garbage, a silent client, a ClientHello cut short and an unknown SNI are counted."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from test_proxy_fixtures import (
    LO,
    l4_vip,
    loop_kind,  # noqa: F401 (autouse: every test on asyncio and on uvloop)
    run,
)
from v6lb.cli import main
from v6lb.core import proxyproto
from v6lb.core.backends import BackendPool, BackendSpec
from v6lb.engines.proxy import ProxyServer
from v6lb.engines.proxy.policy import Picker
from v6lb.model.config import ConfigError, Scheduler, Timeouts, Vip, parse_config
from v6lb.model.config_dump import dump
from v6lb.model.sni import SniRoute, route_for
from v6lb.render.haproxy import render_haproxy

pytestmark = pytest.mark.timeout(60)

NAMES = {"a": ["a.example.com"], "wild": ["*.example.com"], "dflt": ["default.example.net"]}


def _yaml_vip(**more: Any) -> dict[str, Any]:
    vip: dict[str, Any] = {
        "name": "tls",
        "address": "2001:db8::10",
        "ports": [443],
        "mode": "proxy-l4",
        "backends": [
            {"address": "2001:db8::a", "port": 8443},
            {"address": "2001:db8::b", "port": 8443},
            {"address": "2001:db8::b", "port": 9443},
            {"address": "2001:db8::c", "port": 8443},
        ],
        "sni_routes": [
            {"names": ["a.example.com", "A.example.org."], "backends": ["2001:db8::a"]},
            {"names": ["*.example.com"], "backends": ["[2001:db8::b]:8443", "[2001:db8::b]:9443"]},
        ],
    }
    vip.update(more)
    return vip


def _parse(vip: dict[str, Any]) -> Any:
    return parse_config({"vips": [vip]}, "/etc/v6lb/lb.yaml")


def test_sni_routes_config_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _parse(_yaml_vip())
    opts = config.vips[0].options
    assert opts.sni_routes == (
        SniRoute(("a.example.com", "a.example.org"), (0,)),
        SniRoute(("*.example.com",), (1, 2)),
    )
    assert opts.unknown_sni == "default"
    assert parse_config(yaml.safe_load(dump(config)), config.source) == config
    routes = opts.sni_routes
    # exact before wildcard; a wildcard covers one label; case and a final dot ignored
    assert route_for(routes, "A.Example.com.") == 0
    assert route_for(routes, "x.example.com") == 1
    assert route_for(routes, "a.b.example.com") == -1
    assert route_for(routes, None) == -1

    bad = [
        (dict(unknown_sni="refuse"), "vips[0].backends[3]", "in no SNI route"),
        (
            dict(
                sni_routes=[
                    {
                        "names": ["x.y"],
                        "backends": [
                            "2001:db8::a",
                            "2001:db8::c",
                            "[2001:db8::b]:8443",
                            "[2001:db8::b]:9443",
                        ],
                    }
                ]
            ),
            "vips[0].sni_routes",
            "no default pool",
        ),  # fmt: skip
        (
            dict(sni_routes=[{"names": ["x.y"], "backends": ["2001:db8::b"]}]),
            "vips[0].sni_routes[0].backends[0]",
            "add the port",
        ),
        (
            dict(sni_routes=[{"names": ["x.y"], "backends": ["2001:db8::99"]}]),
            "vips[0].sni_routes[0].backends[0]",
            "none of this VIP's backends",
        ),
        (
            dict(
                sni_routes=[
                    {"names": ["x.y"], "backends": ["2001:db8::a"]},
                    {"names": ["X.y"], "backends": ["2001:db8::c"]},
                ]
            ),
            "vips[0].sni_routes[1].names[0]",
            "in sni_routes[0] already",
        ),  # fmt: skip
        (
            dict(sni_routes=[{"names": ["a..b"], "backends": ["2001:db8::a"]}]),
            "vips[0].sni_routes[0].names[0]",
            "not a DNS name",
        ),
        (dict(sni_routes=[]), "vips[0].sni_routes", "empty list"),
        (dict(tls={"certificates": [{"cert": "a", "key": "b"}]}), "vips[0].sni_routes", "either"),
        (dict(protocol="udp"), "vips[0].sni_routes", "over TCP only"),
    ]
    for more, path, words in bad:
        with pytest.raises(ConfigError) as err:
            _parse(_yaml_vip(**more))
        assert err.value.path == path and words in str(err.value), (more, str(err.value))
    no_routes = _yaml_vip(unknown_sni="refuse")
    del no_routes["sni_routes"]
    with pytest.raises(ConfigError, match="applies to a VIP with `sni_routes`"):
        _parse(no_routes)
    l7 = _yaml_vip(mode="proxy-l7")
    with pytest.raises(ConfigError, match="does not fit mode proxy-l7"):
        _parse(l7)

    # `v6lb check` validates it (and names the field)
    good = tmp_path / "ok.yaml"
    good.write_text(yaml.safe_dump({"vips": [_yaml_vip()]}))
    assert main(["check", str(good)]) == 0
    broken = tmp_path / "bad.yaml"
    broken.write_text(yaml.safe_dump({"vips": [_yaml_vip(unknown_sni="refuse")]}))
    assert main(["check", str(broken)]) != 0
    assert "vips[0].backends[3]" in capsys.readouterr().err


def test_the_docs_example_is_valid() -> None:
    """docs/proxy.md's passthrough example parses, with the routes it describes."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "proxy.md").read_text()
    block = text.split("### TLS passthrough by SNI", 1)[1].split("```yaml\n", 1)[1]
    config = parse_config(yaml.safe_load(block.split("```", 1)[0]), "docs/proxy.md")
    opts = config.vips[0].options
    assert [r.backends for r in opts.sni_routes] == [(0,), (1, 2)]
    assert route_for(opts.sni_routes, "www.example.com") == 1
    assert route_for(opts.sni_routes, "example.com") == 1
    assert route_for(opts.sni_routes, "a.b.example.com") == -1  # the default pool: backend 3


def _picks(route: Picker, vip_picker: Picker, clients: list[IPv6Address]) -> set[int]:
    """What ``route`` picks, each pick counted as the proxy does (then given back)."""
    got = []
    for c in clients[:20]:
        got.append(route.pick(c))
        vip_picker.acquire(got[-1])
    for i in got:
        vip_picker.release(i)
    return set(got) | {route.pick(c) for c in clients}


def test_route_pickers_choose_among_their_backends() -> None:
    """A route's picker: only its backends, its own Maglev table, health and weights from
    the VIP's pool, connection counts shared with the VIP's picker."""
    pool = BackendPool([BackendSpec.of(f"2001:db8::{i + 1}", 443) for i in range(4)], seed=7)
    clients = [IPv6Address(f"2001:db8:c::{i:x}") for i in range(1, 400)]
    for kind in Scheduler:
        vip_picker = Picker(kind, pool, IPv6Address("2001:db8::443"))
        route = Picker(kind, pool, IPv6Address("2001:db8::443"), (1, 2), vip_picker.active)

        assert _picks(route, vip_picker, clients) == {1, 2}, kind
        pool.set_up(1, False)
        assert _picks(route, vip_picker, clients) == {2}, kind
        pool.set_up(2, False)
        assert route.pick(clients[0]) == -1
        pool.set_up(1, True)
        pool.set_up(2, True)
        if kind is Scheduler.LEAST_CONNECTIONS:
            vip_picker.acquire(1)  # a connection taken through another route or the VIP
            assert route.pick(clients[0]) == 2
            vip_picker.release(1)
    # Maglev over the route: the same client, the same backend, on every instance
    a = Picker(Scheduler.MAGLEV, pool, IPv6Address("2001:db8::443"), (0, 3))
    b = Picker(Scheduler.MAGLEV, pool_for_copy(pool), IPv6Address("2001:db8::443"), (0, 3))
    assert [a.pick(c) for c in clients] == [b.pick(c) for c in clients]
    assert {a.pick(c) for c in clients} == {0, 3}


def pool_for_copy(pool: BackendPool) -> BackendPool:
    return BackendPool(pool.specs, table_size=pool.size, seed=pool.seed)


# --- backends holding their own certificates ------------------------------------------


class TlsBackend:
    """A blocking TLS server on [::1] in a thread: reads a PROXY v2 header if told, then
    answers one line (its name) over TLS; records the SNI TLV each connection brought."""

    def __init__(self, name: str, ca: trustme.CA, pp: bool) -> None:
        self.name = name
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*NAMES[name]).configure_cert(self.ctx)
        self.pp = pp
        self.authority: list[bytes | None] = []
        self.sock = socket.socket(socket.AF_INET6)
        self.sock.bind(("::1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _exact(self, conn: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = conn.recv(n - len(out))
            if not got:
                raise ConnectionError("closed")
            out += got
        return out

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            if self.pp:
                head = self._exact(conn, 16)
                head += self._exact(conn, struct.unpack("!H", head[14:16])[0])
                got = proxyproto.decode(head)
                assert got is not None
                self.authority.append(got[0].tlv(proxyproto.Tlv.AUTHORITY))
            with self.ctx.wrap_socket(conn, server_side=True) as t:
                t.recv(100)
                t.sendall(self.name.encode() + b"\n")
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def pki() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def backends(pki: trustme.CA) -> Iterator[dict[str, TlsBackend]]:
    bes = {n: TlsBackend(n, pki, pp=True) for n in NAMES}
    yield bes
    for b in bes.values():
        b.close()


def _vips(bes: dict[str, TlsBackend], connect: float) -> list[Vip]:
    base = l4_vip([bes[n].port for n in NAMES], name="sni", pp=True,
                  timeouts=Timeouts(connect=connect, idle=30.0))  # fmt: skip
    routes = (SniRoute(("a.example.com",), (0,)), SniRoute(("*.example.com",), (1,)))
    sni = dataclasses.replace(base, options=dataclasses.replace(base.options, sni_routes=routes))
    strict = dataclasses.replace(
        sni,
        name="strict",
        backends=sni.backends[:2],
        options=dataclasses.replace(sni.options, unknown_sni="refuse"),
    )
    return [sni, strict]


def _client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False  # the SAN is compared below: an unknown name gets the default
    return ctx


async def _ask(port: int, ctx: ssl.SSLContext, sni: str | None) -> tuple[str, str]:
    """(the backend's answer, the first DNS name of the certificate the client saw)."""
    r, w = await asyncio.open_connection(
        "::1", port, ssl=ctx, server_hostname=sni or "", ssl_handshake_timeout=5
    )
    san = w.get_extra_info("peercert")["subjectAltName"][0][1]
    w.write(b"hello\n")
    line = await asyncio.wait_for(r.readline(), 5)
    w.close()
    return line.decode().strip(), san


def _records(msg: bytes, size: int) -> bytes:
    return b"".join(
        struct.pack("!BHH", 22, 0x0301, len(msg[i : i + size])) + msg[i : i + size]
        for i in range(0, len(msg), size)
    )


async def _fragmented(port: int, ctx: ssl.SSLContext, sni: str) -> tuple[str, str]:
    """A real handshake whose ClientHello is sent in 100-byte records, in several writes."""
    r, w = await asyncio.open_connection("::1", port)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    first = out.read()
    assert first[0] == 22 and len(first) == 5 + struct.unpack("!H", first[3:5])[0]
    data = _records(first[5:], 100)
    for i in range(0, len(data), 150):
        w.write(data[i : i + 150])
        await asyncio.sleep(0.01)
    while True:
        got = await asyncio.wait_for(r.read(65536), 5)
        assert got, "closed during the handshake"
        inc.write(got)
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            w.write(out.read())
    obj.write(b"hello\n")
    w.write(out.read())
    line = b""
    while not line.endswith(b"\n"):
        try:
            line += obj.read(100)
        except ssl.SSLWantReadError:
            got = await asyncio.wait_for(r.read(65536), 5)
            assert got
            inc.write(got)
    w.close()
    return line.decode().strip(), obj.getpeercert()["subjectAltName"][0][1]


def _hello(exts: bytes, sid: bytes = b"") -> bytes:
    """A ClientHello record (RFC 8446 §4.1.2) with these extensions and session id."""
    body = b"\x03\x03" + bytes(32) + bytes([len(sid)]) + sid + b"\x00\x02\x13\x01\x01\x00"
    body += struct.pack("!H", len(exts)) + exts
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return _records(msg, 16000)


def _sni(name: bytes) -> bytes:
    entry = struct.pack("!BH", 0, len(name)) + name
    return struct.pack("!HHH", 0, len(entry) + 2, len(entry)) + entry


BAD = {  # name: (first bytes, then EOF?)
    "garbage": (b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n", False),
    "silent": (b"", False),
    "cut": (_records(bytes([1, 0, 2, 0]) + bytes(100), 4000), False),  # says 512 bytes, sends 100
    "cut_eof": (_records(bytes([1, 0, 2, 0]) + bytes(100), 4000), True),
    "malformed": (_hello(b"", sid=bytes(33)), False),  # a 33-byte session id
    "too_big": (_hello(struct.pack("!HH", 21, 20000) + bytes(20000)), False),
    "bad_sni": (_hello(_sni(b"a b.example.com")), False),
}


async def _bad(port: int) -> dict[str, tuple[float, bytes]]:
    """Each of :data:`BAD` on its own connection: (seconds until closed, what came back)."""
    out = {}
    for name, (first, eof) in BAD.items():
        r, w = await asyncio.open_connection("::1", port)
        t0 = time.monotonic()
        w.write(first)
        if eof:
            w.write_eof()
        try:
            got = await asyncio.wait_for(r.read(), 5)
        except ConnectionResetError:
            got = b""
        out[name] = (time.monotonic() - t0, got)
        w.close()
    return out


def _expect_routes(answers: list[tuple[str, str]], split: str = "wild") -> None:
    names = {"a": "a.example.com", "wild": "*.example.com", "dflt": "default.example.net"}
    assert answers == [
        ("a", "a.example.com"),  # exact name
        ("wild", "*.example.com"),  # one label under the wildcard
        ("dflt", "default.example.net"),  # two labels: the default pool
        ("dflt", "default.example.net"),  # no SNI at all
        (split, names[split]),  # the ClientHello in 100-byte records
    ]


async def _all_routes(port: int, ctx: ssl.SSLContext) -> list[tuple[str, str]]:
    answers = [await _ask(port, ctx, n) for n in ("a.example.com", "x.example.com",
                                                   "a.b.example.com", None)]  # fmt: skip
    answers.append(await _fragmented(port, ctx, "y.example.com"))
    return answers


def test_builtin_routes_by_sni_and_counts_bad_hellos(
    pki: trustme.CA, backends: dict[str, TlsBackend]
) -> None:
    connect = 1.0

    async def go() -> None:
        async with ProxyServer(_vips(backends, connect)) as s:
            port = s.addresses("sni")[0][1]
            ctx = _client(pki)
            _expect_routes(await _all_routes(port, ctx))
            # the SNI reaches the backend in the PROXY v2 header (PP2_TYPE_AUTHORITY)
            assert backends["a"].authority == [b"a.example.com"]
            assert backends["dflt"].authority == [b"a.b.example.com", None]
            bad = await _bad(port)
            for name, (seconds, got) in bad.items():
                assert got == b"", name  # closed, nothing relayed
                slow = name in ("silent", "cut")  # a whole ClientHello is awaited
                # slow: at timeouts.connect (the sweep may be a quarter late; slack for a
                # loaded machine); fast: closed well before any timeout could
                assert connect <= seconds < connect * 1.25 + 1 if slow else seconds < 0.8, name
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await _ask(s.addresses("strict")[0][1], ctx, "other.example.net")
            assert await _ask(s.addresses("strict")[0][1], ctx, "a.example.com") == (
                "a",
                "a.example.com",
            )
            c = s.counters()
            assert c["sni"]["errors"] == {
                "tls_hello_not_tls": 1,
                "tls_hello_timeout": 2,
                "tls_hello_truncated": 1,
                "tls_hello_malformed": 1,
                "tls_hello_too_big": 1,
                "tls_hello_bad_sni": 1,
            }
            assert c["strict"]["errors"] == {"tls_unknown_sni": 1}
            assert c["sni"]["connections"] == 12

    run(go())


def _show_stat(path: str) -> list[dict[str, str]]:
    with socket.socket(socket.AF_UNIX) as u:
        u.connect(path)
        u.sendall(b"show stat\n")
        data = b""
        while chunk := u.recv(65536):
            data += chunk
    return list(csv.DictReader(io.StringIO(data.decode().lstrip("# "))))


def test_haproxy_routes_by_sni_and_refuses_bad_hellos(
    pki: trustme.CA, backends: dict[str, TlsBackend], tmp_path: Path
) -> None:
    """The same clients through HAProxy 2.6 running the rendered config."""
    connect = 1.0
    vips = _vips(backends, connect)
    ports = []
    for _ in vips:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            ports.append(int(s.getsockname()[1]))
    vips = [
        dataclasses.replace(v, ports=(p,), address=LO) for v, p in zip(vips, ports, strict=True)
    ]
    sock = str(tmp_path / "stats.sock")
    text = render_haproxy(vips, stats_socket=sock)
    assert "use_backend v6lb_sni_sni0 if { req.ssl_sni -i a.example.com }" in text
    assert "use_backend v6lb_sni_sni1 if { req.ssl_sni -m reg -i ^[^.]+[.]example[.]com$ }" in text
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stderr=subprocess.PIPE)

    async def go() -> None:
        for _ in range(50):
            try:
                socket.create_connection(("::1", ports[1]), timeout=0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        ctx = _client(pki)
        # HAProxy 2.6 reads the SNI in the first record only: a ClientHello spanning
        # records has none for it, and goes to the default pool
        _expect_routes(await _all_routes(ports[0], ctx), split="dflt")
        # HAProxy 2.6 sends no SNI TLV in passthrough (no `set-proxy-v2-tlv-fmt` before 2.9)
        assert backends["a"].authority == [None]
        bad = await _bad(ports[0])
        for name in ("garbage", "cut_eof", "too_big"):  # rejected at once
            assert bad[name][0] < 0.8 and bad[name][1] == b"", name
        for name in ("silent", "cut"):  # rejected at the inspect delay
            # HAProxy's delay runs from its accept, a few ms before the client's clock starts
            assert connect - 0.05 <= bad[name][0] < connect + 1 and bad[name][1] == b"", name
        # relayed: a first record with a ClientHello is accepted; the backend's TLS
        # answers an alert (decode_error; handshake_failure for the name with a space,
        # which HAProxy's wildcard pattern took)
        assert bad["malformed"][1] == b"\x15\x03\x03\x00\x02\x02\x32"
        assert bad["bad_sni"][1] == b"\x15\x03\x03\x00\x02\x02\x28"
        assert (len(backends["wild"].authority), len(backends["dflt"].authority)) == (2, 4)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _ask(ports[1], ctx, "other.example.net")
        assert await _ask(ports[1], ctx, "a.example.com") == ("a", "a.example.com")

    try:
        run(go())
        rows = {(r["pxname"], r["svname"]): r for r in _show_stat(sock)}
        # every refusal is a denied request of the frontend (HAProxy's `dreq`)
        assert rows[(f"v6lb_sni_{ports[0]}", "FRONTEND")]["dreq"] == "5"
        # strict: the unknown SNI, and the readiness probe above (connected, sent nothing)
        assert rows[(f"v6lb_strict_{ports[1]}", "FRONTEND")]["dreq"] == "2"
    finally:
        proc.terminate()
        proc.wait(10)
