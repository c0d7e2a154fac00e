"""TX checksum offload off on a lab node's interfaces (the legacy ``SIOCETHTOOL`` ioctl).

A veth sender with checksum offload hands its TCP and UDP packets on with a partial
checksum (the pseudo-header sum only) and the skb's ``CHECKSUM_PARTIAL`` state, which
every later hop in the same host carries along. Native XDP reads the bytes without that
state: a packet it sends on with ``XDP_TX`` arrives with a wrong checksum and the backend
drops it (``TcpInCsumErrors``, measured; docs/dataplane-xdp.md, "veth"). A real NIC puts
full checksums on the wire. ``v6lb lab up --dataplane xdp`` turns the offload off on the
nodes that are not LBs, as ``ethtool -K IF tx off`` would, without needing ethtool.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Final

__all__ = ["tx_checksum_off"]

_SIOCETHTOOL: Final = 0x8946
_ETHTOOL_STXCSUM: Final = 0x17
_CLONE_NEWNET: Final = 0x40000000


def _off(ifname: str) -> None:
    value = ctypes.create_string_buffer(struct.pack("=II", _ETHTOOL_STXCSUM, 0), 8)
    ifreq = bytearray(struct.pack("=16sQ", ifname.encode(), ctypes.addressof(value)) + bytes(16))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)


def tx_checksum_off(netns: str, ifnames: Sequence[str]) -> None:
    """Turn TX checksum offload off on ``ifnames`` in ``netns`` (OSError if refused).

    On a thread of its own that enters the namespace (``setns`` is per thread), so the
    caller's namespace never changes.
    """
    errors: list[BaseException] = []

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            for name in ifnames:
                _off(name)
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    t = threading.Thread(target=work, name="v6lb-offload")
    t.start()
    t.join()
    if errors:
        raise errors[0]
