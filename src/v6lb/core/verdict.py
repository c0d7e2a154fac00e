"""The one forwarder interface: (packet, ingress port, now) -> a cheap verdict.

A verdict is a 3-tuple ``(action, arg, data)``, built without any per-packet
object beyond the tuple itself:

- ``(FORWARD, out_port, pkt)``: send ``pkt`` (usually the input, rewritten in place).
- ``(FORWARD_MANY, out_port, [pkt, ...])``: several packets (outer fragments).
- ``(FORWARD_L2, out_port, mac)``: send the input unchanged to link-layer address ``mac``.
- ``(REPLY, out_port, pkt)``: the input is dropped (its reason is counted) and
  ``pkt``, an ICMPv6 message v6lb generated, is sent out of ``out_port``.
- ``(DROP, reason, None)``: the input is dropped; ``reason`` is a :class:`Reason`.

Ports are small integers; :data:`PORT_OUTSIDE` faces clients, :data:`PORT_INSIDE`
faces the private side (backends, the inside of an NPT translator),
:data:`PORT_LOCAL` is the node's own stack. ``(FORWARD_MANY, port, [])`` means
"held" (a fragment kept for reassembly; nothing to send yet).
"""

from __future__ import annotations

from typing import Final

from v6lb.wire.reasons import N_REASONS, Reason

FORWARD: Final = 1
FORWARD_MANY: Final = 2
FORWARD_L2: Final = 3
REPLY: Final = 4
DROP: Final = 5

ACTION_NAMES: Final = {
    FORWARD: "forward",
    FORWARD_MANY: "forward-many",
    FORWARD_L2: "forward-l2",
    REPLY: "reply",
    DROP: "drop",
}

PORT_OUTSIDE: Final = 0
PORT_INSIDE: Final = 1
PORT_LOCAL: Final = 2  # the node's own stack (a DSR backend delivering a decapsulated packet)

Verdict = tuple[int, int, object]


class Counters:
    """Per-forwarder counters: packets forwarded, replies sent, and drops by reason."""

    __slots__ = ("forwarded", "replies", "drops", "extra")

    def __init__(self) -> None:
        self.forwarded = 0
        self.replies = 0
        self.drops = [0] * N_REASONS
        self.extra: dict[str, int] = {}

    def drop(self, reason: int) -> None:
        self.drops[reason] += 1

    def bump(self, name: str, n: int = 1) -> None:
        self.extra[name] = self.extra.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        out = {"forwarded": self.forwarded, "replies": self.replies}
        for r in Reason:
            if self.drops[r]:
                out[f"drop.{r.label}"] = self.drops[r]
        out.update(self.extra)
        return out

    @property
    def dropped(self) -> int:
        return sum(self.drops)
