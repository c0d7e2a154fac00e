"""The self-contained HTML report of a demo run.

``v6lb demo`` writes one folder per run; this renders its ``report.html`` from
the same :class:`~v6lb.model.explain.Explanation` objects (hop rows, answers)
that the terminal tables print, so the two never disagree.

The output is one HTML5 document with inline CSS and inline SVG: no script, no
external font, image or stylesheet (a Content-Security-Policy forbids loading
anything), so it opens offline and from a mail attachment alike. Every string
that comes from a run (node names, addresses, drop reasons, facts) is escaped.
The renderer is pure and deterministic: same input, same bytes.

Per mode the report shows the five answers, a sequence diagram (one lane per
node, one arrow per hop row, encapsulated packets dashed with outer and inner
addresses, drops as a red cross with the reason at the node that dropped) and
the hop table; then a comparison of the modes side by side, then the failure
walk-throughs if any.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from v6lb.model.explain import Answers, Explanation, Row, answer_lines
from v6lb.wire.encap import VIEW_NAMES

__all__ = ["render_report", "render_sequence_svg", "lane_order"]

ROLE_ORDER = ("client", "router", "lb", "node", "pod")
# (stroke, fill) per role; unknown roles get the last entry.
ROLE_COLOURS: Mapping[str, tuple[str, str]] = {
    "client": ("#1d4ed8", "#dbeafe"),
    "router": ("#4b5563", "#e5e7eb"),
    "lb": ("#c2410c", "#ffedd5"),
    "node": ("#15803d", "#dcfce7"),
    "pod": ("#be185d", "#fce7f3"),
    "": ("#6b7280", "#f3f4f6"),
}
ENCAP_PROTOS = VIEW_NAMES  # the hop names of an encapsulated packet (wire/encap.py)
ADDRESS_CHANGES = ("source", "destination", "inner ", "encapsulated", "decapsulated")

# Geometry of the sequence diagram, in CSS pixels.
CHAR_W = 7.4  # advance of one 12px monospace character (DejaVu Sans Mono: 7.22)
NAME_CHAR_W = 7.6  # bold 12px sans-serif, generous
NAME_MAX = 26  # longer node names are shortened in the lane header (full name in a tooltip)
GUTTER = 44  # left column holding the row numbers
MIN_LANE = 150
HEAD_H = 42
LINE_H = 14
RIGHT_PAD = 12
ROW_GAP = 18  # between the last label of a row and the first of the next
DEFAULT_MAX_ROWS = 500


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _fmt(value: object, limit: int = 400) -> str:
    """A fact value as text, deterministic (sets sorted), cut at ``limit`` characters."""

    def walk(v: object) -> str:
        if isinstance(v, set | frozenset):
            return "{" + ", ".join(sorted(walk(x) for x in v)) + "}"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{walk(k)}: {walk(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(walk(x) for x in v) + "]"
        return str(v)

    s = walk(value)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# --- lanes -------------------------------------------------------------------


def lane_order(nodes: Mapping[str, str], rows: Sequence[Row] = ()) -> list[tuple[str, str]]:
    """(name, role) of every lane, left to right: client, router, lb, node, pod.

    Nodes sharing a role keep the order of ``nodes``; nodes with another role
    follow, then any sender or receiver of a row that ``nodes`` does not name.
    """

    def rank(role: str) -> int:
        return ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)

    names = list(nodes)
    ordered = sorted(range(len(names)), key=lambda i: (rank(nodes[names[i]]), i))
    lanes = [(names[i], nodes[names[i]]) for i in ordered]
    seen = set(nodes)
    for r in rows:
        for n in (r.sender, r.receiver):
            if n not in seen:
                seen.add(n)
                lanes.append((n, ""))
    return lanes


# --- one row of the diagram --------------------------------------------------


def _encapsulated(r: Row) -> bool:
    return r.proto in ENCAP_PROTOS


def _inner_text(r: Row) -> str:
    d = r.detail
    for prefix in (f"{r.proto}: ", "inner "):  # the label says "inner" itself
        if d.startswith(prefix):
            d = d[len(prefix) :]
    return d.replace(" -> ", " → ")


def _packet_text(r: Row) -> str:
    """Protocol and detail, without saying the protocol twice (encapsulated rows)."""
    if r.detail.startswith(f"{r.proto}:"):
        return r.detail.replace(" -> ", " → ")
    return f"{r.proto} {r.detail}".strip()


def _address_changes(change: str) -> str:
    """The part of a row's change that rewrote addresses or encapsulation (not hop limit)."""
    kept = [p for p in change.split("; ") if p.startswith(ADDRESS_CHANGES)]
    return "; ".join(kept)


