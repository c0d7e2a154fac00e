"""haproxy.cfg for the ``proxy-l4``/``proxy-l7`` VIPs of a config (``--proxy haproxy``).

Pure: a :class:`~v6lb.model.config.Config` (or VIPs) in, text out; golden tests
pin the output. Targets HAProxy 2.6 (Debian 12):

- ``proxy-l4`` → ``mode tcp``; PROXY v2 to the backends with ``send-proxy-v2``
  (and ``check-send-proxy`` so health checks speak it too); inbound PROXY v2
  only from ``trusted_proxy_sources`` (``tcp-request connection expect-proxy
  layer4``). A stream that starts with a PROXY v2 signature or a PROXY v1
  header (``PROXY TCP4 ``, ``PROXY TCP6 ``, ``PROXY UNKNOWN``) after that is
  refused (``tcp-request content reject`` on ``req.payload``, with a 50 ms
  ``tcp-request inspect-delay``), as the builtin engine refuses it.
- ``proxy-l7`` → ``mode http``. HAProxy 2.6 has no ``option forwarded``, so
  ``Forwarded`` is written with ``http-request set-header``, the IPv6 node
  bracketed and the value quoted (RFC 7239 §6): ``for="[2001:db8::1]:4711"``.
  ``X-Forwarded-For`` comes from ``option forwardfor``. Incoming forwarding
  headers from clients outside ``trusted_sources`` are deleted first.
- ``tls:`` (proxy-l7 and proxy-l4) → ``bind ... ssl crt-list DIR/VIP.crtlist alpn
  h2,http/1.1 ssl-min-ver TLSv1.2`` (+ ``strict-sni`` for ``unknown_sni: refuse``, +
  ``ca-file DIR/VIP.ca.pem verify required`` for ``client_ca``); the engine writes the
  files :func:`tls_files` names. Forwarding headers then say ``https``. With ``h2``
  in ALPN HAProxy serves HTTP/2 itself; ``max_concurrent_streams`` →
  ``tune.h2.max-concurrent-streams`` (global in HAProxy 2.6: the largest of the VIPs'),
  and the header list is bounded by ``tune.bufsize`` (from ``max_header_bytes``).
- Schedulers: round-robin → ``balance roundrobin``, least-connections →
  ``balance leastconn``, maglev → ``balance source`` with ``hash-type
  consistent`` (client affinity, but not the core's Maglev table).
- Weights: HAProxy takes 0–256, so weights above 256 are scaled down in
  proportion (a non-zero weight stays at least 1). Drain is ``weight 0``:
  HAProxy then sends no new connections and keeps the open ones. With
  ``pools`` (the running pools, `v6lb ctl`'s overrides applied) the weight,
  drain and enabled state come from the pool; a disabled backend is
  ``disabled`` (HAProxy's maintenance state).
- Reloads (``haproxy -W``, :mod:`v6lb.engines.proxy.haproxy_run`): the stats
  socket has ``expose-fd listeners`` (the new worker takes the listening
  sockets over), ``hard-stop-after`` bounds how long an old worker may keep
  its established connections, and proxy-l7 frontends have ``option
  idle-close-on-response``: an idle keep-alive connection of the old worker is
  not closed under the client's feet but serves its next request, answered
  with ``Connection: close``.
- A lower global ``maxconn`` than HAProxy's default, which otherwise warns that
  it cannot raise the file-descriptor limit.
- ``timeouts.total`` has no HAProxy equivalent; it is written as a comment.
- Bodies stream (HAProxy never buffers one whole without ``option
  http-buffer-request``). ``max_request_bytes: N`` → ``http-request deny
  deny_status 413 if { req.hdr_val(content-length) gt N }``, checked on the head
  (before a ``100 Continue``). HAProxy 2.6 cannot limit a chunked body: its
  body sample fetches (``req.body_size``) see only what fits in one buffer.
- ``max_connections_per_source: N`` → one stick table per VIP (a table-only
  ``backend v6lb_<vip>_sources``, ``store conn_cur``) shared by the VIP's
  frontends, ``tcp-request connection track-sc0 src`` and ``tcp-request
  connection reject if { sc_conn_cur(0) gt N }``: the N+1st open connection
  from one address is refused at accept, as the builtin engine does.
- ``sni_routes`` (proxy-l4 TLS passthrough) → ``tcp-request inspect-delay`` of
  ``timeouts.connect``, ``tcp-request content reject unless { req.ssl_hello_type 1 }``
  and a whole first record, ``use_backend v6lb_<vip>_sniN if { req.ssl_sni ... }``
  (exact names, then ``*.`` as a one-label regex), ``default_backend v6lb_<vip>_default``
  (the default pool) or, with ``unknown_sni: refuse``, a reject unless an SNI matched.
  The route backends' servers ``track`` the health of ``v6lb_<vip>``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv6Address

from v6lb.core.backends import BackendPool
from v6lb.core.proxyproto import SIGNATURE
from v6lb.model.config import (
    Config,
    HealthType,
    ProxyL4Options,
    ProxyL7Options,
    ProxyProtocol,
    Scheduler,
    TlsOptions,
    Vip,
    VipMode,
)
from v6lb.model.sni import default_pool

__all__ = [
    "FORWARDING_HEADERS",
    "backend_name",
    "frontend_name",
    "render_haproxy",
    "scaled_weights",
    "server_backends",
    "server_name",
    "sni_backends",
    "tls_files",
]

HAPROXY_WEIGHT_MAX = 256
TLS_DIR = "/run/v6lb-haproxy"  # where the certificate lists are in a render without an engine
FORWARDING_HEADERS = (
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Forwarded-Port",
    "X-Real-IP",
)
_BALANCE = {
    Scheduler.ROUND_ROBIN: ["balance roundrobin"],
    Scheduler.LEAST_CONNECTIONS: ["balance leastconn"],
    Scheduler.MAGLEV: ["balance source", "hash-type consistent"],
}


def frontend_name(vip: str, port: int) -> str:
    """HAProxy's name of the frontend of ``vip`` on ``port``."""
    return f"v6lb_{vip}_{port}"


