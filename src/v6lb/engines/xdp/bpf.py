"""A small typed wrapper over the bpf(2) syscall, with ctypes: what the XDP harness needs.

Commands: ``BPF_OBJ_GET`` (open a pinned program or map), ``BPF_OBJ_PIN``,
``BPF_MAP_CREATE`` (a Maglev table for the map-in-map swap), ``BPF_MAP_UPDATE_ELEM``,
``BPF_MAP_DELETE_ELEM``,
``BPF_MAP_UPDATE_BATCH`` (a whole Maglev table in one call), ``BPF_MAP_LOOKUP_ELEM``
(per-CPU values: one 8-byte slot per possible CPU), ``BPF_MAP_LOOKUP_BATCH``,
``BPF_PROG_TEST_RUN``, ``BPF_PROG_LOAD`` (a benchmark's few raw instructions) and the XDP
link (``BPF_LINK_CREATE``, ``BPF_LINK_UPDATE``, ``BPF_LINK_DETACH``). The
program itself is loaded and its maps pinned by ``bpftool prog load`` (libbpf does
the ELF relocation and BTF work; docs/dataplane-xdp.md says why). Linux x86-64 and
arm64 only: the syscall number is the one thing that differs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "XDP_FLAGS_DRV_MODE",
    "XDP_FLAGS_SKB_MODE",
    "BpfError",
    "Map",
    "RunResult",
    "link_detach",
    "link_update",
    "map_create",
    "obj_get",
    "obj_pin",
    "possible_cpus",
    "prog_load_xdp",
    "prog_test_run",
    "prog_test_run_live",
    "xdp_link_create",
]

_NR_BPF: Final = {"x86_64": 321, "aarch64": 280}
BPF_MAP_CREATE: Final = 0
BPF_MAP_LOOKUP_ELEM: Final = 1
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_MAP_DELETE_ELEM: Final = 3
BPF_PROG_LOAD: Final = 5
BPF_OBJ_PIN: Final = 6
BPF_OBJ_GET: Final = 7
BPF_PROG_TEST_RUN: Final = 10
BPF_MAP_LOOKUP_BATCH: Final = 24
BPF_MAP_UPDATE_BATCH: Final = 26
BPF_LINK_CREATE: Final = 28
BPF_LINK_UPDATE: Final = 29
BPF_LINK_DETACH: Final = 34
BPF_MAP_TYPE_ARRAY: Final = 2
BPF_F_INNER_MAP: Final = 1 << 12
BPF_XDP: Final = 37  # attach type
XDP_FLAGS_SKB_MODE: Final = 1 << 1  # generic XDP: after the skb is built
XDP_FLAGS_DRV_MODE: Final = 1 << 2  # native XDP: in the driver

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) command failed: the command and errno say which and why."""


