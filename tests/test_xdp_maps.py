"""The XDP program's map contents and limits, computed from the core (no root, no kernel).

``map_entries`` turns the core's DSR services into the maps' contents: the VIP keys must
answer the core's ``_match`` and ``_default`` questions, the tables must be the pools'
tables, and a config larger than the maps is refused, naming the limit, before any map
is written (docs/dataplane-xdp.md, "The maps").
"""

from __future__ import annotations

import copy
import struct
from typing import Any

import pytest

import dsr_fixtures as fx
from v6lb.core.nptv6 import NptMapping
from v6lb.engines.xdp.program import (
    MAX_BACKENDS,
    MAX_NPT,
    MAX_TABLE_ENTRIES,
    counter_names,
    l2_entries,
    map_entries,
    npt_entries,
)
from v6lb.model.config import parse_config
from v6lb.model.pools import dsr_services
from v6lb.wire import build
from v6lb.wire.reasons import Reason

NONE = 0xFFFFFFFF


def _key(addr: str, port: int, proto: int) -> bytes:
    return build.a16(addr) + struct.pack("!HBx", port, proto)


def test_vip_keys_answer_the_cores_questions() -> None:
    services = dsr_services(parse_config(copy.deepcopy(fx.CONFIG), "dsr.yaml"))
    vips, info, maglev, backends = map_entries(services)
    served = services  # every DSR mode
    index = {s.name: i for i, s in enumerate(served)}
    # the multi-backend address: tcp/443 is "multi", udp/53 is "multi-udp"
    assert vips[_key(fx.VIPM, 443, 6)] == index["multi"]
    assert vips[_key(fx.VIPM, 53, 17)] == index["multi-udp"]
    assert vips[_key(fx.VIPM, 0, 6)] == index["multi"]  # _default(tcp): fragments
    assert vips[_key(fx.VIPM, 0, 17)] == index["multi-udp"]
    assert vips[_key(fx.VIPM, 0, 0)] == index["multi"]  # services[0]
    assert _key(fx.VIPM, 53, 6) not in vips and _key(fx.VIP6, 22, 6) not in vips
    # dsr-l2 is served too: its backends' entries are the address, its MACs apart
    assert vips[_key(fx.VIPL2, 443, 6)] == index["l2"] == vips[_key(fx.VIPL2, 0, 0)]
    # the tables end to end, each the pool's, with backend indexes offset
    off = 0
    base = 0
    for s, raw in zip(served, info, strict=True):
        mode, seed, table_off, size, limit, _ = struct.unpack("=6I", raw)
        assert (table_off, size, seed, limit) == (off, s.pool.size, fx.SEED, s.limit)
        assert list(maglev[off : off + size]) == [base + b for b in s.pool.table]
        for i, t in enumerate(s.targets):
            assert backends[base + i] == (s.tunnel_source or bytes(16)) + t
            mac = l2_entries(services)[base + i]
            known = bytes.fromhex(fx.MAC.replace(":", "")) + b"\x01\x00"
            assert mac == (known if s.macs[i] else bytes(8))
        off += size
        base += len(s.pool)
    assert len(maglev) == off and len(backends) == base


def _config(vips: int, backends: int, table: int = 65537) -> dict[str, Any]:
    return {
        "lb": {"addresses": [fx.LB]},
        "vips": [
            {
                "name": f"v{n}",
                "address": f"2001:db8:100::{n + 1:x}",
                "ports": [443],
                "mode": "dsr-ip6ip6",
                "table_size": table,
                "backends": [{"address": f"fd00:{n + 1:x}::{i + 1:x}"} for i in range(backends)],
            }
            for n in range(vips)
        ],
    }


@pytest.mark.parametrize(
    ("vips", "backends", "table", "limit"),
    [(17, 1, 65537, MAX_TABLE_ENTRIES), (2, 2049, 4099, MAX_BACKENDS)],
    ids=["table slots", "backends"],
)
def test_a_config_larger_than_the_maps_is_refused(
    vips: int, backends: int, table: int, limit: int
) -> None:
    services = dsr_services(parse_config(_config(vips, backends, table), "big.yaml"))
    with pytest.raises(ValueError, match=f"the XDP program holds {limit}"):
        map_entries(services)


def test_npt_entries_are_the_cores_pairs() -> None:
    """/48: the subnet word, the core's adjustment and 0xFFFF minus it; /64: the IID."""
    rfc = NptMapping("fd01:203:405::/48", "2001:db8:1::/48")  # RFC 6296 §3.6: 0xd54f
    wide = NptMapping("fd00:1:2:3::/64", "2001:db8:5:6::/64")
    short = NptMapping("fd00:30::/44", "2001:db8:3000::/40")  # zero-extended to /44
    e48, e64, e44 = npt_entries([rfc, wide, short])
    assert struct.unpack("=8s8s8sHHB3x", e48) == (
        build.a16("fd01:203:405::")[:8],
        build.a16("2001:db8:1::")[:8],
        bytes.fromhex("ffffffffffff0000"),
        0xD54F,
        0xFFFF - 0xD54F,
        1,
    )
    assert e64[16:24] == b"\xff" * 8 and e64[28] == 0
    assert e44[16:24] == bytes.fromhex("fffffffffff00000")
    assert e44[8:16] == build.a16("2001:db8:3000::")[:8]
    with pytest.raises(ValueError, match=f"the XDP program holds {MAX_NPT}"):
        npt_entries([rfc] * (MAX_NPT + 1))


def test_counter_names() -> None:
    names = counter_names()
    assert names[int(Reason.NO_MATCH)] == "no-match"
    assert names[64] == "tx" and names[66] == "pass-not-vip"
    assert len(set(names.values())) == len(names)
