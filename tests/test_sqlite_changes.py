"""The SQLite store keeps each workload's issuance checks in memory, and never past a change.

``SqliteStore.issuance_checks`` (read by every exchange) is answered from memory while the change
counter beside the file (``sts.store.sqlite_changes``) says no kill switch or exception was written
since, by any process. These tests write from real other processes, kill a writer half-way, write
behind the counter's back (as an older build would), and check that every reader sees what SQLite
holds whenever it must, and that memory is actually used when nothing changed.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import multiprocessing.connection
import os
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sts.store import IssuanceChecks, StoreUnavailable, SubjectRevocation, record_json, sqlite_changes
from sts.store import sqlite as sqlite_store
from sts.store.sqlite import ISSUANCE_KEPT_SECONDS, SqliteStore
from sts.store.sqlite_changes import SUFFIX, ChangeGeneration
from tests.test_store import FakeClock, make_grant

AGENT = "spiffe://example.org/agent/researcher"
ADMIN = "spiffe://example.org/ops/sts-admin"


def cut_off(now: float, spiffe_id: str = AGENT) -> SubjectRevocation:
    return SubjectRevocation(spiffe_id, int(now), None, ADMIN, "compromised")


def write_behind_the_counter(path: Path, now: float) -> None:
    """A kill switch written straight into the file, as a build that knows no counter would."""
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute(
            "INSERT OR REPLACE INTO subject_revocations (spiffe_id, record, expires_at) VALUES (?, ?, NULL)",
            (AGENT, record_json(cut_off(now))),
        )


def counter(path: Path) -> int:
    data = (Path(os.path.realpath(path) + SUFFIX)).read_bytes()
    return int(struct.unpack("<Q", data)[0])


# -- another process writes: the reader sees it on its next read -------------------------------------


def _writer(path: str, commands: multiprocessing.connection.Connection) -> None:
    store = SqliteStore(Path(path))
    commands.send("ready")
    while True:
        command = commands.recv()
        now = time.time()
        if command == "revoke":
            store.revoke_subject(cut_off(now), keep_until=None)
        elif command == "lift":
            lifted = SubjectRevocation(AGENT, int(now), int(now), ADMIN, "lifted")
            store.revoke_subject(lifted, keep_until=None)
        elif command == "grant":
            store.add_exception(make_grant(FakeClock(), "exc-1"))
        elif command == "withdraw":
            store.withdraw_exception("exc-1", at=int(now), by=ADMIN, reason="over")
        elif command == "die-after-commit":
            assert store._changes is not None
            with store._changes.changing():  # the commit, then death before the counter is even again
                store._conn().execute(
                    "INSERT OR REPLACE INTO subject_revocations (spiffe_id, record, expires_at)"
                    " VALUES (?, ?, NULL)",
                    (AGENT, record_json(cut_off(now))),
                )
                os._exit(3)
        else:
            store.close()
            commands.send("closed")
            return
        commands.send("done")


@pytest.fixture
def writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[multiprocessing.connection.Connection]:
    """Another process writing the same file on command. Here (the reader) kept reads live a minute:
    only the change counter can make a read see what that process wrote."""
    monkeypatch.setattr(sqlite_store, "ISSUANCE_KEPT_SECONDS", 60.0)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_writer, args=(str(tmp_path / "sts.db"), theirs), daemon=True)
    process.start()
    theirs.close()  # the child's end: its death then reads as EOF here
    assert ours.recv() == "ready"  # its store is open before the reader's first read
    yield ours
    if process.is_alive():
        ours.send("stop")
        process.join(10)


def test_a_kill_switch_written_by_another_process_is_seen_at_once(
    tmp_path: Path, writer: multiprocessing.connection.Connection
) -> None:
    store = SqliteStore(tmp_path / "sts.db")
    assert store.issuance_checks(AGENT) == IssuanceChecks(None, [])  # kept in memory from here
    assert AGENT in store._kept
    writer.send("revoke")
    assert writer.recv() == "done"
    checks = store.issuance_checks(AGENT)
    assert checks.revocation is not None and checks.revocation.blocks_issuance(time.time())
    writer.send("lift")
    assert writer.recv() == "done"
    checks = store.issuance_checks(AGENT)
    assert checks.revocation is not None and not checks.revocation.blocks_issuance(time.time() + 1)


def test_an_exception_granted_and_withdrawn_by_another_process_is_seen_at_once(
    tmp_path: Path, writer: multiprocessing.connection.Connection
) -> None:
    store = SqliteStore(tmp_path / "sts.db")
    assert store.issuance_checks(AGENT).exceptions == []
    writer.send("grant")
    assert writer.recv() == "done"
    [granted] = store.issuance_checks(AGENT).exceptions
    assert granted.withdrawn_at is None
    writer.send("withdraw")
    assert writer.recv() == "done"
    [withdrawn] = store.issuance_checks(AGENT).exceptions
    assert withdrawn.withdrawn_at is not None and not withdrawn.active(time.time() + 1)


def test_a_writer_that_dies_after_its_commit_leaves_nothing_kept(
    tmp_path: Path, writer: multiprocessing.connection.Connection
) -> None:
    path = tmp_path / "sts.db"
    store = SqliteStore(path)
    assert store.issuance_checks(AGENT).revocation is None
    writer.send("die-after-commit")
    with pytest.raises(EOFError):
        writer.recv()
    assert counter(path) % 2 == 1  # the dead writer's mark: a change in progress
    assert store.issuance_checks(AGENT).revocation is not None
    # While the counter is odd nothing is kept: a write behind its back is seen at once too.
    store.revoke_subject(SubjectRevocation(AGENT, 0, 0, ADMIN, "lifted"), keep_until=None)  # flock freed
    assert counter(path) % 2 == 0
    lifted = store.issuance_checks(AGENT).revocation
    assert lifted is not None and not lifted.blocks_issuance(time.time())


# -- memory is used, and bounded -----------------------------------------------------------------------


def test_a_read_is_kept_while_nothing_changes_and_for_one_second_at_most(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "sts.db"
    store = SqliteStore(path, clock=clock)
    assert store.issuance_checks(AGENT).revocation is None
    write_behind_the_counter(path, clock())
    assert store.issuance_checks(AGENT).revocation is None  # kept: the counter did not move
    clock.advance(ISSUANCE_KEPT_SECONDS)
    assert store.issuance_checks(AGENT).revocation is not None  # too old to keep: read again


def test_a_kept_read_expires_its_rows_as_the_statement_would(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteStore(tmp_path / "sts.db", clock=clock)
    store.revoke_subject(cut_off(clock()), keep_until=int(clock()) + 1)
    store.add_exception(make_grant(clock, "exc-1"))
    kept = store.issuance_checks(AGENT)
    assert kept.revocation is not None and len(kept.exceptions) == 1
    clock.advance(0.5)
    assert store.issuance_checks(AGENT) == kept  # the same read, from memory
    clock.advance(0.5)  # the kill switch's row expires now: the statement would not return it
    assert store.issuance_checks(AGENT) == IssuanceChecks(None, kept.exceptions)


def test_an_odd_or_lower_counter_keeps_nothing(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "sts.db"
    store = SqliteStore(path, clock=clock)
    store.revoke_subject(SubjectRevocation(AGENT, 0, 0, ADMIN, "lifted"), keep_until=None)
    store.revoke_subject(SubjectRevocation(AGENT, 0, 0, ADMIN, "lifted"), keep_until=None)
    assert counter(path) == 4
    assert store.issuance_checks(AGENT).revocation is not None
    changes = Path(os.path.realpath(path) + SUFFIX)
    for value in (5, 2):  # a change in progress; a file put back from before
        changes.write_bytes(struct.pack("<Q", value))
        with sqlite3.connect(path, isolation_level=None) as conn:
            conn.execute("DELETE FROM subject_revocations")
        assert store.issuance_checks(AGENT).revocation is None
        write_behind_the_counter(path, clock())
        assert store.issuance_checks(AGENT).revocation is not None


def test_kept_reads_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "ISSUANCE_KEPT_ENTRIES", 3)
    store = SqliteStore(tmp_path / "sts.db")
    for n in range(10):
        store.issuance_checks(f"spiffe://example.org/agent/{n}")
        assert len(store._kept) <= 3


def test_a_closed_store_refuses_even_what_it_kept(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "sts.db")
    store.issuance_checks(AGENT)
    store.close()
    with pytest.raises(StoreUnavailable) as refused:
        store.issuance_checks(AGENT)
    assert refused.value.detail is not None and "store closed" in refused.value.detail


def test_without_a_counter_file_every_read_goes_to_sqlite_and_writes_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(self: ChangeGeneration, path: Path, **options: float) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ChangeGeneration, "__init__", refused)
    path = tmp_path / "sts.db"
    with caplog.at_level(logging.WARNING):
        store = SqliteStore(path)
    assert "reads its kill switch and exceptions from SQLite" in caplog.text
    assert store.issuance_checks(AGENT).revocation is None
    write_behind_the_counter(path, time.time())
    assert store.issuance_checks(AGENT).revocation is not None
    # A kill switch is still written (other processes see it within ISSUANCE_KEPT_SECONDS), and said.
    with caplog.at_level(logging.ERROR):
        store.revoke_subject(SubjectRevocation(AGENT, 0, 0, ADMIN, "lifted"), keep_until=None)
    assert "not at once" in caplog.text
    lifted = store.issuance_checks(AGENT).revocation
    assert lifted is not None and not lifted.blocks_issuance(time.time())


def test_the_counter_file_is_private_and_shared_through_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "sts.db"
    store = SqliteStore(path)
    link = tmp_path / "link.db"
    link.symlink_to(path)
    other = SqliteStore(link)
    assert other.issuance_checks(AGENT).revocation is None
    store.revoke_subject(cut_off(time.time()), keep_until=None)
    assert other.issuance_checks(AGENT).revocation is not None
    mode = (tmp_path / f"sts.db{SUFFIX}").stat().st_mode & 0o777
    assert mode == 0o600
    assert not (tmp_path / f"link.db{SUFFIX}").exists()


# -- several writers, and a counter file that goes away ---------------------------------------------


def _many_changes(store: SqliteStore, count: int) -> None:
    for n in range(count):
        store.revoke_subject(SubjectRevocation(AGENT, n, n, ADMIN, "lifted"), keep_until=None)


def test_forked_writers_take_turns_on_the_counter(tmp_path: Path) -> None:
    """A store opened before ``fork`` (its children inherit it): each child opens its own counter file,
    so ``flock`` keeps them apart and no change of the counter is lost."""
    path = tmp_path / "sts.db"
    store = SqliteStore(path)
    store.revoke_subject(SubjectRevocation(AGENT, 0, 0, ADMIN, "lifted"), keep_until=None)
    assert counter(path) == 2
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_many_changes, args=(store, 40)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert counter(path) == 2 + 3 * 40 * 2  # every change: odd, then even again


def test_a_deleted_counter_file_keeps_nothing_until_one_exists_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_changes, "FILE_CHECK_SECONDS", 0.0)  # checked on every read, not 4 a second
    clock = FakeClock()
    path = tmp_path / "sts.db"
    store = SqliteStore(path, clock=clock)
    other = SqliteStore(path, clock=clock)  # another handle, as another process has
    assert store.issuance_checks(AGENT).revocation is None
    changes = Path(os.path.realpath(path) + SUFFIX)
    changes.unlink()
    write_behind_the_counter(path, clock())
    assert store.issuance_checks(AGENT).revocation is not None  # the file is gone: nothing kept
    assert changes.exists()  # the reader opened the file the path names now
    other.revoke_subject(SubjectRevocation(AGENT, 0, 0, ADMIN, "lifted"), keep_until=None)
    assert counter(path) == 2  # the other handle followed the path to the new file
    lifted = store.issuance_checks(AGENT).revocation
    assert lifted is not None and not lifted.blocks_issuance(clock())
    write_behind_the_counter(path, clock())  # a kill switch again, behind the new counter's back
    kept = store.issuance_checks(AGENT).revocation
    assert kept is not None and not kept.blocks_issuance(clock())  # kept again: one new file, one counter


def test_a_writer_waits_for_the_counter_lock_no_longer_than_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "sts.db"
    store = SqliteStore(path, busy_timeout=0.2)
    store.issuance_checks(AGENT)
    held = os.open(os.path.realpath(path) + SUFFIX, os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # a writer of another process, stuck
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as refused:
            store.revoke_subject(cut_off(time.time()), keep_until=None)
        assert 0.2 <= time.monotonic() - started < 2
        assert refused.value.detail is not None and "change lock" in refused.value.detail
    finally:
        os.close(held)
    assert store.issuance_checks(AGENT).revocation is None  # refused before anything was written
