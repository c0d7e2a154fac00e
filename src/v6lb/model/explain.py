"""The explain builder: hop records in, a hop-by-hop table and plain answers out.

Used by the simulator's ``v6lb explain``/``v6lb demo`` and by ``v6lb lab trace`` to
explain real captures. It only compares what was observed: for each packet it
lines up consecutive hops (same ``packet_id``) and reports which addresses,
ports, encapsulation and hop limit changed at which node
(:func:`v6lb.model.hops.diff`). The answers are decided from the structured
changes (their :class:`~v6lb.model.hops.ChangeKind`) and the mode's kind in the
mode table (:mod:`v6lb.model.modes`), never from the text. The flow's facts
(which backend, what the application saw, what the LB keeps per flow) come
from the engine that ran the flow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from v6lb.model.hops import Change, ChangeKind, Hop, PacketView, diff
from v6lb.model.modes import MODES, Kind

MODE_TITLES = {name: m.title for name, m in MODES.items()}


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the hop table."""

    seq: int
    time: float
    leg: str
    link: str
    sender: str
    receiver: str
    src: str
    dst: str
    proto: str
    detail: str
    change: str  # what changed at ``sender`` compared with the previous hop of this packet, and why
    dropped: str | None = None
    packet_id: int = 0
    client_bound: bool = False  # the packet travels towards the client (a reply)
    follows_error: bool = False  # the first data its sender sent on the flow an ICMPv6 error quoted


@dataclass(frozen=True, slots=True)
class Answers:
    nat66_at_lb: bool
    nat_kind: str  # none | stateful destination NAT | stateful destination+source NAT | stateless prefix translation | new connection (proxy)
    changed_at_lb: list[str]  # e.g. "destination 2001:db8::80 -> fd00:10::11"
    backend_saw_source: str
    reply_via_lb: bool
    lb_state: str
    client_address_reaches_app: str


@dataclass(slots=True)
class Explanation:
    mode: str
    title: str
    rows: list[Row]
    answers: Answers
    facts: dict[str, object] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "title": self.title,
            "answers": asdict(self.answers),
            "hops": [asdict(r) for r in self.rows],
            "facts": {k: v for k, v in self.facts.items() if _jsonable(v)},
            "nodes": self.nodes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _jsonable(v: object) -> bool:
    try:
        json.dumps(v, default=str)
    except (TypeError, ValueError):
        return False
    return True


def build_rows(hops: Sequence[Hop], client: str = "") -> list[Row]:
    last: dict[int, PacketView] = {}
    first_sender: dict[int, str] = {}
    # (node, quoted source, quoted destination) -> the words for an ICMPv6 error the node
    # got about a packet it sent: its next data on that flow is marked (Packet Too Big: the
    # data that follows goes in smaller segments).
    told: dict[tuple[str, str, str], str] = {}
    rows: list[Row] = []
    for h in hops:
        p = h.pkt
        prev = last.get(h.packet_id) if h.packet_id else None
        follows = ""
        if prev is None:
            follows = _follows_error(h, told)
            change = h.note or (f"sent {follows}" if follows else "sent")
        else:
            d = diff(prev, p)
            change = "; ".join(c.text for c in d) if d else "unchanged"
            if h.note:
                change = f"{change} ({h.note})"
        if h.packet_id:
            last[h.packet_id] = p
            first_sender.setdefault(h.packet_id, h.sender)
        inner = p.carried
        err = p.error
        if err is not None and err.inner is not None and h.dropped is None:
            q = err.inner
            who = first_sender.get(h.packet_id, h.sender)
            told[(h.receiver, q.src.addr, q.dst.addr)] = f"after the {err.detail} from {who}"
        if err is not None and err.inner is not None:
            detail = f"{err.detail}, quoting [{err.inner.summary()}]"  # an error's quoted packet
            if err is not p:
                detail = f"inner icmpv6 {detail}"  # an error passed on in a tunnel
        elif p.encapsulated:
            detail = f"inner {inner.summary()}"
        else:
            detail = p.detail
        rows.append(
            Row(
                seq=h.seq,
                time=round(h.time, 6),
                leg=h.leg,
                link=h.link,
                sender=h.sender,
                receiver=h.receiver,
                src=str(p.src),
                dst=str(p.dst),
                proto=p.proto,
                detail=detail,
                change=change,
                dropped=h.dropped,
                packet_id=h.packet_id,
                client_bound=inner.dst.addr == client if client else False,
                follows_error=bool(follows),
            )
        )
    return rows


def _follows_error(h: Hop, told: dict[tuple[str, str, str], str]) -> str:
    """ "after the packet too big mtu 1280 from rtr" when ``h`` is the first data packet its
    sender sends on a flow an ICMPv6 error told it about, else ""."""
    p = h.pkt
    if p.carried.proto not in ("tcp", "udp") or "bytes" not in p.carried.detail:
        return ""
    return told.pop((h.sender, p.src.addr, p.dst.addr), "")


