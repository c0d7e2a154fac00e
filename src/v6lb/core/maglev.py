"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), vectorised with numpy.

Each backend has a permutation of the table slots, ``(offset + j * skip) % M``,
with ``offset = h1(name) % M`` and ``skip = h2(name) % (M - 1) + 1``; ``M`` is
prime, so every permutation visits every slot. Backends take turns, and each
turn claims the first slot of the backend's permutation that is still free,
until the table is full.

Conventions fixed here, so that every engine and every host builds the same table:

* A backend's identity is a string, by convention ``"[address]:port"``
  (`backend_id`). ``h1``/``h2`` come from BLAKE2b of its UTF-8 bytes, never
  from Python's per-process ``hash()``.
* Turn order is the sorted order of the identities, not the order of the
  caller's list, so reordering a configuration does not reshuffle flows. The
  table holds indexes into the caller's list.
* Weights are non-negative integers, divided by their greatest common divisor.
  In every round, a backend of weight ``w`` takes ``w`` consecutive turns; a
  backend of weight 0 takes none and owns no slot.
* A flow's slot is ``reciprocal_scale(flow_hash, M)``: the index that
  ``meta mark set jhash ... mod M`` gives the kernel's ``map maglev``.

`build_table` reproduces the plain loop (`_build_table_reference`) exactly, in
one of two ways: batches of turns resolved with numpy (`_Builder.run_batched`,
the comments in `_Builder._resolve_batch` give the argument), or a tuned
Python loop when a round has few turns. Both finish the last few hundred free
slots through inverse permutations (`_Builder._finish`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_TABLE_SIZE",
    "MAX_TABLE_SIZE",
    "Disruption",
    "Maglev",
    "backend_id",
    "balance",
    "build_table",
    "check_table_size",
    "disruption",
    "entry_counts",
    "is_prime",
    "permutation_params",
]

DEFAULT_TABLE_SIZE = 65537
"""The default table size: prime, and the ``mod 65537`` of the kernel recipe."""

MAX_TABLE_SIZE = 1 << 24
"""The largest table accepted; a build needs about 20 bytes per slot."""
_PERSON = b"v6lb-maglev"  # BLAKE2b personalisation: these digests mean "Maglev"
_EMPTY = -1
_BIG = np.iinfo(np.int64).max
_NOBODY = np.iinfo(np.int32).max
# Tuning, measured at M=65537 on a 2-vCPU VM: the free slots left when a build
# switches to one turn at a time, and the backend count below which the tuned
# Python loop beats the batches (batches then resolve long chains of collisions).
_DENSE = 512
_DENSE_SEQ = 1024
_BATCHED_FROM = 256

IntArray = npt.NDArray[np.int64]
Table = npt.NDArray[np.int32]


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin; exact for every n below 3.3e24."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def backend_id(address: str, port: int) -> str:
    """The canonical identity of a backend: ``"[2001:db8::1]:80"`` (address compressed)."""
    return f"[{ipaddress.IPv6Address(address).compressed}]:{port}"