def backend_name(vip: str) -> str:
    """HAProxy's name of the backend (the servers) of ``vip``."""
    return f"v6lb_{vip}"


def server_name(index: int) -> str:
    """HAProxy's name of backend ``index`` (in the file's order) of a VIP."""
    return f"b{index}"


def _s(seconds: float) -> str:
    """A HAProxy time: whole seconds as ``Ns``, else milliseconds."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def scaled_weights(weights: list[int]) -> list[int]:
    """Config weights (0–1000) as HAProxy weights (0–256), proportions kept."""
    top = max(weights, default=0)
    if top <= HAPROXY_WEIGHT_MAX:
        return list(weights)
    return [0 if w == 0 else max(1, round(w * HAPROXY_WEIGHT_MAX / top)) for w in weights]


def _addr(address: IPv6Address, port: int | None) -> str:
    return f"[{address}]:{port}" if port is not None else f"[{address}]"  # port: as dialled


def render_haproxy(
    config: Config | Iterable[Vip],
    *,
    maxconn: int = 4096,
    nbthread: int = 1,
    header_timeout: float = 10.0,
    stats_socket: str | None = None,
    hard_stop_after: float = 30.0,
    pools: Mapping[str, BackendPool] | None = None,
    tls_dir: str = TLS_DIR,
) -> str:
    """The whole haproxy.cfg for the proxy VIPs; other modes are left out.

    ``tls_dir``: where the engine writes each TLS VIP's certificate list
    (:func:`tls_files`: ``VIP.crtlist`` and a PEM of cert and key per certificate).

    ``pools`` (by VIP name): the backends' weight, drain and enabled state as the
    pools hold them (the file's values, `v6lb ctl`'s overrides applied).
    """
    if isinstance(config, Config):
        vips = [v for v in config.vips if v.mode.is_proxy]
        source = config.source
    else:
        vips = [v for v in config if v.mode.is_proxy]
        source = "<vips>"
    out = [
        f"# haproxy.cfg rendered by v6lb from {source}; do not edit",
        "global",
        f"    maxconn {maxconn}",
        f"    nbthread {nbthread}",
        f"    hard-stop-after {_s(hard_stop_after)}",
    ]
    heads = [v.options.max_header_bytes for v in vips if isinstance(v.options, ProxyL7Options)]
    if heads:
        # The request head must fit HAProxy's buffer; a larger head gets 431/400.
        out.append(f"    tune.bufsize {max(16384, max(heads) + 1024)}")
    streams = [
        v.options.max_concurrent_streams
        for v in vips
        if isinstance(v.options, ProxyL7Options)
        and v.options.tls is not None
        and "h2" in v.options.tls.alpn
    ]
    if streams:  # HAProxy 2.6 has one value for every frontend: the largest
        out.append(f"    tune.h2.max-concurrent-streams {max(streams)}")
    if stats_socket:
        out.append(f"    stats socket {stats_socket} mode 600 level admin expose-fd listeners")
    out += [
        "",
        "defaults",
        "    log global",
        "    option dontlognull",
        f"    maxconn {maxconn}",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "",
    ]
    for vip in vips:
        out += _frontends(vip, header_timeout, tls_dir)
        pool = None if pools is None else pools.get(vip.name)
        out += _backend(vip, pool)
        for name, members in sni_backends(vip):
            out += _backend(vip, pool, name, members)
        if getattr(vip.options, "max_connections_per_source", 0):
            out += [
                f"backend v6lb_{vip.name}_sources",
                "    stick-table type ipv6 size 100k expire 60s store conn_cur",
                "",
            ]
    return "\n".join(out).rstrip("\n") + "\n"


def _tls_bind(vip: Vip, tls: TlsOptions, tls_dir: str) -> str:
    """``ssl crt-list ... alpn ... ssl-min-ver ...`` for a bind line (TLS terminated)."""
    text = f" ssl crt-list {tls_dir}/{vip.name}.crtlist alpn {','.join(tls.alpn)}"
    text += f" ssl-min-ver TLSv{tls.min_version}"
    if tls.unknown_sni == "refuse":
        text += " strict-sni"
    if tls.client_ca is not None:
        text += f" ca-file {tls_dir}/{vip.name}.ca.pem verify required"
    return text


def tls_files(vip: Vip, tls_dir: str) -> tuple[list[tuple[str, str, str]], str, str]:
    """A TLS VIP's files for HAProxy: ``([(pem, cert, key), ...], crtlist, its text)``.

    The engine writes each ``VIP-N.pem`` as the certificate chain then the key (HAProxy
    wants both in one file), ``VIP.crtlist``: one line per certificate, its PEM and
    its SNI names (the first line is the default certificate), and with ``client_ca``
    a copy of it as ``VIP.ca.pem`` (a ``(pem, ca, "")`` entry).
    """
    opts = vip.options
    assert isinstance(opts, ProxyL4Options | ProxyL7Options) and opts.tls is not None
    pems = []
    lines = []
    for i, c in enumerate(opts.tls.certificates):
        pem = f"{tls_dir}/{vip.name}-{i}.pem"
        pems.append((pem, c.cert, c.key))
        lines.append(" ".join([pem, *c.names]) + "\n")
    if opts.tls.client_ca is not None:
        pems.append((f"{tls_dir}/{vip.name}.ca.pem", opts.tls.client_ca, ""))
    return pems, f"{tls_dir}/{vip.name}.crtlist", "".join(lines)


def _frontends(vip: Vip, header_timeout: float, tls_dir: str) -> list[str]:
    opts = vip.options
    assert isinstance(opts, ProxyL4Options | ProxyL7Options)
    l7 = vip.mode is VipMode.PROXY_L7
    t = opts.timeouts
    tls = opts.tls
    ssl = _tls_bind(vip, tls, tls_dir) if tls is not None else ""
    out: list[str] = []
    for port in vip.ports:
        out.append(f"frontend {frontend_name(vip.name, port)}")
        out.append(f"    bind [{vip.address}]:{port} v6only{ssl}")
        if opts.dual_stack is not None:
            out.append(f"    bind {opts.dual_stack}:{port}{ssl}")
        out.append(f"    mode {'http' if l7 else 'tcp'}")
        out.append(f"    timeout client {_s(t.idle)}")
        if t.total is not None:
            out.append(
                f"    # timeouts.total {_s(t.total)}: HAProxy has no per-connection lifetime"
            )
        if opts.max_connections_per_source:
            out.append(f"    tcp-request connection track-sc0 src table v6lb_{vip.name}_sources")
            out.append(
                "    tcp-request connection reject"
                f" if {{ sc_conn_cur(0) gt {opts.max_connections_per_source} }}"
            )
        if isinstance(opts, ProxyL4Options):
            if opts.trusted_proxy_sources:
                nets = " ".join(str(n) for n in opts.trusted_proxy_sources)
                out.append(f"    acl v6lb_trusted src {nets}")
                out.append("    tcp-request connection expect-proxy layer4 if v6lb_trusted")
            if opts.sni_routes:
                out.append(f"    tcp-request inspect-delay {_s(t.connect)}")
                out += _REFUSE_CLIENT_PROXY[1:]
                out += _sni_rules(vip, opts)
            else:
                out += _REFUSE_CLIENT_PROXY
        else:
            out.append(f"    timeout http-request {_s(min(header_timeout, t.idle))}")
            out.append(f"    timeout http-keep-alive {_s(t.idle)}")
            out.append("    option http-keep-alive")
            out.append("    option idle-close-on-response")
            if opts.max_request_bytes is not None:  # a chunked body is not limited (2.6)
                out.append(
                    "    http-request deny deny_status 413"
                    f" if {{ req.hdr_val(content-length) gt {opts.max_request_bytes} }}"
                )
            out += _forwarding(opts, "https" if tls is not None else "http")
        default = backend_name(vip.name)
        if isinstance(opts, ProxyL4Options) and opts.sni_routes and opts.unknown_sni == "default":
            default += "_default"
        out.append(f"    default_backend {default}")
        out.append("")
    return out


def sni_backends(vip: Vip) -> list[tuple[str, tuple[int, ...]]]:
    """TLS passthrough: HAProxy's backend per SNI route (``v6lb_VIP_sniN``) and for the
    default pool (``v6lb_VIP_default``), with their server indexes. Their servers track
    the health of ``v6lb_VIP``'s, which holds every server (checks, runtime state)."""
    opts = vip.options
    if not isinstance(opts, ProxyL4Options) or not opts.sni_routes:
        return []
    out = [(f"{backend_name(vip.name)}_sni{k}", r.backends) for k, r in enumerate(opts.sni_routes)]
    if opts.unknown_sni == "default":
        out.append(
            (f"{backend_name(vip.name)}_default", default_pool(opts.sni_routes, len(vip.backends)))
        )
    return out


