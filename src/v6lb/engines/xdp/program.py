"""Load the XDP object, pin it under ``/sys/fs/bpf/v6lb-<tag>/``, fill its maps from a config.

Loading is ``bpftool prog load OBJ DIR/prog pinmaps DIR`` (libbpf relocates the maps
and checks BTF; docs/dataplane-xdp.md). Everything afterwards goes through the bpf(2)
wrapper of :mod:`v6lb.engines.xdp.bpf`. :class:`XdpProgram` is a context manager:
leaving it closes every descriptor and removes the pinned directory, on error too.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from v6lb.core.backends import BackendPool
from v6lb.core.dsr import MODE_IP6IP6, MODE_L2, MODE_SRV6, DsrService
from v6lb.core.nptv6 import NptMapping
from v6lb.engines.xdp.bpf import BPF_F_INNER_MAP, Map, RunResult, obj_get, prog_test_run
from v6lb.model.config import Config
from v6lb.model.pools import dsr_services
from v6lb.wire.reasons import Reason

__all__ = [
    "BPFFS",
    "HERE",
    "MAX_BACKENDS",
    "MAX_NPT",
    "MAX_TABLE_ENTRIES",
    "MAX_VIPS",
    "OBJECT",
    "XdpProgram",
    "counter_names",
    "l2_entries",
    "map_entries",
    "npt_entries",
    "served",
    "table_values",
]

HERE: Final = Path(__file__).resolve().parent
OBJECT: Final = Path(
    os.environ.get("V6LB_XDP_OBJECT", HERE.parents[3] / "build" / "xdp" / "v6lb_xdp.o")
)
"""Where ``make xdp`` writes the compiled program (``V6LB_XDP_OBJECT`` overrides)."""
BPFFS: Final = Path("/sys/fs/bpf")


def _define(name: str, header: str = "maps.h") -> int:
    text = (HERE / header).read_text(encoding="ascii")
    m = re.search(rf"#define {name} \(?(\d+)(?: \* (\d+))?\)?", text)
    if m is None:
        raise RuntimeError(f"{header} defines no {name}")
    return int(m.group(1)) * int(m.group(2) or 1)


MAX_VIPS: Final = _define("V6LB_MAX_VIPS")
MAX_BACKENDS: Final = _define("V6LB_MAX_BACKENDS")
MAX_TABLE_ENTRIES: Final = _define("V6LB_TABLE_ENTRIES")
MAX_NPT: Final = _define("V6LB_MAX_NPT")
_SLOTS: Final = _define("V6LB_CNT_SLOTS", "counters.h")
_NONE: Final = 0xFFFFFFFF
_MODE_IDS: Final = {MODE_IP6IP6: 1, MODE_SRV6: 2, MODE_L2: 3}
"""The modes the program serves, as maps.h numbers them."""
_VIP_KEY = struct.Struct("=16sHBx")  # addr, port (network order, packed below), proto
_VIP_INFO = struct.Struct("=6I")
_U32 = struct.Struct("=I")
_L2_MAC = struct.Struct("=6sBx")  # mac, known
_NPT = struct.Struct("=8s8s8sHHB3x")  # inside, outside, mask (packet order), adj out/in, subnet
_CONF = struct.Struct("=II6sxx16sII")
"""npt pairs in use, dsr-l2 egress ifindex and MAC, ICMPv6 error source, rate and burst."""


def counter_names() -> dict[int, str]:
    """Counter slot -> name: the Reason labels (0..63), then counters.h's own slots."""
    return dict(_counter_names())


@functools.cache
def _counter_names() -> dict[int, str]:
    """Counter slot -> name: the Reason labels (0..63), then counters.h's own slots."""
    names = {int(r): r.label for r in Reason if int(r) < 64}
    text = (HERE / "counters.h").read_text(encoding="ascii")
    for name, slot in re.findall(r"#define V6LB_CNT_(\w+) (\d+)", text):
        if name != "SLOTS":
            names[int(slot)] = name.lower().replace("_", "-")
    return names


def _vip_key(addr: bytes, port: int, proto: int) -> bytes:
    return _VIP_KEY.pack(addr, int.from_bytes(port.to_bytes(2, "big"), "little"), proto)


