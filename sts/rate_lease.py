"""The per-workload rate limit, exact as an upper bound across replicas, without a store write per request.

Every process leases units from the shared per-slot counter (:meth:`~sts.store.Store.lease_in_window`,
atomic in every backend) and spends them locally; only when its units for a key are used up does it
ask the store again. Within one slot (``int(now // window)``) the chunks it asks for grow
geometrically, 1, 2, 4, … up to ``max(1, limit // 20)``: a quiet workload takes one unit per request
(with the default limit of 20 the chunk is always 1, so the count is exact), a busy one costs
O(log limit) store writes per slot instead of one per request.

Leases ahead of need (``ahead``, what the server runs): a store write on the request's path stalls
every connection of the worker's event loop while it waits for the store's write lock (measured on
SQLite under load: 15 % of the leases waited over 2 ms, up to 80 ms, behind the token index's
batches). So, for a key whose chunks exceed one unit, a background runner takes the next chunk
when half of the one in hand is spent, and, from the middle of a slot, the first chunk of the next
slot (as large as this slot's chunks grew): a steady workload's requests then find their units in
hand. The request path still asks the store itself whenever it finds none (a cold key, or a lease
ahead not back yet: then for its one unit only), so nothing is admitted without units the store
granted, and a store failure is still that request's failure.

Tolerance: the store never grants more than ``limit`` units per slot, so **never more than the limit
is admitted per slot across every process and replica**. A unit a process leased and did not use is
wasted: a workload spread over P processes may be refused early, by at most (P - 1) * ``max(1, limit
// 20)`` exchanges in a slot, and by at most 2 * P * ``max(1, limit // 20)`` with leases ahead (a
process can hold half a chunk, the chunk on its way and one request's unit when the slot ends, or a
next slot's chunk it then does not need). Once the store grants fewer units than asked the slot is
spent for everyone, and this process refuses the rest of the slot without asking again.

Memory is bounded: only the current and the next slot's leases are kept, and at most ``max_keys``
keys in each (the oldest is evicted; its unused units are wasted, never reused); the runner's queue
holds at most :data:`MAX_PENDING` leases (past it, none is taken ahead). Keys are verified SPIFFE
IDs, never unauthenticated input. A forked child starts with no lease and no runner thread (its
parent's units are the parent's).

Imports only ``sts.store`` of the project.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from sts.store import Store, StoreLost, StoreUnavailable

log = logging.getLogger(__name__)

MAX_KEYS = 100_000  # workloads with a lease in the current slot, per process
CHUNK_DIVISOR = 20  # the largest chunk is limit // CHUNK_DIVISOR (at least 1)
AHEAD_FROM = 0.5  # fraction of a slot after which the next slot's first chunk is leased ahead
AHEAD_MIN_CHUNK = 4  # a key leases ahead once its chunks reach this size (a quiet key never does)
MAX_PENDING = 10_000  # leases waiting for the runner, per process
CLOSE_TIMEOUT = 6.0  # seconds a stop waits for a lease in progress (SQLite's busy timeout is 5)

Job = Callable[[], None]
Runner = Callable[[Job], bool]  # runs the job later, elsewhere; False: it will not (full)


@dataclass(slots=True)
class _Lease:
    """One key's units in one slot, in this process."""

    left: int = 0  # leased from the store and not used yet
    next_chunk: int = 1  # how many units the next lease asks for
    spent: bool = False  # the store granted fewer than asked: the slot is spent for every process
    coming: bool = False  # a lease ahead for this key and slot is on its way


