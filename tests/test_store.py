"""The store contract, run against every backend, then what only SQLite or Redis must add.

The contract suite runs on ``memory``, ``sqlite`` (a file in tmp_path) and ``redis`` (a real
redis-server, flushed per test) with a fake clock. The clock starts at the real time, so the absolute
expiries Redis sets lie in the future; every backend checks a record's end against the injected clock
when reading, so record expiry is tested alike everywhere. Counters and ``use_once`` keys are forgotten
by Redis on its own (real) clock: their expiry is tested on memory/sqlite by advancing the clock, and on
Redis by reading the absolute EXPIRETIME of each key.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from sts.store import (
    RETENTION_SECONDS,
    WINDOW_GRACE_SECONDS,
    AlreadyExists,
    ExceptionGrant,
    IssuanceChecks,
    Store,
    StoreUnavailable,
    SubjectRevocation,
    TaskRecord,
    TaskTarget,
    TokenRecord,
    record_json,
)
from sts.store import sqlite as sqlite_store
from sts.store.factory import open_store
from sts.store.memory import MemoryStore
from sts.store.redis_store import RedisStore
from sts.store.sqlite import SWEEP_INTERVAL, SqliteStore
from tests.redis_server import RedisServer

AGENT = "spiffe://example.org/agent/researcher"
OTHER = "spiffe://example.org/agent/other"
ADMIN = "spiffe://example.org/ops/sts-admin"
ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    """Whole seconds of real time at the start; moves only when told."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_backend(backend: str, request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Store:
    if backend == "memory":
        return MemoryStore(clock)
    if backend == "sqlite":
        return SqliteStore(tmp_path / "sts.db", clock=clock)
    server: RedisServer = request.getfixturevalue("redis_server")
    redis.Redis.from_url(server.url).flushdb()
    return RedisStore(server.url, clock=clock)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    opened = open_backend(request.param, request, tmp_path, clock)
    yield opened
    opened.close()


@pytest.fixture(params=["memory", "sqlite"])
def clocked_store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    """A backend whose counters and use_once keys also expire by the injected clock."""
    opened = open_backend(request.param, request, tmp_path, clock)
    yield opened
    opened.close()


def make_task(
    clock: FakeClock, task_id: str = "task-1", *, ttl: int = 600, purpose: str = "research"
) -> TaskRecord:
    now = int(clock())
    return TaskRecord(
        id=task_id,
        creator=ADMIN,
        assignee=AGENT,
        targets=(
            TaskTarget("tool:web-search", frozenset({"invoke"})),
            TaskTarget("data:crm", frozenset({"read", "write"})),
        ),
        purpose=purpose,
        created_at=now,
        deadline=now + ttl,
    )


def make_grant(
    clock: FakeClock, grant_id: str, spiffe_id: str = AGENT, *, offset: int = 0, ttl: int = 60
) -> ExceptionGrant:
    created = int(clock()) + offset
    return ExceptionGrant(
        id=grant_id,
        spiffe_id=spiffe_id,
        target="data:crm",
        scopes=frozenset({"read"}),
        reason="incident 42",
        granted_by=ADMIN,
        created_at=created,
        expires_at=created + ttl,
    )


def cut_off(clock: FakeClock, until: int | None, spiffe_id: str = AGENT) -> SubjectRevocation:
    return SubjectRevocation(spiffe_id, int(clock()), until, ADMIN, "compromised")


# ---------------------------------------------------------------- the contract, on every backend


def test_ping_answers(store: Store) -> None:
    store.ping()


def test_task_reads_back_as_written(store: Store, clock: FakeClock) -> None:
    task = make_task(clock)
    store.create_task(task)
    assert store.get_task("task-1") == task
    assert store.get_task("task-unknown") is None


def test_task_id_is_never_taken_twice(store: Store, clock: FakeClock) -> None:
    store.create_task(make_task(clock))
    with pytest.raises(AlreadyExists):
        store.create_task(make_task(clock, purpose="something else"))
    assert store.get_task("task-1") == make_task(clock)


def test_first_completion_wins(store: Store, clock: FakeClock) -> None:
    store.create_task(make_task(clock))
    first = store.complete_task("task-1", at=int(clock()) + 5, by=AGENT)
    later = store.complete_task("task-1", at=int(clock()) + 9, by=ADMIN)
    assert first is not None
    assert (first.completed_at, first.completed_by) == (int(clock()) + 5, AGENT)
    assert later == first == store.get_task("task-1")
    assert first.status(clock()) == "completed"
    assert store.complete_task("task-unknown", at=int(clock()), by=AGENT) is None