def served(services: Sequence[DsrService]) -> list[DsrService]:
    """The services the program forwards (its modes), in VIP index order."""
    return [s for s in services if s.mode in _MODE_IDS]


def table_values(pool: BackendPool, base: int) -> array[int]:
    """A pool's Maglev table as the program holds it: global backend indexes from ``base``."""
    return array("I", (_NONE if b < 0 else base + b for b in pool.table))


def map_entries(
    services: Sequence[DsrService],
) -> tuple[dict[bytes, int], list[bytes], array[int], list[bytes]]:
    """The maps' contents for the core's DSR services: (vips, vip_info, maglev, backends).

    The VIP keys answer the core's three questions (v6lb.core.dsr): ``_match``
    (address, port, protocol: the first VIP wins), ``_default`` for a protocol
    (port 0) and the address's first VIP (port 0, protocol 0). Every DSR mode is
    served; a dsr-l2 backend's entry is 16 zero bytes then its address (its MAC is
    in :func:`l2_entries`). Raises ValueError, naming the limit, when the maps cannot
    hold it all.
    """
    mine = served(services)
    if len(mine) > MAX_VIPS:
        raise ValueError(f"{len(mine)} DSR VIPs: the XDP program holds {MAX_VIPS}")
    n_backends = sum(len(s.pool) for s in mine)
    if n_backends > MAX_BACKENDS:
        raise ValueError(f"{n_backends} backends: the XDP program holds {MAX_BACKENDS}")
    n_slots = sum(s.pool.size for s in mine)
    if n_slots > MAX_TABLE_ENTRIES:
        raise ValueError(
            f"Maglev tables of {n_slots} slots in all: the XDP program holds {MAX_TABLE_ENTRIES}"
        )
    index = {id(s): i for i, s in enumerate(mine)}
    vips: dict[bytes, int] = {}
    for s in services:
        idx = index.get(id(s), _NONE)
        vips.setdefault(_vip_key(s.address, 0, 0), idx)
        vips.setdefault(_vip_key(s.address, 0, s.proto), idx)
        for port in sorted(s.ports):
            vips.setdefault(_vip_key(s.address, port, s.proto), idx)
    if len(vips) > 4 * MAX_VIPS:
        raise ValueError(f"{len(vips)} VIP keys: the XDP program holds {4 * MAX_VIPS}")
    info: list[bytes] = []
    maglev: array[int] = array("I")
    backends: list[bytes] = []
    for s in mine:
        pool = s.pool
        base = len(backends)
        info.append(
            _VIP_INFO.pack(_MODE_IDS[s.mode], pool.seed, len(maglev), pool.size, s.limit, 0)
        )
        maglev.extend(table_values(pool, base))
        backends.extend((s.tunnel_source or bytes(16)) + t for t in s.targets)
    return vips, info, maglev, backends


def l2_entries(services: Sequence[DsrService]) -> list[bytes]:
    """``v6lb_l2_macs``, by the backend index of :func:`map_entries`: (MAC, known).

    A dsr-l2 backend's MAC (its ``mac:``, or one the engine learned); a tunnel
    backend, or a dsr-l2 backend with no MAC (the core names its address then), has
    none: the program passes such a frame to the stack.
    """
    out: list[bytes] = []
    for s in services:
        if s.mode not in _MODE_IDS:
            continue
        for mac in s.macs:
            out.append(_L2_MAC.pack(mac or bytes(6), mac is not None))
    return out


def npt_entries(mappings: Sequence[NptMapping]) -> list[bytes]:
    """``v6lb_npt_pairs``: each pair's prefixes and mask (first 8 bytes) and adjustments.

    The prefixes are zero-extended to the pair's length as RFC 6296 §3.1 and the core
    do; the inbound adjustment is the core's ``0xFFFF - adjustment``. Raises
    ValueError, naming the limit, for more pairs than the map holds.
    """
    if len(mappings) > MAX_NPT:
        raise ValueError(f"{len(mappings)} npt pairs: the XDP program holds {MAX_NPT}")
    out = []
    for m in mappings:
        mask = ((1 << m.length) - 1) << (64 - m.length)
        mb = mask.to_bytes(8, "big")
        ip = m.inside.network_address.packed[:8]
        op = m.outside.network_address.packed[:8]
        inside = bytes(a & b for a, b in zip(ip, mb, strict=True))
        outside = bytes(a & b for a, b in zip(op, mb, strict=True))
        adj = m.adjustment
        out.append(_NPT.pack(inside, outside, mb, adj, 0xFFFF - adj, m.length <= 48))
    return out


