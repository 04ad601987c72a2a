"""The plain tokens' index entries written in batches: visible after a flush or within a tick, bounded,
retried, written at close, and task and exception tokens still recorded before they are returned."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from sts import token_index
from sts.callers import Caller
from sts.config import load_settings
from sts.exchange import GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_JWT, ExchangeRequest
from sts.runtime import Services, build_services
from sts.spiffeid import SpiffeId
from sts.store import Budget, Store, StoreUnavailable, TokenRecord
from sts.store.memory import MemoryStore
from sts.store.sqlite import SqliteStore
from sts.token_index import TokenIndexWriter
from tests.authority import TestAuthority
from tests.conftest import write_config

AGENT = "spiffe://example.org/agent/researcher"
NOW = 1_900_000_000
SLOW = 3600.0  # an interval no test waits for: only an explicit flush (or a wake-up) writes


class Recording:
    """A store that counts index writes and can be made to fail them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: list[int] = []
        self.singles = 0
        self.failures = 0
        self.down = False

    def record_tokens(self, tokens: Sequence[TokenRecord]) -> None:
        if self.down:
            self.failures += 1
            raise StoreUnavailable("down for the test", backend="test", operation="record_tokens")
        self.batches.append(len(tokens))
        self.store.record_tokens(tokens)

    def record_token(self, token: TokenRecord, *, budget: Budget | None = None) -> bool:
        if self.down:
            raise StoreUnavailable("down for the test", backend="test", operation="record_token")
        self.singles += 1
        return self.store.record_token(token, budget=budget)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def entry(jti: str, *, sub: str = AGENT, ttl: int = 600) -> TokenRecord:
    now = int(time.time())
    return TokenRecord(jti, sub, "tool:calc", "tool", now, now + ttl, "none")


def visible(store: Store, sub: str = AGENT) -> set[str]:
    return {t.jti for t in store.tokens(spiffe_id=sub, limit=100_000)}


