"""HTTP-ish applications: a backend server that says what it saw, and a client.

The server records, for every request, the socket's peer (what a backend
"sees" as the source), a PROXY v2 header if the stream starts with one, and the
``X-Forwarded-For``/``Forwarded`` headers; from these it derives the client
address the application learnt. Requests are ``METHOD PATH HTTP/1.1`` with
headers and an optional ``Content-Length`` body; responses carry
``Content-Length`` so one connection can carry several requests. As the lab's
HTTP server does, a query ``bytes=N`` pads the answer to N bytes (a large
response: full-size reply segments, for Path MTU discovery on the way back).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass, field

from v6lb.core import forwarded, proxyproto
from v6lb.engines.sim.host import TcpConn
from v6lb.engines.sim.node import SimNode

__all__ = ["HttpClient", "HttpServer", "RequestSeen", "parse_head", "wanted_bytes"]


def _addr(b: bytes) -> str:
    return str(ipaddress.IPv6Address(b))


def parse_head(buf: bytes) -> tuple[str, list[tuple[str, str]], int] | None:
    """(start line, headers, length of the head incl. the blank line), or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers, end + 4


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    """All values of ``name`` joined by ", " (RFC 9110 §5.3), or None."""
    vals = [v for k, v in headers if k.lower() == name.lower()]
    return ", ".join(vals) if vals else None


def content_length(headers: list[tuple[str, str]]) -> int:
    v = header(headers, "content-length")
    return int(v) if v and v.isdigit() else 0


MAX_BYTES = 16 << 20


def wanted_bytes(path: str) -> int:
    """``bytes=N`` from a request's query (0 if absent or not a number), at most 16 MB."""
    for value in urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("bytes", []):
        if value.isdigit():
            return min(int(value), MAX_BYTES)
    return 0


@dataclass
class RequestSeen:
    """What a backend application saw for one request."""

    node: str
    local: str
    local_port: int
    peer: str
    peer_port: int
    time: float
    method: str
    path: str
    body_bytes: int
    proxy_v2: str | None = None  # "[addr]:port" from a PROXY v2 header
    x_forwarded_for: str | None = None
    forwarded: str | None = None

    @property
    def app_client(self) -> str:
        """The client address as the application learnt it (PROXY v2, Forwarded, XFF, peer)."""
        if self.proxy_v2 is not None:
            return self.proxy_v2.split("]")[0].lstrip("[")
        if self.forwarded:
            for el in forwarded.parse_forwarded(self.forwarded):
                if "for" in el:
                    node = forwarded.parse_node(el["for"])
                    if node.address is not None:
                        return str(node.address)
        if self.x_forwarded_for:
            hops = forwarded.parse_x_forwarded_for(self.x_forwarded_for)
            if hops:
                return str(hops[0])
        return self.peer

    @property
    def learnt_via(self) -> str:
        if self.proxy_v2 is not None:
            return "PROXY v2 header"
        if self.forwarded:
            return "Forwarded header (RFC 7239)"
        if self.x_forwarded_for:
            return "X-Forwarded-For header"
        return "the socket's peer address"


@dataclass
class _ServerConn:
    buf: bytes = b""
    proxy_checked: bool = False
    proxy: str | None = None


