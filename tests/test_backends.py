"""BackendPool: the Maglev table behind nat and dsr-*, rebuilt on health, drain and weight."""

from __future__ import annotations

import random

import pytest

from v6lb.core.backends import BackendPool, BackendSpec
from v6lb.core.flowhash import flow_hash, reciprocal_scale

SPECS = [BackendSpec.of(f"fd00:10::{i}", 8080) for i in range(1, 6)]


def _flows(n: int) -> list[tuple[bytes, bytes, int, int]]:
    rng = random.Random(7)
    vip = bytes.fromhex("20010db8000000000000000000000080")
    return [(rng.randbytes(16), vip, rng.randrange(1024, 65536), 443) for _ in range(n)]


def test_two_pools_agree_flow_by_flow() -> None:
    a = BackendPool(SPECS, seed=0x5EED)
    b = BackendPool(list(reversed(SPECS)), seed=0x5EED)
    for f in _flows(1000):
        ia, ib = a.pick_flow(*f), b.pick_flow(*f)
        assert a.addresses[ia] == b.addresses[ib]


def test_pick_uses_the_kernel_index() -> None:
    p = BackendPool(SPECS, seed=9)
    for f in _flows(200):
        h = flow_hash(*f, seed=9)
        assert p.pick_flow(*f) == p.table[reciprocal_scale(h, 65537)] == p.pick(h)


def test_down_and_drain_leave_the_table_and_only_their_flows_move() -> None:
    p = BackendPool(SPECS, seed=1)
    flows = _flows(2000)
    before = [p.pick_flow(*f) for f in flows]
    gen = p.generation
    assert p.set_up(2, False) and p.generation == gen + 1
    assert not p.set_up(2, False)
    after = [p.pick_flow(*f) for f in flows]
    assert 2 not in after
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert sum(1 for x, _ in moved if x == 2) == before.count(2)
    # Maglev is near-minimal: few flows of the other backends move too.
    others = sum(1 for x, _ in moved if x != 2)
    assert others <= 0.03 * (len(flows) - before.count(2))
    assert not p.keeps_existing(2)
    p.set_up(2, True)
    p.set_drain(3, True)
    assert 3 not in {p.pick_flow(*f) for f in flows}
    assert p.keeps_existing(3) and p.is_draining(3)


def test_weights_and_no_eligible_backend() -> None:
    p = BackendPool([BackendSpec.of("fd00::1", 80, 3), BackendSpec.of("fd00::2", 80, 1)])
    share = p.table.count(0) / len(p.table)
    assert 0.74 < share < 0.76
    assert p.slots == [p.table.count(0), p.table.count(1)]
    p.set_up(0, False)
    assert p.slots == [0, len(p.table)]  # recounted with each build
    p.set_drain(1, True)
    assert p.slots == [0, 0]
    assert not p.any_eligible and p.pick_flow(*_flows(1)[0]) == -1
    with pytest.raises(ValueError):
        BackendPool([])
    with pytest.raises(ValueError):
        p.set_weight(0, -1)


def test_a_drain_keeps_a_table_for_the_open_flows() -> None:
    """keep_table: the draining backends still in; moved: where it differs from the table."""
    specs = [BackendSpec.of(f"2001:db8::{i}", 80) for i in range(1, 4)]
    pool = BackendPool(specs, table_size=65537)
    assert pool.moved == [] and pool.keep_table == pool.table  # nothing drains
    before = list(pool.table)
    pool.set_drain(0, True)
    assert 0 not in pool.table
    assert pool.keep_table == before  # the table the open flows were hashed on
    moved = set(pool.moved)
    assert moved == {i for i in range(65537) if pool.table[i] != before[i]}
    assert {i for i in range(65537) if before[i] == 0} <= moved  # all of backend 0's slots
    assert len(moved) < 65537 // 3 + 100  # Maglev moves very few others
    pool.set_up(1, False)  # a dead backend keeps nothing: not in the keep table either
    assert 1 not in pool.keep_table and 1 not in pool.table
    pool.set_drain(2, True)  # every backend left is draining: all slots moved
    assert pool.table[0] == -1 and len(pool.moved) == 65537
    assert set(pool.keep_table) == {0, 2}
    pool.set_up(1, True)
    pool.set_drain(0, False)
    pool.set_drain(2, False)
    assert pool.moved == [] and pool.table == before
