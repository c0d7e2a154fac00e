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
from v6lb.core.dsr import MODE_IP6IP6, MODE_SRV6
from v6lb.engines.xdp.program import (
    MAX_BACKENDS,
    MAX_TABLE_ENTRIES,
    counter_names,
    map_entries,
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
    served = [s for s in services if s.mode in (MODE_IP6IP6, MODE_SRV6)]
    index = {s.name: i for i, s in enumerate(served)}
    # the multi-backend address: tcp/443 is "multi", udp/53 is "multi-udp"
    assert vips[_key(fx.VIPM, 443, 6)] == index["multi"]
    assert vips[_key(fx.VIPM, 53, 17)] == index["multi-udp"]
    assert vips[_key(fx.VIPM, 0, 6)] == index["multi"]  # _default(tcp): fragments
    assert vips[_key(fx.VIPM, 0, 17)] == index["multi-udp"]
    assert vips[_key(fx.VIPM, 0, 0)] == index["multi"]  # services[0]
    assert _key(fx.VIPM, 53, 6) not in vips and _key(fx.VIP6, 22, 6) not in vips
    # dsr-l2 keeps its keys, with no index: the program passes its packets on
    assert vips[_key(fx.VIPL2, 443, 6)] == NONE and vips[_key(fx.VIPL2, 0, 0)] == NONE
    # the tables end to end, each the pool's, with backend indexes offset
    off = 0
    base = 0
    for s, raw in zip(served, info, strict=True):
        mode, seed, table_off, size, limit, _ = struct.unpack("=6I", raw)
        assert (table_off, size, seed, limit) == (off, s.pool.size, fx.SEED, s.limit)
        assert list(maglev[off : off + size]) == [base + b for b in s.pool.table]
        for i, t in enumerate(s.targets):
            assert backends[base + i] == s.tunnel_source + t
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


def test_counter_names() -> None:
    names = counter_names()
    assert names[int(Reason.NO_MATCH)] == "no-match"
    assert names[64] == "tx" and names[66] == "pass-not-vip"
    assert len(set(names.values())) == len(names)
