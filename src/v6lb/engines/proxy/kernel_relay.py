"""proxy-l4's kernel relay: a BPF sockmap splices a relayed connection's two sockets.

:class:`KernelRelay` loads ``build/xdp/v6lb_xdp_sockmap_relay.o`` (``make xdp``; BPF C in
``engines/xdp/sockmap_relay.c``) once per :class:`~.server.ProxyServer` with
``bpftool prog load`` and ``bpftool prog attach ... stream_verdict``, keeps the three
maps open by descriptor and unpins them at once (nothing is left in ``/sys/fs/bpf``,
even after a crash; closing the descriptors frees everything). When it cannot
(no object, no bpftool, not root, a kernel without sockmap or BTF), the proxy relays
in user space and says so in one log line.

:meth:`KernelRelay.splice` hands one connection over (:class:`KernelLink`): once its
backend is connected, the PROXY v2 header written and both write buffers empty, the
proxy stops reading both sockets, puts both in ``v6lb_relay_peers``, writes their
``relay_end`` entries, puts both in ``v6lb_relay_socks`` (the verdict program starts)
and sets ``SO_RCVLOWAT`` on each: that calls the socket's ``data_ready``, so bytes that
arrived before the hand-over go through the program too, in order. From then on the
kernel moves every byte; Python is woken only by the end of a direction:

- EOF and reset are seen on an epoll of the proxy's own (one per server, read by the
  event loop) that waits for ``EPOLLRDHUP`` and errors, not for data. A direction
  ends only when everything the program redirected has entered the peer's send buffer
  (``tcpi_bytes_sent - tcpi_bytes_retrans + tcpi_notsent_bytes`` has grown by the
  program's byte count): then the peer gets its FIN (``write_eof``), or the reset is
  passed on. ``TCP_INFO`` takes the socket lock, so the program has run on every byte
  that came before the FIN when it returns.
- Byte counters are the program's (bytes redirected per socket), added to what Python
  relayed before the hand-over; the idle timeout sees them move.
- Backpressure: the program lets at most ``limit`` (the proxy's write high-water mark)
  bytes wait in front of the peer; past that it passes the socket's data to the socket
  itself for good, which closes the TCP window. The sweep sees the flag, waits until
  the redirected bytes are in the peer, and resumes reading that socket: that direction
  is relayed in user space from then on (``fallbacks``).
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import socket
import struct
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from v6lb.engines.xdp.bpf import BpfError, Map

if TYPE_CHECKING:
    from .l4 import L4Client

__all__ = ["OBJECT", "KernelLink", "KernelRelay", "RelayUnavailable"]

OBJECT: Final = Path(
    os.environ.get(
        "V6LB_RELAY_OBJECT",
        Path(__file__).resolve().parents[4] / "build" / "xdp" / "v6lb_xdp_sockmap_relay.o",
    )
)
"""Where ``make xdp`` writes the program (``V6LB_RELAY_OBJECT`` overrides)."""
BPFFS: Final = Path("/sys/fs/bpf")
SO_COOKIE: Final = 57
_END: Final = struct.Struct("=QQIIII")  # peer cookie, bytes, limit, base, flags, pad
_PASSED: Final = 2  # V6LB_RELAY_PASSED
_COOKIE: Final = struct.Struct("=Q")
_FD: Final = struct.Struct("=I")
# struct tcp_info: bytes_received at 128, notsent_bytes at 144, bytes_sent and
# bytes_retrans at 200 and 208 (linux/tcp.h)
_TCP_INFO: Final = struct.Struct("=128xQ8xI52xQQ")
_WATCH: Final = select.EPOLLRDHUP
_AFTER_EOF: Final = select.EPOLLET  # errors only (always reported), once each
_DRAIN_FIRST: Final = 0.0005  # seconds before the first re-check of a draining direction
_DRAIN_MAX: Final = 0.05


class RelayUnavailable(Exception):
    """The kernel relay cannot be loaded here: the message says why."""


def _written(sock: Any) -> int:
    """Bytes that entered the socket's send buffer (sent once, or not sent yet)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    _, notsent, sent, retrans = _TCP_INFO.unpack_from(raw)
    return int(sent - retrans + notsent)


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
        # libbpf's reason (": Operation not permitted(1)."), else bpftool's "Error: ..." line
        why = next((x for x in lines if "not permitted" in x.lower()), None)
        why = "Operation not permitted" if why else None
        why = why or next((x for x in lines if x.startswith("Error:")), lines[-1])
        raise RelayUnavailable(f"{' '.join(args[:3])}: {why.strip()}")