def poll(condition: Callable[[], bool], timeout: float = 1.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(0.005)
    return time.monotonic() - started


@pytest.fixture
def sqlite(tmp_path: Path) -> Recording:
    return Recording(SqliteStore(tmp_path / "sts.db"))


def test_entries_are_written_in_one_batch_on_flush(sqlite: Recording) -> None:
    writer = TokenIndexWriter(sqlite, interval=SLOW)
    for i in range(10):
        writer.add(entry(f"j{i}"))
    assert visible(sqlite) == set()  # queued, not written
    assert writer.queued == 10
    writer.flush()
    assert visible(sqlite) == {f"j{i}" for i in range(10)}
    assert (sqlite.batches, sqlite.singles, writer.queued) == ([10], 0, 0)
    writer.flush()  # nothing queued: no write
    assert sqlite.batches == [10]
    writer.close()


def test_the_background_thread_writes_within_a_tick(sqlite: Recording) -> None:
    writer = TokenIndexWriter(sqlite)  # the defaults: every 50 ms
    writer.add(entry("a"))
    writer.add(entry("b"))
    waited = poll(lambda: visible(sqlite) == {"a", "b"})
    print(f"written after {waited * 1000:.0f} ms")
    assert sqlite.singles == 0
    writer.close()


def test_a_full_batch_wakes_the_writer_before_its_interval(sqlite: Recording) -> None:
    writer = TokenIndexWriter(sqlite, interval=SLOW, flush_at=5)
    for i in range(4):
        writer.add(entry(f"j{i}"))
    time.sleep(0.1)
    assert visible(sqlite) == set()
    writer.add(entry("j4"))
    poll(lambda: len(visible(sqlite)) == 5)
    writer.close()


def test_a_full_queue_writes_synchronously(sqlite: Recording) -> None:
    writer = TokenIndexWriter(sqlite, interval=SLOW, max_queued=3)
    for i in range(5):
        writer.add(entry(f"j{i}"))
    assert writer.queued == 3
    assert sqlite.singles == 2
    assert visible(sqlite) == {"j3", "j4"}  # the caller paid for these, at once
    sqlite.down = True
    with pytest.raises(StoreUnavailable):
        writer.add(entry("refused"))  # the store's failure reaches the request: 503, fail closed
    sqlite.down = False
    writer.flush()
    assert visible(sqlite) == {f"j{i}" for i in range(5)}
    writer.close()


def test_the_default_bounds() -> None:
    assert (token_index.FLUSH_INTERVAL, token_index.FLUSH_AT, token_index.MAX_QUEUED) == (0.05, 256, 10_000)


def test_a_failing_store_is_retried_and_nothing_is_lost(
    sqlite: Recording, caplog: pytest.LogCaptureFixture
) -> None:
    writer = TokenIndexWriter(sqlite, interval=0.01)
    sqlite.down = True
    with caplog.at_level(logging.INFO, logger="sts.token_index"):
        for i in range(20):
            writer.add(entry(f"j{i}"))
        poll(lambda: sqlite.failures >= 3)
        with pytest.raises(StoreUnavailable):
            writer.flush()  # an explicit flush says so
        assert writer.queued == 20
        sqlite.down = False
        poll(lambda: visible(sqlite) == {f"j{i}" for i in range(20)})
        poll(lambda: "written again" in caplog.text)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per streak of failures, not once per tick
    assert "down for the test" in warnings[0].getMessage()
    assert writer.queued == 0
    writer.close()


def test_close_writes_everything_and_later_adds_are_synchronous(sqlite: Recording) -> None:
    writer = TokenIndexWriter(sqlite, interval=SLOW)
    for i in range(300):
        writer.add(entry(f"j{i}"))
    thread = writer._thread
    assert thread is not None and thread.is_alive()
    writer.close()
    assert not thread.is_alive()
    assert len(visible(sqlite)) == 300
    writer.add(entry("late"))
    assert "late" in visible(sqlite) and sqlite.singles == 1


def test_close_with_the_store_down_logs_what_is_lost(
    sqlite: Recording, caplog: pytest.LogCaptureFixture
) -> None:
    writer = TokenIndexWriter(sqlite, interval=SLOW)
    writer.add(entry("a"))
    sqlite.down = True
    with caplog.at_level(logging.ERROR, logger="sts.token_index"):
        writer.close()  # does not raise: shutdown goes on
    assert "1 entries of plain tokens not written at shutdown" in caplog.text


def test_the_thread_starts_lazily_in_the_adding_process(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Recording(MemoryStore())
    writer = TokenIndexWriter(store, interval=SLOW)
    assert writer._thread is None  # nothing started before the first add
    writer.add(entry("parent"))
    parent_thread = writer._thread
    real = os.getpid()
    monkeypatch.setattr(token_index.os, "getpid", lambda: real + 1)  # as in a forked child
    writer.add(entry("child"))
    assert writer.queued == 1  # the parent's entry is the parent's to write
    assert writer._thread is not None and writer._thread is not parent_thread
    writer.flush()
    assert visible(store) == {"child"}
    writer.close()
    monkeypatch.undo()
    assert parent_thread is not None
    parent_thread.join(0)  # left to the (simulated) parent; it is a daemon


def test_a_forked_child_starts_with_an_empty_queue(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "sts.db")
    writer = TokenIndexWriter(store, interval=SLOW)
    writer.add(entry("parent"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = writer.queued == 0 and writer._thread is None
            writer.add(entry("child"))
            writer.flush()
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)
    assert answer == b"1"
    assert writer.queued == 1
    writer.close()
    assert visible(store) == {"parent", "child"}
    store.close()


# ---------------------------------------------------------------------------- through the exchange


@pytest.fixture
def services(tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority) -> Services:
    config = write_config(tmp_path, 8443, example_org, partner_test)
    built = build_services(load_settings(config, environ={}))
    built.exchange.index._interval = SLOW  # only explicit flushes write the plain entries here
    return built


def request(token: str, **extra: str) -> ExchangeRequest:
    form = {
        "grant_type": [GRANT_TYPE_TOKEN_EXCHANGE],
        "subject_token": [token],
        "subject_token_type": [TOKEN_TYPE_JWT],
    }
    form.update({k: [v] for k, v in extra.items()})
    return ExchangeRequest.from_form(form)


ORCHESTRATOR = Caller(SpiffeId.parse("spiffe://example.org/orchestrator"), "spiffe_jwt")
ADMIN = Caller(SpiffeId.parse("spiffe://example.org/ops/sts-admin"), "spiffe_jwt")


def test_plain_tokens_are_queued_and_the_admin_view_flushes_first(
    services: Services, example_org: TestAuthority
) -> None:
    now = int(time.time())
    svid = example_org.mint(AGENT, services.settings.issuer, now=now)
    issued = services.exchange.exchange(
        request(svid, audience="tool:calc", scope="invoke"), request_id="r", now=now
    )
    assert services.store.tokens(spiffe_id=AGENT, limit=10) == []  # queued
    assert services.exchange.index.queued == 1
    view = services.admin.view(ADMIN, "tokens", {"spiffe_id": AGENT}, request_id="v", now=now)
    assert [t["jti"] for t in view["tokens"]] == [issued.jti]
    services.close()


def test_task_tokens_are_recorded_before_they_are_returned(
    services: Services, example_org: TestAuthority
) -> None:
    now = int(time.time())
    body = {
        "assignee": AGENT,
        "targets": [{"target": "tool:calc", "scopes": ["invoke"]}],
        "purpose": "p",
        "ttl_seconds": 100,
    }
    task = services.tasks.create(ORCHESTRATOR, body, request_id="t", now=now)
    svid = example_org.mint(AGENT, services.settings.issuer, now=now)
    issued = services.exchange.exchange(
        request(svid, audience="tool:calc", scope="invoke", task_id=task.id), request_id="r", now=now
    )
    assert [t.jti for t in services.store.tokens(task_id=task.id, limit=10)] == [issued.jti]
    assert services.exchange.index.queued == 0
    services.close()


def test_exception_tokens_are_recorded_before_they_are_returned(
    services: Services, example_org: TestAuthority
) -> None:
    now = int(time.time())
    job = "spiffe://example.org/batch/withdrawn"
    body = {
        "spiffe_id": job,
        "target": "tool:calc",
        "scopes": ["invoke"],
        "reason": "incident 7",
        "expires_at": now + 600,
    }
    grant = services.admin.grant_exception(ADMIN, body, request_id="g", now=now)
    svid = example_org.mint(job, services.settings.issuer, now=now)
    issued = services.exchange.exchange(
        request(svid, audience="tool:calc", scope="invoke"), request_id="r", now=now
    )
    (recorded,) = services.store.tokens(spiffe_id=job, limit=10)
    assert (recorded.jti, recorded.exception_id) == (issued.jti, grant.id)
    assert services.exchange.index.queued == 0
    services.close()


def test_closing_the_services_writes_the_queue(
    tmp_path: Path, services: Services, example_org: TestAuthority
) -> None:
    now = int(time.time())
    svid = example_org.mint(AGENT, services.settings.issuer, now=now)
    issued = services.exchange.exchange(
        request(svid, audience="tool:calc", scope="invoke"), request_id="r", now=now
    )
    services.close()
    reopened = SqliteStore(tmp_path / "sts.db")
    assert [t.jti for t in reopened.tokens(spiffe_id=AGENT, limit=10)] == [issued.jti]
    reopened.close()
