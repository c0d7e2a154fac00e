"""TLS termination in a namespace, for both engines: `v6lb run --proxy builtin|haproxy`,
certificates made by trustme, curl over HTTPS with two SNI names (HTTP/1.1) and HTTP/2
(two requests on one connection), the lab httpd seeing
X-Forwarded-For and X-Forwarded-Proto: https; curl --http2 and --http1.1 to an nginx
backend whose access log shows what it saw (the client in X-Forwarded-For and
Forwarded, proto https); an unknown SNI (default certificate, or refused), garbage
instead of a ClientHello and a silent client: cut off and counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from netns_helpers import batch, namespaces

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]

VIP = "2001:db8:7e::80"
BACKEND = "2001:db8:7e::1"
CLIENT = "2001:db8:7e::100"
IDLE = 2  # seconds: the header timeout (min(10, idle)) bounds the handshake

CONFIG = """
lb: {{instance: tls{tag}, control_socket: {sock}}}
vips:
  - name: web
    address: "{vip}"
    ports: [443]
    mode: proxy-l7
    health: {{type: none}}
    timeouts: {{idle: {idle}}}
    backends: [{{address: "{backend}", port: 8080}}]
    tls:
      certificates:
        - {{cert: www.crt, key: www.key, names: [www.example.com]}}
        - {{cert: api.crt, key: api.key, names: [api.example.com]}}
  - name: strict
    address: "{vip}"
    ports: [8443]
    mode: proxy-l7
    health: {{type: none}}
    timeouts: {{idle: {idle}}}
    backends: [{{address: "{backend}", port: 8080}}]
    tls:
      unknown_sni: refuse
      certificates: [{{cert: www.crt, key: www.key, names: [www.example.com]}}]
  - name: stream
    address: "{vip}"
    ports: [7443]
    mode: proxy-l4
    health: {{type: none}}
    backends: [{{address: "{backend}", port: 8080}}]
    tls:
      certificates: [{{cert: www.crt, key: www.key}}]
  - name: ngx
    address: "{vip}"
    ports: [4443]
    mode: proxy-l7
    health: {{type: none}}
    backends: [{{address: "{backend}", port: 8081}}]
    tls:
      certificates: [{{cert: www.crt, key: www.key}}]
  - name: mtls
    address: "{vip}"
    ports: [9443]
    mode: proxy-l7
    health: {{type: none}}
    backends: [{{address: "{backend}", port: 8080}}]
    tls:
      client_ca: ca.pem
      min_version: "1.3"
      certificates: [{{cert: www.crt, key: www.key}}]