class KernelRelay:
    """The loaded program and its maps, shared by every proxy-l4 VIP of one server."""

    def __init__(self, obj: Path | None = None) -> None:
        obj = obj or OBJECT
        if not obj.is_file():
            raise RelayUnavailable(f"{obj} is missing (build it with `make xdp`)")
        if shutil.which("bpftool") is None:
            raise RelayUnavailable("bpftool is not installed (apt-get install bpftool)")
        if not os.path.ismount(BPFFS):
            _run(["mount", "-t", "bpf", "bpf", str(BPFFS)])
        pin = BPFFS / f"v6lb-relay-{os.getpid()}-{id(self):x}"
        self.maps: list[Map] = []
        try:
            pin.mkdir()
            _run(["bpftool", "prog", "load", str(obj), str(pin / "prog"), "pinmaps", str(pin)])
            socks = str(pin / "v6lb_relay_socks")
            prog = str(pin / "prog")
            _run(["bpftool", "prog", "attach", "pinned", prog, "stream_verdict", "pinned", socks])
        except (OSError, RelayUnavailable):
            shutil.rmtree(pin, ignore_errors=True)
            raise
        try:
            self.socks = Map(str(pin / "v6lb_relay_socks"), 8, 4)
            self.peers = Map(str(pin / "v6lb_relay_peers"), 8, 4)
            self.ends = Map(str(pin / "v6lb_relay_ends"), 8, _END.size)
            self.maps = [self.socks, self.peers, self.ends]
        except BpfError as exc:
            self.close()
            raise RelayUnavailable(str(exc)) from None
        finally:  # our descriptors keep the maps, and the maps the attached program
            shutil.rmtree(pin, ignore_errors=True)
        self.ep = select.epoll()
        self.watched: dict[int, tuple[KernelLink, bool]] = {}  # fd -> (link, client side)
        self.links: set[KernelLink] = set()  # the spliced connections still open
        self.loop: asyncio.AbstractEventLoop | None = None
        self.handoffs = 0  # connections spliced
        self.refused = 0  # hand-overs the kernel refused (the connection stayed in user space)
        self.fallbacks = 0  # directions that went back to user space (a slow reader)

    @classmethod
    def open(cls, log: Any) -> KernelRelay | None:
        """The relay, or None after one log line saying why the user-space relay is used."""
        try:
            return cls()
        except (RelayUnavailable, OSError) as exc:
            log(f"proxy-l4 relay: kernel: unavailable ({exc}); relaying in user space instead")
            return None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is None:
            self.loop = loop
            loop.add_reader(self.ep.fileno(), self._events)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.ep.fileno())
            self.loop = None
        if getattr(self, "ep", None) is not None:
            self.ep.close()
        for m in self.maps:
            m.close()
        self.maps = []

    def status(self) -> dict[str, int]:
        return {
            "spliced": self.handoffs,
            "refused": self.refused,
            "fallbacks": self.fallbacks,
            "open": len(self.links),
        }

    def splice(self, conn: L4Client) -> KernelLink | None:
        """Hand ``conn`` over to the kernel; None if the kernel refused (nothing changed)."""
        assert conn.t is not None and conn.up is not None and conn.up.t is not None
        cs = conn.t.get_extra_info("socket")
        bs = conn.up.t.get_extra_info("socket")
        if cs is None or bs is None or self.loop is None:
            return None
        conn.t.pause_reading()
        conn.up.t.pause_reading()
        link = KernelLink(self, conn, cs, bs)
        try:
            link.insert()
        except OSError:  # a socket no longer established (EOF came), a full map, ...
            link.remove_keys()
            self.refused += 1
            conn.t.resume_reading()
            conn.up.t.resume_reading()
            return None
        self.handoffs += 1
        self.links.add(link)
        for fd, side in ((link.cfd, True), (link.bfd, False)):
            self.watched[fd] = (link, side)
            self.ep.register(fd, _WATCH)
        for s in (cs, bs):  # bytes queued before the hand-over: through the program now
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return link

    def unwatch(self, fd: int) -> None:
        if self.watched.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def _events(self) -> None:
        for fd, mask in self.ep.poll(0):
            got = self.watched.get(fd)
            if got is not None:
                got[0].event(got[1], mask)