def check_table_size(size: int) -> None:
    """Raise ValueError unless ``size`` is a prime in 2..`MAX_TABLE_SIZE`."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"table size must be an int, not {type(size).__name__}")
    if not 2 <= size <= MAX_TABLE_SIZE:
        raise ValueError(f"table size {size} is out of range: use a prime in 2..{MAX_TABLE_SIZE}")
    if not is_prime(size):
        raise ValueError(f"table size {size} is not prime: Maglev needs a prime, e.g. 65537")


def permutation_params(name: str, size: int) -> tuple[int, int]:
    """``(offset, skip)`` of the backend ``name`` in a table of ``size`` slots."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=16, person=_PERSON).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def _normalise(backends: Sequence[str], weights: Sequence[int] | None) -> list[int]:
    if isinstance(backends, str):
        raise TypeError("backends must be a sequence of identity strings, not one string")
    for b in backends:
        if not isinstance(b, str):
            raise TypeError(f"a backend identity must be a str, not {type(b).__name__}")
    if len(set(backends)) != len(backends):
        seen: set[str] = set()
        dupes: set[str] = set()
        for b in backends:
            (dupes if b in seen else seen).add(b)
        raise ValueError(f"duplicate backend identities: {', '.join(sorted(dupes))}")
    if weights is None:
        return [1] * len(backends)
    if len(weights) != len(backends):
        raise ValueError(f"{len(weights)} weights for {len(backends)} backends")
    ws: list[int] = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int | np.integer):
            raise TypeError(f"weights must be integers, got {w!r}")
        if w < 0:
            raise ValueError(f"weights must be >= 0, got {w}")
        ws.append(int(w))
    g = math.gcd(*ws)
    return [w // g for w in ws] if g > 1 else ws


def _prepare(
    backends: Sequence[str], weights: Sequence[int] | None, size: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Validate; return (the turns of one round, offsets, skips, order).

    ``order[k]`` is the caller's index of the k-th backend in sorted order.
    Offsets, skips and turns are all in sorted order.
    """
    check_table_size(size)
    ws = _normalise(backends, weights)
    order = sorted(range(len(backends)), key=lambda i: backends[i])
    offsets: list[int] = []
    skips: list[int] = []
    turns: list[int] = []
    for k, i in enumerate(order):
        off, skip = permutation_params(backends[i], size)
        offsets.append(off)
        skips.append(skip)
        turns.extend([k] * ws[i])
    return turns, offsets, skips, order


def _build_table_reference(
    backends: Sequence[str], weights: Sequence[int] | None = None, size: int = DEFAULT_TABLE_SIZE
) -> list[int]:
    """The paper's population loop (Pseudocode 1) with weighted turns, written plainly.

    This is the definition `build_table` must reproduce exactly; it takes
    50-120 ms at M=65537.
    """
    turns, offsets, skips, order = _prepare(backends, weights, size)
    table = [_EMPTY] * size
    if not turns:
        return table
    nxt = [0] * len(offsets)
    filled = 0
    while True:
        for k in turns:
            off, skip, j = offsets[k], skips[k], nxt[k]
            slot = (off + j * skip) % size
            while table[slot] >= 0:
                j += 1
                slot = (off + j * skip) % size
            table[slot] = k
            nxt[k] = j + 1
            filled += 1
            if filled == size:
                return [order[k] for k in table]


class _Builder:
    """State of one vectorised build. A position indexes a backend's permutation."""

    def __init__(
        self, turns: list[int], offsets: list[int], skips: list[int], size: int, dense: int
    ) -> None:
        self.size = size
        self.dense = dense
        self.round = np.asarray(turns, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.skips = np.asarray(skips, dtype=np.int64)
        self.free = np.ones(size, dtype=np.bool_)
        self.steps = np.arange(min(size, 4096), dtype=np.int64)  # grown on demand
        self.table = np.full(size, _EMPTY, dtype=np.int32)
        # owner[slot]: the lowest turn of the current batch that has had slot as
        # its candidate (reset after each batch).
        self.owner = np.full(size, _NOBODY, dtype=np.int32)
        self.nxt = np.zeros(len(offsets), dtype=np.int64)
        self.filled = 0
        self.t0 = 0  # the next turn, as an index into the round

    def run_sequential(self) -> Table:
        """The plain loop, tuned (slot arithmetic instead of positions), then `_finish`.

        Faster than the batches for a few hundred backends or fewer: batches
        then resolve long chains of collisions one numpy step at a time.
        """
        size = self.size
        stop = size - self.dense
        if stop > 0:
            turns = self.round.tolist()
            skips = self.skips.tolist()
            cur = self.offsets.tolist()  # slot at each backend's next position
            taken = bytearray(size)
            table = [_EMPTY] * size
            filled = 0
            done = False
            while not done:
                for t, k in enumerate(turns):
                    skip = skips[k]
                    slot = cur[k]
                    while taken[slot]:
                        slot += skip
                        if slot >= size:
                            slot -= size
                    taken[slot] = 1
                    table[slot] = k
                    slot += skip
                    cur[k] = slot - size if slot >= size else slot
                    filled += 1
                    if filled == stop:
                        self.t0 = (t + 1) % len(turns)
                        done = True
                        break
            self.table = np.array(table, dtype=np.int32)
            self.free = self.table < 0
            self.filled = filled
        self._finish()
        return self.table

    def run_batched(self) -> Table:
        """Batches of turns resolved with numpy, then `_finish`."""
        size = self.size
        n_round = len(self.round)
        while size - self.filled > self.dense:
            free = size - self.filled
            batch = min(max(free // 3, 256), 8192, free)
            turns = self.round[(self.t0 + np.arange(batch)) % n_round]
            self.t0 = (self.t0 + batch) % n_round
            self._resolve_batch(turns)
        self._finish()
        return self.table

    def find_free(
        self, backend: IntArray, start: IntArray, need: IntArray, turn: IntArray | None
    ) -> IntArray:
        """For each query q, the first ``need[q]`` positions >= ``start[q]`` whose slot is free.

        Free means: not in the table and, when ``turn`` is given, no batch turn
        lower than ``turn[q]`` has had it as its candidate (see `owner`). The
        results are concatenated query by query; ``size`` (past the end of the
        permutation) stands for "none left".
        """
        size = self.size
        out = np.full(int(need.sum()), size, dtype=np.int64)
        n_q = len(backend)
        if n_q == 0:
            return out
        out_at = np.cumsum(need) - need
        per_free = size / max(size - self.filled, 1)  # positions per free slot
        # Queries whose needs are within a factor of 4 share one 2-D window,
        # wide enough for about need + sqrt(need) + 1 free slots on average.
        # Rows that come up short retry with a window twice as wide: another
        # round of numpy calls on the few short rows costs less than scanning
        # much wider windows for every row.
        if int(need.max()) == 1:
            groups = [np.arange(n_q)]
        else:
            level = np.log2(need).astype(np.int64) // 2
            groups = [
                qs
                for lv in range(int(level.min()), int(level.max()) + 1)
                if len(qs := np.nonzero(level == lv)[0])
            ]
        for qs in groups:
            b = backend[qs]
            s = start[qs]
            k = need[qs]
            at = out_at[qs]
            th = None if turn is None else turn[qs][:, None]
            spread = per_free
            while True:
                km = int(k.max())
                width = min(int((km + math.sqrt(km) + 1.0) * spread) + 4, size)
                if width > len(self.steps):
                    self.steps = np.arange(max(width, 2 * len(self.steps)), dtype=np.int64)
                step = self.skips[b]
                # slot of position s + i is (offset + s*skip + i*skip) % size.
                slot = self.steps[:width] * step[:, None]
                slot += ((self.offsets[b] + s * step) % size)[:, None]
                slot %= size
                free = self.free[slot]
                if int(s.max()) + width > size:
                    free &= self.steps[:width] < (size - s)[:, None]
                if th is not None:
                    free &= self.owner[slot] >= th
                if km == 1:
                    col = free.argmax(axis=1)
                    found = free[np.arange(len(s)), col]
                    out[at[found]] = s[found] + col[found]
                    found = found.astype(np.int64)
                else:
                    csum = free.cumsum(axis=1)
                    r, c = np.nonzero(free & (csum <= k[:, None]))
                    out[at[r] + csum[r, c] - 1] = s[r] + c
                    found = np.minimum(csum[:, -1], k)
                more = np.nonzero((found < k) & (s + width < size))[0]
                if len(more) == 0:
                    break
                b, s, k = b[more], s[more] + width, k[more] - found[more]
                at = at[more] + found[more]
                if th is not None:
                    th = th[more]
                spread *= 2
        return out

    def _resolve_batch(self, turns: IntArray) -> None:
        size = self.size
        n = len(turns)
        # Group the turns by backend, keeping turn order within a group.
        small = turns.astype(np.int16) if len(self.offsets) < 1 << 15 else turns
        by_backend = np.argsort(small, kind="stable")  # radix sort on int16
        sorted_b = turns[by_backend]
        same = np.empty(n, dtype=np.bool_)
        same[0] = False
        np.equal(sorted_b[1:], sorted_b[:-1], out=same[1:])
        starts = np.nonzero(~same)[0]
        counts = np.diff(np.append(starts, n))
        backs = sorted_b[starts]
        group_of = np.empty(n, dtype=np.int64)
        group_of[by_backend] = np.cumsum(~same) - 1
        rank_of = np.empty(n, dtype=np.int64)
        rank_of[by_backend] = np.arange(n) - np.repeat(starts, counts)
        # prev[t]: the previous turn of the same backend in this batch, or -1.
        prev = np.full(n, -1, dtype=np.int64)
        prev[by_backend[same]] = by_backend[np.nonzero(same)[0] - 1]

        # First guess: the k-th turn of a backend takes the k-th free slot of
        # its permutation, as if the other turns of the batch did not exist.
        cand = np.empty(n, dtype=np.int64)
        cand[by_backend] = self.find_free(backs, self.nxt[backs], counts, None)
        live = cand < size
        slot = np.zeros(n, dtype=np.int64)
        slot[live] = self._slots(turns[live], cand[live])
        idx = np.arange(n, dtype=np.int32)
        owner = self.owner
        np.minimum.at(owner, slot[live], idx[live])

        # Then iterate to the sequential result S. Invariant: no candidate is
        # past its position in S; candidates only move forward.
        # owner[x] is the lowest turn that has ever had slot x as candidate.
        # Such a turn u proves x is taken before any later turn t in S: either
        # u holds x in S, or u passed x (u is not past its S position), which
        # it only does when a turn before u holds x. So t may skip x.
        # Turn t is "bad" while owner[its slot] < t. A bad turn moves to its
        # first position whose slot is free and has no owner below it; the
        # later turns of its backend move along (each must follow the one
        # before). At the fixpoint, each turn's slot is free at its turn and
        # is its first such position after its backend's previous turn,
        # which is exactly the sequential choice.
        while True:
            bad_idx = np.nonzero(live & (owner[slot] < idx))[0]
            if len(bad_idx) == 0:
                break
            # t_k: the first bad turn of each backend (group) that has one.
            first_bad = np.full(len(starts), _NOBODY, dtype=np.int32)
            np.minimum.at(first_bad, group_of[bad_idx], bad_idx.astype(np.int32))
            gb = np.nonzero(first_bad != _NOBODY)[0]
            t_k = first_bad[gb].astype(np.int64)
            r_k = rank_of[t_k]
            need = counts[gb] - r_k
            p_k = prev[t_k]
            begin = cand[t_k]
            has_p = p_k >= 0
            begin[has_p] = np.maximum(begin[has_p], cand[p_k[has_p]] + 1)
            found = self.find_free(backs[gb], begin, need, t_k)
            # The suffix of turns t_k.. of each of these backends, in order.
            rep = np.repeat(np.arange(len(gb)), need)
            local = np.arange(len(rep)) - np.repeat(np.cumsum(need) - need, need)
            suffix = by_backend[starts[gb][rep] + r_k[rep] + local]
            # Blocking only by owners below t_k (fewer than turn t may have)
            # can only give earlier positions, so `found` is not past S; the
            # max keeps candidates moving forward and in order.
            new = np.maximum(cand[suffix], found)
            moved = new != cand[suffix]
            ch = suffix[moved]
            cand[ch] = new[moved]
            lv = cand[ch] < size
            live[ch[~lv]] = False
            ch = ch[lv]
            slot[ch] = self._slots(turns[ch], cand[ch])
            np.minimum.at(owner, slot[ch], idx[ch])
        owner.fill(_NOBODY)
        ls = slot[live]
        self.table[ls] = turns[live]
        self.free[ls] = False
        self.filled += len(ls)
        last = by_backend[starts + counts - 1]
        self.nxt[backs] = cand[last] + 1

    def _slots(self, backend: IntArray, pos: IntArray) -> IntArray:
        return (self.offsets[backend] + pos * self.skips[backend]) % self.size

    def _finish(self) -> None:
        """The last few free slots, one turn at a time, through inverse permutations.

        A backend has passed every slot before its next position, so of the
        slots still free its next claim is the one with the lowest position
        ``(slot - offset) * skip^-1 mod M``: no walking over taken slots.
        """
        size = self.size
        free_slots = np.nonzero(self.free)[0].astype(np.int64)
        n_free = len(free_slots)
        if n_free == 0:
            return
        n_round = len(self.round)
        turns = self.round[(self.t0 + np.arange(n_free)) % n_round]
        backs, row_of = np.unique(turns, return_inverse=True)
        inv = np.array([pow(int(s), -1, size) for s in self.skips[backs]], dtype=np.int64)
        rank = ((free_slots[None, :] - self.offsets[backs][:, None]) * inv[:, None]) % size
        who = np.empty(n_free, dtype=np.int32)
        for row, backend in zip(row_of.tolist(), turns.tolist(), strict=True):
            j = int(rank[row].argmin())
            who[j] = backend
            rank[:, j] = _BIG  # taken
        self.table[free_slots] = who
        self.free[free_slots] = False
        self.filled = size


def _build(
    backends: Sequence[str],
    weights: Sequence[int] | None,
    size: int,
    method: Literal["auto", "batched", "sequential"] = "auto",
    dense: int | None = None,
) -> Table:
    turns, offsets, skips, order = _prepare(backends, weights, size)
    if not turns:
        return np.full(size, _EMPTY, dtype=np.int32)
    if method == "auto":
        per_backend = Counter(turns)
        # A backend with a large share of the turns behaves like few backends.
        few = len(per_backend) < _BATCHED_FROM or max(per_backend.values()) * 16 > len(turns)
        method = "sequential" if few else "batched"
    if method == "sequential":
        builder = _Builder(turns, offsets, skips, size, _DENSE_SEQ if dense is None else dense)
        table = builder.run_sequential()
    else:
        builder = _Builder(turns, offsets, skips, size, _DENSE if dense is None else dense)
        table = builder.run_batched()
    return np.asarray(order, dtype=np.int32)[table]


def build_table(
    backends: Sequence[str], weights: Sequence[int] | None = None, size: int = DEFAULT_TABLE_SIZE
) -> Table:
    """Build a Maglev lookup table: ``size`` backend indexes (int32); -1 when nobody has weight.

    ``backends`` are identity strings (see `backend_id`), and the table's
    indexes refer to this list. ``weights`` are non-negative ints (default: all 1).
    Raises ValueError when ``size`` is not prime, on duplicate backends, or on bad weights.
    """
    return _build(backends, weights, size)


# --- metrics -----------------------------------------------------------------


def entry_counts(table: Table, n_backends: int) -> IntArray:
    """How many table entries each backend owns."""
    owned = table[table >= 0]
    return np.bincount(owned, minlength=n_backends).astype(np.int64)


def balance(table: Table, weights: Sequence[int]) -> tuple[float, float]:
    """``(max, min)`` over backends of weight > 0 of entries owned / ideal entries.

    The ideal share of backend i is ``len(table) * w_i / sum(w)``. Perfect
    balance is ``(1.0, 1.0)``. Raises ValueError when no backend has weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    if not (w > 0).any():
        raise ValueError("no backend has a weight > 0")
    counts = entry_counts(table, len(w))
    ideal = len(table) * w / w.sum()
    ratio = counts[w > 0] / ideal[w > 0]
    return float(ratio.max()), float(ratio.min())


@dataclass(frozen=True)
class Disruption:
    """How a table changed between two backend sets (off the hot path).

    ``changed`` entries have a different backend. ``required`` of them had to
    change: their old backend is gone, or their new backend is new.
    ``excess`` = ``changed - required`` is the disruption Maglev tries to keep small.
    """

    size: int
    changed: int
    required: int

    @property
    def excess(self) -> int:
        return self.changed - self.required

    @property
    def excess_fraction(self) -> float:
        return self.excess / self.size

    @property
    def required_fraction(self) -> float:
        return self.required / self.size


def disruption(old: Maglev, new: Maglev) -> Disruption:
    """Compare two tables of the same size by backend identity."""
    if old.size != new.size:
        raise ValueError(f"table sizes differ: {old.size} and {new.size}")
    position = {name: i for i, name in enumerate(new.backends)}
    # old index -> new index of the same backend, -1 if it is gone
    old_to_new = np.array([position.get(name, -1) for name in old.backends] + [-1], dtype=np.int64)
    old_names = set(old.backends)
    # Indexing with -1 (an empty entry) picks the appended sentinels.
    new_is_added = np.array([name not in old_names for name in new.backends] + [True])
    mapped = old_to_new[old.table]
    changed = mapped != new.table
    required = changed & ((mapped < 0) | new_is_added[new.table])
    return Disruption(old.size, int(changed.sum()), int(required.sum()))


# --- the lookup object -------------------------------------------------------


class Maglev:
    """A built Maglev table and its backends; `lookup` is the per-flow hot path.

    ``lookup(h)`` takes a 32-bit flow hash (`v6lb.core.flowhash.flow_hash`)
    and returns the backend index, or -1 when no backend has weight. The slot
    is ``(h * size) >> 32``, as ``jhash ... mod size`` computes it.
    """

    __slots__ = ("_lookup", "backends", "size", "table", "weights")

    def __init__(
        self,
        backends: Sequence[str],
        weights: Sequence[int] | None = None,
        size: int = DEFAULT_TABLE_SIZE,
    ) -> None:
        self.backends: tuple[str, ...] = tuple(backends)
        self.weights: tuple[int, ...] = (
            (1,) * len(self.backends) if weights is None else tuple(int(w) for w in weights)
        )
        self.size = size
        table = build_table(self.backends, weights, size)
        table.flags.writeable = False
        self.table: Table = table
        self._lookup: list[int] = table.tolist()  # list indexing beats numpy per item

    def slot(self, flow_hash: int) -> int:
        """The table slot of a flow: the kernel's ``reciprocal_scale(flow_hash, size)``."""
        return (flow_hash * self.size) >> 32

    def lookup(self, flow_hash: int) -> int:
        """The backend index for a 32-bit flow hash, or -1 if there is none."""
        return self._lookup[(flow_hash * self.size) >> 32]

    def backend(self, flow_hash: int) -> str | None:
        """The backend identity for a 32-bit flow hash, or None."""
        i = self._lookup[(flow_hash * self.size) >> 32]
        return None if i < 0 else self.backends[i]

    def counts(self) -> IntArray:
        """Entries owned by each backend."""
        return entry_counts(self.table, len(self.backends))

    def balance(self) -> tuple[float, float]:
        """``(max, min)`` of entries / ideal entries over backends with weight (see `balance`)."""
        return balance(self.table, self.weights)

    def __repr__(self) -> str:
        return f"Maglev({len(self.backends)} backends, size={self.size})"