def server_backends(vip: Vip, index: int) -> list[str]:
    """Every HAProxy backend that holds server ``index`` of ``vip`` (runtime changes)."""
    return [backend_name(vip.name)] + [n for n, m in sni_backends(vip) if index in m]


def _sni_pattern(name: str) -> str:
    """An SNI name as a HAProxy match: exact (``-i``), or ``*.`` as one label (a regex;
    ``[.]`` for a dot: the config parser would eat a backslash)."""
    if name.startswith("*."):
        rest = name[2:].replace(".", "[.]")
        return f"-m reg -i ^[^.]+[.]{rest}$"
    return f"-i {name}"


def _sni_rules(vip: Vip, opts: ProxyL4Options) -> list[str]:
    """TLS passthrough: a whole first record holding a ClientHello, or rejected (at once
    for other bytes, at the inspect delay for too few); then the route by its SNI, exact
    names before wildcards (model/sni.py's rule)."""
    out = [
        "    tcp-request content reject unless { req.ssl_hello_type 1 }",
        "    tcp-request content reject unless { req.payload_lv(3,2) -m found }",
    ]
    exact: list[tuple[str, str]] = []
    wild: list[tuple[str, str]] = []
    for k, r in enumerate(opts.sni_routes):
        for name in r.names:
            (wild if name.startswith("*.") else exact).append(
                (name, f"{backend_name(vip.name)}_sni{k}")
            )
    if opts.unknown_sni == "refuse":
        for name, _ in exact + wild:
            out.append(f"    acl v6lb_sni_known req.ssl_sni {_sni_pattern(name)}")
        out.append("    tcp-request content reject unless v6lb_sni_known")
    out.append("    tcp-request content accept")
    for name, back in exact + wild:
        out.append(f"    use_backend {back} if {{ req.ssl_sni {_sni_pattern(name)} }}")
    return out