class KernelLink:
    """One spliced connection: its two sockets, which directions the kernel relays."""

    __slots__ = (
        "relay",
        "conn",
        "cs",
        "bs",
        "cfd",
        "bfd",
        "ck",
        "bk",
        "c_out0",
        "b_out0",
        "kernel",
        "ended",
        "error",
        "waits",
        "last",
        "closed",
    )

    def __init__(self, relay: KernelRelay, conn: L4Client, cs: Any, bs: Any) -> None:
        self.relay = relay
        self.conn = conn
        self.cs, self.bs = cs, bs
        self.cfd, self.bfd = cs.fileno(), bs.fileno()
        self.ck = cs.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
        self.bk = bs.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
        self.c_out0 = 0  # bytes in each send buffer before the hand-over
        self.b_out0 = 0
        # per direction, index 0: client -> backend, 1: backend -> client
        self.kernel = [True, True]  # relayed by the kernel (else: fell back to user space)
        self.ended = [False, False]  # the source's EOF or error was seen
        self.error = [False, False]
        self.waits: list[asyncio.TimerHandle | None] = [None, None]
        self.last = (0, 0)  # the program's byte counts, kept when the link closes
        self.closed = False

    # --- setting up and tearing down ------------------------------------------------

    def insert(self) -> None:
        r = self.relay
        self.c_out0, self.b_out0 = _written(self.cs), _written(self.bs)
        limit = max(64 * 1024, min(self.conn.rt.write_high, 0xFFFFFFFF))
        r.peers.update(self.ck, _FD.pack(self.cfd))
        r.peers.update(self.bk, _FD.pack(self.bfd))
        r.ends.update(self.ck, _END.pack(_COOKIE.unpack(self.bk)[0], 0, limit, 0, 0, 0))
        r.ends.update(self.bk, _END.pack(_COOKIE.unpack(self.ck)[0], 0, limit, 0, 0, 0))
        r.socks.update(self.ck, _FD.pack(self.cfd))
        r.socks.update(self.bk, _FD.pack(self.bfd))

    def remove_keys(self) -> None:
        """Undo :meth:`insert` (the sockets leave the socket maps when they close)."""
        r = self.relay
        for m in (r.socks, r.peers, r.ends):
            for k in (self.ck, self.bk):
                try:
                    m.delete(k)
                except OSError:
                    pass

    def forget(self) -> None:
        """The connection closes: keep the byte counts, drop our state (before the fds close)."""
        if self.closed:
            return
        self.last = self.counts()
        self.closed = True
        self.relay.links.discard(self)
        for i, w in enumerate(self.waits):
            if w is not None:
                w.cancel()
                self.waits[i] = None
        self.relay.unwatch(self.cfd)
        self.relay.unwatch(self.bfd)
        for k in (self.ck, self.bk):
            try:
                self.relay.ends.delete(k)
            except OSError:
                pass

    # --- reading the kernel ---------------------------------------------------------

    def _end(self, key: bytes) -> tuple[int, int]:
        """(bytes redirected, flags) of one socket's end."""
        _, n, _, _, flags, _ = _END.unpack(self.relay.ends.lookup(key))
        return int(n), int(flags)

    def counts(self) -> tuple[int, int]:
        """Bytes the kernel relayed (client -> backend, backend -> client)."""
        if self.closed:
            return self.last
        try:
            return self._end(self.ck)[0], self._end(self.bk)[0]
        except OSError:
            return self.last

    def queued(self) -> int:
        """Bytes redirected but not yet in the peer's send buffer (held by the kernel)."""
        if self.closed:
            return 0
        up, down = self.counts()
        try:
            return max(0, up - (_written(self.bs) - self.b_out0)) + max(
                0, down - (_written(self.cs) - self.c_out0)
            )
        except OSError:
            return 0

    def _drained(self, d: int) -> bool | None:
        """Direction ``d``: all redirected bytes are in the peer (None: it was passed back)."""
        src, dst = (self.cs, self.bs) if d == 0 else (self.bs, self.cs)
        src.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)  # waits for the socket lock
        n, flags = self._end(self.ck if d == 0 else self.bk)
        if flags & _PASSED:
            return None
        out0 = self.b_out0 if d == 0 else self.c_out0
        return _written(dst) - out0 >= n

    # --- events -----------------------------------------------------------------------

    def event(self, client_side: bool, mask: int) -> None:
        """Our epoll: the source of a direction reached EOF, or failed."""
        d = 0 if client_side else 1
        if self.closed or not self.kernel[d]:
            return
        if self.ended[d]:  # an error after the EOF: writing to this socket failed
            if mask & select.EPOLLERR:
                conn = self.conn
                if not conn.closed:
                    conn.rt.error("client_reset" if d == 0 else "backend_reset", conn.backend)
                conn.close()
            return
        self.ended[d] = True
        self.error[d] = bool(mask & select.EPOLLERR)
        fd = self.cfd if client_side else self.bfd
        try:
            self.relay.ep.modify(fd, _AFTER_EOF)
        except OSError:
            pass
        self._finish(d, _DRAIN_FIRST)

    def sweep(self) -> None:
        """Called by the VIP's sweep: a direction the program passed back goes to user space."""
        for d in (0, 1):
            if self.kernel[d] and not self.ended[d] and self.waits[d] is None:
                try:
                    flags = self._end(self.ck if d == 0 else self.bk)[1]
                except OSError:
                    continue
                if flags & _PASSED:
                    self._finish(d, _DRAIN_FIRST)

    def _finish(self, d: int, delay: float) -> None:
        """End direction ``d`` (EOF, error) or hand it back, once its bytes are delivered."""
        self.waits[d] = None
        if self.closed:
            return
        try:
            done = self._drained(d)
        except OSError:
            done = True  # a socket is gone: nothing more to wait for
        if done is False:
            assert self.relay.loop is not None
            self.waits[d] = self.relay.loop.call_later(
                delay, self._finish, d, min(_DRAIN_MAX, delay * 2)
            )
            return
        conn = self.conn
        if done is None:  # passed back: the rest of this direction goes through Python
            self.kernel[d] = False
            self.relay.fallbacks += 1
            self.relay.unwatch(self.cfd if d == 0 else self.bfd)
            t = conn.t if d == 0 else (conn.up.t if conn.up is not None else None)
            if t is not None and not t.is_closing():
                t.resume_reading()
            return
        if self.error[d]:
            if not conn.closed:
                conn.rt.error("client_reset" if d == 0 else "backend_reset", conn.backend)
            conn.close()
            return
        conn.kernel_eof(d, self._tail(self.cfd if d == 0 else self.bfd))

    @staticmethod
    def _tail(fd: int) -> bytes:
        """Bytes left in the source's receive queue: they came with the FIN that closed a
        socket whose other half had already ended, which takes it out of the maps first."""
        out = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # BlockingIOError: nothing (more) there
                return out
            if not chunk:
                return out
            out += chunk
