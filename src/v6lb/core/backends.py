"""A VIP's backends and the Maglev table that picks one per flow.

Shared by ``nat`` and ``dsr-*`` (and by the proxies' Maglev scheduler): every
LB instance that has the same backends, weights, health and seed builds the
same table and therefore picks the same backend for the same flow, with no
shared state (the reason ``nat``/``dsr-*`` accept ``maglev`` only).

A backend is *eligible* for new flows when it is up, enabled, not draining and
of non-zero weight; the table is built from eligible backends only and rebuilt
on every change (health, drain, weight). A backend that is draining still
*keeps* its existing flows (conntrack entries for ``nat``, the flow LRU for
``dsr-*`` in the python plane, :attr:`BackendPool.keep_table` for TCP ``dsr-*`` in
the kernel plane); a backend that is down, or disabled by the operator
(``v6lb ctl disable``), keeps none.

Indexing: slot = ``reciprocal_scale(flow_hash, M)``, the kernel's
``jhash ... mod M`` map index, so the kernel's nftables map and this table agree.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from v6lb.core.flowhash import flow_hash
from v6lb.core.maglev import DEFAULT_TABLE_SIZE, backend_id, build_table, entry_counts


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend as the pool sees it: 16-byte address, port, weight, drain."""

    address: bytes
    port: int
    weight: int = 1
    drain: bool = False

    @classmethod
    def of(
        cls, address: str | ipaddress.IPv6Address, port: int, weight: int = 1, drain: bool = False
    ) -> BackendSpec:
        return cls(ipaddress.IPv6Address(address).packed, port, weight, drain)

    @property
    def text(self) -> str:
        return f"[{ipaddress.IPv6Address(self.address)}]:{self.port}"


class BackendPool:
    """Backends of one VIP, their eligibility, and the Maglev lookup table."""

    def __init__(
        self, specs: Sequence[BackendSpec], *, table_size: int = DEFAULT_TABLE_SIZE, seed: int = 0
    ) -> None:
        if not specs:
            raise ValueError("a backend pool needs at least one backend")
        self.specs = list(specs)
        self.addresses = [s.address for s in self.specs]
        self.ports = [s.port for s in self.specs]
        self.ids = [backend_id(str(ipaddress.IPv6Address(s.address)), s.port) for s in self.specs]
        self.size = table_size
        self.seed = seed
        self._weight = [s.weight for s in self.specs]
        self._drain = [s.drain for s in self.specs]
        self._up = [True] * len(self.specs)
        self._enabled = [True] * len(self.specs)
        self.generation = 0
        self.table: list[int] = []
        self.slots: list[int] = []  # table entries per backend
        # the table as it was for the flows a drain must keep: the draining backends
        # counted as eligible; ``moved``: the slots where it differs from ``table``
        self.keep_table: list[int] = []
        self.moved: list[int] = []
        self._rebuild()

    def __len__(self) -> int:
        return len(self.specs)

    # --- state -------------------------------------------------------------

    def eligible_weights(self) -> list[int]:
        return [
            w if up and on and not d else 0
            for w, up, on, d in zip(self._weight, self._up, self._enabled, self._drain, strict=True)
        ]

    def _rebuild(self) -> None:
        weights = self.eligible_weights()
        if any(weights):
            table = build_table(self.ids, weights, self.size)
            self.table = table.tolist()
            # slots per backend, counted once per build: a status lists them for every
            # backend, and list.count over each table cost 0.6 s for 100 VIPs x 10 backends
            self.slots = entry_counts(table, len(self.specs)).tolist()
        else:
            table = None
            self.table = [-1] * self.size
            self.slots = [0] * len(self.specs)
        keep = [
            w if up and on else 0
            for w, up, on in zip(self._weight, self._up, self._enabled, strict=True)
        ]
        if keep == weights or not any(keep):
            self.keep_table, self.moved = self.table, []
        else:
            kept = build_table(self.ids, keep, self.size)
            self.keep_table = kept.tolist()
            if table is None:  # every backend left is draining: all its slots moved
                self.moved = list(range(self.size))
            else:
                self.moved = (kept != table).nonzero()[0].tolist()
        self.generation += 1

    def set_up(self, index: int, up: bool) -> bool:
        """Record a health change; rebuild the table if it changed anything."""
        if self._up[index] == up:
            return False
        self._up[index] = up
        self._rebuild()
        return True

    def set_drain(self, index: int, drain: bool) -> bool:
        if self._drain[index] == drain:
            return False
        self._drain[index] = drain
        self._rebuild()
        return True

    def set_weight(self, index: int, weight: int) -> bool:
        if weight < 0:
            raise ValueError("a weight is a non-negative integer")
        if self._weight[index] == weight:
            return False
        self._weight[index] = weight
        self._rebuild()
        return True

    def set_enabled(self, index: int, enabled: bool) -> bool:
        """The operator's switch: a disabled backend takes no flows, new or existing."""
        if self._enabled[index] == enabled:
            return False
        self._enabled[index] = enabled
        self._rebuild()
        return True

    def is_enabled(self, index: int) -> bool:
        return self._enabled[index]

    def weight(self, index: int) -> int:
        return self._weight[index]

    def is_up(self, index: int) -> bool:
        return self._up[index]

    def is_draining(self, index: int) -> bool:
        return self._drain[index]

    def keeps_existing(self, index: int) -> bool:
        """May this backend keep carrying flows it already has? (up and enabled, draining or not)"""
        return self._up[index] and self._enabled[index]

    @property
    def any_eligible(self) -> bool:
        return self.table[0] >= 0

    # --- picking -------------------------------------------------------------

    def pick(self, h: int) -> int:
        """Backend index for a 32-bit flow hash, or -1 when no backend is eligible."""
        return self.table[(h * self.size) >> 32]

    def pick_flow(self, src: bytes, dst: bytes, sport: int, dport: int) -> int:
        """Backend index for the 4-tuple, hashed as nftables' ``jhash ip6 saddr . ip6 daddr . th sport . th dport``."""
        return self.table[(flow_hash(src, dst, sport, dport, self.seed) * self.size) >> 32]
