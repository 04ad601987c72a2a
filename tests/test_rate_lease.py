"""The per-workload rate limit by quota leases: exact as an upper bound across processes, few store writes.

Several :class:`RateLimiter` objects on one store stand for several processes or replicas (each SQLite
store object has its own connection, as a process would); real forked processes and a real Redis check
the same bound where the store is really shared.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from sts import rate_lease
from sts.rate_lease import CHUNK_DIVISOR, RateLimiter
from sts.store import Store, StoreLost, StoreUnavailable
from sts.store.memory import MemoryStore
from sts.store.redis_store import RedisStore
from sts.store.sqlite import SqliteStore
from tests.redis_server import RedisServer
from tests.test_store import redis_server
from tests.test_store_durability import store_on, wait_until

__all__ = ["redis_server"]  # the session's Redis, shared with test_store

KEY = "rate:spiffe://example.org/agent/researcher"
NOW = 1_900_000_000.0


class Counting:
    """A store whose ``lease_in_window`` calls are counted (and can be made to fail)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.wants: list[int] = []
        self.down = False

    def lease_in_window(self, key: str, *, want: int, limit: int, window: int, now: float) -> int:
        if self.down:
            raise StoreUnavailable("down for the test", backend="test", operation="lease_in_window")
        self.wants.append(want)
        return self.store.lease_in_window(key, want=want, limit=limit, window=window, now=now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def limiter(store: Any, **options: Any) -> RateLimiter:
    return RateLimiter(store, **options)


@pytest.fixture(params=["memory", "sqlite"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[Store]]:
    """Four store objects on one shared state: the memory store itself, or four SQLite connections."""
    if request.param == "memory":
        one = MemoryStore()
        stores: list[Store] = [one] * 4
    else:
        stores = [SqliteStore(tmp_path / "sts.db") for _ in range(4)]
    yield stores
    for store in stores:
        store.close()


def admitted(rate: RateLimiter, n: int, *, limit: int, now: float = NOW, key: str = KEY) -> int:
    return sum(rate.admit(key, limit=limit, now=now) for _ in range(n))


# ---------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("limit", [1, 7, 20, 100, 1000])
def test_one_limiter_admits_exactly_the_limit(limit: int) -> None:
    rate = limiter(MemoryStore())
    assert admitted(rate, limit * 3 + 5, limit=limit) == limit  # one process wastes nothing


@pytest.mark.parametrize("limit", [1, 5, 20, 100, 400])
def test_several_processes_never_admit_more_than_the_limit(shared: list[Store], limit: int) -> None:
    limiters = [limiter(store) for store in shared]
    chooser = random.Random(limit)
    results = [limiters[chooser.randrange(4)].admit(KEY, limit=limit, now=NOW) for _ in range(limit * 4)]
    total = sum(results)
    assert total <= limit
    # The stated tolerance: refused early by at most (P - 1) x max(1, limit // 20).
    assert total >= limit - 3 * max(1, limit // CHUNK_DIVISOR)
    # And the next second has its own limit.
    assert sum(lim.admit(KEY, limit=limit, now=NOW + 1) for lim in limiters for _ in range(limit)) <= limit


def test_threads_and_limiters_together_stay_under_the_limit(tmp_path: Path) -> None:
    stores = [SqliteStore(tmp_path / "sts.db") for _ in range(3)]
    limiters = [limiter(store) for store in stores]
    limit = 500

    def hammer(index: int) -> int:
        return admitted(limiters[index % 3], 300, limit=limit)

    with ThreadPoolExecutor(8) as pool:
        total = sum(pool.map(hammer, range(8)))
    assert limit - 2 * (limit // CHUNK_DIVISOR) <= total <= limit
    for store in stores:
        store.close()


def _process(path: str, limit: int, attempts: int, start: float, results: Any) -> None:
    store = SqliteStore(Path(path))
    rate = limiter(store)
    while time.time() < start:
        time.sleep(0.001)
    results.put(admitted(rate, attempts, limit=limit))
    store.close()


def test_real_processes_on_one_sqlite_file_never_exceed_the_limit(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "sts.db").close()  # the schema, before the race
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    limit, start = 300, time.time() + 0.5
    workers = [
        context.Process(target=_process, args=(str(tmp_path / "sts.db"), limit, 200, start, results))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    totals = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert limit - 3 * (limit // CHUNK_DIVISOR) <= sum(totals) <= limit


def test_redis_replicas_never_exceed_the_limit(redis_server: RedisServer) -> None:
    redis.Redis.from_url(redis_server.url).flushdb()
    stores = [RedisStore(redis_server.url) for _ in range(3)]
    limiters = [limiter(store) for store in stores]
    now = time.time() + 3600  # a slot of its own, whatever the real clock does meanwhile
    for limit in (1, 20, 200):
        key = f"{KEY}:{limit}"
        chooser = random.Random(limit)
        total = sum(limiters[chooser.randrange(3)].admit(key, limit=limit, now=now) for _ in range(limit * 3))
        assert limit - 2 * max(1, limit // CHUNK_DIVISOR) <= total <= limit
    for store in stores:
        store.close()


# ---------------------------------------------------------------------------- store writes


def test_chunks_grow_geometrically_up_to_a_twentieth_of_the_limit() -> None:
    store = Counting(MemoryStore())
    rate = limiter(store)
    assert admitted(rate, 1000, limit=1000) == 1000
    assert store.wants[:6] == [1, 2, 4, 8, 16, 32]
    assert max(store.wants) == 1000 // CHUNK_DIVISOR
    assert sum(store.wants) >= 1000  # every unit admitted came from the store
    assert store.store.lease_in_window(KEY, want=1, limit=1000, window=1, now=NOW) == 0  # all taken


def test_a_quiet_workload_pays_one_exact_write_per_request() -> None:
    store = Counting(MemoryStore())
    rate = limiter(store)
    assert admitted(rate, 3, limit=20) == 3  # the default limit: the chunk is always 1
    assert store.wants == [1, 1, 1]
    assert store.store.lease_in_window(KEY, want=100, limit=20, window=1, now=NOW) == 17  # nothing wasted


def test_a_thousand_requests_in_one_slot_cost_a_few_store_calls() -> None:
    store = Counting(MemoryStore())
    rate = limiter(store)
    assert admitted(rate, 1000, limit=10**6) == 1000
    assert len(store.wants) <= 11  # 1 + 2 + 4 + ... + 512 >= 1000


def test_a_spent_slot_refuses_without_asking_the_store_again() -> None:
    store = Counting(MemoryStore())
    rate = limiter(store)
    assert admitted(rate, 200, limit=100) == 100
    calls = len(store.wants)
    assert admitted(rate, 500, limit=100) == 0
    assert len(store.wants) == calls


def test_huge_limit() -> None:
    store = Counting(MemoryStore())
    rate = limiter(store)
    limit = 10**9
    assert admitted(rate, 5000, limit=limit) == 5000
    assert len(store.wants) <= 13
    assert max(store.wants) <= limit // CHUNK_DIVISOR


def test_limit_one_across_limiters(shared: list[Store]) -> None:
    limiters = [limiter(store) for store in shared]
    assert [lim.admit(KEY, limit=1, now=NOW) for lim in limiters for _ in range(3)].count(True) == 1


def test_zero_limit_refuses_without_a_store_call() -> None:
    store = Counting(MemoryStore())
    rate = limiter(store)
    assert not rate.admit(KEY, limit=0, now=NOW)
    assert not rate.admit(KEY, limit=-1, now=NOW)
    assert store.wants == []


# ---------------------------------------------------------------------------- slots, memory, forks


def test_slot_rollover_starts_afresh_and_drops_old_slots() -> None:
    store = Counting(MemoryStore())
    rate = limiter(store)
    assert admitted(rate, 10, limit=5, now=NOW + 0.2) == 5
    assert admitted(rate, 10, limit=5, now=NOW + 0.9) == 0  # the same slot
    assert admitted(rate, 10, limit=5, now=NOW + 1.0) == 5  # the next one
    assert rate.keys == 1
    rate.admit("rate:other", limit=5, now=NOW + 2)
    assert rate.keys == 1  # only the current slot's leases are kept
    # A late request for a slot already left is still counted exactly, in the store.
    before = len(store.wants)
    assert not rate.admit(KEY, limit=5, now=NOW + 1.5)
    assert len(store.wants) == before + 1
    assert rate.admit(KEY, limit=6, now=NOW + 1.5)  # one unit left there under a larger limit


def test_a_clock_stepped_back_starts_afresh_instead_of_leasing_per_request() -> None:
    """One request while the clock was an hour ahead must not leave every later request on the late
    path (one unit each, a store write on the request path) until the clock catches up."""
    store = Counting(MemoryStore())
    rate = limiter(store)
    assert rate.admit(KEY, limit=10**6, now=NOW + 3600)
    before = len(store.wants)
    assert admitted(rate, 2000, limit=10**6, now=NOW) == 2000
    assert len(store.wants) - before <= 20, store.wants[before:]  # chunks again, not 2,000 calls
    assert sum(store.wants[before:]) >= 2000


def test_window_of_several_seconds() -> None:
    rate = limiter(MemoryStore(), window=10)
    assert admitted(rate, 10, limit=4, now=NOW) == 4
    assert admitted(rate, 10, limit=4, now=NOW + 9) == 0
    assert admitted(rate, 10, limit=4, now=NOW + 10) == 4


def test_the_number_of_keys_is_capped() -> None:
    store = Counting(MemoryStore())
    rate = limiter(store, max_keys=100)
    for i in range(1000):
        assert rate.admit(f"rate:{i}", limit=1000, now=NOW)
    assert rate.keys == 100
    # An evicted key starts again at one unit (its leftover is wasted, never reused).
    store.wants.clear()
    assert rate.admit("rate:0", limit=1000, now=NOW)
    assert store.wants == [1]


def test_default_key_cap() -> None:
    assert rate_lease.MAX_KEYS == 100_000


def test_a_pid_change_drops_the_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Counting(MemoryStore())
    rate = limiter(store)
    assert admitted(rate, 4, limit=1000) == 4  # 1 + 2 + 4 leased: three units left locally
    calls = len(store.wants)
    assert rate.admit(KEY, limit=1000, now=NOW)
    assert len(store.wants) == calls  # from a local unit
    real = os.getpid()
    monkeypatch.setattr(rate_lease.os, "getpid", lambda: real + 1)
    assert rate.admit(KEY, limit=1000, now=NOW)
    assert len(store.wants) == calls + 1 and store.wants[-1] == 1  # asked the store, from chunk 1


def test_a_forked_child_does_not_spend_its_parents_units(tmp_path: Path) -> None:
    store = Counting(SqliteStore(tmp_path / "sts.db"))
    rate = limiter(store)
    assert admitted(rate, 4, limit=1000) == 4  # units left locally
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the same objects, copied
        try:
            before = len(store.wants)
            ok = rate.admit(KEY, limit=1000, now=NOW) and len(store.wants) == before + 1
            os.write(write, b"1" if ok and store.wants[-1] == 1 else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)
    assert answer == b"1"
    calls = len(store.wants)
    assert rate.admit(KEY, limit=1000, now=NOW)  # the parent still has its own
    assert len(store.wants) == calls
    store.close()


# ---------------------------------------------------------------------------- failures


def test_a_store_failure_propagates_and_admits_nothing(tmp_path: Path) -> None:
    store = Counting(MemoryStore())
    rate = limiter(store)
    store.down = True
    with pytest.raises(StoreUnavailable):
        rate.admit(KEY, limit=20, now=NOW)
    store.down = False
    assert admitted(rate, 30, limit=20) == 20  # recovers; nothing was taken while it failed
    closed = SqliteStore(tmp_path / "sts.db")
    closed.close()
    with pytest.raises(StoreUnavailable) as caught:
        limiter(closed).admit(KEY, limit=20, now=NOW)
    assert (caught.value.backend, caught.value.operation) == ("sqlite", "lease_in_window")


def test_a_durable_redis_refuses_leases_during_a_loss(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        store = store_on(server.url)
        rate = limiter(store)
        assert rate.admit(KEY, limit=20, now=time.time())
        server.client().flushall()  # the store lost what it held
        wait_until(lambda: store.condition().lost, timeout=3.0)
        with pytest.raises(StoreLost):
            store.lease_in_window(KEY, want=1, limit=20, window=1, now=time.time())
        with pytest.raises(StoreLost):
            rate.admit(f"{KEY}:fresh", limit=20, now=time.time())
        store.close()


# ---------------------------------------------------------------------------- leases ahead of need


class Ahead:
    """A runner for tests: jobs run at once (``inline``) or when the test says (:meth:`run`); it
    marks the store calls they make, so the request path's own leases can be told apart."""

    def __init__(self, store: Counting, *, inline: bool = True, room: int = 10**6) -> None:
        self.store = store
        self.inline = inline
        self.room = room
        self.jobs: list[rate_lease.Job] = []
        self.ahead_wants: list[int] = []

    def __call__(self, job: rate_lease.Job) -> bool:
        if len(self.jobs) >= self.room:
            return False
        self.jobs.append(job)
        if self.inline:
            self.run()
        return True

    def run(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            before = len(self.store.wants)
            job()
            self.ahead_wants.extend(self.store.wants[before:])
            del self.store.wants[before:]  # what remains in store.wants is the request path's


def test_a_busy_workload_finds_its_units_in_hand() -> None:
    store = Counting(MemoryStore())
    ahead = Ahead(store)
    rate = limiter(store, ahead=ahead)
    assert admitted(rate, 2000, limit=10**6) == 2000
    assert store.wants == [1, 2]  # the request path leased only the first three units
    assert sum(ahead.ahead_wants) + 3 >= 2000  # every admitted unit came from the store
    assert max(ahead.ahead_wants) <= 10**6 // CHUNK_DIVISOR


def test_late_in_a_slot_the_next_slots_first_chunk_is_leased_ahead() -> None:
    store = Counting(MemoryStore())
    ahead = Ahead(store)
    rate = limiter(store, ahead=ahead)
    assert admitted(rate, 100, limit=10**6, now=NOW + 0.2) == 100
    assert admitted(rate, 100, limit=10**6, now=NOW + 0.6) == 100  # past AHEAD_FROM: the next is leased
    taken = store.store.lease_in_window(KEY, want=0, limit=10**6, window=1, now=NOW + 1)
    assert taken == 0
    store.wants.clear()
    assert admitted(rate, 100, limit=10**6, now=NOW + 1.0) == 100
    assert store.wants == []  # the new slot began with units in hand
    # The store counts them in that slot, so the bound there is the same.
    assert store.store.lease_in_window(KEY, want=10**6, limit=10**6, window=1, now=NOW + 1) < 10**6


def test_a_quiet_workload_never_leases_ahead() -> None:
    store = Counting(MemoryStore())
    ahead = Ahead(store)
    rate = limiter(store, ahead=ahead)
    assert admitted(rate, 3, limit=20, now=NOW + 0.9) == 3  # the default limit: chunks of 1, exact
    assert admitted(rate, 2, limit=1000, now=NOW + 0.9, key="rate:quiet") == 2  # chunks under 4
    assert ahead.ahead_wants == [] and ahead.jobs == []
    assert store.store.lease_in_window(KEY, want=100, limit=20, window=1, now=NOW) == 17


def test_while_a_lease_ahead_is_on_its_way_a_request_takes_one_unit_itself() -> None:
    store = Counting(MemoryStore())
    ahead = Ahead(store, inline=False)
    rate = limiter(store, ahead=ahead)
    assert admitted(rate, 3, limit=10**6) == 3  # 1 + 2 leased; the third unit's use asks 4 ahead
    assert len(ahead.jobs) == 1
    assert admitted(rate, 3, limit=10**6) == 3  # nothing in hand, the chunk not back: one unit each
    assert store.wants == [1, 2, 1, 1, 1]
    ahead.run()
    store.wants.clear()
    assert admitted(rate, 4, limit=10**6) == 4  # the chunk arrived
    assert store.wants == []


def test_a_lease_ahead_for_a_slot_already_over_is_never_taken() -> None:
    store = Counting(MemoryStore())
    ahead = Ahead(store, inline=False)
    rate = limiter(store, ahead=ahead)
    assert admitted(rate, 10, limit=10**6, now=NOW + 0.7) == 10
    assert ahead.jobs  # this slot's next chunk and the next slot's first, both waiting
    assert admitted(rate, 1, limit=10**6, now=NOW + 2.0) == 1  # two slots later
    ahead.run()
    assert ahead.ahead_wants == []  # neither reached the store
    assert store.store.lease_in_window(KEY, want=1, limit=1, window=1, now=NOW + 1) == 1  # slot NOW+1 untouched


def test_a_full_runner_leaves_the_request_path_to_lease() -> None:
    store = Counting(MemoryStore())
    rate = limiter(store, ahead=Ahead(store, room=0))
    assert admitted(rate, 200, limit=10**6, now=NOW + 0.7) == 200
    assert sum(store.wants) >= 200 and len(store.wants) <= 10  # geometric, on the request path


def test_a_store_failure_ahead_admits_nothing_and_the_request_fails_itself() -> None:
    store = Counting(MemoryStore())
    ahead = Ahead(store, inline=False)
    rate = limiter(store, ahead=ahead)
    assert admitted(rate, 4, limit=10**6) == 4
    store.down = True
    ahead.run()  # the chunk ahead fails: no unit, and it is no longer on its way
    with pytest.raises(StoreUnavailable):
        rate.admit(KEY, limit=10**6, now=NOW)
    store.down = False
    assert rate.admit(KEY, limit=10**6, now=NOW)


@pytest.mark.parametrize("limit", [40, 100, 400, 2000])
def test_with_leases_ahead_several_processes_never_admit_more_than_the_limit(
    shared: list[Store], limit: int
) -> None:
    """Demand of twice the limit at three moments of a slot (leases ahead within it, and of the next
    slot from its middle on), then in the next slot: each slot admits at most the limit, and no fewer
    than the limit less the stated tolerance, 2 x P x max(1, limit // 20)."""
    runners = [rate_lease.BackgroundRunner() for _ in shared]
    limiters = [limiter(store, ahead=runner) for store, runner in zip(shared, runners, strict=True)]
    chooser = random.Random(limit)
    tolerance = 2 * len(shared) * max(1, limit // CHUNK_DIVISOR)
    try:
        for offsets in ((0.1, 0.6, 0.9), (1.2, 1.5)):
            total = 0
            for offset in offsets:
                for _ in range(limit * 2):
                    total += limiters[chooser.randrange(4)].admit(KEY, limit=limit, now=NOW + offset)
                for runner in runners:
                    wait_until(lambda runner=runner: runner.pending == 0, timeout=10)
            assert limit - tolerance <= total <= limit, (offsets, total)
    finally:
        for runner in runners:
            runner.close()  # before the fixture closes the stores


def test_real_processes_with_leases_ahead_never_exceed_the_limit(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "sts.db").close()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    limit, start = 400, time.time() + 0.5
    workers = [
        context.Process(target=_process_ahead, args=(str(tmp_path / "sts.db"), limit, 300, start, results))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    totals = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert limit - 2 * 4 * (limit // CHUNK_DIVISOR) <= sum(totals) <= limit


def _process_ahead(path: str, limit: int, attempts: int, start: float, results: Any) -> None:
    store = SqliteStore(Path(path))
    runner = rate_lease.BackgroundRunner()
    rate = limiter(store, ahead=runner)
    while time.time() < start:
        time.sleep(0.001)
    now = NOW + 0.7  # late in the slot: chunks within it and the next slot's first are leased ahead
    total = 0
    for _ in range(attempts):
        total += rate.admit(KEY, limit=limit, now=now)
        time.sleep(0.0002)  # give the runner its turn, as a server's event loop does between requests
    results.put(total)
    runner.close()
    store.close()


def test_the_background_runner_runs_jobs_in_order_and_survives_a_failing_one() -> None:
    runner = rate_lease.BackgroundRunner(max_pending=3)
    done: list[int] = []
    gate = threading.Event()

    def blocked() -> None:
        gate.wait(10)

    def failing() -> None:
        raise RuntimeError("a bug in a job")

    assert runner(blocked)
    wait_until(lambda: runner.pending == 0, timeout=5)  # taken by the thread, which now waits
    assert runner(failing) and runner(lambda: done.append(1)) and runner(lambda: done.append(2))
    assert not runner(lambda: done.append(3))  # full: refused, never queued
    gate.set()
    wait_until(lambda: done == [1, 2], timeout=5)
    assert runner(lambda: done.append(4))
    wait_until(lambda: done == [1, 2, 4], timeout=5)
    gate.clear()
    assert runner(blocked) and runner(lambda: done.append(5))
    wait_until(lambda: runner.pending == 1, timeout=5)
    closing = threading.Thread(target=runner.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive()  # close waits for the job running
    gate.set()
    closing.join(5)
    assert not closing.is_alive()
    assert done == [1, 2, 4]  # the job that was waiting was dropped, not run after close
    assert not runner(lambda: done.append(6))  # closed: refuses
