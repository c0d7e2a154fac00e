"""The encapsulations, declared once: what each one is on the wire and what it is called.

An :class:`Encap` member is one way the LB wraps the client's packet: its
label, the bytes it adds in front of the packet, the next header of its outer
IPv6 header, the names the hop decoder (``model/hops.py``) gives a packet in
that form, and the words explain uses for it. Every layer reads these facts
from here: the DSR forwarder (``core/dsr.py``) takes the overhead of each of its
modes, the mode table (``model/modes.py``) names each tunnel mode's member,
the simulator hands a packet whose outer next header is one of
:data:`OUTER_NEXT_HEADERS` to the backend's decapsulator, explain prints
:attr:`Encap.title` and :attr:`Encap.sent`, and the HTML report marks the hops
whose protocol is in :data:`VIEW_NAMES` as encapsulated.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from v6lb.wire.constants import IPV6_HDR_LEN, NH_IPV6, NH_ROUTING, PROTO_NAMES

__all__ = ["OUTER_NEXT_HEADERS", "VIEW_NAMES", "Encap"]

_SRH_ONE_SEGMENT: Final = 8 + 16  # RFC 8754: the fixed part and one 16-byte segment


class Encap(Enum):
    """How the LB wraps the client's packet, and the bytes that adds in front of it.

    ``next_header``: the outer IPv6 header's next header (None: no outer header).
    ``views``: the names the hop decoder gives the outer packet: whole, then a
    later fragment of it (named by the protocol after the fragment header).
    ``title``: explain's "encapsulated in <title>". ``sent``: explain's note on
    where the LB sends a new flow's packet.
    """

    NONE = ("none", 0, None, (), "", "sent on")
    IP6IP6 = (  # RFC 2473
        "ip6ip6",
        IPV6_HDR_LEN,
        NH_IPV6,
        ("ipv6-in-ipv6", PROTO_NAMES[NH_IPV6]),
        "IPv6-in-IPv6",
        "encapsulated to its address (IPv6-in-IPv6)",
    )
    SRV6 = (  # RFC 8754, one segment
        "srv6",
        IPV6_HDR_LEN + _SRH_ONE_SEGMENT,
        NH_ROUTING,
        ("srv6", PROTO_NAMES[NH_IPV6]),
        "SRv6 (outer IPv6 + SRH)",
        "encapsulated to its SID",
    )

    def __init__(
        self,
        label: str,
        overhead: int,
        next_header: int | None,
        views: tuple[str, ...],
        title: str,
        sent: str,
    ) -> None:
        self.label = label
        self.overhead = overhead
        self.next_header = next_header
        self.views = views
        self.title = title
        self.sent = sent

    @classmethod
    def viewed_as(cls, name: str) -> Encap | None:
        """The encapsulation the hop decoder names ``name`` as a whole packet, or None."""
        return next((e for e in cls if e.views and e.views[0] == name), None)


OUTER_NEXT_HEADERS: Final = frozenset(e.next_header for e in Encap if e.next_header is not None)
"""The next headers an outer header of some encapsulation carries (41, 43)."""

VIEW_NAMES: Final = frozenset(name for e in Encap for name in e.views)
"""Every name the hop decoder gives an encapsulated packet or a fragment of one."""
