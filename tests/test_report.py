"""The HTML report: built from real packets through the explain builder, then checked.

The hop lists are synthetic but the packets are real (``v6lb.wire.build``), so
the addresses in the diagram are what ``PacketView`` decoded, as in a demo run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from v6lb.model.explain import Explanation, explain
from v6lb.model.hops import Hop
from v6lb.render.report import lane_order, render_report, render_sequence_svg
from v6lb.wire import build
from v6lb.wire.constants import NH_IPV6, TCP_ACK

TCP_SYN, TCP_PSH = 0x02, 0x08

CLIENT = "2001:db8:ffff::1234"
VIP = "2001:db8:100::80"
LB = "fd00:10::2"
NODE1 = "fd00:10::11"
NODE2 = "fd00:10::12"
POD1 = "fd00:20:1::5"
ROGUE = "fd00:99::1"

NODES = {
    "pod-a": "pod",
    "node-1": "node",
    "lb-2": "lb",
    "client": "client",
    "lb-1": "lb",
    "node-2": "node",
    "router": "router",
}
DROP_REASON = "not-from-lb: outer source fd00:99::1 is not a configured LB"


class _Hops:
    """Numbers the hops as they are added."""

    def __init__(self) -> None:
        self.hops: list[Hop] = []

    def add(
        self, link: str, sender: str, receiver: str, data: bytes, pid: int, leg: str, **kw: str
    ) -> None:
        n = len(self.hops) + 1
        self.hops.append(Hop(n, n / 1000, link, sender, receiver, bytes(data), pid, leg, **kw))


def _syn(src: str, dst: str, sport: int, dport: int, hl: int = 64) -> bytes:
    return bytes(build.tcp(src, dst, sport, dport, flags=TCP_SYN, hop_limit=hl))


def _data(src: str, dst: str, sport: int, dport: int, hl: int = 64) -> bytes:
    return bytes(
        build.tcp(
            src,
            dst,
            sport,
            dport,
            flags=TCP_ACK | TCP_PSH,
            payload=b"GET / HTTP/1.1\r\n\r\n",
            hop_limit=hl,
        )
    )


def nat_explanation(extra_requests: int = 0) -> Explanation:
    """Client -> VIP, the LB rewrites the destination to node-1, the reply is un-NATed."""
    h = _Hops()
    h.add("internet", "client", "router", _syn(CLIENT, VIP, 40000, 443), 1, "request")
    h.add("edge", "router", "lb-1", _syn(CLIENT, VIP, 40000, 443, 63), 1, "request")
    h.add(
        "private",
        "lb-1",
        "node-1",
        _syn(CLIENT, NODE1, 40000, 8443, 62),
        1,
        "request",
        note="DNAT to the chosen backend",
    )
    h.add(
        "private",
        "node-1",
        "lb-1",
        build.tcp(NODE1, CLIENT, 8443, 40000, flags=TCP_SYN | TCP_ACK),
        2,
        "reply",
    )
    h.add(
        "edge",
        "lb-1",
        "router",
        build.tcp(VIP, CLIENT, 443, 40000, flags=TCP_SYN | TCP_ACK, hop_limit=63),
        2,
        "reply",
    )
    h.add(
        "internet",
        "router",
        "client",
        build.tcp(VIP, CLIENT, 443, 40000, flags=TCP_SYN | TCP_ACK, hop_limit=62),
        2,
        "reply",
    )
    for i in range(extra_requests):
        pid = 10 + i
        h.add("internet", "client", "router", _data(CLIENT, VIP, 40000, 443), pid, "data")
        h.add("edge", "router", "lb-1", _data(CLIENT, VIP, 40000, 443, 63), pid, "data")
        h.add("private", "lb-1", "node-1", _data(CLIENT, NODE1, 40000, 8443, 62), pid, "data")
    facts = {
        "client": CLIENT,
        "backend_saw_source": CLIENT,
        "reply_via_lb": True,
        "lb_state": "a conntrack entry per flow (original and reply tuples)",
        "backends": {NODE2, NODE1},
    }
    return explain("nat", h.hops, facts, NODES)


def _encap(outer_src: str, outer_dst: str, inner: bytes) -> bytes:
    return bytes(build.ipv6(outer_src, outer_dst, NH_IPV6, inner, hop_limit=64))


def dsr_explanation() -> Explanation:
    """The LB wraps the client's packet in IPv6-in-IPv6; the node decapsulates; direct reply."""
    h = _Hops()
    h.add("internet", "client", "router", _syn(CLIENT, VIP, 40001, 443), 1, "request")
    h.add("edge", "router", "lb-2", _syn(CLIENT, VIP, 40001, 443, 63), 1, "request")
    h.add(
        "private",
        "lb-2",
        "node-1",
        _encap(LB, NODE1, _syn(CLIENT, VIP, 40001, 443, 63)),
        1,
        "request",
    )
    h.add(
        "cni",
        "node-1",
        "pod-a",
        _syn(CLIENT, VIP, 40001, 443, 62),
        1,
        "request",
        note="decapsulated; VIP on lo",
    )
    syn_ack = build.tcp(VIP, CLIENT, 443, 40001, flags=TCP_SYN | TCP_ACK)
    h.add("cni", "pod-a", "node-1", syn_ack, 2, "reply")
    h.add(
        "private",
        "node-1",
        "router",
        build.tcp(VIP, CLIENT, 443, 40001, flags=TCP_SYN | TCP_ACK, hop_limit=63),
        2,
        "reply",
    )
    h.add(
        "internet",
        "router",
        "client",
        build.tcp(VIP, CLIENT, 443, 40001, flags=TCP_SYN | TCP_ACK, hop_limit=62),
        2,
        "reply",
    )
    facts = {
        "client": CLIENT,
        "backend_saw_source": CLIENT,
        "reply_via_lb": False,
        "lb_state": "none (a consistent hash; an LRU cache of flow -> backend)",
    }
    return explain("dsr-ip6ip6", h.hops, facts, NODES)


