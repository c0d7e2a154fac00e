"""What a validated config would set up, as text for ``v6lb check`` (:func:`summarize`)."""

from __future__ import annotations

from v6lb.model.config import (
    Backend,
    Config,
    DsrL2Options,
    HealthCheck,
    HealthType,
    NatOptions,
    ProxyL4Options,
    ProxyL7Options,
    Timeouts,
    TunnelOptions,
    Vip,
)

__all__ = ["summarize"]


def summarize(config: Config) -> str:
    lines = [_lb_line(config)]
    sync = config.lb.conntrack_sync
    if sync is not None:
        standby = ", ".join(map(str, sync.peer_snat)) or "none"
        lines.append(
            f"  conntrack sync: conntrackd FTFW over UDP [{sync.address}]:{sync.port}"
            f" -> [{sync.peer}]:{sync.port} on {sync.interface};"
            f" peer SNAT announced as standby: {standby}"
        )
    peers = config.lb.peers
    if peers is not None:
        lines.append(
            f"  peers: {', '.join(map(str, peers.addresses))} on {peers.interface} (a proxy"
            " VIP's TCP packet that no connection here owns is sent on to them)"
        )
    if not config.vips:
        lines.append("no VIPs")
    for vip in config.vips:
        lines.extend(_vip_lines(vip))
    for pair in config.npt:
        lines.append(f"npt {pair.inside} <-> {pair.outside}")
    # topology: and bgp: are summarised by `v6lb check` itself.
    return "\n".join(lines) + "\n"


def _lb_line(config: Config) -> str:
    lb = config.lb
    addresses = ", ".join(map(str, lb.addresses)) or "none"
    interfaces = ", ".join(lb.interfaces) or "none"
    return (
        f"lb {lb.instance}: addresses {addresses}; interfaces {interfaces};"
        f" control socket {lb.control_socket}\n"
        f"  flow hash seed {lb.flow_hash_seed:#010x}; conntrack max {lb.conntrack_max};"
        f" DSR flow cache {lb.flow_cache_size};"
        f" ICMPv6 errors {lb.icmp_error_rate}/s (burst {lb.icmp_error_burst})\n"
        f"  forward allow: {_allowed(config)}"
    )


def _allowed(config: Config) -> str:
    """``lb.forward_allow``: what the host routes besides v6lb's traffic (docs/nat.md)."""
    if not config.npt and all(v.mode.is_proxy for v in config.vips):
        return "(no L3 data plane: the host's forwarding is left alone)"
    entries = [f"{a.source} -> {a.destination}" for a in config.lb.forward_allow]
    return ", ".join(entries) or "nothing but v6lb's traffic (the rest is dropped, counted)"


def _vip_lines(vip: Vip) -> list[str]:
    ports = ",".join(map(str, vip.ports))
    scheduler = str(vip.scheduler)
    if vip.table_size is not None:
        scheduler += f" (table {vip.table_size})"
    takers = sum(1 for b in vip.backends if b.weight > 0 and not b.drain)
    lines = [
        f"vip {vip.name}: [{vip.address}]:{ports}/{vip.protocol} mode {vip.mode},"
        f" scheduler {scheduler}, {takers} of {len(vip.backends)} backends take new flows",
        f"  health: {_health(vip.health)}",
        f"  options: {_options(vip)}",
    ]
    lines.extend(f"  backend {_backend(vip, b)}" for b in vip.backends)
    return lines


def _health(h: HealthCheck) -> str:
    if h.type is HealthType.NONE:
        return "none (backends always count as up)"
    probe = "tcp connect"
    if h.type is HealthType.HTTP:
        probe = f"http {h.method} {h.path}"
        if h.host is not None:
            probe += f" Host {h.host}"
        probe += f" expecting {h.expect_text()}"
    if h.port is not None:
        probe += f" on port {h.port}"
    return (
        f"{probe} every {h.interval:g} s, timeout {h.timeout:g} s,"
        f" up after {h.rise} successes, down after {h.fall} failures"
    )


def _timeouts(t: Timeouts) -> str:
    total = "none" if t.total is None else f"{t.total:g} s"
    return f"timeouts connect {t.connect:g} s, idle {t.idle:g} s, total {total}"


def _prefixes(label: str, nets: tuple[object, ...]) -> str:
    return f"{label} {', '.join(map(str, nets)) if nets else 'none'}"


def _options(vip: Vip) -> str:
    o = vip.options
    if isinstance(o, NatOptions):
        if o.snat is None:
            return "no SNAT (backends must route replies back through the LB)"
        pool = o.snat.network_address if o.snat.prefixlen == 128 else o.snat
        return f"SNAT to {pool} ports {o.snat_ports[0]}-{o.snat_ports[1]}"
    if isinstance(o, DsrL2Options):
        return "MAC rewrite on the link, hop limit kept"
    if isinstance(o, TunnelOptions):
        inner = o.mtu - vip.mode.facts.overhead
        return (
            f"outer source {o.tunnel_source}, path MTU {o.mtu}"
            f" (client packets up to {inner} bytes fit unfragmented)"
        )
    stack = f"also IPv4 on {o.dual_stack}" if o.dual_stack is not None else "IPv6 only"
    tls = []
    if o.tls is not None:
        t = o.tls
        tls.append(
            f"TLS {len(t.certificates)} certificate(s), TLS {t.min_version}+,"
            f" ALPN {','.join(t.alpn)}, unknown SNI {t.unknown_sni}"
            + (", client certificates required" if t.client_ca else "")
        )
    if isinstance(o, ProxyL4Options):
        return "; ".join(
            [
                *tls,
                f"PROXY protocol to backends {o.proxy_protocol}",
                f"relay {o.relay}",
                _prefixes("PROXY headers accepted from", o.trusted_proxy_sources),
                _timeouts(o.timeouts),
                stack,
            ]
        )
    assert isinstance(o, ProxyL7Options)
    return "; ".join(
        [
            *tls,
            f"forwarded headers {'on' if o.forwarded_headers else 'off'}",
            _prefixes("forwarded headers trusted from", o.trusted_sources),
            (
                f"max request {o.max_request_bytes} bytes"
                if o.max_request_bytes is not None
                else "no request size limit"
            )
            + f", max header {o.max_header_bytes} bytes",
            *(
                [f"HTTP/2 up to {o.max_concurrent_streams} streams a connection"]
                if o.tls is not None and "h2" in o.tls.alpn
                else []
            ),
            _timeouts(o.timeouts),
            stack,
        ]
    )


def _backend(vip: Vip, b: Backend) -> str:
    port = str(b.port) if b.port is not None else ",".join(map(str, vip.ports))
    text = f"[{b.address}]:{port} weight {b.weight}"
    if b.mac is not None:
        text += f" mac {b.mac}"
    if b.sid is not None and b.sid != b.address:
        text += f" sid {b.sid}"
    if b.drain:
        text += ", draining (existing flows only)"
    elif b.weight == 0:
        text += ", standby (weight 0: no new flows)"
    return text