"""

# The nginx backend: what each request brought, one line each (fields between "|").
NGINX = """
{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    log_format seen escape=none '$request_uri|$server_protocol|$http_x_forwarded_for|'
                    '$http_x_forwarded_proto|$http_forwarded';
    access_log {d}/nginx-access.log seen;
    client_body_temp_path {d};
    proxy_temp_path {d};
    fastcgi_temp_path {d};
    uwsgi_temp_path {d};
    scgi_temp_path {d};
    server {{
        listen [{backend}]:8081;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

# Run in the namespace: the certificate an SNI gets (or the error), garbage, a silent client.
PROBE = textwrap.dedent(
    """
    import json, socket, ssl, sys, time
    vip, ca, what = sys.argv[1], sys.argv[2], sys.argv[3]
    def hello(port, sni):
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False
        s = socket.create_connection((vip, port), timeout=5)
        try:
            t = ctx.wrap_socket(s, server_hostname=sni)
        except (ssl.SSLError, OSError) as e:
            return "refused: " + type(e).__name__
        cert = t.getpeercert()
        t.close()
        return cert["subjectAltName"][0][1]
    if what == "sni":
        print(json.dumps([hello(443, "other.example.net"), hello(8443, "other.example.net"),
                          hello(8443, "www.example.com")]))
    else:
        g = socket.create_connection((vip, 443), timeout=10)
        g.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        t0 = time.monotonic()
        got = g.recv(100)
        garbage = [round(time.monotonic() - t0, 2), got[:1].hex()]
        q = socket.create_connection((vip, 443), timeout=10)
        t0 = time.monotonic()
        mid = hello(443, "api.example.com")  # another client is served meanwhile
        try:
            q.recv(100)
        except ConnectionResetError:
            pass
        print(json.dumps({"garbage": garbage, "silent": round(time.monotonic() - t0, 2),
                          "other": mid}))
    """
)


def _ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def _status(ns: str, sock: str) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "v6lb.cli", "status", "--control-socket", sock, "--json"],
        capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _vip_errors(status: dict[str, Any], name: str) -> dict[str, int]:
    for v in status["proxy"]["vips"]:
        if v["name"] == name:
            return v.get("errors", {})  # type: ignore[no-any-return]
    raise AssertionError(f"no VIP {name} in {status['proxy']}")


@pytest.mark.parametrize("engine", ["builtin", "haproxy"])
def test_tls_termination_in_a_namespace(engine: str, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "needs root (CI runs as root)"
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for name in ("www", "api"):
        cert = ca.issue_cert(f"{name}.example.com")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.crt"))
        cert.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
    tag = f"{os.getpid() % 10000}{engine[0]}"
    sock = f"/run/v6lb/tls-{tag}.sock"
    cfg = tmp_path / "lb.yaml"  # relative certificate paths: from the file's directory
    cfg.write_text(CONFIG.format(tag=tag, sock=sock, vip=VIP, backend=BACKEND, idle=IDLE))
    (tmp_path / "probe.py").write_text(PROBE)
    procs: list[subprocess.Popen[str]] = []
    with namespaces("lb", tag="tls") as names:
        ns = names["lb"]
        batch(ns, *(f"address add {a}/128 dev lo nodad" for a in (VIP, BACKEND, CLIENT)))
        try:
            httpd = [sys.executable, "-m", "v6lb.lab.httpd", "--node", "b0", "--address", BACKEND]
            procs.append(subprocess.Popen(_ns(ns, *httpd, "--port", "8080"), text=True))
            user = "user root;\n"
            (tmp_path / "nginx.conf").write_text(
                NGINX.format(user=user, d=tmp_path, backend=BACKEND)
            )
            conf = str(tmp_path / "nginx.conf")
            procs.append(subprocess.Popen(_ns(ns, "nginx", "-c", conf), text=True))
            lb = subprocess.Popen(
                [sys.executable, "-m", "v6lb.cli", "run", str(cfg), "--netns", ns, "--proxy", engine],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(lb)
            seen: dict[str, Any] = {}
            for sni in ("www.example.com", "api.example.com"):
                for _ in range(50):  # the engine and the backend come up within a second or two
                    r = subprocess.run(
                        _ns(ns, "curl", "-sS", "--http1.1", "--cacert", str(tmp_path / "ca.pem"),
                            "--interface", CLIENT, "--resolve", f"{sni}:443:[{VIP}]",
                            "-w", "\\n%{http_version} %{ssl_verify_result}", f"https://{sni}/"),
                        capture_output=True, text=True, timeout=10,
                    )  # fmt: skip
                    if r.returncode == 0 and r.stdout.startswith("{"):
                        break
                    assert lb.poll() is None, lb.communicate()[1]
                    time.sleep(0.2)
                body, _, tail = r.stdout.rpartition("\n")
                assert tail == "1.1 0", (r.stdout, r.stderr)  # HTTP/1.1, verified against the CA
                seen[sni] = json.loads(body)
            # HTTP/2 (ALPN h2, proxy-l7's default): two requests on one connection
            r = subprocess.run(
                _ns(ns, "curl", "-sS", "--http2", "--cacert", str(tmp_path / "ca.pem"),
                    "--interface", CLIENT, "--resolve", f"www.example.com:443:[{VIP}]",
                    "-w", "\n%{http_version} %{num_connects}\n",
                    "https://www.example.com/h2a", "https://www.example.com/h2b?x=1"),
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            lines = [line for line in r.stdout.split("\n") if line]
            assert r.returncode == 0 and lines[1:2] == ["2 1"], (r.stdout, r.stderr)
            assert lines[3:4] == ["2 0"], r.stdout  # the second request: no new connection
            seen["h2"] = json.loads(lines[2])
            assert seen["h2"]["path"] == "/h2b?x=1", seen["h2"]
            for got in (seen["api.example.com"], seen["h2"]):
                headers = {k.lower(): v for k, v in got["headers"].items()}
                assert headers["x-forwarded-for"] == CLIENT
                assert headers["x-forwarded-proto"] == "https"
                assert headers["forwarded"].endswith(";proto=https")
                assert headers["forwarded"].startswith(f'for="[{CLIENT}]:')

            # nginx behind the VIP: HTTP/2 and HTTP/1.1 from curl, its log says what it saw
            for version in ("--http2", "--http1.1"):
                r = subprocess.run(
                    _ns(ns, "curl", "-sS", version, "--cacert", str(tmp_path / "ca.pem"),
                        "--interface", CLIENT, "--resolve", f"www.example.com:4443:[{VIP}]",
                        f"https://www.example.com:4443/seen{version}"),
                    capture_output=True, text=True, timeout=10,
                )  # fmt: skip
                assert r.returncode == 0 and r.stdout == "ok\n", (r.stdout, r.stderr)
            log = [
                line.split("|") for line in (tmp_path / "nginx-access.log").read_text().splitlines()
            ]
            assert [x[0] for x in log] == ["/seen--http2", "/seen--http1.1"], log
            for _uri, proto, xff, xfp, fwd in log:
                assert proto == "HTTP/1.1" and xff == CLIENT and xfp == "https", log
                assert fwd.startswith(f'for="[{CLIENT}]:') and fwd.endswith(";proto=https"), log

            # proxy-l4 with TLS: the plain stream relayed (HTTP here, the backend sees the LB)
            r = subprocess.run(
                _ns(ns, "curl", "-sS", "--http1.1", "--cacert", str(tmp_path / "ca.pem"),
                    "--resolve", f"www.example.com:7443:[{VIP}]", "https://www.example.com:7443/"),
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            assert r.returncode == 0 and json.loads(r.stdout)["node"] == "b0", (r.stdout, r.stderr)

            # client certificates: required by mtls (TLS 1.3 only), verified against the CA
            ca.issue_cert("client.example.com").private_key_and_cert_chain_pem.write_to_path(
                str(tmp_path / "client.pem")
            )
            curl = [
                "curl",
                "-sS",
                "--http1.1",
                "--cacert",
                str(tmp_path / "ca.pem"),
                "--resolve",
                f"www.example.com:9443:[{VIP}]",
                "https://www.example.com:9443/",
            ]
            r = subprocess.run(_ns(ns, *curl, "--cert", str(tmp_path / "client.pem")),
                               capture_output=True, text=True, timeout=10)  # fmt: skip
            assert r.returncode == 0 and r.stdout.startswith("{"), r.stderr
            r = subprocess.run(_ns(ns, *curl), capture_output=True, text=True, timeout=10)
            assert r.returncode != 0 and not r.stdout.startswith("{"), (r.stdout, r.stderr)
            r = subprocess.run(_ns(ns, *curl, "--tls-max", "1.2"),
                               capture_output=True, text=True, timeout=10)  # fmt: skip
            # TLS 1.2 refused: a handshake error
            assert r.returncode == 35, (r.returncode, r.stderr)

            probe = [sys.executable, str(tmp_path / "probe.py"), VIP, str(tmp_path / "ca.pem")]
            r = subprocess.run(_ns(ns, *probe, "sni"), capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            default, refused, named = json.loads(r.stdout)
            assert default == "www.example.com"  # unknown SNI: the first certificate
            assert refused.startswith("refused"), refused
            assert named == "www.example.com"

            r = subprocess.run(_ns(ns, *probe, "bad"), capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            bad = json.loads(r.stdout)
            assert bad["garbage"][0] < 1.0 and bad["garbage"][1] in ("", "15")  # closed (an alert)
            assert IDLE - 0.1 <= bad["silent"] <= IDLE + 1.5, bad
            assert bad["other"] == "api.example.com"

            errors = _vip_errors(_status(ns, sock), "web")
            if engine == "builtin":
                assert errors["tls_handshake_failed"] >= 1 and errors["tls_handshake_timeout"] >= 1
                assert _vip_errors(_status(ns, sock), "strict")["tls_unknown_sni"] == 1
            else:
                # HAProxy 2.6 counts garbage as a failed handshake; a silent client is cut by
                # `timeout client` (the VIP's idle timeout) and counted nowhere (docs/proxy.md)
                assert errors["ssl_failed_handshake"] >= 1, errors
                strict = _vip_errors(_status(ns, sock), "strict")
                assert strict["ssl_failed_handshake"] == 1, strict

            # SIGHUP: new certificates for www (reissued), the open configuration kept
            cert = ca.issue_cert("www.example.com", "renewed.example.com")
            cert.cert_chain_pems[0].write_to_path(str(tmp_path / "www.crt"))
            cert.private_key_pem.write_to_path(str(tmp_path / "www.key"))
            lb.send_signal(signal.SIGHUP)
            sans: Any = None
            for _ in range(50):
                r = subprocess.run(
                    _ns(ns, sys.executable, "-c", textwrap.dedent(f"""
                        import socket, ssl
                        ctx = ssl.create_default_context(cafile={str(tmp_path / 'ca.pem')!r})
                        s = ctx.wrap_socket(socket.create_connection(("{VIP}", 443), timeout=5),
                                            server_hostname="www.example.com")
                        print(len(s.getpeercert()["subjectAltName"]))
                    """)),
                    capture_output=True, text=True, timeout=10,
                )  # fmt: skip
                sans = r.stdout.strip()
                if sans == "2":
                    break
                time.sleep(0.2)
            assert sans == "2", "the renewed certificate was not served after SIGHUP"
            lb.send_signal(signal.SIGTERM)
            assert lb.wait(20) == 0, lb.communicate()[1]
        finally:  # SIGTERM first: nginx's master stops its worker, v6lb run its haproxy
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