def failure_explanation() -> Explanation:
    """A tunnel from a source that is not a configured LB: node-2 refuses to decapsulate."""
    h = _Hops()
    h.add(
        "private",
        "lb-1",
        "node-2",
        _encap(ROGUE, NODE2, _syn(CLIENT, VIP, 40002, 443, 63)),
        1,
        "request",
        dropped=DROP_REASON,
    )
    facts = {
        "client": CLIENT,
        "backend_saw_source": "nothing: the packet was dropped",
        "summary": "A spoofed tunnel source is refused by the decapsulating node.",
    }
    return explain("dsr-ip6ip6", h.hops, facts, NODES)


def sample_report() -> str:
    """A report with two modes and one failure (also used to eyeball the layout)."""
    return render_report(
        [nat_explanation(extra_requests=1), dsr_explanation()],
        title="v6lb demo report",
        failures=[failure_explanation()],
        generated_note="synthetic hops for the tests",
    )


# --- a strict look at the HTML -----------------------------------------------

VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


class StrictParser(HTMLParser):
    """Records elements, attributes and text/title strings; reports misnested or unclosed tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.svg_texts: list[str] = []
        self.svg_count = 0
        self.doctype = ""
        self._in_text = 0
        self._buf: list[str] = []

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "svg":
            self.svg_count += 1
        if tag in ("text", "title"):
            self._in_text += 1
            self._buf = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'} at {self.getpos()}")
            return
        self.stack.pop()
        if tag in ("text", "title"):
            self._in_text -= 1
            self.svg_texts.append("".join(self._buf))

    def handle_data(self, data: str) -> None:
        if self._in_text:
            self._buf.append(data)


def parse(doc: str, *, document: bool = True) -> StrictParser:
    p = StrictParser()
    p.feed(doc)
    p.close()
    assert not p.errors, p.errors[:5]
    assert not p.stack, f"unclosed: {p.stack}"
    if document:
        assert p.doctype.lower() == "doctype html"
    return p


def parse_svg(svg: str) -> StrictParser:
    p = parse(svg, document=False)
    assert p.svg_count == 1
    return p


# --- tests -----------------------------------------------------------------------


def test_report_is_well_formed_html_with_one_svg_per_mode() -> None:
    doc = sample_report()
    p = parse(doc)
    assert p.svg_count == 3  # two modes + one failure
    sections = [a for t, a in p.tags if t == "section" and "mode" in a.get("class", "")]
    assert len(sections) == 3
    assert "Failure walk-throughs" in doc
    assert "<h1>v6lb demo report</h1>" in doc
    assert "synthetic hops for the tests" in doc
    assert "How to read this" in doc


def test_lanes_follow_roles_and_every_node_is_drawn() -> None:
    exp = nat_explanation()
    assert [n for n, _ in lane_order(exp.nodes, exp.rows)] == [
        "client",
        "router",
        "lb-2",
        "lb-1",
        "node-1",
        "node-2",
        "pod-a",
    ]
    p = parse_svg(render_sequence_svg(exp))
    names = [a for t, a in p.tags if t == "text" and a.get("class") == "name"]
    xs = [float(a["x"]) for a in names]
    assert xs == sorted(xs)
    for name in NODES:
        assert name in p.svg_texts


def test_one_arrow_per_row_with_the_real_addresses() -> None:
    exp = nat_explanation()
    p = parse_svg(render_sequence_svg(exp))
    arrows = [a for t, a in p.tags if t == "g" and a.get("class", "").startswith("arrow")]
    assert len(arrows) == len(exp.rows) == 6
    texts = p.svg_texts
    assert f"[{CLIENT}]:40000 → [{VIP}]:443" in texts
    assert f"[{CLIENT}]:40000 → [{NODE1}]:8443" in texts  # the DNAT'ed hop
    assert f"[{NODE1}]:8443 → [{CLIENT}]:40000" in texts  # the backend's reply
    assert "tcp [S]" in texts and "tcp [SA]" in texts
    assert any(t.startswith("↳ lb-1: destination") and NODE1 in t for t in texts)
    assert any(t.startswith("↳ lb-1: source") and VIP in t for t in texts)  # un-NAT of the reply


def test_encapsulated_hop_shows_outer_and_inner_addresses() -> None:
    exp = dsr_explanation()
    p = parse_svg(render_sequence_svg(exp))
    encap = [a for t, a in p.tags if t == "g" and a.get("class") == "arrow encap"]
    assert len(encap) == 1
    assert f"outer {LB} → {NODE1}" in p.svg_texts
    assert any(
        t.startswith("ipv6-in-ipv6, inner") and f"[{CLIENT}]:40001 → [{VIP}]:443" in t
        for t in p.svg_texts
    )
    assert exp.answers.reply_via_lb is False


def test_drop_is_drawn_with_its_reason() -> None:
    doc = sample_report()
    p = parse(doc)
    drops = [a for t, a in p.tags if t == "g" and a.get("class") == "arrow drop"]
    assert len(drops) == 1
    assert any(a.get("class") == "cross" for t, a in p.tags if t == "path")
    assert f"✗ dropped at node-2: {DROP_REASON}" in p.svg_texts
    assert f"DROPPED at node-2: {DROP_REASON}" in doc  # the hop table
    assert "A spoofed tunnel source is refused" in doc


def test_comparison_table_has_every_mode_and_answer() -> None:
    doc = sample_report()
    p = parse(doc)
    cmp_at = doc.index('id="comparison"')
    tail = doc[cmp_at : doc.index("</section>", cmp_at)]
    for mode in ("nat", "dsr-ip6ip6"):
        assert f"<b>{mode}</b>" in tail
    assert "stateful destination NAT" in tail
    assert "a conntrack entry per flow" in tail
    assert "none (a consistent hash" in tail
    links = [a["href"] for t, a in p.tags if t == "a"]
    ids = {a["id"] for _, a in p.tags if "id" in a}
    assert all(h[1:] in ids for h in links if h.startswith("#"))


def test_nothing_is_loaded_from_outside() -> None:
    doc = sample_report()
    p = parse(doc)
    for tag, attrs in p.tags:
        assert tag not in ("script", "link", "img", "iframe", "object", "embed"), tag
        for k, v in attrs.items():
            if k in ("src", "href", "xlink:href", "action", "poster", "data", "srcset"):
                assert v.startswith("#"), f"<{tag} {k}={v!r}>"
    assert "http://" not in doc and "https://" not in doc
    assert "url(" not in doc and "@import" not in doc
    assert "default-src 'none'" in doc  # the CSP forbids loading anything


def test_hostile_strings_are_escaped() -> None:
    evil = '<script>alert("x")</script>'
    h = _Hops()
    h.add("l&nk", evil, "router", _syn(CLIENT, VIP, 1, 2), 1, "<leg>", dropped='reason "<b>"')
    exp = explain(
        "nat", h.hops, {"client": evil, "x<y": "a&b"}, {evil: "client", "router": "router"}
    )
    doc = render_report([exp], title="<i>t</i>", failures=[exp], generated_note="<img src=x>")
    p = parse(doc)
    assert "<script" not in doc and "<img" not in doc and "<i>" not in doc
    assert "&lt;script&gt;" in doc
    assert f"{evil} (client)" in p.svg_texts  # the lane's tooltip holds the full name
    assert any(t.startswith("<script>") for t in p.svg_texts)  # the (shortened) lane header
    assert not any(t in ("script", "img", "i") for t, _ in p.tags)


def test_diagram_grows_with_rows_and_output_is_deterministic() -> None:
    small = render_sequence_svg(nat_explanation())
    big = render_sequence_svg(nat_explanation(extra_requests=20))

    def height(svg: str) -> int:
        m = re.search(r'<svg [^>]*height="(\d+)"', svg)
        assert m
        return int(m.group(1))

    assert height(big) > height(small) + 20 * 3 * 28
    assert sample_report() == sample_report()
    assert f"{{{NODE1}, {NODE2}}}" in sample_report()  # a set fact is shown sorted
    # The lane headers are repeated at the bottom of a long diagram.
    assert big.count('class="name"') == 2 * len(NODES)


def test_row_limit() -> None:
    exp = nat_explanation(extra_requests=10)
    doc = render_report([exp], max_rows=5)
    p = parse(doc)
    assert len([a for t, a in p.tags if t == "g" and a.get("class", "").startswith("arrow")]) == 5
    assert f"{len(exp.rows) - 5} more hops not drawn" in doc


def test_empty_inputs_still_render() -> None:
    parse(render_report([]))
    empty = explain("npt", [], {}, {"client": "client"})
    doc = render_report([empty])
    assert "no packets recorded" in doc
    assert parse(doc).svg_count == 1


# --- in a real browser ----------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
)


def _chromium() -> str:
    exe = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    )
    if exe is None:
        pytest.fail(
            "chromium is not installed; the report test needs it: "
            "`apt-get install -y chromium` (Debian package chromium), or `make apt` as root"
        )
    return exe


def _run(cmd: list[str], deadline: float) -> subprocess.CompletedProcess[str]:
    """Run chromium in its own process group; kill that group if it outlives the deadline."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium took too long: {' '.join(cmd)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _page_problems(stderr: str) -> list[str]:
    """Console output of the page (the report has no script: any message is a problem)."""
    return [
        line
        for line in stderr.splitlines()
        if ":CONSOLE" in line or "Uncaught" in line or "Refused to" in line
    ]