class RateLimiter:
    """Admissions per key per ``window`` seconds, at most ``limit`` across every process sharing ``store``.

    Thread-safe; the store is called outside the lock, so one slow lease holds up no other key.
    A store failure (StoreUnavailable, StoreLost during a loss) propagates: nothing is admitted without
    units that the store granted. ``ahead``: where leases ahead of need run (the server's is a
    :class:`BackgroundRunner`); None: every lease is taken by the request that needs it.
    """

    def __init__(
        self, store: Store, *, window: int = 1, max_keys: int = MAX_KEYS, ahead: Runner | None = None
    ) -> None:
        self._store = store
        self._window = window
        self._max_keys = max(1, max_keys)
        self._ahead = ahead
        self._reset()
        _LIVE.add(self)

    def _reset(self) -> None:
        """Forget every lease (and the lock, which a fork may have copied while held)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._slot: int | None = None
        self._leases: dict[str, _Lease] = {}
        self._next: dict[str, _Lease] = {}  # the next slot's, leased ahead

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
            if self._slot is None or slot > self._slot or slot < self._slot - 1:
                # Old slots are dropped whole; the next one starts with what was leased ahead for it.
                # A clock stepped back by more than a slot starts afresh too (what was leased for the
                # later slots is lost, never spent here), or every request would take the late path.
                self._leases = self._next if self._slot is not None and slot == self._slot + 1 else {}
                self._slot, self._next = slot, {}
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
                    into_slot = now - slot * self._window
                    jobs = self._plan_ahead(key, lease, slot, into_slot=into_slot, limit=limit, cap=cap)
                    want = 0
                elif lease.spent:
                    return False
                elif lease.coming:
                    want = 1  # the chunk on its way is for the requests after this one
                else:
                    want = min(lease.next_chunk, cap)
                    lease.next_chunk = min(want * 2, cap)
        if want == 0:
            self._submit(jobs)
            return True
        granted = self._store.lease_in_window(key, want=want, limit=limit, window=self._window, now=now)
        with self._lock:
            if lease is not None and self._holds(key, slot, lease):
                if granted < want:
                    lease.spent = True
                if granted > 1:
                    lease.left += granted - 1  # one unit is this request's
        return granted > 0

    # Leases ahead of need

    def _plan_ahead(
        self, key: str, lease: _Lease, slot: int, *, into_slot: float, limit: int, cap: int
    ) -> list[tuple[_Lease, Job]]:
        """Under the lock, after a unit was taken: the leases to take ahead for ``key`` (marked coming)."""
        jobs: list[tuple[_Lease, Job]] = []
        if self._ahead is None or lease.next_chunk < AHEAD_MIN_CHUNK or cap < AHEAD_MIN_CHUNK:
            return jobs
        if not lease.spent and not lease.coming and lease.left <= lease.next_chunk // 2:
            want = min(lease.next_chunk, cap)
            lease.next_chunk = min(want * 2, cap)
            lease.coming = True
            jobs.append((lease, self._job(key, slot, lease, want, limit)))
        late_in_slot = into_slot >= AHEAD_FROM * self._window
        if late_in_slot and key not in self._next and len(self._next) < self._max_keys:
            want = lease.next_chunk  # as large as this slot's chunks grew
            following = self._next[key] = _Lease(next_chunk=min(want * 2, cap), coming=True)
            jobs.append((following, self._job(key, slot + 1, following, want, limit)))
        return jobs

    def _job(self, key: str, slot: int, lease: _Lease, want: int, limit: int) -> Job:
        def take() -> None:
            self._take_ahead(key, slot, lease, want, limit)

        return take

    def _submit(self, jobs: list[tuple[_Lease, Job]]) -> None:
        """Hand ``jobs`` to the runner, outside the lock; a lease it refuses is no longer coming."""
        for lease, job in jobs:
            if self._ahead is not None and self._ahead(job):
                continue
            with self._lock:
                lease.coming = False  # rare (the runner is full): the request path asks instead

    def _take_ahead(self, key: str, slot: int, lease: _Lease, want: int, limit: int) -> None:
        """On the runner: lease ``want`` units of ``slot`` for ``lease``, if it is still kept."""
        with self._lock:
            if self._pid != os.getpid() or not self._holds(key, slot, lease):
                return  # its slot is over (or this is a forked copy): nothing to lease
        granted: int | None = None
        try:
            granted = self._store.lease_in_window(
                key, want=want, limit=limit, window=self._window, now=float(slot * self._window)
            )
        except (StoreUnavailable, StoreLost) as e:  # the request path asks, and refuses, itself
            log.debug("rate limit: a lease ahead failed (%s); requests lease for themselves", e)
        finally:
            with self._lock:
                lease.coming = False
                if granted is not None and self._holds(key, slot, lease):
                    if granted < want:
                        lease.spent = True
                    lease.left += granted

    def _holds(self, key: str, slot: int, lease: _Lease) -> bool:
        """Under the lock: ``lease`` is still the one kept for ``key`` in ``slot`` (current or next)."""
        if self._pid != os.getpid() or self._slot is None:
            return False
        if slot == self._slot:
            return self._leases.get(key) is lease
        return slot == self._slot + 1 and self._next.get(key) is lease


class BackgroundRunner:
    """Runs the limiter's leases ahead of need on one daemon thread, in order, so no request waits.

    At most :data:`MAX_PENDING` jobs wait; past that :meth:`__call__` refuses. The thread starts with
    the first job (and again in a forked child, which has none).
    """

    def __init__(self, *, name: str = "sts-rate-ahead", max_pending: int = MAX_PENDING) -> None:
        self._name = name
        self._max_pending = max_pending
        self._start()
        _RUNNERS.add(self)

    def _start(self) -> None:
        self._pid = os.getpid()
        self._jobs: collections.deque[Job] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False

    def __call__(self, job: Job) -> bool:
        if self._pid != os.getpid():
            self._start()
        with self._ready:
            if self._closed or len(self._jobs) >= self._max_pending:
                return False
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._ready.notify()
        return True

    @property
    def pending(self) -> int:
        """Jobs waiting (not the one running)."""
        return len(self._jobs)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Refuse new jobs, drop the waiting ones and wait up to ``timeout`` for the one running: the
        store must not be closed under a lease (SQLite's connections are closed from another thread)."""
        if self._pid != os.getpid():
            self._start()
        with self._ready:
            self._closed = True
            self._jobs.clear()
            thread, self._thread = self._thread, None
            self._ready.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("rate limit: a lease ahead still runs after %g s; the store closes anyway", timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                job = self._jobs.popleft()
            try:
                job()
            except Exception:  # a job of the limiter never raises; anything else must not end the thread
                log.exception("rate limit: a lease ahead failed")


_LIVE: weakref.WeakSet[RateLimiter] = weakref.WeakSet()
_RUNNERS: weakref.WeakSet[BackgroundRunner] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for limiter in list(_LIVE):
        limiter._reset()
    for runner in list(_RUNNERS):
        runner._start()


os.register_at_fork(after_in_child=_after_fork_in_child)