class HttpServer:
    """A backend: answers every request with who served it and whom it saw."""

    def __init__(self, node: SimNode, ports: list[int]) -> None:
        self.node = node
        self.ports = sorted(set(ports))
        self.requests: list[RequestSeen] = []
        self.errors: list[str] = []
        for port in self.ports:
            node.stack.listen(port, self._accept)

    def _accept(self, conn: TcpConn) -> None:
        state = _ServerConn()
        conn.on_data = lambda c, d: self._data(c, state, d)
        conn.on_peer_close = lambda c: c.close()

    def _data(self, conn: TcpConn, st: _ServerConn, data: bytes) -> None:
        st.buf += data
        if not st.proxy_checked:
            found = proxyproto.detect(st.buf)
            if found is None:
                return
            if found:
                try:
                    got = proxyproto.decode(st.buf)
                except proxyproto.ProxyProtocolError as exc:
                    self.errors.append(str(exc))
                    conn.abort("bad proxy header", send_rst=True)
                    return
                if got is None:
                    return
                hdr, used = got
                st.buf = st.buf[used:]
                if hdr.src is not None:
                    st.proxy = f"[{hdr.src}]:{hdr.src_port}"
            st.proxy_checked = True
        while True:
            head = parse_head(st.buf)
            if head is None:
                return
            start, headers, hlen = head
            n = content_length(headers)
            if len(st.buf) < hlen + n:
                return
            st.buf = st.buf[hlen + n :]
            method, _, rest = start.partition(" ")
            seen = RequestSeen(
                node=self.node.name,
                local=_addr(conn.local),
                local_port=conn.lport,
                peer=_addr(conn.remote),
                peer_port=conn.rport,
                time=self.node.now,
                method=method,
                path=rest.split(" ")[0],
                body_bytes=n,
                proxy_v2=st.proxy,
                x_forwarded_for=header(headers, "x-forwarded-for"),
                forwarded=header(headers, "forwarded"),
            )
            self.requests.append(seen)
            body = (
                f"served by {self.node.name} at [{seen.local}]:{seen.local_port};"
                f" socket peer [{seen.peer}]:{seen.peer_port};"
                f" client per {seen.learnt_via}: {seen.app_client}\n"
            ).encode()
            want = wanted_bytes(seen.path)
            if want > len(body):  # as the lab's httpd: ?bytes=N pads the answer to N bytes
                body += b"x" * (want - len(body) - 1) + b"\n"
            conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Served-By: %s\r\n\r\n"
                % (len(body), self.node.name.encode())
                + body
            )


@dataclass
class ClientEvent:
    time: float
    what: str


@dataclass
class HttpClient:
    """Sends ``bodies`` as requests one after the other on one connection, then closes.

    ``gap`` seconds pass between a response and the next request. If the
    connection dies (reset, timeout) with requests left, the client opens a
    new connection and sends the pending request again, as a browser would.
    """

    node: SimNode
    dst: bytes
    dport: int
    bodies: list[bytes]
    sport: int | None = None
    gap: float = 0.0
    retry: bool = True
    host: str = ""
    path: str = ""  # every request's path and query (default: /req1, /req2, ...)
    responses: list[str] = field(default_factory=list)
    events: list[ClientEvent] = field(default_factory=list)
    conns: list[TcpConn] = field(default_factory=list)
    _next: int = 0
    _buf: bytes = b""
    done: bool = False

    def finished(self) -> bool:
        return self.done

    def start(self) -> TcpConn:
        conn = self.node.stack.connect(self.dst, self.dport, sport=self.sport)
        self.sport = None  # a retry takes a new ephemeral port
        self.conns.append(conn)
        self._log(f"connect {conn.remote_text} from port {conn.lport}")
        conn.on_established = self._established
        conn.on_data = self._data
        conn.on_peer_close = lambda c: c.close()
        conn.on_closed = self._closed
        return conn

    def _log(self, what: str) -> None:
        self.events.append(ClientEvent(self.node.now, what))

    def _established(self, conn: TcpConn) -> None:
        self._log("connected")
        self._send(conn)

    def _send(self, conn: TcpConn) -> None:
        if conn.close_reason is not None:
            return
        if self._next >= len(self.bodies):
            conn.close()
            return
        body = self.bodies[self._next]
        host = self.host or f"[{_addr(self.dst)}]"
        method = "POST" if body else "GET"
        path = self.path or f"/req{self._next + 1}"
        req = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self._log(f"request {self._next + 1} ({len(req)} bytes)")
        conn.send(req)

    def _data(self, conn: TcpConn, data: bytes) -> None:
        self._buf += data
        head = parse_head(self._buf)
        if head is None:
            return
        start, headers, hlen = head
        n = content_length(headers)
        if len(self._buf) < hlen + n:
            return
        text = self._buf[: hlen + n].decode("latin-1")
        self._buf = self._buf[hlen + n :]
        self.responses.append(text)
        self._log(f"response {self._next + 1}: {start}")
        self._next += 1
        if self.gap and self._next < len(self.bodies):
            self.node.net.clock.after(self.gap, lambda: self._send(conn))
        else:
            self._send(conn)

    def _closed(self, conn: TcpConn, reason: str) -> None:
        self._log(f"connection closed: {reason}")
        if self._next < len(self.bodies) and self.retry and reason != "closed":
            self._buf = b""
            self.start()
        else:
            self.done = True