@dataclass(frozen=True, slots=True)
class _Label:
    text: str
    cls: str


def _row_labels(r: Row) -> tuple[list[_Label], list[_Label]]:
    """Text above the arrow and below it."""
    if _encapsulated(r):
        above = [_Label(f"outer {r.src} → {r.dst}", "lbl encap")]
        below = [_Label(f"{r.proto}, inner {_inner_text(r)}", "lbl encap")]
    else:
        above = [_Label(f"{r.src} → {r.dst}", "lbl")]
        below = [_Label(f"{r.proto} {r.detail}".strip(), "lbl sub")]
    changed = _address_changes(r.change)
    if changed and not r.dropped:
        below.append(_Label(f"↳ {r.sender}: {changed.replace(' -> ', ' → ')}", "lbl chg"))
    if r.dropped:
        below.append(_Label(f"✗ dropped at {r.receiver}: {r.dropped}", "lbl drop"))
    return above, below


def _text_w(s: str) -> float:
    return len(s) * CHAR_W


def _n(v: float) -> str:
    return str(round(v))


def render_sequence_svg(
    exp: Explanation, *, max_rows: int = DEFAULT_MAX_ROWS, label: str = ""
) -> str:
    """One ``<svg>``: a lane per node, an arrow per hop row (at most ``max_rows``)."""
    rows = exp.rows[:max_rows]
    lanes = lane_order(exp.nodes, rows)
    names = [n if len(n) <= NAME_MAX else n[: NAME_MAX - 1] + "…" for n, _ in lanes]
    labels = [_row_labels(r) for r in rows]
    widest_label = max(
        (_text_w(lb.text) for above, below in labels for lb in (*above, *below)), default=0.0
    )
    widest_name = max((len(n) * NAME_CHAR_W for n in names), default=0.0)
    n_lanes = max(1, len(lanes))
    lane_w = max(float(MIN_LANE), widest_name + 24)
    width = max(GUTTER + lane_w * n_lanes + RIGHT_PAD, GUTTER + widest_label + 2 * RIGHT_PAD)
    lane_w = (width - GUTTER - RIGHT_PAD) / n_lanes
    xs = {name: GUTTER + lane_w * (i + 0.5) for i, (name, _) in enumerate(lanes)}

    body: list[str] = []
    y = HEAD_H + 18.0
    leg = None
    for r, (above, below) in zip(rows, labels, strict=True):
        if r.leg and r.leg != leg:
            body.append(
                f'<rect class="leg" x="{GUTTER}" y="{_n(y)}" width="{_n(width - GUTTER)}" '
                f'height="18"/><text class="legname" x="{GUTTER + 6}" y="{_n(y + 13)}">'
                f"{_e(r.leg)}</text>"
            )
            y += 24
        leg = r.leg
        body.append(_arrow(r, xs, width, y, above, below))
        y += LINE_H * (len(above) + len(below)) + ROW_GAP
    if not rows:
        body.append(
            f'<text class="lbl sub" x="{GUTTER + 6}" y="{_n(y + 14)}">no packets recorded</text>'
        )
        y += 28
    if len(exp.rows) > len(rows):
        body.append(
            f'<text class="lbl sub" x="{GUTTER + 6}" y="{_n(y + 14)}">'
            f"… {len(exp.rows) - len(rows)} more hops not drawn (see the JSON output)</text>"
        )
        y += 28
    footer = len(rows) > 12
    height = y + (HEAD_H + 16 if footer else 8)

    out: list[str] = []
    title = label or f"Sequence of packets, {exp.mode}"
    out.append(
        f'<svg class="seq" role="img" aria-label="{_e(title)}" width="{_n(width)}" '
        f'height="{_n(height)}" viewBox="0 0 {_n(width)} {_n(height)}">'
    )
    out.append(f"<title>{_e(title)}</title>")
    life_end = height - (HEAD_H + 8 if footer else 8)
    for name, role in lanes:
        stroke, _ = ROLE_COLOURS.get(role, ROLE_COLOURS[""])
        x = xs[name]
        out.append(
            f'<line class="life" x1="{_n(x)}" y1="{HEAD_H + 8}" x2="{_n(x)}" '
            f'y2="{_n(life_end)}" stroke="{stroke}"/>'
        )
    for (name, role), short in zip(lanes, names, strict=True):
        out.append(_lane_head(name, short, role, xs[name], lane_w, 4))
        if footer:
            out.append(_lane_head(name, short, role, xs[name], lane_w, height - HEAD_H - 4))
    out.extend(body)
    out.append("</svg>")
    return "\n".join(out)