@pytest.mark.parametrize(
    ("after_deadline", "readable", "status"),
    [
        (-1, True, "active"),
        (0, True, "expired"),
        (RETENTION_SECONDS - 1, True, "expired"),
        (RETENTION_SECONDS, False, None),
    ],
    ids=["before-deadline", "at-deadline", "last-second-of-retention", "retention-over"],
)
def test_task_kept_until_deadline_plus_retention(
    store: Store, clock: FakeClock, after_deadline: int, readable: bool, status: str | None
) -> None:
    task = make_task(clock, ttl=600)
    store.create_task(task)
    clock.advance(600 + after_deadline)
    found = store.get_task(task.id)
    assert (found is not None) == readable
    assert (found.status(clock()) if found else None) == status
    assert (store.token_state("jti-1", task.id, AGENT).task is not None) == readable
    assert (store.complete_task(task.id, at=int(clock()), by=AGENT) is not None) == readable


def test_revoked_jti_until_the_token_expires(store: Store, clock: FakeClock) -> None:
    store.revoke_jti("jti-1", expires_at=int(clock()) + 300)
    assert store.token_state("jti-1", None, AGENT).jti_revoked
    assert not store.token_state("jti-2", None, AGENT).jti_revoked
    clock.advance(299)
    assert store.token_state("jti-1", None, AGENT).jti_revoked
    clock.advance(1)
    assert not store.token_state("jti-1", None, AGENT).jti_revoked


def test_later_revocation_of_one_jti_is_kept(store: Store, clock: FakeClock) -> None:
    store.revoke_jti("jti-1", expires_at=int(clock()) + 300)
    store.revoke_jti("jti-1", expires_at=int(clock()) + 100)
    clock.advance(200)
    assert store.token_state("jti-1", None, AGENT).jti_revoked


@pytest.mark.parametrize(
    ("until", "kept_after_a_day"),
    [(60, False), (None, True)],
    ids=["with-until", "forever"],
)
def test_subject_revocation_kept_until_keep_until(
    store: Store, clock: FakeClock, until: int | None, kept_after_a_day: bool
) -> None:
    end = None if until is None else int(clock()) + until
    revocation = cut_off(clock, end)
    store.revoke_subject(revocation, keep_until=end)
    assert store.subject_revocation(AGENT) == revocation
    assert store.subject_revocation(OTHER) is None
    assert revocation.blocks_issuance(clock())
    clock.advance(86400)
    assert (store.subject_revocation(AGENT) == revocation) is kept_after_a_day
    assert (store.token_state("jti-1", None, AGENT).subject_revocation is not None) is kept_after_a_day


def test_subject_revocation_is_replaced(store: Store, clock: FakeClock) -> None:
    store.revoke_subject(cut_off(clock, None), keep_until=None)
    lifted = SubjectRevocation(AGENT, int(clock()), int(clock()) + 10, ADMIN, "lifted soon")
    store.revoke_subject(lifted, keep_until=int(clock()) + 10)
    assert store.subject_revocation(AGENT) == lifted
    clock.advance(10)
    assert store.subject_revocation(AGENT) is None


@pytest.mark.parametrize(
    ("jti_revoked", "task", "subject_revoked", "ask_task"),
    [
        (False, None, False, True),
        (True, None, False, True),
        (False, "active", False, True),
        (False, "completed", False, True),
        (False, "active", True, True),
        (True, "completed", True, True),
        (True, "completed", False, False),
    ],
    ids=[
        "clean",
        "jti-revoked",
        "task-active",
        "task-completed",
        "subject-revoked",
        "all-three",
        "no-task-id",
    ],
)
def test_token_state_combines_the_three_records(
    store: Store, clock: FakeClock, jti_revoked: bool, task: str | None, subject_revoked: bool, ask_task: bool
) -> None:
    if jti_revoked:
        store.revoke_jti("jti-1", expires_at=int(clock()) + 300)
    if task is not None:
        store.create_task(make_task(clock))
    if task == "completed":
        store.complete_task("task-1", at=int(clock()), by=AGENT)
    if subject_revoked:
        store.revoke_subject(cut_off(clock, None), keep_until=None)
    state = store.token_state("jti-1", "task-1" if ask_task else None, AGENT)
    assert state.jti_revoked is jti_revoked
    assert (state.task.status(clock()) if state.task else None) == (task if ask_task else None)
    assert (state.subject_revocation is not None) is subject_revoked


def test_exceptions_per_workload_and_all_oldest_first(store: Store, clock: FakeClock) -> None:
    later = make_grant(clock, "exc-b", offset=1)
    earlier = make_grant(clock, "exc-a")
    other = make_grant(clock, "exc-c", OTHER, offset=2)
    for grant in (later, other, earlier):
        store.add_exception(grant)
    assert store.exceptions(AGENT) == [earlier, later]
    assert store.exceptions(OTHER) == [other]
    assert store.exceptions() == [earlier, later, other]
    assert store.exceptions("spiffe://example.org/nobody") == []
    with pytest.raises(AlreadyExists):
        store.add_exception(make_grant(clock, "exc-a", OTHER))


