"""The per-workload rate limit, exact as an upper bound across replicas, without a store write per request.

Every process leases units from the shared per-slot counter (:meth:`~sts.store.Store.lease_in_window`,
atomic in every backend) and spends them locally; only when its units for a key are used up does it
ask the store again. Within one slot (``int(now // window)``) the chunks it asks for grow
geometrically, 1, 2, 4, … up to ``max(1, limit // 20)``: a quiet workload takes one unit per request
(with the default limit of 20 the chunk is always 1, so the count is exact), a busy one costs
O(log limit) store writes per slot instead of one per request.

Tolerance: the store never grants more than ``limit`` units per slot, so **never more than the limit
is admitted per slot across every process and replica**. A unit a process leased and did not use is
wasted: a workload spread over P processes may be refused early, by at most (P - 1) * ``max(1, limit
// 20)`` exchanges in a slot. Once the store grants fewer units than asked the slot is spent for
everyone, and this process refuses the rest of the slot without asking again.

Memory is bounded: only the current slot's leases are kept, and at most ``max_keys`` keys (the oldest
is evicted; its unused units are wasted, never reused). Keys are verified SPIFFE IDs, never
unauthenticated input. A forked child starts with no lease (its parent's units are the parent's).

Imports only ``sts.store`` of the project.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

from sts.store import Store

MAX_KEYS = 100_000  # workloads with a lease in the current slot, per process
CHUNK_DIVISOR = 20  # the largest chunk is limit // CHUNK_DIVISOR (at least 1)


@dataclass(slots=True)
class _Lease:
    """One key's units in the current slot, in this process."""

    left: int = 0  # leased from the store and not used yet
    next_chunk: int = 1  # how many units the next lease asks for
    spent: bool = False  # the store granted fewer than asked: the slot is spent for every process


class RateLimiter:
    """Admissions per key per ``window`` seconds, at most ``limit`` across every process sharing ``store``.

    Thread-safe; the store is called outside the lock, so one slow lease holds up no other key.
    A store failure (StoreUnavailable, StoreLost during a loss) propagates: nothing is admitted without
    units that the store granted.
    """

    def __init__(self, store: Store, *, window: int = 1, max_keys: int = MAX_KEYS) -> None:
        self._store = store
        self._window = window
        self._max_keys = max(1, max_keys)
        self._reset()
        _LIVE.add(self)

    def _reset(self) -> None:
        """Forget every lease (and the lock, which a fork may have copied while held)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._slot: int | None = None
        self._leases: dict[str, _Lease] = {}

    @property
    def keys(self) -> int:
        """How many keys hold a lease in the current slot (bounded by ``max_keys``)."""
        return len(self._leases)

    def admit(self, key: str, *, limit: int, now: float) -> bool:
        """Take one unit of ``key``'s slot containing ``now``: True when admitted, False when spent."""
        if limit <= 0:
            return False
        if self._pid != os.getpid():
            self._reset()  # a forked child never spends its parent's units
        slot = int(now // self._window)
        cap = max(1, limit // CHUNK_DIVISOR)
        lease: _Lease | None
        with self._lock:
            if self._slot is None or slot > self._slot:
                self._slot, self._leases = slot, {}  # old slots are dropped whole
            if slot < self._slot:
                lease, want = None, 1  # a late request for a slot already left: one unit, kept nowhere
            else:
                lease = self._leases.get(key)
                if lease is None:
                    if len(self._leases) >= self._max_keys:
                        del self._leases[next(iter(self._leases))]  # the oldest key of this slot
                    lease = self._leases[key] = _Lease()
                if lease.left > 0:
                    lease.left -= 1
                    return True
                if lease.spent:
                    return False
                want = min(lease.next_chunk, cap)
                lease.next_chunk = min(want * 2, cap)
        granted = self._store.lease_in_window(key, want=want, limit=limit, window=self._window, now=now)
        with self._lock:
            current = (
                lease is not None
                and self._pid == os.getpid()
                and self._slot == slot
                and self._leases.get(key) is lease
            )
            if current and lease is not None:
                if granted < want:
                    lease.spent = True
                if granted > 1:
                    lease.left += granted - 1  # one unit is this request's
        return granted > 0


_LIVE: weakref.WeakSet[RateLimiter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for limiter in list(_LIVE):
        limiter._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