def _hex(data: bytes) -> str:
    return data.hex().upper()


# A client's own PROXY header (v2 signature, v1 text) is refused, not relayed after ours.
# A first read shorter than a pattern waits up to the inspect delay, then passes.
_REFUSE_CLIENT_PROXY = [
    "    tcp-request inspect-delay 50ms",
    f"    tcp-request content reject if {{ req.payload(0,12) -m bin {_hex(SIGNATURE)} }}",
    "    tcp-request content reject if { req.payload(0,11) -m bin"
    f" {_hex(b'PROXY TCP4 ')} {_hex(b'PROXY TCP6 ')} }}",
    f"    tcp-request content reject if {{ req.payload(0,13) -m bin {_hex(b'PROXY UNKNOWN')} }}",
]


def _forwarding(opts: ProxyL7Options, proto: str) -> list[str]:
    out: list[str] = []
    if not opts.forwarded_headers:
        return out
    trusted = bool(opts.trusted_sources)
    if trusted:
        nets = " ".join(str(n) for n in opts.trusted_sources)
        out.append(f"    acl v6lb_trusted src {nets}")
    cond = " unless v6lb_trusted" if trusted else ""
    for name in FORWARDING_HEADERS:
        out.append(f"    http-request del-header {name}{cond}")
    # RFC 7239 §6: an IPv6 node is bracketed, and a node with ':' must be quoted.
    nodes = [("", '\\"[%[src]]:%[src_port]\\"')]
    if opts.dual_stack is not None:
        out.append("    acl v6lb_ipv4 src 0.0.0.0/0")
        nodes = [(" !v6lb_ipv4", nodes[0][1]), (" v6lb_ipv4", '\\"%[src]:%[src_port]\\"')]
    for family, node in nodes:
        element = f"for={node};proto={proto}"
        if trusted:
            found = "{ req.fhdr(forwarded) -m found }"
            out.append(
                f'    http-request set-header Forwarded "%[req.fhdr(forwarded)], {element}"'
                f" if {found}{family}"
            )
            out.append(f'    http-request set-header Forwarded "{element}" if !{found}{family}')
        else:
            out.append(
                f'    http-request set-header Forwarded "{element}"'
                + (f" if{family}" if family else "")
            )
    out.append(
        f"    http-request set-header X-Forwarded-Proto {proto}"
        " unless { req.hdr(x-forwarded-proto) -m found }"
    )
    out.append("    option forwardfor")
    return out


