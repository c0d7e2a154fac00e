"""What the Python data plane installs: TUN devices, tables, rules (pure, no I/O).

Each forwarder kind present in the file gets its own TUN devices, one per
logical port, so the port of a packet is known from the device it was read
from and no per-packet dispatch is needed:

=====  ==============  ===========================================================
kind   device          what the kernel steers into it
=====  ==============  ===========================================================
nat    ``…-no``        ``to VIP/128`` (PORT_OUTSIDE)
nat    ``…-ni``        ``from BACKEND/128 ipproto P sport S`` and ``to SNAT`` (PORT_INSIDE)
npt    ``…-po``        ``to OUTSIDE-PREFIX`` (PORT_OUTSIDE)
npt    ``…-pi``        ``from INSIDE-PREFIX`` except ``to INSIDE-PREFIX`` (PORT_INSIDE)
dsr    ``…-do``        ``to VIP/128`` (PORT_OUTSIDE; the tunnelled packet goes back in here;
                       a ``dsr-l2`` frame leaves by an AF_PACKET socket on the egress link)
=====  ==============  ===========================================================

Each device has one routing table in the instance's table block (the top of
the block, away from the kernel engine's tables) holding ``default dev TUN``
(and a ``throw`` for the inside prefix in the npt inside table, so traffic
between inside hosts stays in the kernel). Every route and rule carries
``proto 0x76``, so :func:`v6lb.engines.kernel.apply.remove` deletes them.
A verdict for port P is written to the kind's device of port P; the kernel
routes it on from there.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Final

from v6lb.core.verdict import PORT_INSIDE, PORT_OUTSIDE
from v6lb.model.config import Config, VipMode
from v6lb.render.routes import ROUTE_PROTO, TAG_SPAN, instance_tag

__all__ = ["RULE_PREF", "Side", "Steering", "inject_macs", "inject_names", "plan", "tun_name"]

RULE_PREF: Final = 7590
"""Before the kernel engine's fwmark rules (7600) and the main table (32766)."""
_TABLE_TOP: Final = TAG_SPAN - 8
_KINDS: Final = {"nat": 0, "npt": 2, "dsr": 4}
_LETTER: Final = {"nat": "n", "npt": "p", "dsr": "d"}
_NOT_LOCAL: Final = "fib daddr type != local"
"""A rule on the source: what is addressed to the LB itself stays the kernel's (as the
``local`` table, looked up before the rules, keeps it with TUNs)."""


def tun_name(instance: str, kind: str, port: int) -> str:
    """``v6lb-<instance[:6]>-<n|p|d><o|i>``: at most 14 characters."""
    return f"v6lb-{instance[:6]}-{_LETTER[kind]}{'o' if port == PORT_OUTSIDE else 'i'}"


def inject_names(instance: str) -> tuple[str, str]:
    """``V6LB_PYTHON_IO=ring``: the veth pair the engine writes into (kernel end, engine end)."""
    return f"v6lb-{instance[:6]}-xk", f"v6lb-{instance[:6]}-xe"


def inject_macs(instance: str) -> tuple[str, str]:
    """The pair's MACs (kernel end, engine end): locally administered, from the instance
    name, so the netdev chain that names the kernel end's reads the same after a restart."""
    tail = ":".join(f"{b:02x}" for b in zlib.crc32(instance.encode()).to_bytes(4, "big"))
    return f"02:76:{tail}", f"06:76:{tail}"


@dataclass(slots=True)
class Side:
    """One TUN device: the forwarder kind behind it and the port its packets arrive on."""

    kind: str
    port: int
    name: str
    table: int
    rules: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    matches: list[str] = field(default_factory=list)
    """The same steering as nftables matches (``V6LB_PYTHON_IO=ring``: netdev ingress)."""


@dataclass(slots=True)
class Steering:
    instance: str
    sides: list[Side]

    def batch(self) -> str:
        """``ip -6 -batch`` text: routes first (their devices must be up), then rules."""
        lines = [r for s in self.sides for r in s.routes]
        lines += [r for s in self.sides for r in s.rules]
        return "\n".join(lines) + "\n"

    def names(self) -> list[str]:
        return [s.name for s in self.sides]


def _side(instance: str, kind: str, port: int) -> Side:
    table = instance_tag(instance) + _TABLE_TOP + _KINDS[kind] + (port == PORT_INSIDE)
    name = tun_name(instance, kind, port)
    proto = f"proto {ROUTE_PROTO:#x}"
    return Side(
        kind, port, name, table, routes=[f"route add default dev {name} table {table} {proto}"]
    )


def _rule(side: Side, match: str, nft: str) -> None:
    line = f"rule add {match} lookup {side.table} pref {RULE_PREF} protocol {ROUTE_PROTO:#x}"
    if line not in side.rules:  # two VIPs on one address (tcp and udp) share the rule
        side.rules.append(line)
        side.matches.append(nft)


def plan(config: Config) -> Steering:
    """The devices, tables and rules for every nat, npt and DSR part of ``config``."""
    inst = config.lb.instance
    sides: list[Side] = []
    nat = [v for v in config.vips if v.mode is VipMode.NAT]
    if nat:
        out, inn = _side(inst, "nat", PORT_OUTSIDE), _side(inst, "nat", PORT_INSIDE)
        for vip in nat:
            _rule(out, f"to {vip.address}/128", f"ip6 daddr {vip.address}")
            snat = getattr(vip.options, "snat", None)
            if snat is not None:
                _rule(inn, f"to {snat}", f"ip6 daddr {snat}")
                continue  # replies come back to the SNAT address
            ports = sorted({b.port for b in vip.backends if b.port} | set(vip.ports))
            for b in vip.backends:
                for port in [b.port] if b.port else ports:
                    _rule(
                        inn,
                        f"from {b.address}/128 ipproto {vip.protocol} sport {port}",
                        f"ip6 saddr {b.address} meta l4proto {vip.protocol} th sport {port}"
                        f" {_NOT_LOCAL}",
                    )
        sides += [out, inn]
    if config.npt:
        out, inn = _side(inst, "npt", PORT_OUTSIDE), _side(inst, "npt", PORT_INSIDE)
        for pair in config.npt:
            _rule(out, f"to {pair.outside}", f"ip6 daddr {pair.outside}")
            insides = ", ".join(str(p.inside) for p in config.npt)  # the throw routes
            _rule(
                inn,
                f"from {pair.inside}",
                f"ip6 saddr {pair.inside} ip6 daddr != {{ {insides} }} {_NOT_LOCAL}",
            )
            inn.routes.append(
                f"route add throw {pair.inside} table {inn.table} proto {ROUTE_PROTO:#x}"
            )
        sides += [out, inn]
    dsr = [v for v in config.vips if v.mode.is_dsr]
    if dsr:
        out = _side(inst, "dsr", PORT_OUTSIDE)
        for vip in dsr:
            _rule(out, f"to {vip.address}/128", f"ip6 daddr {vip.address}")
        sides.append(out)
    return Steering(inst, sides)