def _lb_changes(hops: Sequence[Hop], lb_nodes: set[str]) -> list[Change]:
    """Changes (but the hop limit) made by LB nodes on the first packet that crossed one."""
    before: dict[int, PacketView] = {}
    for h in hops:
        if h.receiver in lb_nodes and h.packet_id:
            before[h.packet_id] = h.pkt
        elif h.sender in lb_nodes and h.packet_id in before:
            prev = before.pop(h.packet_id)
            return [c for c in diff(prev, h.pkt) if c.kind is not ChangeKind.HOP_LIMIT]
    return []


def explain(
    mode: str,
    hops: Sequence[Hop],
    facts: Mapping[str, object],
    nodes: Mapping[str, str],
) -> Explanation:
    """Build the explanation of one mode's run."""
    lb_nodes = {n for n, role in nodes.items() if role == "lb"}
    changes = _lb_changes(hops, lb_nodes)
    addr_changes = [c for c in changes if c.kind.rewrites_address]
    outer = [c for c in addr_changes if not c.inner]
    mode_kind = MODES[mode].kind if mode in MODES else None
    proxy = mode_kind is Kind.PROXY
    if proxy:
        nat66 = False
        kind = "new connection (proxy)"
    elif mode_kind is Kind.TRANSLATE:
        nat66 = bool(addr_changes)
        kind = "stateless prefix translation" if nat66 else "none"
    elif mode_kind is Kind.NAT or (
        mode_kind is Kind.ANNOUNCE and any(c.kind.rewrites_destination for c in outer)
    ):
        nat66 = bool(addr_changes)
        snat = any(c.kind.rewrites_source for c in outer)
        kind = (
            ("stateful destination+source NAT" if snat else "stateful destination NAT")
            if nat66
            else "none"
        )
    else:
        nat66 = bool(outer) and not any(c.kind is ChangeKind.ENCAP and not c.inner for c in changes)
        kind = "none"
        if any(c.inner for c in addr_changes):
            nat66, kind = True, "unexpected inner rewrite"
    backend_saw = str(facts.get("backend_saw_source", "?"))
    app_saw = str(facts.get("app_saw_client", backend_saw))
    client = str(facts.get("client", "?"))
    how = str(facts.get("client_address_via", ""))
    if not how:
        if proxy:
            how = f"the LB sends it in a header; the application read {app_saw}"
        elif backend_saw == client:
            how = f"it is the packet's source address: the application sees {client} directly"
        else:
            how = f"the application sees {backend_saw}, not the client ({client})"
    answers = Answers(
        nat66_at_lb=nat66,
        nat_kind=kind,
        changed_at_lb=[c.text for c in addr_changes] if not proxy else [],
        backend_saw_source=backend_saw,
        reply_via_lb=bool(facts.get("reply_via_lb", False)),
        lb_state=str(facts.get("lb_state", "?")),
        client_address_reaches_app=how,
    )
    return Explanation(
        mode=mode,
        title=MODE_TITLES.get(mode, mode),
        rows=build_rows(hops, client),
        answers=answers,
        facts=dict(facts),
        nodes=dict(nodes),
    )


QUESTIONS = (
    ("nat66_at_lb", "Did NAT66 happen at the LB?"),
    ("backend_saw_source", "What source address did the backend see?"),
    ("reply_via_lb", "Does the reply go back through the LB?"),
    ("lb_state", "What state does the LB hold per flow?"),
    ("client_address_reaches_app", "How does the client's address reach the application?"),
)


def answer_lines(a: Answers) -> list[tuple[str, str]]:
    """The five questions with plain-language answers."""
    if a.nat66_at_lb:
        nat = f"yes: {a.nat_kind}; " + ", ".join(a.changed_at_lb)
    elif a.nat_kind.startswith("new connection"):
        nat = "no: the LB terminates the client's connection and opens a new one to the backend"
    else:
        nat = "no: the LB forwards the client's packet without rewriting its addresses"
    return [
        (QUESTIONS[0][1], nat),
        (QUESTIONS[1][1], a.backend_saw_source),
        (
            QUESTIONS[2][1],
            "yes" if a.reply_via_lb else "no: the backend replies straight to the client",
        ),
        (QUESTIONS[3][1], a.lb_state),
        (QUESTIONS[4][1], a.client_address_reaches_app),
    ]


def key_rows(rows: Sequence[Row]) -> list[Row]:
    """The hops of the first packet of each leg in each direction, every drop, and the
    first data packet a sender sent after an ICMPv6 error about its flow (``follows_error``).

    A compact view for terminals: the SYN, the SYN-ACK, the first request and
    the first response show every translation the flow gets; later packets of
    the same leg cross the same nodes the same way (the full list is in --json
    and in the report). A direction is the (source, destination) address pair of
    the packet's first hop, so a proxy's second connection has its own.
    """
    origin: dict[int, tuple[str, str]] = {}
    first: dict[tuple[str, str, str], int] = {}
    for r in rows:
        if not r.packet_id:
            continue
        o = origin.setdefault(r.packet_id, (r.src.rsplit(":", 1)[0], r.dst.rsplit(":", 1)[0]))
        first.setdefault((r.leg, *o), r.packet_id)
    keep = {pid for (leg, _, _), pid in first.items() if leg != "ack"}  # bare ACKs add nothing
    keep |= {r.packet_id for r in rows if r.follows_error}  # the data after a Packet Too Big
    return [r for r in rows if r.packet_id in keep or r.dropped or not r.packet_id]
