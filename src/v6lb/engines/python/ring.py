"""AF_PACKET rings (PACKET_MMAP): the Python data plane's batched I/O (``V6LB_PYTHON_IO=ring``).

:class:`RxRing` is a TPACKET_V3 receive ring on one device: the kernel copies
each frame into a block of a memory map shared with this process and hands the
block over when it is full or ``tov_ms`` after its first frame. Reading a
block costs no system call. :class:`TxRing` is a TPACKET_V2 transmit ring:
frames are written into the map and one ``send`` hands the kernel every frame
written since the last one. Both use the same virtio-net header as a TUN with
offloads (:data:`~v6lb.engines.python.tun.VNET_HDR_LEN` bytes before the
Ethernet header), so a 64 KB TCP packet with a checksum to complete passes as
one frame.
"""

from __future__ import annotations

import mmap
import socket
import struct
from typing import Final

from v6lb.engines.python.tun import VNET_HDR_LEN

__all__ = ["ETH_HLEN", "RxRing", "TxRing"]

SOL_PACKET: Final = 263
PACKET_RX_RING: Final = 5
PACKET_STATISTICS: Final = 6
PACKET_VERSION: Final = 10
PACKET_TX_RING: Final = 13
PACKET_LOSS: Final = 14
PACKET_VNET_HDR: Final = 15
PACKET_QDISC_BYPASS: Final = 20
TPACKET_V2: Final = 1
TPACKET_V3: Final = 2
ETH_P_ALL: Final = 0x0003
ETH_P_IPV6: Final = 0x86DD
ETH_HLEN: Final = 14
TP_STATUS_USER: Final = 1
TP_STATUS_SEND_REQUEST: Final = 1
_REQ3: Final = struct.Struct("7I")
_REQ: Final = struct.Struct("4I")
_TX_DATA: Final = 32
"""TPACKET2_HDRLEN - sizeof(struct sockaddr_ll): where a TX frame's data starts."""
BLOCK_STATUS: Final = struct.Struct("I")  # tpacket_block_desc.hdr.bh1.block_status at 8
BLOCK_PKTS: Final = struct.Struct("II")  # num_pkts, offset_to_first_pkt at 12
FRAME3: Final = struct.Struct("I8xII4xHH")
"""tpacket3_hdr: tp_next_offset, tp_snaplen, tp_len, tp_mac, tp_net."""
TX_HDR: Final = struct.Struct("II")  # tpacket2_hdr: tp_status, tp_len
_Bytes = bytes | bytearray | memoryview


def _vnet_on(sock: socket.socket, vnet: bool) -> None:
    if vnet:  # before the ring: the kernel refuses it on a socket that has one
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)


class RxRing:
    """A TPACKET_V3 receive ring on ``device``: every frame it sends or receives.

    ``outgoing``: the socket sees every frame the device transmits (an
    ``ETH_P_ALL`` tap), which is how frames that nftables ``fwd``s to a TAP
    device reach it. Blocks are handed over in order; :attr:`block` is the next
    one to look at, :meth:`release` gives it back to the kernel.
    """

    def __init__(
        self,
        device: str,
        *,
        vnet: bool = False,
        block_size: int = 1 << 17,
        blocks: int = 64,
        tov_ms: int = 1,
    ) -> None:
        self.device = device
        self.vnet = vnet
        self.block_size = block_size
        self.blocks = blocks
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # bound below
        try:
            _vnet_on(self.sock, vnet)
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            frame = 2048
            req = _REQ3.pack(block_size, blocks, frame, block_size // frame * blocks, tov_ms, 0, 0)
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.map = mmap.mmap(self.sock.fileno(), block_size * blocks)
            self.sock.bind((device, ETH_P_ALL))
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.mv = memoryview(self.map)
        self.block = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def ready(self) -> int:
        """The offset of the next block if the kernel has handed it over, else -1."""
        off = self.block * self.block_size
        return off if BLOCK_STATUS.unpack_from(self.map, off + 8)[0] & TP_STATUS_USER else -1

    def release(self, off: int) -> None:
        """Give the block at ``off`` back to the kernel and move on to the next one."""
        BLOCK_STATUS.pack_into(self.map, off + 8, 0)
        self.block = (self.block + 1) % self.blocks

    def dropped(self) -> tuple[int, int]:
        """(packets, drops) since the last call (``PACKET_STATISTICS`` resets them)."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        packets, drops, _ = struct.unpack("3I", raw)
        return packets, drops

    def close(self) -> None:
        self.mv.release()
        self.map.close()
        self.sock.close()


class TxRing:
    """A TPACKET_V2 transmit ring on ``device``: frames to ``dst`` from ``src`` (MACs).

    :attr:`eth` is the header of every frame (to ``dst`` from ``src``); the caller
    writes it into the slot with the packet (and its virtio-net header), then the
    slot's status and length. :meth:`flush` makes the kernel send every pending slot with one
    ``send``, without waiting: a slot is free again once the kernel has passed
    the packet on (its status goes back to 0). Packets that do not fit a slot
    (64 KB TCP with offloads) go through :meth:`send_big`, a plain ``sendmsg``
    on a second socket, after a flush so they keep their order.
    """

    def __init__(
        self,
        device: str,
        dst: bytes,
        src: bytes,
        *,
        vnet: bool = False,
        frame: int = 2048,
        frames: int = 1024,
    ) -> None:
        self.device = device
        self.vnet = vnet
        self.frame = frame
        self.frames = frames
        self.eth = dst + src + ETH_P_IPV6.to_bytes(2, "big")
        # where the packet (the IPv6 header) starts in a slot, and its largest size
        self.data = _TX_DATA + (VNET_HDR_LEN if vnet else 0) + ETH_HLEN
        self.room = frame - self.data
        self.extra = ETH_HLEN + (VNET_HDR_LEN if vnet else 0)  # tp_len = packet + extra
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.big = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            _vnet_on(self.sock, vnet)
            _vnet_on(self.big, vnet)
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            self.sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)  # skip a bad frame, not stop
            self.sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            block = max(frame, 1 << 16)  # frames per block: a whole number of them
            req = _REQ.pack(block, frame * frames // block, frame, frames)
            self.sock.setsockopt(SOL_PACKET, PACKET_TX_RING, req)
            self.map = mmap.mmap(self.sock.fileno(), frame * frames)
            self.sock.bind((device, ETH_P_IPV6))
            self.big.bind((device, ETH_P_IPV6))
        except BaseException:
            self.sock.close()
            self.big.close()
            raise
        self.mv = memoryview(self.map)
        self.slot = 0
        self.pending = 0
        self.errors = 0

    def flush(self) -> None:
        """Send every pending slot: one system call."""
        if self.pending:
            self.pending = 0
            try:
                self.sock.send(b"", socket.MSG_DONTWAIT)
            except OSError:
                self.errors += 1

    def send_big(self, hdr: _Bytes | None, pkt: _Bytes) -> None:
        """One packet too big for a slot (or built elsewhere): flush, then ``sendmsg``."""
        self.flush()
        parts: list[_Bytes] = [self.eth, pkt]
        if self.vnet:
            parts.insert(0, hdr if hdr is not None else bytes(VNET_HDR_LEN))
        try:
            self.big.sendmsg(parts)
        except OSError:
            self.errors += 1

    def close(self) -> None:
        self.mv.release()
        self.map.close()
        self.sock.close()
        self.big.close()
