"""TUN devices: open, name and configure (the only ioctl in the engine)."""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Final

__all__ = ["IFNAMSIZ", "open_tun"]

TUNSETIFF: Final = 0x400454CA
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
IFNAMSIZ: Final = 16


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (no packet-info header) and return its non-blocking fd.

    The device is not persistent: it disappears when the fd is closed, also when
    the process is killed.
    """
    if not 0 < len(name) < IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must have 1 to 15 characters")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd
