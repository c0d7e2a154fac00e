"""model/pools.py: the one pool rule, and every engine and renderer agreeing through it."""

from __future__ import annotations

import dataclasses
import random
import re
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from v6lb.core.backends import BackendPool
from v6lb.core.flowhash import flow_hash, flow_index
from v6lb.core.maglev import DEFAULT_TABLE_SIZE
from v6lb.core.verdict import FORWARD, PORT_OUTSIDE
from v6lb.engines.proxy.health import health_set_for
from v6lb.engines.proxy.runtime import VipRuntime
from v6lb.engines.sim.lb import LbNode
from v6lb.engines.sim.scenario import Sim
from v6lb.model.config import (
    Config,
    ProxyL4Options,
    Vip,
    VipMode,
    load_topology,
    parse_config,
)
from v6lb.model.modes import modes_where
from v6lb.model.pools import (
    MAGLEV_TABLE_SIZE,
    backend_specs,
    dsr_forwarder,
    nat_forwarder,
    npt_forwarder,
    pool_for,
    pools_for,
    table_size,
)
from v6lb.render.nftables import L2Ports, map_names, render_nft
from v6lb.render.routes import tunnel_targets
from v6lb.wire import build
from v6lb.wire.constants import TCP_SYN

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "eks-ipv6.yaml"
A = build.a16


def _file(*vips: dict[str, object], seed: int = 0x5EED) -> Config:
    lb = {"addresses": ["2001:db8::1"], "flow_hash_seed": seed}
    return parse_config({"lb": lb, "vips": list(vips)}, "pools.yaml")


def _vip(
    name: str, mode: str, backends: list[dict[str, object]], **more: object
) -> dict[str, object]:
    extra: dict[str, object] = {"tunnel_source": "2001:db8::1"} if mode == "dsr-ip6ip6" else {}
    return {
        "name": name,
        "address": f"2001:db8:10::{name.encode().hex()[:4]}",
        "ports": [80, 8080],
        "mode": mode,
        "backends": backends,
        **extra,
        **more,
    }


BACKENDS: list[dict[str, object]] = [
    {"address": "fd00::1"},
    {"address": "fd00::2", "weight": 3},
    {"address": "fd00::3", "drain": True},
    {"address": "fd00::4", "port": 9000},
]


def _runtime(vip: Vip, seed: int) -> VipRuntime:
    """The builtin proxy's per-VIP state, as its server builds it."""
    return VipRuntime.build(
        vip,
        health_set_for(vip.health, len(vip.backends), 0.0),
        seed=seed,
        max_connections=10,
        header_timeout=1.0,
        write_high=1 << 16,
    )


def _as_proxy(vip: Vip) -> Vip:
    return dataclasses.replace(vip, mode=VipMode.PROXY_L4, options=ProxyL4Options())


# --- the rule ----------------------------------------------------------------------


def test_the_table_size_default_is_one_value() -> None:
    assert MAGLEV_TABLE_SIZE == DEFAULT_TABLE_SIZE == 65537
    c = _file(
        _vip("maglev", "nat", BACKENDS),
        _vip("small", "nat", BACKENDS, table_size=251),
        _vip("rr", "proxy-l4", BACKENDS[:2], scheduler="round-robin"),
    )
    maglev, small, rr = c.vips
    assert maglev.table_size == MAGLEV_TABLE_SIZE  # the file's default, filled in by load
    assert rr.table_size is None  # not maglev: the proxy still keeps a table, of the default size
    assert [table_size(v) for v in c.vips] == [MAGLEV_TABLE_SIZE, 251, MAGLEV_TABLE_SIZE]
    assert [pool_for(v, 1).size for v in c.vips] == [MAGLEV_TABLE_SIZE, 251, MAGLEV_TABLE_SIZE]
    assert _runtime(rr, 1).pool.size == MAGLEV_TABLE_SIZE
    assert _runtime(small, 1).pool.size == 251


def test_backend_ports_weights_and_drain() -> None:
    c = _file(_vip("nat", "nat", BACKENDS), _vip("dsr", "dsr-ip6ip6", BACKENDS[:3]))
    nat, dsr = c.vips
    # nat keys a backend without a port as 0 ("the client's port"); the others as the VIP's first.
    assert [(IPv6Address(s.address), s.port) for s in backend_specs(nat)] == [
        (IPv6Address("fd00::1"), 0),
        (IPv6Address("fd00::2"), 0),
        (IPv6Address("fd00::3"), 0),
        (IPv6Address("fd00::4"), 9000),
    ]
    assert [s.port for s in backend_specs(dsr)] == [80, 80, 80]
    assert [(s.weight, s.drain) for s in backend_specs(nat)] == [
        (1, False),
        (3, False),
        (1, True),
        (1, False),
    ]
    pool = pool_for(nat, 7)
    assert pool.seed == 7 and pool.eligible_weights() == [1, 3, 0, 1]
    slots = [pool.table.count(i) for i in range(len(pool))]
    assert pool.slots == slots  # counted once per build
    assert slots[2] == 0  # draining: no new flows
    assert 2.5 < slots[1] / slots[0] < 3.5 and 0.8 < slots[3] / slots[0] < 1.25


def test_pools_for_selects_by_mode_name() -> None:
    c = _file(_vip("nat", "nat", BACKENDS), _vip("l4", "proxy-l4", BACKENDS[:2]))
    assert list(pools_for(c)) == ["nat", "l4"]
    assert list(pools_for(c, ("nat",))) == ["nat"]
    assert pools_for(c)["nat"].table == pool_for(c.vip("nat"), 0x5EED).table


# --- every user, one pool ------------------------------------------------------------


@pytest.fixture(scope="module")
def eks() -> tuple[Config, Sim]:
    config, topo = load_topology(EXAMPLE)
    return config, Sim(config, topo)


def _sim_pools(sim: Sim) -> dict[str, list[BackendPool]]:
    """Every LB node's pool of every VIP it serves (several instances serve the same VIP)."""
    out: dict[str, list[BackendPool]] = {}
    for node in sim.net.nodes.values():
        if not isinstance(node, LbNode):
            continue
        for svc in node.nat.services if node.nat else []:
            out.setdefault(svc.name, []).append(svc.pool)
        for dsvc in node.dsr.services if node.dsr else []:
            out.setdefault(dsvc.name, []).append(dsvc.pool)
        for name, proxy in node.proxies.items():
            out.setdefault(name, []).append(proxy.pool)
    return out


def _kernel_tables(config: Config) -> dict[str, list[int]]:
    """The Maglev table of each kernel-mode VIP as the rendered nft maps hold it (backend
    index per slot), read back from the text."""
    macs = {
        b.address: f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}"
        for i, b in enumerate(b for v in config.vips for b in v.backends)
    }
    l2 = L2Ports(ingress="eth0", egress="eth1", egress_mac="02:00:00:00:ff:ff")
    text = render_nft(config, l2=l2, backend_macs=macs)
    marks = {(t.vip.name, f"{t.mark:#010x}"): t.backend_index for t in tunnel_targets(config)}
    out = {}
    for vip in config.vips:
        if str(vip.mode) not in modes_where(plane="kernel", vip=True):
            continue
        (name,) = map_names(config, vip)
        block = re.search(rf"\tmap {name} \{{\n(.*?)\n\t\}}", text, re.S)
        assert block, name
        values = dict(re.findall(r"^\t\t\t(\d+) : (.+),$", block.group(1), re.M))
        if vip.mode is VipMode.NAT:
            keys = [f"{b.address} . {b.port}" if b.port else str(b.address) for b in vip.backends]
        elif vip.mode.tunnels:
            mark_of = {i: k for (n, k), i in marks.items() if n == vip.name}
            keys = [mark_of[j] for j in range(len(vip.backends))]
        else:
            keys = [b.mac or macs[b.address] for b in vip.backends]
        assert len(set(keys)) == len(vip.backends), name
        out[vip.name] = [keys.index(values[str(slot)]) for slot in range(len(values))]
    return out