def _backend(
    vip: Vip,
    pool: BackendPool | None,
    name: str | None = None,
    members: tuple[int, ...] | None = None,
) -> list[str]:
    """The VIP's backend (every server, checked), or with ``name`` and ``members`` a TLS
    passthrough route's: those servers, each tracking its twin's health in the first."""
    opts = vip.options
    assert isinstance(opts, ProxyL4Options | ProxyL7Options)
    l7 = vip.mode is VipMode.PROXY_L7
    t = opts.timeouts
    tracked = name is not None
    out = [f"backend {name or backend_name(vip.name)}", f"    mode {'http' if l7 else 'tcp'}"]
    out += [f"    {line}" for line in _BALANCE[vip.scheduler]]
    out.append(f"    timeout connect {_s(t.connect)}")
    out.append(f"    timeout server {_s(t.idle)}")
    if l7:  # an upgraded (WebSocket) connection: idle in both directions, as the builtin
        out.append(f"    timeout tunnel {_s(t.idle)}")
    hc = vip.health
    check = ""
    if hc.type is not HealthType.NONE and not tracked:
        out.append(f"    timeout check {_s(hc.timeout)}")
        if hc.type is HealthType.HTTP:
            out.append("    option httpchk")
            host = hc.host or "v6lb"
            out.append(
                f"    http-check send meth {hc.method} uri {hc.path or '/'} ver HTTP/1.1"
                f" hdr Host {host}"
            )
            codes = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in hc.expect)
            out.append(f"    http-check expect status {codes}")
        check = f" check inter {_s(hc.interval)} rise {hc.rise} fall {hc.fall}"
        if hc.port is not None:
            check += f" port {hc.port}"
    pp = isinstance(opts, ProxyL4Options) and opts.proxy_protocol is ProxyProtocol.V2
    n = len(vip.backends)
    if pool is not None and len(pool) == n:
        drain = [pool.is_draining(i) for i in range(n)]
        enabled = [pool.is_enabled(i) for i in range(n)]
        weights = scaled_weights([pool.weight(i) for i in range(n)])
    else:
        drain = [b.drain for b in vip.backends]
        enabled = [True] * n
        weights = scaled_weights([b.weight for b in vip.backends])
    for i, (b, w) in enumerate(zip(vip.backends, weights, strict=True)):
        if members is not None and i not in members:
            continue
        line = f"    server {server_name(i)} {_addr(b.address, b.port)}"
        line += f" weight {0 if drain[i] else w}"
        if not enabled[i]:
            line += " disabled"
        if pp:
            line += " send-proxy-v2"
            if check and hc.type is HealthType.TCP:
                line += " check-send-proxy"
        line += check
        if check and hc.port is None and b.port is None:
            line += f" port {vip.ports[0]}"  # a port-less server needs a check port
        if tracked and hc.type is not HealthType.NONE:
            line += f" track {backend_name(vip.name)}/{server_name(i)}"
        if drain[i]:
            line += "  # drain: no new connections, open ones finish"
        out.append(line)
    out.append("")
    return out