def _icmp_source(config: Config, services: Sequence[DsrService]) -> bytes:
    """The Packet Too Big source: ``dsr_forwarder``'s ICMPv6 error source, by its rule."""
    if config.lb.addresses:
        return config.lb.addresses[0].packed
    src = next((s.tunnel_source for s in services if s.tunnel_source), None)
    if src is not None:
        return src
    return services[0].address if services else bytes(16)


class XdpProgram:
    """The compiled program loaded and pinned under ``/sys/fs/bpf/v6lb-<tag>/``."""

    def __init__(self, tag: str, obj: Path = OBJECT) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", tag):  # bpffs refuses a '.' in a name
            raise ValueError(f"tag {tag!r}: letters, digits, '_' or '-', at most 100")
        if not obj.is_file():
            raise FileNotFoundError(f"{obj}: no XDP object; build it with `make xdp`")
        self.dir = BPFFS / f"v6lb-{tag}"
        self.prog_fd = -1
        self.maps: dict[str, Map] = {}
        self._npt_count = 0
        self._l2_egress = (0, bytes(6))
        self._icmp = (bytes(16), 0, 0)
        if not os.path.ismount(BPFFS):
            subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir()
        try:
            subprocess.run(
                [
                    "bpftool",
                    "prog",
                    "load",
                    str(obj),
                    str(self.dir / "prog"),
                    "pinmaps",
                    str(self.dir),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            self.prog_fd = obj_get(str(self.dir / "prog"))
            d = str(self.dir)
            self.maps = {
                "vips": Map(f"{d}/v6lb_vips", _VIP_KEY.size, 4),
                "vip_info": Map(f"{d}/v6lb_vip_info", 4, _VIP_INFO.size),
                "maglev": Map(f"{d}/v6lb_maglev", 4, 4),
                "backends": Map(f"{d}/v6lb_backends", 4, 32),
                "counters": Map(f"{d}/v6lb_counters", 4, 8, per_cpu=True),
                "l2_macs": Map(f"{d}/v6lb_l2_macs", 4, _L2_MAC.size),
                "npt": Map(f"{d}/v6lb_npt_pairs", 4, _NPT.size),
                "conf": Map(f"{d}/v6lb_conf", 4, _CONF.size),
                "icmp": Map(f"{d}/v6lb_icmp_counts", 4, 8, per_cpu=True),
            }
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> XdpProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every descriptor and unpin everything under the tagged directory."""
        for m in self.maps.values():
            m.close()
        self.maps = {}
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1
        shutil.rmtree(self.dir, ignore_errors=True)

    def fill(
        self,
        config: Config,
        services: Sequence[DsrService] | None = None,
        *,
        macs: Mapping[str, bytes] | None = None,
    ) -> int:
        """Fill the maps from ``config``'s DSR VIPs and npt pairs; return how many VIPs.

        The pools are :func:`v6lb.model.pools.dsr_services`' (``pool_for``: every
        backend up), so the program and a fresh ``DsrForwarder`` hold the same tables;
        or ``services``' (the xdp plane's, with the backends it knows are down).
        ``macs``: dsr-l2 backends' MACs the engine learned, as ``dsr_services`` takes
        them. The npt pairs are ``config.npt``'s, as ``npt_forwarder`` builds them.
        """
        if services is None:
            services = dsr_services(config, macs)
        vips, info, maglev, backends = map_entries(services)
        l2 = l2_entries(services)
        npt = npt_entries([NptMapping(p.inside, p.outside) for p in config.npt])
        m = self.maps
        for key, idx in vips.items():
            m["vips"].update(key, _U32.pack(idx))
        for i, v in enumerate(info):
            m["vip_info"].update(_U32.pack(i), v)
        for i, b in enumerate(backends):
            m["backends"].update(_U32.pack(i), b)
        for i, v in enumerate(info):
            _, _, off, size, _, _ = _VIP_INFO.unpack(v)
            self.set_table(i, maglev[off : off + size])
        for i, b in enumerate(l2):
            m["l2_macs"].update(_U32.pack(i), b)
        for i, b in enumerate(npt):
            m["npt"].update(_U32.pack(i), b)
        self._npt_count = len(npt)
        self._icmp = (
            _icmp_source(config, services),
            config.lb.icmp_error_rate,
            config.lb.icmp_error_burst,
        )
        self._write_conf()
        return len(info)

    def set_table(self, vip: int, table: array[int]) -> None:
        """Put ``table`` in place as VIP ``vip``'s Maglev table, in one step.

        A new array map is filled whole (one batch update), then stored in
        ``v6lb_maglev[vip]``: for an array of maps the kernel exchanges the pointer
        atomically, and frees the old table only after every program run that may
        hold it has ended (RCU). So no packet sees a half-written table. The table's
        size must stay the VIP's ``table_size`` (a reload loads a new program).
        """
        new = Map.create_array(f"v6lb_t{vip}", 4, len(table), BPF_F_INNER_MAP)
        try:
            keys = array("I", range(len(table)))
            new.update_batch(keys.tobytes(), table.tobytes(), len(table))
            self.maps["maglev"].update(_U32.pack(vip), _U32.pack(new.fd))
        finally:
            new.close()  # v6lb_maglev holds it now

    def set_l2_mac(self, index: int, mac: bytes) -> None:
        """Backend ``index``'s dsr-l2 MAC (global index, as :func:`l2_entries`): one update."""
        if len(mac) != 6:
            raise ValueError("a 6-byte MAC")
        self.maps["l2_macs"].update(_U32.pack(index), _L2_MAC.pack(bytes(mac), 1))

    def set_l2_egress(self, ifindex: int, mac: bytes) -> None:
        """Send dsr-l2 frames out of link ``ifindex`` (MAC ``mac``); 0: back where they came."""
        if len(mac) != 6 or not 0 <= ifindex < 1 << 32:
            raise ValueError("an ifindex (0: the ingress link) and a 6-byte MAC")
        self._l2_egress = (ifindex, bytes(mac))
        self._write_conf()

    def _write_conf(self) -> None:
        ifindex, mac = self._l2_egress
        conf = _CONF.pack(self._npt_count, ifindex, mac, *self._icmp)
        self.maps["conf"].update(_U32.pack(0), conf)

    def run(self, frame: bytes, repeat: int = 1) -> RunResult:
        """BPF_PROG_TEST_RUN on one Ethernet frame."""
        return prog_test_run(self.prog_fd, frame, repeat)

    def icmp_counts(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """ICMPv6 errors, summed over the CPUs: per VIP index (forwarded, unmatched) and per
        npt pair (translated, unmatched), as maps.h's ``v6lb_icmp_counts`` holds them."""
        slots = 2 * (MAX_VIPS + MAX_NPT)
        keys, values = self.maps["icmp"].lookup_batch(slots)
        per = array("Q", values)
        ncpu = len(per) // max(1, len(keys) // 4)
        total = [0] * slots
        for i, slot in enumerate(array("I", keys)):
            total[slot] = sum(per[i * ncpu : (i + 1) * ncpu])
        pairs = [(total[k], total[k + 1]) for k in range(0, slots, 2)]
        return pairs[:MAX_VIPS], pairs[MAX_VIPS:]

    def counters(self) -> dict[str, int]:
        """The per-CPU counters summed over the CPUs, by name; zeros left out."""
        out: dict[str, int] = {}
        names = _counter_names()
        keys, values = self.maps["counters"].lookup_batch(_SLOTS)
        per = array("Q", values)
        ncpu = len(per) // max(1, len(keys) // 4)
        for i, slot in enumerate(array("I", keys)):
            total = sum(per[i * ncpu : (i + 1) * ncpu])
            if total and slot in names:
                out[names[slot]] = total
        return out