class _ObjGet(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class _MapCreate(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


class _LinkCreate(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class _LinkUpdate(ctypes.Structure):
    _fields_ = [
        ("link_fd", ctypes.c_uint32),
        ("new_prog_fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("old_prog_fd", ctypes.c_uint32),
    ]


class _MapElem(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _MapBatch(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _TestRun(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(0, f"bpf(2): no syscall number known for {platform.machine()}")
    rc = int(_libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({what}): {os.strerror(err)}")
    return rc


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def obj_get(path: str) -> int:
    """A new file descriptor for the program or map pinned at ``path`` (close it)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, _ObjGet(pathname=_addr(name)), f"OBJ_GET {path}")


def obj_pin(fd: int, path: str) -> None:
    """Pin the program, map or link ``fd`` at ``path`` (in a bpffs; unlink it to unpin)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, _ObjGet(pathname=_addr(name), bpf_fd=fd), f"OBJ_PIN {path}")


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0, name: str = ""
) -> int:
    """A new map; its file descriptor (the map lives while a descriptor or a map holds it)."""
    attr = _MapCreate(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode("ascii")[:15],
    )
    return _bpf(BPF_MAP_CREATE, attr, f"MAP_CREATE {name or map_type}")


def xdp_link_create(prog_fd: int, ifindex: int, flags: int) -> int:
    """Attach an XDP program to interface ``ifindex`` as a BPF link; the link's descriptor.

    ``flags``: :data:`XDP_FLAGS_DRV_MODE` (native) or :data:`XDP_FLAGS_SKB_MODE`
    (generic). The program stays attached while the link is open or pinned.
    """
    attr = _LinkCreate(prog_fd=prog_fd, target_ifindex=ifindex, attach_type=BPF_XDP, flags=flags)
    return _bpf(BPF_LINK_CREATE, attr, f"LINK_CREATE xdp ifindex {ifindex}")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Replace the link's program by ``prog_fd`` in one step (no packet goes without one)."""
    _bpf(BPF_LINK_UPDATE, _LinkUpdate(link_fd=link_fd, new_prog_fd=prog_fd), "LINK_UPDATE")


def link_detach(link_fd: int) -> None:
    """Detach the link's program now, whoever else holds the link."""
    _bpf(BPF_LINK_DETACH, _LinkUpdate(link_fd=link_fd), "LINK_DETACH")


def possible_cpus() -> int:
    """The kernel's possible CPUs: the number of values of a per-CPU map element."""
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
        text = f.read().strip()
    return 1 + max(int(part.split("-")[-1]) for part in text.split(","))


class Map:
    """A pinned BPF map with fixed key and value sizes, opened by path."""

    def __init__(self, path: str, key_size: int, value_size: int, per_cpu: bool = False) -> None:
        self.path = path
        self.key_size = key_size
        self.value_size = value_size
        self.per_cpu = per_cpu
        self.fd = obj_get(path)

    @classmethod
    def create_array(cls, name: str, value_size: int, entries: int, flags: int = 0) -> Map:
        """A new unpinned ARRAY map of ``entries`` values (u32 keys); ``path`` is its name."""
        m = cls.__new__(cls)
        m.path, m.key_size, m.value_size, m.per_cpu = name, 4, value_size, False
        m.fd = map_create(BPF_MAP_TYPE_ARRAY, 4, value_size, entries, flags, name)
        return m

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, key: bytes, value: bytes | None = None) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"{self.path}: a key is {self.key_size} bytes, not {len(key)}")
        if value is not None and len(value) != self.value_size:
            raise ValueError(f"{self.path}: a value is {self.value_size} bytes, not {len(value)}")

    def update(self, key: bytes, value: bytes) -> None:
        self._check(key, value)
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value, len(value))
        attr = _MapElem(map_fd=self.fd, key=_addr(k), value=_addr(v))
        _bpf(BPF_MAP_UPDATE_ELEM, attr, f"MAP_UPDATE_ELEM {self.path}")

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False if it was not there."""
        self._check(key)
        k = ctypes.create_string_buffer(key, len(key))
        try:
            _bpf(BPF_MAP_DELETE_ELEM, _MapElem(map_fd=self.fd, key=_addr(k)), "MAP_DELETE_ELEM")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def update_batch(self, keys: bytes, values: bytes, count: int) -> None:
        """``count`` elements in one call: ``keys`` and ``values`` end to end."""
        if len(keys) != count * self.key_size or len(values) != count * self.value_size:
            raise ValueError(f"{self.path}: {count} keys and values of the map's sizes")
        done = 0
        while done < count:
            k = ctypes.create_string_buffer(
                keys[done * self.key_size :], (count - done) * self.key_size
            )
            v = ctypes.create_string_buffer(
                values[done * self.value_size :], (count - done) * self.value_size
            )
            attr = _MapBatch(keys=_addr(k), values=_addr(v), count=count - done, map_fd=self.fd)
            _bpf(BPF_MAP_UPDATE_BATCH, attr, f"MAP_UPDATE_BATCH {self.path}")
            done += attr.count  # the kernel writes back how many it took
            if attr.count == 0:
                raise BpfError(0, f"bpf(MAP_UPDATE_BATCH {self.path}): no progress")

    def lookup_batch(self, count: int) -> tuple[bytes, bytes]:
        """(keys, values) of the first ``count`` elements in one call (an array map's all).

        Values as :meth:`lookup` returns them, end to end. The kernel says ENOENT when
        the walk reaches the map's end: that is the end, not an error.
        """
        vsize = self.value_size
        if self.per_cpu:
            vsize = ((vsize + 7) & ~7) * possible_cpus()
        keys = ctypes.create_string_buffer(count * self.key_size)
        values = ctypes.create_string_buffer(count * vsize)
        out = ctypes.create_string_buffer(max(self.key_size, 8))
        attr = _MapBatch(
            out_batch=_addr(out),
            keys=_addr(keys),
            values=_addr(values),
            count=count,
            map_fd=self.fd,
        )
        try:
            _bpf(BPF_MAP_LOOKUP_BATCH, attr, f"MAP_LOOKUP_BATCH {self.path}")
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
        n = attr.count
        return keys.raw[: n * self.key_size], values.raw[: n * vsize]

    def lookup(self, key: bytes) -> bytes:
        """The value (per-CPU maps: one ``value_size`` slot, 8-byte aligned, per CPU)."""
        self._check(key)
        size = self.value_size
        if self.per_cpu:
            size = ((size + 7) & ~7) * possible_cpus()
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(size)
        attr = _MapElem(map_fd=self.fd, key=_addr(k), value=_addr(v))
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, f"MAP_LOOKUP_ELEM {self.path}")
        return v.raw


@dataclass(frozen=True, slots=True)
class RunResult:
    """What BPF_PROG_TEST_RUN returned: the verdict, the output frame, ns per run."""

    retval: int
    data: bytes
    duration_ns: int


BPF_F_TEST_XDP_LIVE_FRAMES: Final = 1 << 1
_XDP_MD: Final = struct.Struct("=6I")  # data, data_end, data_meta, ingress, rx queue, egress


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, headroom: int = 256) -> RunResult:
    """Run the program on ``data`` ``repeat`` times in the kernel (BPF_PROG_TEST_RUN).

    ``duration_ns`` is the kernel's mean time per run. The output buffer has room
    for ``headroom`` more bytes than the input (what ``bpf_xdp_adjust_head`` adds).
    The runs share one buffer: a program that rewrites the frame sees its own output
    from the second run on (:func:`prog_test_run_live` does not).
    """
    din = ctypes.create_string_buffer(data, len(data))
    out_size = len(data) + headroom
    dout = ctypes.create_string_buffer(out_size)
    attr = _TestRun(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=out_size,
        data_in=_addr(din),
        data_out=_addr(dout),
        repeat=repeat,
    )
    _bpf(BPF_PROG_TEST_RUN, attr, "PROG_TEST_RUN")
    return RunResult(attr.retval, dout.raw[: attr.data_size_out], attr.duration)


def prog_test_run_live(prog_fd: int, data: bytes, repeat: int, ifindex: int = 0) -> int:
    """Mean ns per run of ``repeat`` runs, each on a fresh copy of ``data``.

    BPF_PROG_TEST_RUN with ``BPF_F_TEST_XDP_LIVE_FRAMES`` (Linux 5.18), as
    xdp-trafficgen uses it: frames come from a page pool reset to ``data`` in
    batches of 64, and XDP_TX is carried out as a redirect to the ingress device
    ``ifindex`` (of the caller's network namespace). With 0, that is the namespace's
    loopback, which refuses it (it has no XDP transmit): the frame is then freed.
    A veth sends it to its peer: a packet generator. No output is returned.
    """
    din = ctypes.create_string_buffer(data, len(data))
    ctx = ctypes.create_string_buffer(_XDP_MD.pack(0, len(data), 0, ifindex, 0, 0), _XDP_MD.size)
    attr = _TestRun(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_in=_addr(din),
        repeat=repeat,
        ctx_size_in=_XDP_MD.size,
        ctx_in=_addr(ctx),
        flags=BPF_F_TEST_XDP_LIVE_FRAMES,
    )
    _bpf(BPF_PROG_TEST_RUN, attr, "PROG_TEST_RUN live frames")
    return int(attr.duration)


class _ProgLoad(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
    ]


BPF_PROG_TYPE_XDP: Final = 6


def prog_load_xdp(insns: bytes, name: str) -> int:
    """A descriptor for an XDP program of raw instructions (8 bytes each); close it.

    For programs of a few instructions that need no map or ELF (a benchmark's
    reflector or sink); the v6lb program is loaded from its object by bpftool.
    """
    if not insns or len(insns) % 8:
        raise ValueError("instructions: a non-empty multiple of 8 bytes")
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoad(
        prog_type=BPF_PROG_TYPE_XDP,
        insn_cnt=len(insns) // 8,
        insns=_addr(code),
        license=_addr(lic),
        prog_name=name.encode()[:15],
    )
    return _bpf(BPF_PROG_LOAD, attr, f"PROG_LOAD {name}")