def test_issuance_checks_read_the_kill_switch_and_the_exceptions_together(
    store: Store, clock: FakeClock
) -> None:
    assert store.issuance_checks(AGENT) == IssuanceChecks(None, [])
    later = make_grant(clock, "exc-b", offset=1)
    earlier = make_grant(clock, "exc-a")
    for grant in (later, make_grant(clock, "exc-c", OTHER, offset=2), earlier):
        store.add_exception(grant)
    store.revoke_subject(cut_off(clock, None), keep_until=None)
    checks = store.issuance_checks(AGENT)
    assert checks.revocation == store.subject_revocation(AGENT) is not None
    assert checks.exceptions == store.exceptions(AGENT) == [earlier, later]
    assert store.issuance_checks(OTHER).revocation is None
    assert [g.id for g in store.issuance_checks(OTHER).exceptions] == ["exc-c"]


def test_issuance_checks_agree_with_the_separate_reads_on_ties_and_expiry(store: Store, clock: FakeClock) -> None:
    """Grants created in the same second come in id order; rows past their keep time are gone from
    both views at the same instant (the kill switch and a grant kept until the same second)."""
    for grant_id in ("exc-z", "exc-m", "exc-a"):
        store.add_exception(make_grant(clock, grant_id, ttl=10))
    store.revoke_subject(cut_off(clock, int(clock()) + 10), keep_until=int(clock()) + 10)
    checks = store.issuance_checks(AGENT)
    assert [g.id for g in checks.exceptions] == ["exc-a", "exc-m", "exc-z"]
    assert checks == IssuanceChecks(store.subject_revocation(AGENT), store.exceptions(AGENT))
    assert checks.revocation is not None
    clock.advance(10)  # the kill switch's keep time ends; the grants are kept for their retention
    later = store.issuance_checks(AGENT)
    assert later == IssuanceChecks(None, store.exceptions(AGENT)) and len(later.exceptions) == 3
    clock.advance(RETENTION_SECONDS)
    assert store.issuance_checks(AGENT) == IssuanceChecks(None, []) == IssuanceChecks(
        store.subject_revocation(AGENT), store.exceptions(AGENT)
    )


def test_expired_exceptions_listed_until_retention_ends(store: Store, clock: FakeClock) -> None:
    grant = make_grant(clock, "exc-a", ttl=60)
    store.add_exception(grant)
    clock.advance(60)
    assert store.exceptions(AGENT) == [grant]
    assert not grant.active(clock())
    clock.advance(RETENTION_SECONDS - 1)
    assert store.exceptions() == [grant]
    clock.advance(1)
    assert store.exceptions(AGENT) == []
    assert store.exceptions() == []