@pytest.mark.tool
@pytest.mark.timeout(60)
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    exe = _chromium()
    doc = sample_report()
    page = tmp_path / "report.html"
    page.write_text(doc, encoding="utf-8")
    deadline = time.monotonic() + 28
    base = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]

    dom = _run([*base, "--dump-dom", page.as_uri()], deadline)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not _page_problems(dom.stderr), _page_problems(dom.stderr)
    out = dom.stdout
    assert out.count("<svg") == 3, out[:500]
    assert out.count("<text") == doc.count("<text ")  # every SVG text survived parsing
    assert out.count('class="arrow') == doc.count('class="arrow')
    assert "v6lb demo report" in out

    png = tmp_path / "report.png"
    shot = _run([*base, "--window-size=1400,1800", f"--screenshot={png}", page.as_uri()], deadline)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert not _page_problems(shot.stderr), _page_problems(shot.stderr)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_packet_too_big_section_lists_engines_and_limits() -> None:
    """The packet-too-big walk-through's report section: both parts in the summary, a
    table of engines and the setups where it cannot work, well-formed and escaped."""
    from v6lb.engines.sim.runs import explain_run, load_scenario

    exp, _ = explain_run(*load_scenario(None), "dsr-ip6ip6", "packet-too-big")
    doc = render_report([], failures=[exp])
    p = parse(doc)
    assert p.svg_count == 1
    assert "Reply path: pod-" in doc and "lowered from 1500 for this walk-through" in doc
    assert "How each engine passes a Packet Too Big for the VIP on" in doc
    assert "v4_web_ip6ip6_icmp_unmatched" in doc and "quote shape 4:" in doc
    assert "Where it cannot work, whatever the LB does" in doc and "ECMP router" in doc
