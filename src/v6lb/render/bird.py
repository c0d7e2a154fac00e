"""bird.conf text (BIRD 2) for an LB speaker and for a router. Pure: settings in, text out.

**LB speaker** (:func:`render_speaker`): one ``protocol static`` per announced
prefix, named by :func:`static_name` (``v6lb_2001_db8_a__1_128``), holding a
blackhole route that never leaves BIRD (there is no kernel protocol). The BGP
sessions export static routes only, with the prefix's MED. A prefix is
announced while its static protocol is enabled: the engine
(engines/bird.py) runs ``birdc enable|disable NAME`` as the VIP's
backends turn healthy or not, and a prefix rendered with ``up=False`` starts
withdrawn (``disabled yes``). Nothing is imported.

**Router** (:func:`render_router`): BGP sessions that import everything
(raising ``bgp_local_pref`` where a neighbour has ``local_pref``) and export
nothing, and a kernel protocol with ``merge paths yes`` so that equal routes
from several LB speakers become one ECMP route with a next hop per speaker.
Pair it with ``net.ipv6.fib_multipath_hash_policy=1`` (docs/anycast.md).

Both: ``protocol device``, BFD on every session when enabled (``protocol bfd``
with the configured interval and multiplier), the configured hold and
keepalive times, short reconnect timers (a restarted peer is back in about a
second), and graceful restart off (a dead LB's routes must go at once, not be
kept as stale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv6Network

from v6lb.model.bgp import BgpSettings, Neighbour, router_id_for

__all__ = ["SpeakerRoute", "render_router", "render_speaker", "static_name"]


@dataclass(frozen=True, slots=True)
class SpeakerRoute:
    """A prefix an LB speaker may announce; ``up``: announced from the start."""

    prefix: IPv6Network
    med: int | None = None
    up: bool = True


def static_name(prefix: IPv6Network) -> str:
    """The BIRD protocol name that carries ``prefix`` (``2001:db8::1/128`` -> ``v6lb_2001_db8__1_128``)."""
    return f"v6lb_{prefix.network_address.compressed.replace(':', '_')}_{prefix.prefixlen}"


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)} ms"


def _header(kind: str, name: str, settings: BgpSettings) -> list[str]:
    rid = settings.router_id or router_id_for(name)
    out = [
        f"# v6lb: bird.conf for {kind} {name} (rendered by v6lb.render.bird; do not edit)",
        "log stderr all;",
        f"router id {rid};",
        "",
        "protocol device {",
        "  scan time 10;",
        "}",
        "",
    ]
    if settings.bfd.enabled:
        out += [
            "protocol bfd {",
            '  interface "*" {',
            f"    min rx interval {_ms(settings.bfd.interval)};",
            f"    min tx interval {_ms(settings.bfd.interval)};",
            f"    multiplier {settings.bfd.multiplier};",
            "  };",
            "}",
            "",
        ]
    return out


def _session(settings: BgpSettings, n: Neighbour, channel: list[str]) -> list[str]:
    out = [
        f"protocol bgp {n.name} {{",
        f"  local as {settings.asn};",
        f"  neighbor {n.address} as {n.asn};",
    ]
    if n.interface is not None:
        out.append(f'  interface "{n.interface}";')
    out += [
        f"  hold time {settings.hold};",
        f"  keepalive time {settings.keepalive};",
        "  connect delay time 1;",
        "  connect retry time 2;",
        "  error wait time 1, 4;",
        "  graceful restart off;",
    ]
    if settings.bfd.enabled:
        out.append("  bfd yes;")
    out += ["  ipv6 {", *(f"    {line}" for line in channel), "  };", "}", ""]
    return out


def render_speaker(name: str, settings: BgpSettings, routes: Sequence[SpeakerRoute]) -> str:
    """bird.conf for the LB speaker ``name``: ``routes`` announced to every neighbour."""
    out = _header("LB speaker", name, settings)
    for r in routes:
        out += [f"protocol static {static_name(r.prefix)} {{"]
        if not r.up:
            out.append("  disabled yes;")
        out += ["  ipv6;", f"  route {r.prefix} blackhole;", "}", ""]
    out += ["filter v6lb_export {", "  if source != RTS_STATIC then reject;"]
    for r in routes:
        med = r.med if r.med is not None else settings.med
        if med is not None:
            out.append(f"  if net = {r.prefix} then bgp_med = {med};")
    out += ["  accept;", "}", ""]
    for n in settings.neighbours:
        out += _session(settings, n, ["import none;", "export filter v6lb_export;"])
    return "\n".join(out).rstrip("\n") + "\n"


def render_router(
    name: str,
    settings: BgpSettings,
    *,
    ecmp_limit: int = 16,
    uplinks: Sequence[str] = (),
    uplink_med: int | None = None,
) -> str:
    """bird.conf for the router ``name``: learn from every neighbour, install ECMP routes.

    ``uplinks`` names the neighbours of a *site router* that face the upstream: the
    router passes its BGP routes (the site's LB announcements) on to them, with
    ``bgp_med = uplink_med`` (the site's cost, lower wins upstream), and learns
    nothing from them. MED is never passed on from one AS to another (RFC 4271
    §5.1.4), so the site router sets it explicitly. Without ``uplinks`` the
    router exports nothing over BGP.
    """
    known = {n.name for n in settings.neighbours}
    for u in uplinks:
        if u not in known:
            raise ValueError(f"uplink {u!r} is not a neighbour of {name}")
    out = _header("router", name, settings)
    out += [
        "protocol kernel {",
        "  ipv6 {",
        "    import none;",
        "    export where source = RTS_BGP;",
        "  };",
        f"  merge paths yes limit {ecmp_limit};",
        "}",
        "",
    ]
    if uplinks:
        out += ["filter v6lb_uplink {", "  if source != RTS_BGP then reject;"]
        if uplink_med is not None:
            out.append(f"  bgp_med = {uplink_med};")
        out += ["  accept;", "}", ""]
    for n in settings.neighbours:
        if n.name in uplinks:
            out += _session(settings, n, ["import none;", "export filter v6lb_uplink;"])
            continue
        if n.local_pref is not None:
            imp = f"import filter {{ bgp_local_pref = {n.local_pref}; accept; }};"
        else:
            imp = "import all;"
        out += _session(settings, n, [imp, "export none;"])
    return "\n".join(out).rstrip("\n") + "\n"
