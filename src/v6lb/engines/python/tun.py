"""TUN devices: open, name and configure (the only ioctl in the engine)."""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Final

__all__ = ["IFNAMSIZ", "VNET_HDR_LEN", "open_tun"]

TUNSETIFF: Final = 0x400454CA
TUNSETOFFLOAD: Final = 0x400454D0
IFF_TUN: Final = 0x0001
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
TUN_F_CSUM: Final = 0x01
TUN_F_TSO6: Final = 0x04
IFNAMSIZ: Final = 16
VNET_HDR_LEN: Final = 10
"""``struct virtio_net_hdr``: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset."""


def open_tun(name: str, *, offload: bool = False, tap: bool = False) -> int:
    """Create TUN device ``name`` (no packet-info header) and return its non-blocking fd.

    The device is not persistent: it disappears when the fd is closed, also when
    the process is killed. With ``offload`` every packet read or written starts
    with a :data:`VNET_HDR_LEN`-byte virtio-net header, and the kernel may hand
    over TCP packets of up to 64 KB that it segments later (TSO6), with a
    checksum it completes later (``NEEDS_CSUM``). The header read with a packet
    is written back with it, so only a forwarder that can keep such a packet's
    checksum right may get them: npt (checksum-neutral) and nat (it adjusts a
    partial checksum by the address change only).

    ``tap``: an Ethernet (TAP) device instead. The ring I/O never reads it: frames
    sent to it are copied by an AF_PACKET tap and dropped when its queue is full.
    """
    if not 0 < len(name) < IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must have 1 to 15 characters")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = (IFF_TAP if tap else IFF_TUN) | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        if offload:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO6)
    except OSError:
        os.close(fd)
        raise
    return fd