def test_every_user_builds_the_same_pool(eks: tuple[Config, Sim]) -> None:
    config, sim = eks
    seed = config.lb.flow_hash_seed
    want = {v.name: pool_for(v, seed).table for v in config.vips}
    nat = nat_forwarder(config)
    assert {s.name: s.pool.table for s in nat.services} == {
        v.name: want[v.name] for v in config.vips if v.mode is VipMode.NAT
    }
    dsr = dsr_forwarder(config)
    for v in config.vips:
        if v.mode.is_dsr:
            assert dsr.pool(v.name).table == want[v.name], v.name
        if v.mode.is_proxy:
            assert _runtime(v, seed).pool.table == want[v.name], v.name
    kernel = _kernel_tables(config)
    assert kernel and all(kernel[n] == want[n] for n in kernel)
    served = _sim_pools(sim)
    assert set(served) == set(want)
    for name, pools in served.items():
        assert all(p.table == want[name] for p in pools), name


def test_kernel_sim_and_proxy_pick_the_same_backend_per_flow(eks: tuple[Config, Sim]) -> None:
    """For the same flow, the nft map slot (jhash ... mod N), the simulator's forwarders and
    the builtin proxy's pool name the same backend (a DSR VIP served as proxy-l4 instead:
    the same backends, address and port)."""
    config, sim = eks
    seed = config.lb.flow_hash_seed
    kernel = _kernel_tables(config)
    lb = next(n for n in sim.net.nodes.values() if isinstance(n, LbNode) and n.nat and n.dsr)
    rng = random.Random(13)
    for name in ("web-nat", "web-l2", "web-ip6ip6", "web-srv6"):
        vip = config.vip(name)
        backends = [A(str(b.address)) for b in vip.backends]
        proxy = _runtime(_as_proxy(vip), seed) if vip.mode.is_dsr else None
        size = table_size(vip)
        seen = set()
        for _ in range(300):
            client = f"2001:db8:ffff::{rng.randrange(1, 1 << 16):x}"
            sport = rng.randrange(1024, 65536)
            src, dst = A(client), vip.address.packed
            k = kernel[name][flow_index(flow_hash(src, dst, sport, 80, seed), size)]
            if vip.mode is VipMode.NAT:
                assert lb.nat is not None
                pkt = build.tcp(client, str(vip.address), sport, 80, flags=TCP_SYN)
                action, _, out = lb.nat.process(pkt, PORT_OUTSIDE, 0.0)
                assert action == FORWARD and isinstance(out, bytearray)
                s = backends.index(bytes(out[24:40]))
            else:
                assert lb.dsr is not None and proxy is not None
                picked = lb.dsr.backend_for(src, dst, sport, 80)
                assert picked is not None and picked[0] == name
                s = picked[1]
                # dsr keys a backend without a port as the VIP's first port, as the proxies do
                assert proxy.pool.pick_flow(src, dst, sport, 80) == k
                # the proxy's maglev scheduler keys on the client address only (ports 0)
                k0 = kernel[name][flow_index(flow_hash(src, dst, 0, 0, seed), size)]
                assert proxy.picker.pick(IPv6Address(client)) == k0
            assert k == s, (name, client, sport)
            seen.add(k)
        assert seen == set(range(len(backends))), name


def test_npt_forwarder_from_the_npt_section() -> None:
    data = {
        "lb": {"icmp_error_rate": 5, "icmp_error_burst": 2},
        "npt": [{"inside": "fd00:10::/48", "outside": "2001:db8:10::/48"}],
    }
    c = parse_config(data, "npt.yaml")
    fwd = npt_forwarder(c, decrement_hop_limit=False)
    assert [(str(m.inside), str(m.outside)) for m in fwd.mappings] == [
        ("fd00:10::/48", "2001:db8:10::/48")
    ]
    # no lb.addresses: errors come from the outside prefix
    assert fwd.icmp.source == A("2001:db8:10::") and (fwd.icmp.rate, fwd.icmp.burst) == (5, 2)
    assert fwd.decrement_hop_limit is False
    assert npt_forwarder(c, A("2001:db8::9")).icmp.source == A("2001:db8::9")
    with pytest.raises(ValueError, match="no npt"):
        npt_forwarder(_file(_vip("nat", "nat", BACKENDS)))
