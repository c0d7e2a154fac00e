"""TLS termination on proxy-l7: the ``tls:`` config, the file checks, the builtin engine
on loopback (SNI, forwarding headers, bad handshakes counted), the HAProxy render."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from test_proxy_fixtures import (
    Backend_,
    HttpBackend,
    header,
    l4_vip,
    l7_vip,
    loop_kind,  # noqa: F401 (autouse: every test on asyncio and on uvloop)
    read_response,
    run,
)
from v6lb.cli import main
from v6lb.engines.proxy import ProxyServer
from v6lb.engines.proxy.tls import check_tls, load_tls
from v6lb.model.config import ConfigError, TlsCertificate, TlsOptions, parse_config
from v6lb.model.schema import Where
from v6lb.render.haproxy import render_haproxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, two server certificates (www.example.com, api.example.com) and their files."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    out: dict[str, Any] = {"ca": ca, "dir": d}
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name in ("www", "api"):
        cert = ca.issue_cert(f"{name}.example.com")
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
    return out


def _tls(d: Path, **kw: Any) -> TlsOptions:
    return TlsOptions(
        certificates=(
            TlsCertificate(str(d / "www.crt"), str(d / "www.key"), ("www.example.com",)),
            TlsCertificate(str(d / "api.crt"), str(d / "api.key"), ("api.example.com",)),
        ),
        **kw,
    )


def _config(tls: dict[str, Any], file: str = "/etc/v6lb/lb.yaml") -> Any:
    return parse_config(
        {
            "vips": [
                {
                    "name": "web",
                    "address": "2001:db8::10",
                    "ports": [443],
                    "mode": "proxy-l7",
                    "backends": [{"address": "2001:db8::20", "port": 80}],
                    "tls": tls,
                }
            ]
        },
        file,
    )


# --- config and file checks -----------------------------------------------------------


def test_tls_config_fields_and_errors() -> None:
    c = _config(
        {
            "certificates": [
                {"cert": "certs/www.crt", "key": "/k/www.key", "names": ["WWW.example.com"]},
                {"cert": "api.crt", "key": "api.key", "names": ["*.example.org"]},
            ],
            "min_version": 1.3,
            "unknown_sni": "refuse",
            "client_ca": "ca.pem",
        }
    )
    tls = c.vips[0].options.tls
    assert tls.certificates[0] == TlsCertificate(
        "/etc/v6lb/certs/www.crt", "/k/www.key", ("www.example.com",)
    )
    assert (tls.min_version, tls.unknown_sni, tls.client_ca, tls.alpn) == (
        "1.3",
        "refuse",
        "/etc/v6lb/ca.pem",
        ("h2", "http/1.1"),  # proxy-l7's default: HTTP/2 first
    )
    bad = [
        ({"certificates": []}, "vips[0].tls.certificates", "empty"),
        ({"certificates": [{"cert": "a"}]}, "vips[0].tls.certificates[0].key", "required"),
        (
            {"certificates": [{"cert": "a", "key": "b"}], "alpn": ["h3"]},
            "vips[0].tls.alpn[0]",
            "h2, http/1.1",
        ),
        ({"certificates": [{"cert": "a", "key": "b"}], "min_version": "1.1"}, "min_version", ""),
        (
            {"certificates": [{"cert": "a", "key": "b", "names": ["a b"]}]},
            "vips[0].tls.certificates[0].names[0]",
            "not a DNS name",
        ),
    ]
    for tls_raw, path, words in bad:
        with pytest.raises(ConfigError) as err:
            _config(tls_raw)
        assert path in err.value.path and words in str(err.value), str(err.value)
    # proxy-l4 relays the plain stream: http/1.1 only, h2 refused and named
    l4 = {"certificates": [{"cert": "a", "key": "b"}]}
    raw = {"name": "t", "address": "2001:db8::11", "ports": [443], "mode": "proxy-l4"}
    raw["backends"] = [{"address": "2001:db8::20", "port": 80}]
    got = parse_config({"vips": [{**raw, "tls": l4}]}, "/etc/v6lb/lb.yaml")
    assert got.vips[0].options.tls.alpn == ("http/1.1",)
    with pytest.raises(ConfigError) as err:
        parse_config({"vips": [{**raw, "tls": {**l4, "alpn": ["h2"]}}]}, "/etc/v6lb/lb.yaml")
    assert err.value.path.endswith("vips[0].tls.alpn[0]") and "proxy-l4" in str(err.value)


def test_certificate_files_checked_and_named(pki: dict[str, Any], tmp_path: Path) -> None:
    d = pki["dir"]
    where = Where("lb.yaml", "vips[0].tls")
    load_tls(_tls(d), where)  # good files load
    missing = TlsOptions(
        certificates=(TlsCertificate(str(tmp_path / "no.crt"), str(d / "www.key")),)
    )
    with pytest.raises(ConfigError) as err:
        load_tls(missing, where)
    assert err.value.path == "vips[0].tls.certificates[0].cert"
    assert "no.crt" in str(err.value) and err.value.file == "lb.yaml"
    mismatch = TlsOptions(certificates=(TlsCertificate(str(d / "www.crt"), str(d / "api.key")),))
    with pytest.raises(ConfigError) as err:
        load_tls(mismatch, where)
    assert err.value.path == "vips[0].tls.certificates[0].key"
    assert "does not match" in str(err.value)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    junk = TlsOptions(
        certificates=(TlsCertificate(str(d / "www.crt"), str(d / "www.key")),),
        client_ca=str(tmp_path / "junk.pem"),
    )
    with pytest.raises(ConfigError) as err:
        load_tls(junk, where)
    assert err.value.path == "vips[0].tls.client_ca" and "junk.pem" in str(err.value)
    # `v6lb check`'s entry: the VIP's index in the file
    cfg = _config({"certificates": [{"cert": str(d / "www.crt"), "key": str(d / "api.key")}]})
    with pytest.raises(ConfigError, match=r"vips\[0\]\.tls\.certificates\[0\]\.key"):
        check_tls(cfg)


def test_v6lb_check_reads_the_certificates(
    pki: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = pki["dir"]
    for name in ("www.crt", "www.key", "api.key"):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    text = (
        "vips:\n  - {name: web, address: '2001:db8::10', ports: [443], mode: proxy-l7,\n"
        "     backends: [{address: '2001:db8::20', port: 80}],\n"
        "     tls: {certificates: [{cert: www.crt, key: KEY, names: [www.example.com]}]}}\n"
    )
    good = tmp_path / "good.yaml"
    good.write_text(text.replace("KEY", "www.key"))
    assert main(["check", str(good)]) == 0
    assert "TLS 1 certificate(s), TLS 1.2+, ALPN h2,http/1.1" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("KEY", "api.key"))
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"v6lb: error: {bad}: vips[0].tls.certificates[0].key: the key ")
    assert f"{tmp_path}/api.key does not match the certificate {tmp_path}/www.crt" in err


# --- the builtin engine on loopback -------------------------------------------------


def _client(pki: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    pki["ca"].configure_trust(ctx)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


async def _get(port: int, ctx: ssl.SSLContext, sni: str | None) -> tuple[Any, int, bytes]:
    r, w = await asyncio.open_connection(
        "::1", port, ssl=ctx, server_hostname=sni or "", ssl_handshake_timeout=5
    )
    obj = w.get_extra_info("ssl_object")
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Proto: http\r\n\r\n")
    status, _, body = await read_response(r)
    w.close()
    return obj, status, body


def test_builtin_tls_sni_forwarding_and_bad_handshakes(pki: dict[str, Any]) -> None:
    d = pki["dir"]

    async def main() -> None:
        be = await HttpBackend("b0").start()
        base = l7_vip([be.port], name="tls")
        opts = dataclasses.replace(base.options, tls=_tls(d))
        strict = dataclasses.replace(
            base,
            name="strict",
            options=dataclasses.replace(opts, tls=_tls(d, unknown_sni="refuse")),
        )
        vips = [dataclasses.replace(base, options=opts), strict]
        async with ProxyServer(vips, header_timeout=1.0) as s:
            port = s.addresses("tls")[0][1]
            ctx = _client(pki)
            for name in ("www.example.com", "api.example.com"):
                obj, status, body = await _get(port, ctx, name)
                assert (status, body) == (200, b"b0")
                assert obj.selected_alpn_protocol() == "http/1.1"
                assert obj.getpeercert()["subjectAltName"] == (("DNS", name),)
            head = be.heads[-1]
            assert header(head, "X-Forwarded-Proto") == ["https"]
            assert header(head, "X-Forwarded-For") == ["::1"]
            assert header(head, "Forwarded")[0].endswith(";proto=https")
            # an unknown SNI gets the default (first) certificate: name check off to see it
            loose = _client(pki)
            loose.check_hostname = False
            obj, status, _ = await _get(port, loose, "other.example.net")
            assert status == 200
            assert obj.getpeercert()["subjectAltName"] == (("DNS", "www.example.com"),)
            # ... or is refused
            with pytest.raises(ssl.SSLError):
                await _get(s.addresses("strict")[0][1], loose, "other.example.net")
            # garbage instead of a ClientHello; a silent client: cut off, counted
            r1, w1 = await asyncio.open_connection("::1", port)
            w1.write(b"GET / HTTP/1.1\r\n\r\n" * 4)
            got = await asyncio.wait_for(r1.read(), 2)  # closed at once: an alert at most
            assert got == b"" or got[0] == 0x15, got
            t0 = time.monotonic()
            r2, w2 = await asyncio.open_connection("::1", port)
            _, status, _ = await _get(port, ctx, "www.example.com")  # others are served
            assert status == 200
            assert await asyncio.wait_for(r2.read(), 3) == b""
            assert 0.9 <= time.monotonic() - t0 < 2.5
            w1.close()
            w2.close()
            # SIGHUP's path: the certificates read again, for new connections
            s.reload_tls({"tls": s.load_tls(vips[0])})
            _, status, _ = await _get(port, ctx, "api.example.com")
            assert status == 200
            c = s.counters()
            assert c["tls"]["errors"] == {"tls_handshake_failed": 1, "tls_handshake_timeout": 1}
            assert c["strict"]["errors"] == {"tls_unknown_sni": 1, "tls_handshake_failed": 1}
        await be.stop()

    run(main())


def test_builtin_proxy_l4_tls_relays_and_half_closes(pki: dict[str, Any]) -> None:
    """proxy-l4 with tls: the plain stream to the backend; its EOF is our close_notify."""
    d = pki["dir"]

    async def main() -> None:
        async def pong(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            got = await r.readexactly(4)
            w.write(got.upper())
            w.write_eof()  # the backend is done: the client must see the end
            await r.read()

        be = await Backend_(pong).start()
        base = l4_vip([be.port], pp=False)
        vip = dataclasses.replace(base, options=dataclasses.replace(base.options, tls=_tls(d)))
        async with ProxyServer([vip]) as s:
            r, w = await asyncio.open_connection(
                "::1", s.addresses()[0][1], ssl=_client(pki), server_hostname="api.example.com"
            )
            assert w.get_extra_info("peercert")["subjectAltName"] == (("DNS", "api.example.com"),)
            w.write(b"ping")
            assert await asyncio.wait_for(r.read(), 5) == b"PING"  # then EOF (close_notify)
            w.close()
        await be.stop()

    run(main())


def test_builtin_tls_records_coalesced_split_and_closed(pki: dict[str, Any]) -> None:
    """The read path record by record: several records in one segment, one split across
    two segments, full 16 KiB records, the last data and the close_notify in one segment
    all reach the backend in order; the backend's EOF comes back as our close_notify."""
    d = pki["dir"]

    async def main() -> None:
        async def upper(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while got := await r.read(65536):
                w.write(got.upper())
            w.write_eof()

        be = await Backend_(upper).start()
        base = l4_vip([be.port], pp=False)
        vip = dataclasses.replace(base, options=dataclasses.replace(base.options, tls=_tls(d)))
        async with ProxyServer([vip]) as s:
            r, w = await asyncio.open_connection("::1", s.addresses()[0][1])
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = _client(pki).wrap_bio(inc, out, server_hostname="www.example.com")
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    w.write(out.read())
                    inc.write(await asyncio.wait_for(r.read(65536), 5))
            obj.write(b"hi")
            w.write(out.read())  # the client's Finished and a first record: echoed
            first = b""
            while first != b"HI":
                inc.write(await asyncio.wait_for(r.read(65536), 5))
                with contextlib.suppress(ssl.SSLWantReadError):
                    first += obj.read(65536)
            parts = [b"a" * 10, b"b" * 100, b"c" * 16384, bytes(range(97, 123)) * 700, b"d" * 7]
            records = []
            for part in parts:
                obj.write(part)  # one record each (at most 16 KiB of plaintext a record)
                records.append(out.read())
            with pytest.raises(ssl.SSLWantReadError):
                obj.unwrap()  # our close_notify; the server's is to come
            bye = out.read()
            w.write(b"".join(records[:3]) + records[3][:100])
            await w.drain()
            await asyncio.sleep(0.05)  # two segments: the split record's halves apart
            w.write(records[3][100:] + records[4] + bye)
            got = bytearray()
            while True:
                data = await asyncio.wait_for(r.read(65536), 5)
                inc.write(data)
                try:
                    while chunk := obj.read(65536):
                        got += chunk
                except ssl.SSLWantReadError:
                    assert data, "the connection ended without a close_notify"
                    continue
                except ssl.SSLZeroReturnError:
                    break
            assert got == b"".join(parts).upper()
            w.close()
        await be.stop()

    run(main())


# --- HAProxy's rendering --------------------------------------------------------------


def test_haproxy_renders_the_tls_bind(pki: dict[str, Any]) -> None:
    d = pki["dir"]
    vip = dataclasses.replace(l7_vip([8080], name="web"), ports=(443,))
    tls = _tls(d, unknown_sni="refuse", min_version="1.3", client_ca=str(d / "ca.pem"))
    vip = dataclasses.replace(vip, options=dataclasses.replace(vip.options, tls=tls))
    text = render_haproxy([vip], tls_dir="/run/v6lb-haproxy")
    bind = [line for line in text.splitlines() if line.strip().startswith("bind")][0]
    assert bind.split() == [
        "bind",
        "[::1]:443",
        "v6only",
        "ssl",
        "crt-list",
        "/run/v6lb-haproxy/web.crtlist",
        "alpn",
        "http/1.1",
        "ssl-min-ver",
        "TLSv1.3",
        "strict-sni",
        "ca-file",
        "/run/v6lb-haproxy/web.ca.pem",
        "verify",
        "required",
    ]
    assert "    http-request set-header X-Forwarded-Proto https" in text
    assert ';proto=https"' in text