def _lane_head(name: str, short: str, role: str, x: float, lane_w: float, y: float) -> str:
    stroke, fill = ROLE_COLOURS.get(role, ROLE_COLOURS[""])
    w = lane_w - 14
    return (
        f'<g class="lane"><title>{_e(name)} ({_e(role or "unknown role")})</title>'
        f'<rect x="{_n(x - w / 2)}" y="{_n(y)}" width="{_n(w)}" height="{HEAD_H}" rx="6" '
        f'fill="{fill}" stroke="{stroke}"/>'
        f'<text class="name" x="{_n(x)}" y="{_n(y + 18)}" text-anchor="middle">{_e(short)}</text>'
        f'<text class="role" x="{_n(x)}" y="{_n(y + 34)}" text-anchor="middle" fill="{stroke}">'
        f"{_e(role or '?')}</text></g>"
    )


def _arrow(
    r: Row,
    xs: Mapping[str, float],
    width: float,
    y0: float,
    above: list[_Label],
    below: list[_Label],
) -> str:
    x1, x2 = xs[r.sender], xs[r.receiver]
    ya = y0 + LINE_H * len(above) + 5  # the arrow's y
    cls = "arrow drop" if r.dropped else "arrow encap" if _encapsulated(r) else "arrow"
    tip = f"#{r.seq} {r.leg} {r.sender} → {r.receiver} on {r.link}: " + (
        f"DROPPED: {r.dropped}" if r.dropped else r.change
    )
    g = [f'<g class="{cls}"><title>{_e(tip)}</title>']
    g.append(
        f'<text class="seqno" x="{GUTTER - 6}" y="{_n(ya + 4)}" text-anchor="end">{r.seq}</text>'
    )
    if x1 == x2:  # a node talking to itself: a small loop to the right
        g.append(
            f'<path class="shaft" d="M{_n(x1)} {_n(ya - 5)} h26 v10 h-18" fill="none"/>'
            f'<polygon class="head" points="{_n(x1)},{_n(ya + 5)} {_n(x1 + 9)},{_n(ya + 1)} '
            f'{_n(x1 + 9)},{_n(ya + 9)}"/>'
        )
        anchor_x, anchor = x1 + 34, "start"
    else:
        d = 1 if x2 > x1 else -1
        if _encapsulated(r) and not r.dropped:
            g.append(
                f'<line class="tunnel" x1="{_n(x1)}" y1="{_n(ya)}" x2="{_n(x2 - d * 9)}" '
                f'y2="{_n(ya)}"/>'
            )
        end = x2 if r.dropped else x2 - d * 8
        g.append(f'<line class="shaft" x1="{_n(x1)}" y1="{_n(ya)}" x2="{_n(end)}" y2="{_n(ya)}"/>')
        if r.dropped:
            g.append(
                f'<path class="cross" d="M{_n(x2 - 7)} {_n(ya - 7)} L{_n(x2 + 7)} {_n(ya + 7)} '
                f'M{_n(x2 - 7)} {_n(ya + 7)} L{_n(x2 + 7)} {_n(ya - 7)}"/>'
            )
        else:
            g.append(
                f'<polygon class="head" points="{_n(x2)},{_n(ya)} {_n(x2 - d * 10)},{_n(ya - 5)} '
                f'{_n(x2 - d * 10)},{_n(ya + 5)}"/>'
            )
        anchor_x, anchor = (x1 + x2) / 2, "middle"
    lines = [(lb, ya - 5 - LINE_H * (len(above) - 1 - i)) for i, lb in enumerate(above)]
    lines += [(lb, ya + 5 + LINE_H * (i + 1) - 2) for i, lb in enumerate(below)]
    for lb, yb in lines:
        half = _text_w(lb.text) / 2
        centre = anchor_x + half if anchor == "start" else anchor_x
        x = min(max(centre, GUTTER + half + 4), width - half - 4)
        g.append(
            f'<text class="{lb.cls}" x="{_n(x)}" y="{_n(yb)}" text-anchor="middle">'
            f"{_e(lb.text)}</text>"
        )
    g.append("</g>")
    return "".join(g)