def test_count_in_window_counts_per_fixed_window(store: Store, clock: FakeClock) -> None:
    start = (int(clock()) // 10 + 1) * 10  # the first second of a window
    clock.now = start
    assert [store.count_in_window("rate:a", window=10, now=start + i) for i in (0, 3, 9.9)] == [1, 2, 3]
    assert store.count_in_window("rate:b", window=10, now=start + 1) == 1
    clock.now = start + 10
    assert store.count_in_window("rate:a", window=10, now=start + 10) == 1
    assert (
        store.count_in_window("rate:a", window=5, now=start + 10) == 1
    )  # another window size, its own count


def test_lease_in_window_grants_at_most_the_limit_per_window(store: Store, clock: FakeClock) -> None:
    start = (int(clock()) // 10 + 1) * 10  # the first second of a window
    clock.now = start
    lease = store.lease_in_window
    assert [lease("rate:a", want=w, limit=10, window=10, now=start + 1) for w in (1, 4, 4, 4, 4)] == [
        1,
        4,
        4,
        1,  # only what is left
        0,  # spent: nothing granted, nothing changed
    ]
    assert lease("rate:b", want=3, limit=10, window=10, now=start + 2) == 3  # its own key
    assert lease("rate:a", want=5, limit=10, window=5, now=start + 2) == 5  # another window size
    assert lease("rate:c", want=1, limit=0, window=10, now=start) == 0
    clock.now = start + 10
    assert lease("rate:a", want=7, limit=10, window=10, now=start + 10) == 7  # the next window
    # count_in_window counts in the same counter: one more hit than the units leased.
    assert store.count_in_window("rate:a", window=10, now=start + 10) == 8
    assert lease("rate:a", want=5, limit=10, window=10, now=start + 10) == 2
    huge = 10**9
    assert lease("rate:h", want=huge // 20, limit=huge, window=10, now=start + 10) == huge // 20


def test_a_window_stays_spent_for_a_caller_whose_clock_lags_the_stores(store: Store, clock: FakeClock) -> None:
    """A caller whose ``now`` is 5 s behind the store's clock (another host's clock, or a lease that
    waited behind the write lock past the window's end) still finds the window's count. Expired at the
    window's end by the store's clock (and on Redis, ``EXPIREAT`` in the past deletes the key at once),
    the counter read 0 used and the whole limit was granted again, on every call."""
    lagging = float(int(time.time()) - 5)  # a second that is over by the injected clock and by Redis's
    clock.now = lagging + 5
    lease = store.lease_in_window
    assert lease("rate:a", want=10, limit=10, window=1, now=lagging) == 10
    assert lease("rate:a", want=10, limit=10, window=1, now=lagging) == 0
    assert [store.count_in_window("rate:b", window=1, now=lagging) for _ in range(3)] == [1, 2, 3]


def test_a_window_counter_is_forgotten_after_its_grace(clocked_store: Store, clock: FakeClock) -> None:
    """The grace is bounded: the store keeps no window's counter longer than the window and the grace."""
    start = float(int(clock()))
    assert clocked_store.lease_in_window("rate:a", want=10, limit=10, window=1, now=start) == 10
    clock.now = start + 1 + WINDOW_GRACE_SECONDS - 0.5
    assert clocked_store.lease_in_window("rate:a", want=10, limit=10, window=1, now=start) == 0
    clock.now = start + 1 + WINDOW_GRACE_SECONDS
    assert clocked_store.lease_in_window("rate:a", want=10, limit=10, window=1, now=start) == 10


def test_record_tokens_indexes_a_batch_as_record_token_does(store: Store, clock: FakeClock) -> None:
    now = int(clock())
    batch = [
        TokenRecord(
            f"j{i}",
            AGENT if i % 2 else OTHER,
            "tool:calc",
            "tool",
            now + i,
            now + 60,
            "none",
            task_id="t1" if i < 3 else None,
        )
        for i in range(6)
    ]
    store.record_tokens(batch)
    store.record_tokens([])
    assert [t.jti for t in store.tokens(spiffe_id=AGENT, limit=10)] == ["j5", "j3", "j1"]
    assert [t.jti for t in store.tokens(spiffe_id=OTHER, limit=10)] == ["j4", "j2", "j0"]
    assert [t.jti for t in store.tokens(task_id="t1", limit=10)] == ["j2", "j1", "j0"]
    assert store.tokens(task_id="t1", limit=10)[0] == batch[2]
    single = TokenRecord("one", AGENT, "tool:calc", "tool", now + 9, now + 60, "none")
    assert store.record_token(single)
    assert store.tokens(spiffe_id=AGENT, limit=1) == [single]  # both writes, one shape
    clock.advance(61)
    assert store.tokens(spiffe_id=AGENT, limit=10) == []


def test_a_batch_larger_than_one_statement_is_indexed_whole(store: Store, clock: FakeClock) -> None:
    """More rows than SQLite takes in one statement (``ROWS_PER_INSERT``): every entry is indexed."""
    now = int(clock())
    batch = [TokenRecord(f"j{i}", AGENT, "tool:calc", "tool", now, now + 60 + i, "none") for i in range(250)]
    store.record_tokens(batch)
    assert sorted(store.tokens(spiffe_id=AGENT, limit=1000), key=lambda t: t.jti) == sorted(
        batch, key=lambda t: t.jti
    )


def test_a_jti_written_twice_in_one_sqlite_batch_keeps_the_later_entry(tmp_path: Path, clock: FakeClock) -> None:
    """One multi-row INSERT OR REPLACE does what one write after another did (executemany): the later
    row replaces the earlier, also across the statements a large batch is cut into. (The issuer's jtis
    are random; the index must still not keep two entries for one.)"""
    store = SqliteStore(tmp_path / "sts.db", clock=clock)
    try:
        now = int(clock())
        batch = [TokenRecord(f"j{i}", AGENT, "tool:calc", "tool", now, now + 60, "none") for i in range(250)]
        batch[5] = TokenRecord("j150", AGENT, "tool:search", "tool", now, now + 60, "none")  # written, then
        batch[150] = TokenRecord("j150", AGENT, "data:crm", "data", now + 1, now + 60, "none")  # replaced
        batch[120] = TokenRecord("j7", AGENT, "data:crm", "data", now + 1, now + 60, "none")  # same statement
        store.record_tokens(batch)
        entries = {t.jti: t for t in store.tokens(spiffe_id=AGENT, limit=1000)}
        assert len(entries) == 248
        assert entries["j150"] == batch[150] and entries["j7"] == batch[120]
    finally:
        store.close()


def test_take_budget_never_exceeds_its_limit(store: Store, clock: FakeClock) -> None:
    end = int(clock()) + 600
    assert [store.take_budget("task-1", limit=3, expires_at=end) for _ in range(5)] == [True] * 3 + [
        False
    ] * 2
    assert store.take_budget("task-2", limit=3, expires_at=end)
    assert not store.take_budget("task-3", limit=0, expires_at=end)
    assert store.take_budget("task-1", limit=4, expires_at=end)  # a raised limit leaves room for one more


def test_use_once_refuses_replays(store: Store, clock: FakeClock) -> None:
    end = int(clock()) + 60
    assert [store.use_once("jti-1", expires_at=end) for _ in range(3)] == [True, False, False]
    assert store.use_once("jti-2", expires_at=end)


def test_budget_starts_again_once_expired(clocked_store: Store, clock: FakeClock) -> None:
    end = int(clock()) + 60
    assert clocked_store.take_budget("task-1", limit=1, expires_at=end)
    clock.advance(59)
    assert not clocked_store.take_budget("task-1", limit=1, expires_at=end)
    clock.advance(1)
    assert clocked_store.take_budget("task-1", limit=1, expires_at=end + 60)


def test_use_once_key_forgotten_after_it_expires(clocked_store: Store, clock: FakeClock) -> None:
    end = int(clock()) + 60
    assert clocked_store.use_once("jti-1", expires_at=end)
    clock.advance(59)
    assert not clocked_store.use_once("jti-1", expires_at=end)
    clock.advance(1)
    assert clocked_store.use_once("jti-1", expires_at=end + 60)


def test_threads_share_one_store_exactly(store: Store, clock: FakeClock) -> None:
    """Granian runs several threads per worker over one store object."""
    end = int(clock()) + 600

    def hammer() -> tuple[int, list[int]]:
        taken = sum(store.take_budget("task-1", limit=250, expires_at=end) for _ in range(100))
        return taken, [store.count_in_window("rate:a", window=3600, now=clock()) for _ in range(100)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [future.result() for future in [pool.submit(hammer) for _ in range(4)]]
    assert sum(taken for taken, _ in results) == 250
    assert sorted(c for _, counts in results for c in counts) == list(range(1, 401))


def test_closed_sqlite_store_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "sts.db")
    store.close()
    with pytest.raises(StoreUnavailable, match="unavailable"):
        store.ping()


# ---------------------------------------------------------------- SQLite


def test_sqlite_file_is_private_and_its_directory_made(tmp_path: Path) -> None:
    path = tmp_path / "state" / "deeper" / "sts.db"
    SqliteStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_sqlite_survives_restart(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "sts.db"
    first = SqliteStore(path, clock=clock)
    first.create_task(make_task(clock))
    first.complete_task("task-1", at=int(clock()) + 1, by=AGENT)
    first.revoke_jti("jti-1", expires_at=int(clock()) + 300)
    first.revoke_subject(cut_off(clock, None), keep_until=None)
    first.add_exception(make_grant(clock, "exc-a"))
    assert first.take_budget("task-1", limit=2, expires_at=int(clock()) + 600)
    assert first.use_once("jti-9", expires_at=int(clock()) + 60)
    first.close()

    second = SqliteStore(path, clock=clock)
    state = second.token_state("jti-1", "task-1", AGENT)
    assert state.jti_revoked
    assert state.task is not None
    assert state.task.completed_by == AGENT
    assert state.subject_revocation == cut_off(clock, None)
    assert second.exceptions(AGENT) == [make_grant(clock, "exc-a")]
    assert [second.take_budget("task-1", limit=2, expires_at=int(clock()) + 600) for _ in range(2)] == [
        True,
        False,
    ]
    assert not second.use_once("jti-9", expires_at=int(clock()) + 60)
    second.close()


def test_sqlite_deletes_expired_rows(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "sts.db"
    store = SqliteStore(path, clock=clock)
    store.create_task(make_task(clock))
    store.revoke_jti("jti-1", expires_at=int(clock()) + 300)
    store.revoke_subject(cut_off(clock, int(clock()) + 60), keep_until=int(clock()) + 60)
    store.revoke_subject(cut_off(clock, None, OTHER), keep_until=None)  # kept forever
    store.add_exception(make_grant(clock, "exc-a"))
    store.count_in_window("rate:a", window=1, now=clock())
    store.take_budget("task-1", limit=5, expires_at=int(clock()) + 600)
    store.use_once("jti-9", expires_at=int(clock()) + 60)
    tables = ("tasks", "revoked_jti", "subject_revocations", "exceptions", "counters", "once")

    def rows() -> dict[str, int]:
        with sqlite3.connect(path) as raw:
            return {t: raw.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}  # noqa: S608

    assert rows() == {
        "tasks": 1,
        "revoked_jti": 1,
        "subject_revocations": 2,
        "exceptions": 1,
        "counters": 2,
        "once": 1,
    }
    clock.advance(RETENTION_SECONDS + 600 + SWEEP_INTERVAL)
    store.use_once("jti-10", expires_at=int(clock()) + 60)  # any write sweeps when one is due
    assert rows() == {
        "tasks": 0,
        "revoked_jti": 0,
        "subject_revocations": 1,
        "exceptions": 0,
        "counters": 0,
        "once": 1,
    }
    store.close()


def test_sqlite_sweep_deletes_a_bounded_batch_and_comes_back_soon_for_the_rest(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep runs on a request's write, so its length is that request's stall: at most a batch per
    table, then again after SWEEP_BACKLOG_INTERVAL until the backlog is gone, then every SWEEP_INTERVAL."""
    monkeypatch.setattr(sqlite_store, "SWEEP_BATCH", 3)
    path = tmp_path / "sts.db"
    store = SqliteStore(path, clock=clock)
    for i in range(7):
        store.use_once(f"old-{i}", expires_at=int(clock()) + 10)

    def expired() -> int:
        with sqlite3.connect(path) as raw:
            return int(raw.execute("SELECT count(*) FROM once WHERE key LIKE 'old-%'").fetchone()[0])

    clock.advance(SWEEP_INTERVAL)
    store.use_once("new-0", expires_at=int(clock()) + 600)
    assert expired() == 4  # one batch
    store.use_once("new-1", expires_at=int(clock()) + 600)
    assert expired() == 4  # not before the backlog interval
    clock.advance(sqlite_store.SWEEP_BACKLOG_INTERVAL)
    store.use_once("new-2", expires_at=int(clock()) + 600)
    assert expired() == 1
    clock.advance(sqlite_store.SWEEP_BACKLOG_INTERVAL)
    store.use_once("new-3", expires_at=int(clock()) + 600)
    assert expired() == 0  # fewer than a batch: the backlog is gone
    store.use_once("soon", expires_at=int(clock()) + 1)
    clock.advance(sqlite_store.SWEEP_BACKLOG_INTERVAL + 1)
    store.use_once("new-4", expires_at=int(clock()) + 600)
    with sqlite3.connect(path) as raw:  # back to the long interval: the expired row waits for it
        assert raw.execute("SELECT count(*) FROM once WHERE key = 'soon'").fetchone()[0] == 1
    store.close()


def test_sqlite_locked_beyond_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "sts.db"
    store = SqliteStore(path, busy_timeout=0.05)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            store.revoke_jti("jti-1", expires_at=int(time.time()) + 60)
        assert time.monotonic() - started < 1.0
        assert "locked" in (caught.value.detail or "")
        store.ping()  # reads never wait for the writer in WAL mode
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.revoke_jti("jti-1", expires_at=int(time.time()) + 60)
    store.close()


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda p: p.write_bytes(b"this is not a database, just bytes" * 100), "not a database"),
        (lambda p: p.mkdir(), "unable to open"),
        (lambda p: sqlite3.connect(p).execute("PRAGMA user_version = 99").connection.close(), "newer"),
    ],
    ids=["garbage-file", "a-directory", "newer-schema"],
)
def test_sqlite_unusable_file_is_unavailable(
    tmp_path: Path, prepare: Callable[[Path], Any], message: str
) -> None:
    path = tmp_path / "sts.db"
    prepare(path)
    with pytest.raises(StoreUnavailable) as caught:
        SqliteStore(path)
    assert message in (caught.value.detail or "")


RACER = """
import json, sys
from pathlib import Path

kind, where, now = sys.argv[1], sys.argv[2], float(sys.argv[3])
if kind == "sqlite":
    from sts.store.sqlite import SqliteStore
    store = SqliteStore(Path(where))
else:
    from sts.store.redis_store import RedisStore
    store = RedisStore(where)
end = int(now) + 3600
print("ready", flush=True)
sys.stdin.readline()
taken = [store.take_budget("task-1", limit=250, expires_at=end) for _ in range(200)]
counts = [store.count_in_window("rate:agent", window=3600, now=now) for _ in range(200)]
fresh = [store.use_once(f"jti-{i}", expires_at=end) for i in range(200)]
print(json.dumps({"taken": sum(taken), "counts": counts, "fresh": sum(fresh)}))
"""


def race_two_processes(kind: str, where: str) -> None:
    """Two processes, started together, hammer one budget, one window and 200 one-time keys."""
    now = str(time.time())
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, kind, where, now],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        for _ in range(2)
    ]
    for racer in racers:
        assert racer.stdout is not None
        assert racer.stdout.readline().strip() == "ready"
    for racer in racers:
        assert racer.stdin is not None
        racer.stdin.write("go\n")
        racer.stdin.flush()
    results = [json.loads(racer.communicate(timeout=60)[0]) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers)
    assert sum(r["taken"] for r in results) == 250
    assert sorted(results[0]["counts"] + results[1]["counts"]) == list(range(1, 401))  # no lost update
    assert sum(r["fresh"] for r in results) == 200


def test_sqlite_two_processes_get_exact_totals(tmp_path: Path) -> None:
    path = tmp_path / "sts.db"
    SqliteStore(path).close()
    race_two_processes("sqlite", str(path))


# ---------------------------------------------------------------- Redis


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test alone may stop and start."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


def test_redis_replicas_see_each_other_at_once(redis_server: RedisServer, clock: FakeClock) -> None:
    redis.Redis.from_url(redis_server.url).flushdb()
    one, two = RedisStore(redis_server.url, clock=clock), RedisStore(redis_server.url, clock=clock)
    two.create_task(make_task(clock))
    assert two.token_state("jti-1", "task-1", AGENT).task == make_task(clock)
    one.revoke_jti("jti-1", expires_at=int(clock()) + 300)
    one.revoke_subject(cut_off(clock, None), keep_until=None)
    one.complete_task("task-1", at=int(clock()), by=ADMIN)
    state = two.token_state("jti-1", "task-1", AGENT)
    assert state.jti_revoked
    assert state.subject_revocation is not None
    assert state.task is not None
    assert state.task.completed_by == ADMIN
    assert two.complete_task("task-1", at=int(clock()) + 1, by=AGENT) == state.task
    assert [
        one.take_budget("b", limit=1, expires_at=int(clock()) + 60),
        two.take_budget("b", limit=1, expires_at=int(clock()) + 60),
    ] == [True, False]
    assert [s.count_in_window("rate:a", window=60, now=clock()) for s in (one, two, one)] == [1, 2, 3]
    one.close()
    two.close()


def test_redis_keys_expire_at_the_records_end(redis_server: RedisServer, clock: FakeClock) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    raw.flushdb()
    store = RedisStore(redis_server.url, clock=clock)
    now = int(clock())
    task = make_task(clock, ttl=600)
    store.create_task(task)
    store.complete_task(task.id, at=now, by=AGENT)
    store.revoke_jti("jti-1", expires_at=now + 300)
    store.revoke_subject(cut_off(clock, now + 120), keep_until=now + 120)
    store.revoke_subject(cut_off(clock, None, OTHER), keep_until=None)
    store.add_exception(make_grant(clock, "exc-a", ttl=60))
    store.add_exception(make_grant(clock, "exc-b", OTHER, ttl=90))
    store.count_in_window("rate:a", window=60, now=now)
    store.lease_in_window("rate:l", want=3, limit=5, window=60, now=now)
    store.take_budget("task-1", limit=5, expires_at=now + 600)
    store.use_once("jti-9", expires_at=now + 30)
    slot = now // 60
    keys = [k.decode() for k in raw.keys("*") if isinstance(k, bytes)]
    assert {key: raw.expiretime(key) for key in keys} == {
        "sts:task:task-1": now + 600 + RETENTION_SECONDS,
        "sts:task-done:task-1": now + 600 + RETENTION_SECONDS,
        "sts:tasks": now + 600 + RETENTION_SECONDS,  # the live view's task index
        "sts:jti:jti-1": now + 300,
        f"sts:subject:{AGENT}": now + 120,
        f"sts:subject:{OTHER}": -1,  # kept until lifted
        "sts:exception:exc-a": now + 60 + RETENTION_SECONDS,
        "sts:exception:exc-b": now + 90 + RETENTION_SECONDS,
        f"sts:exceptions-of:{AGENT}": now + 60 + RETENTION_SECONDS,
        f"sts:exceptions-of:{OTHER}": now + 90 + RETENTION_SECONDS,
        "sts:exceptions-all": now + 90 + RETENTION_SECONDS,
        f"sts:window:rate:a:{slot}": (slot + 1) * 60 + WINDOW_GRACE_SECONDS,  # the window's end and the grace
        f"sts:window:rate:l:{slot}": (slot + 1) * 60 + WINDOW_GRACE_SECONDS,
        "sts:budget:task-1": now + 600,
        "sts:once:jti-9": now + 30,
    }
    store.close()


def test_redis_two_processes_get_exact_totals(redis_server: RedisServer) -> None:
    redis.Redis.from_url(redis_server.url).flushdb()
    race_two_processes("redis", redis_server.url)


def every_method(clock: FakeClock) -> list[tuple[str, Callable[[Store], object]]]:
    end = int(clock()) + 60
    return [
        ("ping", lambda s: s.ping()),
        ("create_task", lambda s: s.create_task(make_task(clock, "task-2"))),
        ("get_task", lambda s: s.get_task("task-1")),
        ("complete_task", lambda s: s.complete_task("task-1", at=end, by=AGENT)),
        ("revoke_jti", lambda s: s.revoke_jti("jti-1", expires_at=end)),
        ("revoke_subject", lambda s: s.revoke_subject(cut_off(clock, None), keep_until=None)),
        ("subject_revocation", lambda s: s.subject_revocation(AGENT)),
        ("token_state", lambda s: s.token_state("jti-1", "task-1", AGENT)),
        ("add_exception", lambda s: s.add_exception(make_grant(clock, "exc-z"))),
        ("exceptions", lambda s: s.exceptions()),
        ("count_in_window", lambda s: s.count_in_window("rate:a", window=1, now=clock())),
        ("lease_in_window", lambda s: s.lease_in_window("rate:a", want=2, limit=5, window=1, now=clock())),
        (
            "record_tokens",
            lambda s: s.record_tokens([TokenRecord("j", AGENT, "t", "tool", int(clock()), end, "none")]),
        ),
        ("take_budget", lambda s: s.take_budget("task-1", limit=5, expires_at=end)),
        ("use_once", lambda s: s.use_once("jti-8", expires_at=end)),
    ]


def test_redis_down_fails_fast_and_the_same_store_recovers(own_redis: RedisServer, clock: FakeClock) -> None:
    store = RedisStore(own_redis.url, clock=clock)
    store.create_task(make_task(clock))
    assert store.take_budget("task-1", limit=5, expires_at=int(clock()) + 60)
    own_redis.stop()
    slow = {}
    for name, call in every_method(clock):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            call(store)
        slow[name] = time.monotonic() - started
    # Fail fast, not after redis-py's default retries with backoff (seconds); loose for a shared machine.
    assert max(slow.values()) < 2.0, slow

    own_redis.start()  # empty: it kept nothing (--save "")
    store.ping()
    assert store.take_budget("task-1", limit=5, expires_at=int(clock()) + 60)  # scripts are loaded again
    store.create_task(make_task(clock))
    assert store.token_state("jti-1", "task-1", AGENT).task == make_task(clock)
    store.close()


def test_redis_restart_between_calls_is_not_seen(own_redis: RedisServer, clock: FakeClock) -> None:
    store = RedisStore(own_redis.url, clock=clock)
    store.revoke_jti("jti-1", expires_at=int(clock()) + 60)
    own_redis.restart()  # the pooled connection is now closed by the old server
    assert not store.token_state("jti-1", None, AGENT).jti_revoked  # answered, by the new (empty) Redis
    store.close()


# ---------------------------------------------------------------- open_store


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", MemoryStore),
        ("sqlite://{tmp}/state/sts.db", SqliteStore),
        ("sqlite:///{tmp}/state/sts.db", SqliteStore),  # what config builds: sqlite:/// + an absolute path
        ("redis://127.0.0.1:6379/0", RedisStore),
        ("redis://cache.internal", RedisStore),
        ("rediss://cache.internal:6380/1", RedisStore),
    ],
    ids=["memory", "sqlite-absolute", "sqlite-four-slashes", "redis", "redis-defaults", "rediss"],
)
def test_open_store_by_url(tmp_path: Path, url: str, kind: type) -> None:
    opened = open_store(url.format(tmp=tmp_path))  # Redis connects only when first used
    assert isinstance(opened, kind)
    if isinstance(opened, SqliteStore):
        assert opened.path == tmp_path / "state" / "sts.db"
        assert opened.path.exists()
    opened.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://state/sts.db", "relative"),
        ("sqlite:///../state/sts.db", "relative paths are refused"),
        ("sqlite:sts.db", "sqlite:///abs/path"),
        ("sqlite:///", "directory"),
        ("sqlite:///var/lib/sts/", "directory"),
        ("sqlite:///var/lib/sts.db?mode=ro", "no query"),
        ("memory://somewhere", "nothing after"),
        ("redis://", "no host"),
        ("redis://cache:port/0", "port"),
        ("redis://cache:6379/zero", "must be a number"),
        ("postgres://db/sts", "'postgres'"),
        ("just-a-path.db", "no scheme"),
    ],
    ids=[
        "sqlite-relative-host-form",
        "sqlite-dot-dot",
        "sqlite-no-slashes",
        "sqlite-no-file",
        "sqlite-directory",
        "sqlite-query",
        "memory-with-path",
        "redis-no-host",
        "redis-bad-port",
        "redis-bad-db",
        "unknown-scheme",
        "no-scheme",
    ],
)
def test_open_store_refuses(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        open_store(url)


def test_open_store_does_not_touch_the_filesystem_for_a_refused_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="relative"):
        open_store("sqlite://sts.db")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the stored text of a record

_texts = st.text(max_size=12)
_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_scopes = st.frozensets(_texts, max_size=4)
_records = st.one_of(
    st.builds(
        TaskRecord,
        id=_texts,
        creator=_texts,
        assignee=_texts,
        targets=st.lists(st.builds(TaskTarget, _texts, _scopes), max_size=3).map(tuple),
        purpose=_texts,
        created_at=_ints,
        deadline=_ints,
        completed_at=st.none() | _ints,
        completed_by=st.none() | _texts,
    ),
    st.builds(SubjectRevocation, _texts, _ints, st.none() | _ints, _texts, _texts),
    st.builds(
        ExceptionGrant,
        id=_texts,
        spiffe_id=_texts,
        target=_texts,
        scopes=_scopes,
        reason=_texts,
        granted_by=_texts,
        created_at=_ints,
        expires_at=_ints,
        withdrawn_at=st.none() | _ints,
        withdrawn_by=st.none() | _texts,
        withdraw_reason=st.none() | _texts,
    ),
    st.builds(
        TokenRecord,
        jti=_texts,
        spiffe_id=_texts,
        target=_texts,
        token_class=_texts,
        issued_at=_ints,
        expires_at=_ints,
        binding=_texts,
        task_id=st.none() | _texts,
        exception_id=st.none() | _texts,
    ),
)


@settings(max_examples=300, deadline=None)
@given(record=_records, omit=st.sampled_from([(), ("targets",), ("completed_at", "completed_by"), ("jti",)]))
def test_record_json_is_the_text_asdict_gives(
    record: TaskRecord | SubjectRevocation | ExceptionGrant | TokenRecord, omit: tuple[str, ...]
) -> None:
    """The stored text is what every backend has always written (``dataclasses.asdict``, sets sorted):
    rows written before the shallow encoder read back, and the two encoders never disagree."""
    expected = {k: v for k, v in dataclasses.asdict(record).items() if k not in omit}
    assert record_json(record, omit=omit) == json.dumps(expected, default=sorted, separators=(",", ":"))