# --- HTML --------------------------------------------------------------------

CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  color: #111827; background: #f9fafb; }
header, main, footer, nav { max-width: 1500px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 0 0 6px; }
h3 { font-size: 16px; margin: 18px 0 6px; }
.note { color: #4b5563; margin: 0 0 12px; }
.howto { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 12px 16px; }
.howto p { margin: 0 0 8px; }
.legend { display: flex; flex-wrap: wrap; gap: 8px 22px; margin: 6px 0 0; padding: 0;
  list-style: none; font-size: 14px; }
.legend li { display: flex; align-items: center; gap: 8px; }
.swatch { display: inline-block; width: 42px; height: 0; border-top: 2px solid #111827; }
.swatch.encap { border-top: 3px dashed #7c3aed; box-shadow: 0 0 0 3px #ede9fe; }
.swatch.drop { border-top-color: #dc2626; }
.swatch.chg { width: auto; height: auto; border: 0; color: #b45309; font-family: monospace; }
nav ol { margin: 12px 0 0; padding-left: 22px; columns: 2 360px; }
nav a, td a { color: #1d4ed8; }
section.mode { background: #fff; border: 1px solid #e5e7eb; border-radius: 10px;
  padding: 16px 20px; margin: 22px 0; }
section.mode.failure { border-color: #fca5a5; }
.modename { font-family: ui-monospace, "DejaVu Sans Mono", monospace; color: #6b7280;
  font-size: 15px; font-weight: normal; }
.summary { margin: 0 0 8px; }
table { border-collapse: collapse; }
table.answers td, table.answers th { text-align: left; vertical-align: top; padding: 3px 12px 3px 0; }
table.answers th { font-weight: 600; white-space: nowrap; }
.diagram { overflow-x: auto; border: 1px solid #e5e7eb; border-radius: 8px; background: #fff;
  margin: 8px 0; }
svg.seq { display: block; }
svg.seq text { font: 12px ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace; }
svg.seq text.name { font: bold 12px system-ui, "DejaVu Sans", sans-serif; fill: #111827; }
svg.seq text.role { font: 11px system-ui, "DejaVu Sans", sans-serif; }
svg.seq text.lbl { paint-order: stroke; stroke: #fff; stroke-width: 4px; stroke-linejoin: round;
  fill: #111827; }
svg.seq text.sub { fill: #4b5563; }
svg.seq text.encap { fill: #6d28d9; }
svg.seq text.chg { fill: #b45309; }
svg.seq text.drop { fill: #dc2626; font-weight: bold; }
svg.seq text.seqno { fill: #9ca3af; font-size: 11px; }
svg.seq text.legname { font: bold 12px system-ui, "DejaVu Sans", sans-serif; fill: #374151; }
svg.seq rect.leg { fill: #f3f4f6; }
svg.seq line.life { stroke-dasharray: 3 4; stroke-width: 1; opacity: 0.55; }
svg.seq .shaft { stroke: #111827; stroke-width: 1.6; fill: none; }
svg.seq .head { fill: #111827; }
svg.seq .encap .shaft { stroke: #7c3aed; stroke-width: 2; stroke-dasharray: 7 4; }
svg.seq .encap .head { fill: #7c3aed; }
svg.seq .tunnel { stroke: #ede9fe; stroke-width: 9; stroke-linecap: round; }
svg.seq .drop .shaft { stroke: #dc2626; stroke-dasharray: 2 3; }
svg.seq .cross { stroke: #dc2626; stroke-width: 3; stroke-linecap: round; fill: none; }
.tablewrap { overflow-x: auto; }
table.hops { font-size: 12.5px; width: 100%; }
table.hops th, table.hops td { border-bottom: 1px solid #e5e7eb; padding: 3px 8px; text-align: left;
  vertical-align: top; }
table.hops th { background: #f3f4f6; position: sticky; top: 0; }
table.hops td.addr, table.hops td.pkt { font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
table.hops td.addr, table.hops td.hop { white-space: nowrap; }
table.hops td.pkt { overflow-wrap: anywhere; min-width: 12em; }
table.hops td.chg { min-width: 16em; }
table.hops td.num { text-align: right; color: #6b7280; }
table.hops tr.drop td { background: #fef2f2; }
table.hops tr.drop td.chg { color: #b91c1c; font-weight: 600; }
table.hops tr.encap td.pkt { color: #6d28d9; }
details { margin: 8px 0; }
details table td, details table th { text-align: left; vertical-align: top; padding: 2px 12px 2px 0;
  font-size: 13px; }
details table td { font-family: ui-monospace, "DejaVu Sans Mono", monospace;
  overflow-wrap: anywhere; }
section.compare { margin: 22px 0; }
table.compare { background: #fff; font-size: 13.5px; }
table.compare th, table.compare td { border: 1px solid #e5e7eb; padding: 6px 10px; text-align: left;
  vertical-align: top; }
table.compare th { background: #f3f4f6; }
.yes { color: #b45309; font-weight: 600; }
.no { color: #15803d; font-weight: 600; }
.mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
table.compare td.addr { white-space: nowrap; }
footer { color: #6b7280; font-size: 13px; padding-bottom: 28px; }
@media print { body { background: #fff; } section.mode { break-inside: auto; }
  .diagram { overflow: visible; border: 0; } }
"""

HOWTO = (
    "Each section below is one forwarding mode, run on the same simulated network: a client "
    "on the internet, a router, the load balancer holding the public VIP, and private nodes "
    "and pods behind it. First come the five answers (did NAT66 happen, what source the "
    "backend saw, whether the reply crosses the LB, what the LB remembers per flow, and how "
    "the client's address reaches the application). Then the sequence diagram: time runs "
    "down, every vertical line is a node, every arrow is one packet on one link, labelled with "
    "the addresses it carried on that link. The hop table under it holds the same rows as "
    "the terminal output of <code>v6lb explain</code>, with what each node changed and why. "
    "Hover an arrow for its full record. The modes are compared side by side at the end."
)


def _yesno(v: bool) -> str:
    return '<span class="yes">yes</span>' if v else '<span class="no">no</span>'


def _answers_html(a: Answers) -> str:
    rows = "".join(f"<tr><th>{_e(q)}</th><td>{_e(ans)}</td></tr>" for q, ans in answer_lines(a))
    return f'<table class="answers">{rows}</table>'


def _hop_table(exp: Explanation, max_rows: int) -> str:
    head = (
        "<tr><th>#</th><th>leg</th><th>link</th><th>hop</th><th>source</th>"
        "<th>destination</th><th>packet</th><th>what changed here, and why</th></tr>"
    )
    body: list[str] = []
    for r in exp.rows[:max_rows]:
        cls = "drop" if r.dropped else "encap" if _encapsulated(r) else ""
        change = f"DROPPED at {r.receiver}: {r.dropped}" if r.dropped else r.change
        body.append(
            f'<tr class="{cls}"><td class="num">{r.seq}</td><td>{_e(r.leg)}</td>'
            f'<td>{_e(r.link)}</td><td class="hop">{_e(r.sender)} → {_e(r.receiver)}</td>'
            f'<td class="addr">{_e(r.src)}</td><td class="addr">{_e(r.dst)}</td>'
            f'<td class="pkt">{_e(_packet_text(r))}</td>'
            f'<td class="chg">{_e(change)}</td></tr>'
        )
    more = ""
    if len(exp.rows) > max_rows:
        more = f'<p class="note">… {len(exp.rows) - max_rows} more hops not shown.</p>'
    return (
        f'<div class="tablewrap"><table class="hops"><thead>{head}</thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{more}"
    )


def _facts_html(facts: Mapping[str, object], open_: bool) -> str:
    if not facts:
        return ""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in facts.items())
    return (
        f"<details{' open' if open_ else ''}><summary>Facts recorded by the engine "
        f"({len(facts)})</summary><table>{rows}</table></details>"
    )


def _engines_html(facts: Mapping[str, object]) -> str:
    """packet-too-big: how each engine passes the error on, and where it cannot work."""
    engines, cannot = facts.get("engines"), facts.get("cannot_work")
    out = []
    if isinstance(engines, list) and engines:
        rows = []
        for n in engines:
            more = [f"quote shape {i}: {q}" for i, q in enumerate(n.get("quote_shapes") or [], 1)]
            more += [f"{k}: {n[k]}" for k in ("dropped", "limit") if n.get(k)]
            more += [f"counter {k}: {v}" for k, v in (n.get("counters") or {}).items()]
            extra = "".join(f"<li>{_e(m)}</li>" for m in more)
            rows.append(
                f"<tr><th>{_e(n['engine'])}<br><small>{_e(n['run'])}</small></th>"
                f"<td>{_e(n['how'])}{f'<ul>{extra}</ul>' if extra else ''}</td></tr>"
            )
        out.append("<h3>How each engine passes a Packet Too Big for the VIP on</h3>")
        out.append(f'<table class="engines">{"".join(rows)}</table>')
    if isinstance(cannot, list) and cannot:
        items = "".join(f"<li><b>{_e(c['where'])}</b>: {_e(c['why'])}</li>" for c in cannot)
        out.append(f"<h3>Where it cannot work, whatever the LB does</h3><ul>{items}</ul>")
    return "\n".join(out)


def _section(exp: Explanation, anchor: str, *, failure: bool, max_rows: int) -> str:
    kind = "Failure" if failure else "Mode"
    out = [
        f'<section class="mode{" failure" if failure else ""}" id="{_e(anchor)}">',
        f'<h2>{_e(exp.title)} <span class="modename">{kind.lower()} {_e(exp.mode)}</span></h2>',
    ]
    summary = exp.facts.get("summary")
    if isinstance(summary, str) and summary:
        out.append(f'<p class="summary">{_e(summary)}</p>')
    out.append("<h3>The five answers</h3>")
    out.append(_answers_html(exp.answers))
    out.append("<h3>Sequence of packets</h3>")
    label = f"{kind} {exp.mode}: sequence of packets"
    out.append(
        f'<div class="diagram">{render_sequence_svg(exp, max_rows=max_rows, label=label)}</div>'
    )
    out.append("<h3>Hop by hop</h3>")
    out.append(_hop_table(exp, max_rows))
    out.append(_engines_html(exp.facts))
    out.append(_facts_html(exp.facts, open_=failure))
    out.append("</section>")
    return "\n".join(x for x in out if x)


def _comparison(exps: Sequence[Explanation], anchors: Sequence[str]) -> str:
    head = (
        "<tr><th>mode</th><th>NAT66 at the LB?</th><th>kind of translation</th>"
        "<th>source the backend saw</th><th>reply via the LB?</th><th>LB state per flow</th>"
        "<th>how the client address reaches the app</th></tr>"
    )
    body = []
    for e, anchor in zip(exps, anchors, strict=True):
        a = e.answers
        changed = (
            f'<br><span class="mono">{_e(", ".join(a.changed_at_lb))}</span>'
            if a.changed_at_lb
            else ""
        )
        body.append(
            f'<tr><td><a href="#{_e(anchor)}"><b>{_e(e.mode)}</b></a><br>'
            f"<small>{_e(e.title)}</small></td>"
            f"<td>{_yesno(a.nat66_at_lb)}</td><td>{_e(a.nat_kind)}{changed}</td>"
            f'<td class="mono addr">{_e(a.backend_saw_source)}</td><td>{_yesno(a.reply_via_lb)}</td>'
            f"<td>{_e(a.lb_state)}</td><td>{_e(a.client_address_reaches_app)}</td></tr>"
        )
    return (
        '<section class="compare" id="comparison"><h2>The modes side by side</h2>'
        f'<div class="tablewrap"><table class="compare"><thead>{head}</thead>'
        f"<tbody>{''.join(body)}</tbody></table></div></section>"
    )


def render_report(
    explanations: Sequence[Explanation],
    *,
    title: str = "v6lb demo: how each mode carries a packet",
    failures: Sequence[Explanation] = (),
    generated_note: str = "",
    max_rows: int = DEFAULT_MAX_ROWS,
) -> str:
    """The whole report as one self-contained HTML5 document.

    ``explanations`` are the modes, in the order to show them; ``failures``
    are failure walk-throughs drawn the same way. ``generated_note`` (e.g. the
    command line and the time of the run) is shown under the title as given:
    nothing time-dependent is added here. At most ``max_rows`` hops per mode
    are drawn and tabled.
    """
    anchors = [f"mode-{i + 1}-{_slug(e.mode)}" for i, e in enumerate(explanations)]
    fanchors = [f"failure-{i + 1}-{_slug(e.mode)}" for i, e in enumerate(failures)]
    toc = [
        f'<li><a href="#{_e(a)}">{_e(e.mode)}</a>: {_e(e.title)}</li>'
        for e, a in zip(explanations, anchors, strict=True)
    ]
    if explanations:
        toc.append('<li><a href="#comparison">The modes side by side</a></li>')
    toc += [
        f'<li><a href="#{_e(a)}">failure: {_e(e.mode)}</a>: {_e(e.title)}</li>'
        for e, a in zip(failures, fanchors, strict=True)
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>{_e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{_e(title)}</h1>",
    ]
    if generated_note:
        out.append(f'<p class="note">{_e(generated_note)}</p>')
    out += [
        '<div class="howto">',
        f"<p><b>How to read this.</b> {HOWTO}</p>",
        '<ul class="legend">',
        '<li><span class="swatch"></span> a packet, labelled <code>source → destination</code>'
        " then protocol and detail</li>",
        '<li><span class="swatch encap"></span> encapsulated: outer addresses above the arrow, '
        "the inner packet below</li>",
        '<li><span class="swatch drop"></span><b style="color:#dc2626">✗</b> dropped at that '
        "node, with the reason</li>",
        '<li><span class="swatch chg">↳</span> addresses the sending node rewrote</li>',
        "</ul>",
        "</div>",
        "</header>",
    ]
    if toc:
        out.append(f"<nav><h3>Contents</h3><ol>{''.join(toc)}</ol></nav>")
    out.append("<main>")
    if not explanations and not failures:
        out.append('<p class="note">No modes were run.</p>')
    for e, a in zip(explanations, anchors, strict=True):
        out.append(_section(e, a, failure=False, max_rows=max_rows))
    if explanations:
        out.append(_comparison(explanations, anchors))
    if failures:
        out.append('<h2 id="failures">Failure walk-throughs</h2>')
        for e, a in zip(failures, fanchors, strict=True):
            out.append(_section(e, a, failure=True, max_rows=max_rows))
    out += [
        "</main>",
        "<footer><p>Drawn by v6lb from the recorded hops; self-contained, no scripts, "
        "nothing loaded from the network.</p></footer>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(out)
