"""``sqlite:///abs/path``: the embedded default store, one file shared by every worker process.

Owns the SQLite schema and the JSON form of records in it. The file is in WAL mode with
``synchronous=NORMAL`` (readers never wait for the writer; a power cut may lose the last commits, an
application crash loses nothing). Each thread has its own connection; processes meet at the file, so
every check-and-set (counters, budgets, ``use_once``, creation, completion) is one atomic statement
(``INSERT … ON CONFLICT DO UPDATE … WHERE … RETURNING``, SQLite ≥ 3.35), never a read then a write.

The ``tokens`` table (the live view's index of issued tokens) was added without a schema version bump:
it is created when missing, and a build without it ignores it.

Every row carries ``expires_at`` (NULL: kept forever); reads ignore rows past it and writes delete them
at most once per :data:`SWEEP_INTERVAL` seconds per store, so the file stays bounded.

The kill switch and exceptions every exchange reads (:meth:`SqliteStore.issuance_checks`) are kept in
each process's memory while the file's change counter (:mod:`sts.store.sqlite_changes`) has not moved,
one second at most: every write of them moves it, from any process.

Imports only ``sts.store`` of the project.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from sts.store import (
    RETENTION_SECONDS,
    AlreadyExists,
    Budget,
    ExceptionGrant,
    IssuanceChecks,
    StoreCondition,
    StoreLoss,
    StoreUnavailable,
    SubjectRevocation,
    TaskRecord,
    TokenRecord,
    TokenState,
    decode,
    exception_from,
    label,
    record_json,
    subject_from,
    task_from,
    token_from,
    window_kept_until,
    withdrawn,
)
from sts.store.sqlite_changes import ChangeGeneration, Generation

log = logging.getLogger(__name__)

# Expired rows are deleted by a write at most this often (per store object, so per worker process).
SWEEP_INTERVAL = 60
# At most this many expired rows per table per sweep: the sweep runs on whichever write comes first
# and holds the file's write lock meanwhile, so its length is a stall of every writer (a request's
# rate-limit lease among them). Deleting a minute of a busy server's index entries at once (~146,000
# rows) took 1.3 s; 5,000 took 127 ms (from a 300,000-row table), and in a 10-minute soak at N = 64
# batches of 5,000 still put 200 ms into the p99 of half the 30 s samples: 1,000 (~25 ms) instead.
SWEEP_BATCH = 1000
# When a table had more expired rows than one batch, the next sweep comes this soon (seconds): 4,000
# rows a second per process, above the ~2,500 index entries a second a 2-core server writes.
SWEEP_BACKLOG_INTERVAL = 0.25
# Bumped when the schema changes; a file written by a newer build is refused rather than misread.
SCHEMA_VERSION = 1

_TABLES = ("tasks", "revoked_jti", "subject_revocations", "exceptions", "counters", "once", "tokens")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, record TEXT NOT NULL, completed_at INTEGER, completed_by TEXT,
    expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_jti (jti TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS subject_revocations (
    spiffe_id TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at INTEGER);
CREATE TABLE IF NOT EXISTS exceptions (
    id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, created_at INTEGER NOT NULL, record TEXT NOT NULL,
    expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS exceptions_by_workload ON exceptions (spiffe_id, created_at);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS once (key TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY, task_id TEXT, spiffe_id TEXT NOT NULL, issued_at INTEGER NOT NULL,
    record TEXT NOT NULL, expires_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tokens_by_task ON tokens (task_id, issued_at) WHERE task_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tokens_by_subject ON tokens (spiffe_id, issued_at);
""" + "".join(f"CREATE INDEX IF NOT EXISTS {t}_expiry ON {t} (expires_at);\n" for t in _TABLES)

# ?1 key, ?2 expires_at, ?3 now: a live row counts on, an expired one starts again at 1.
_COUNT = """
INSERT INTO counters (key, value, expires_at) VALUES (?1, 1, ?2)
ON CONFLICT (key) DO UPDATE SET
    value = CASE WHEN counters.expires_at > ?3 THEN counters.value + 1 ELSE 1 END,
    expires_at = excluded.expires_at
RETURNING value
"""
# As _COUNT, but a live row at ?4 (the limit) is left alone and nothing is returned.
_TAKE = _COUNT.replace("RETURNING", "WHERE counters.expires_at <= ?3 OR counters.value < ?4\nRETURNING")
_USE_ONCE = """
INSERT INTO once (key, expires_at) VALUES (?1, ?2)
ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at WHERE once.expires_at <= ?3
RETURNING 1
"""
# Ids are taken while their row is live; an expired row may be replaced (as in the memory store).
_CREATE_TASK = """
INSERT INTO tasks (id, record, completed_at, completed_by, expires_at) VALUES (?1, ?2, NULL, NULL, ?3)
ON CONFLICT (id) DO UPDATE SET
    record = excluded.record, completed_at = NULL, completed_by = NULL, expires_at = excluded.expires_at
WHERE tasks.expires_at <= ?4
RETURNING 1
"""
_ADD_EXCEPTION = """
INSERT INTO exceptions (id, spiffe_id, created_at, record, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (id) DO UPDATE SET
    spiffe_id = excluded.spiffe_id, created_at = excluded.created_at, record = excluded.record,
    expires_at = excluded.expires_at
WHERE exceptions.expires_at <= ?6
RETURNING 1
"""
_RECORD_TOKEN = """
INSERT OR REPLACE INTO tokens (jti, task_id, spiffe_id, issued_at, record, expires_at)
VALUES (?, ?, ?, ?, ?, ?)
"""
ROWS_PER_INSERT = 100  # 600 parameters: under SQLite's oldest limit of 999 per statement


@functools.lru_cache(maxsize=8)
def _record_tokens_sql(rows: int) -> str:
    """``_RECORD_TOKEN`` for ``rows`` rows in one statement (later rows replace earlier ones, as in order)."""
    one = "(?, ?, ?, ?, ?, ?)"
    return _RECORD_TOKEN.replace(f"VALUES {one}", "VALUES " + ", ".join([one] * rows))


# One statement, one snapshot: the three things that can make a token inactive.
_TOKEN_STATE = """
SELECT j.jti, t.record, t.completed_at, t.completed_by, s.record
FROM (SELECT 1)
LEFT JOIN revoked_jti AS j ON j.jti = ?1 AND j.expires_at > ?4
LEFT JOIN tasks AS t ON t.id = ?2 AND t.expires_at > ?4
LEFT JOIN subject_revocations AS s ON s.spiffe_id = ?3 AND (s.expires_at IS NULL OR s.expires_at > ?4)
"""

# ?1 spiffe_id, ?2 now: the kill switch (at most one row, the primary key) first, then the live
# exceptions oldest first, as ``exceptions`` orders them; the kind column tells the two apart.
_KILL_SWITCH_ROW = 0
_ISSUANCE_CHECKS = """
SELECT 0, record, 0, '', expires_at FROM subject_revocations
WHERE spiffe_id = ?1 AND (expires_at IS NULL OR expires_at > ?2)
UNION ALL
SELECT 1, record, created_at, id, expires_at FROM exceptions WHERE spiffe_id = ?1 AND expires_at > ?2
ORDER BY 1, 3, 4
"""
# How long a process keeps a workload's issuance checks in memory at most, whatever the change
# counter says (sts.store.sqlite_changes: what a writer unaware of the counter could change), and
# how many workloads it keeps (then it starts again from none).
ISSUANCE_KEPT_SECONDS = 1.0
ISSUANCE_KEPT_ENTRIES = 10_000

_P = ParamSpec("_P")
_R = TypeVar("_R")


_Method = Callable[Concatenate["SqliteStore", _P], _R]


def _answers(method: _Method[_P, _R]) -> _Method[_P, _R]:
    """Turn every SQLite failure (locked past the busy timeout, I/O, corruption) into StoreUnavailable."""

    @functools.wraps(method)
    def guarded(self: SqliteStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"sqlite {self.path}: {exc}", backend="sqlite", operation=method.__name__
            ) from exc
        except StoreUnavailable as exc:  # corrupt record, closed store: name where it happened
            label(exc, "sqlite", method.__name__)
            raise
        except OSError as exc:  # the change counter's file (sts.store.sqlite_changes)
            raise StoreUnavailable(
                f"sqlite {self.path}: change counter: {exc}", backend="sqlite", operation=method.__name__
            ) from exc

    return guarded


@dataclass(frozen=True, slots=True)
class _KeptChecks:
    """One workload's issuance-check rows, decoded, as read under change generation ``generation``."""

    generation: Generation
    read_at: float
    revocation: tuple[SubjectRevocation, float | None] | None  # with its row's expires_at
    exceptions: tuple[tuple[ExceptionGrant, float], ...]

    def at(self, now: float) -> IssuanceChecks:
        """What the statement would read at ``now`` (no write since): its rows not yet expired."""
        revocation = None
        if self.revocation is not None and (self.revocation[1] is None or self.revocation[1] > now):
            revocation = self.revocation[0]
        return IssuanceChecks(revocation, [grant for grant, expires in self.exceptions if expires > now])


class _PerThread(threading.local):
    conn: sqlite3.Connection | None = None
    pid: int = 0


class SqliteStore:
    """The :class:`~sts.store.Store` in one SQLite file; safe across threads and processes.

    ``busy_timeout`` bounds how long a call waits for another process's write lock before it fails
    with StoreUnavailable.
    """

    def __init__(
        self, path: Path, *, clock: Callable[[], float] = time.time, busy_timeout: float = 5.0
    ) -> None:
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise StoreUnavailable(
                f"SQLite {sqlite3.sqlite_version} is too old; 3.35 or newer is needed",
                backend="sqlite",
                operation="open",
            )
        self.path = path
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._local = _PerThread()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._next_sweep = 0.0
        self._kept: dict[str, _KeptChecks] = {}
        try:
            _create_private(path)
        except OSError as exc:
            raise StoreUnavailable(f"sqlite {path}: {exc}", backend="sqlite", operation="open") from exc
        self._open_schema()
        self._changes = ChangeGeneration.beside(path, lock_timeout=busy_timeout)

    @_answers
    def _open_schema(self) -> None:
        conn = self._conn()
        # WAL is a property of the file: set it once. Switching needs an exclusive lock that SQLite does not
        # wait for, so when several processes open a new file together, retry until one of them has set it.
        deadline = time.monotonic() + self._busy_timeout
        while conn.execute("PRAGMA journal_mode").fetchall()[0][0] != "wal":
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with _immediate(conn):
            version = conn.execute("PRAGMA user_version").fetchall()[0][0]
            if version > SCHEMA_VERSION:
                newer = f"schema version {version} is newer than this build's {SCHEMA_VERSION}"
                raise StoreUnavailable(f"sqlite {self.path}: {newer}")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @_answers
    def ping(self) -> None:
        self._conn().execute("SELECT count(*) FROM sqlite_master").fetchall()

    # Tasks

    @_answers
    def create_task(self, task: TaskRecord) -> None:
        conn, now = self._writer()
        keep = task.deadline + RETENTION_SECONDS
        if not conn.execute(_CREATE_TASK, (task.id, record_json(task), keep, now)).fetchall():
            raise AlreadyExists(task.id)

    @_answers
    def get_task(self, task_id: str) -> TaskRecord | None:
        rows = (
            self._conn()
            .execute(
                "SELECT record, completed_at, completed_by FROM tasks WHERE id = ? AND expires_at > ?",
                (task_id, self._clock()),
            )
            .fetchall()
        )
        return _task_row(*rows[0]) if rows else None

    @_answers
    def complete_task(self, task_id: str, *, at: int, by: str) -> TaskRecord | None:
        conn, now = self._writer()
        # The condition on completed_at makes the first completion win, whichever process it came from.
        conn.execute(
            "UPDATE tasks SET completed_at = ?, completed_by = ?"
            " WHERE id = ? AND expires_at > ? AND completed_at IS NULL",
            (at, by, task_id, now),
        )
        return self.get_task(task_id)

    @_answers
    def active_task_count(self, now: float) -> int:
        # A task's row is kept until deadline + retention, so its deadline is expires_at - retention.
        rows = (
            self._conn()
            .execute(
                "SELECT count(*) FROM tasks WHERE completed_at IS NULL AND expires_at > ?",
                (now + RETENTION_SECONDS,),
            )
            .fetchall()
        )
        return int(rows[0][0])

    @_answers
    def list_tasks(
        self, *, now: float, assignee: str | None = None, active_only: bool = False, limit: int
    ) -> list[TaskRecord]:
        # Tasks are few (live ones plus a day of ended ones); the assignee lives in the JSON record, so
        # it is matched here rather than with json_extract (not in every SQLite build).
        floor = now + RETENTION_SECONDS if active_only else self._clock()
        query = "SELECT record, completed_at, completed_by FROM tasks WHERE expires_at > ?"
        if active_only:
            query += " AND completed_at IS NULL"
        rows = self._conn().execute(query, (floor,)).fetchall()
        tasks = [_task_row(*row) for row in rows]
        chosen = [t for t in tasks if assignee is None or t.assignee == assignee]
        return sorted(chosen, key=lambda t: (-t.created_at, t.id))[: max(0, limit)]

    @_answers
    def record_token(self, token: TokenRecord, *, budget: Budget | None = None) -> bool:
        conn, now = self._writer()
        values = (
            token.jti,
            token.task_id,
            token.spiffe_id,
            token.issued_at,
            record_json(token),
            token.expires_at,
        )
        if budget is None:
            conn.execute(_RECORD_TOKEN, values)  # one autocommit statement
            return True
        if budget.limit <= 0:
            return False
        # The budget and the index entry in one transaction: one commit, as take_budget alone was.
        with _immediate(conn):
            if not conn.execute(
                _TAKE, (f"budget:{budget.key}", budget.expires_at, now, budget.limit)
            ).fetchall():
                return False
            conn.execute(_RECORD_TOKEN, values)
        return True

    @_answers
    def record_tokens(self, tokens: Sequence[TokenRecord]) -> None:
        if not tokens:
            return
        conn, _ = self._writer()
        rows = [
            (t.jti, t.task_id, t.spiffe_id, t.issued_at, record_json(t), t.expires_at) for t in tokens
        ]
        # One commit for the whole batch, and one statement per ROWS_PER_INSERT rows rather than one
        # per row: the sqlite3 module gives up the GIL around every step and must win it back from
        # the request thread each time, while this transaction holds the file's write lock (measured:
        # executemany held it 10-20 ms per batch of ~150 under load, so requests' writes queued).
        with _immediate(conn):
            for start in range(0, len(rows), ROWS_PER_INSERT):
                chunk = rows[start : start + ROWS_PER_INSERT]
                conn.execute(_record_tokens_sql(len(chunk)), [value for row in chunk for value in row])

    @_answers
    def tokens(
        self, *, task_id: str | None = None, spiffe_id: str | None = None, limit: int
    ) -> list[TokenRecord]:
        column, value = ("task_id", task_id) if task_id is not None else ("spiffe_id", spiffe_id)
        query = (
            f"SELECT record FROM tokens WHERE {column} = ? AND expires_at > ?"  # noqa: S608 (a fixed name)
            " ORDER BY issued_at DESC, jti LIMIT ?"
        )
        rows = self._conn().execute(query, (value, self._clock(), max(0, limit))).fetchall()
        return [token_from(decode(record)) for (record,) in rows]

    # Revocation

    @_answers
    def revoke_jti(self, jti: str, *, expires_at: int) -> None:
        conn, _ = self._writer()
        conn.execute(
            "INSERT INTO revoked_jti (jti, expires_at) VALUES (?, ?) ON CONFLICT (jti)"
            " DO UPDATE SET expires_at = max(revoked_jti.expires_at, excluded.expires_at)",
            (jti, expires_at),
        )

    @_answers
    def revoke_subject(self, revocation: SubjectRevocation, *, keep_until: int | None) -> None:
        conn, _ = self._writer()
        with self._changing():
            conn.execute(
                "INSERT OR REPLACE INTO subject_revocations (spiffe_id, record, expires_at) VALUES (?, ?, ?)",
                (revocation.spiffe_id, record_json(revocation), keep_until),
            )

    @_answers
    def subject_revocation(self, spiffe_id: str) -> SubjectRevocation | None:
        rows = (
            self._conn()
            .execute(
                "SELECT record FROM subject_revocations"
                " WHERE spiffe_id = ? AND (expires_at IS NULL OR expires_at > ?)",
                (spiffe_id, self._clock()),
            )
            .fetchall()
        )
        return subject_from(decode(rows[0][0])) if rows else None

    @_answers
    def issuance_checks(self, spiffe_id: str) -> IssuanceChecks:
        """The kill switch and the exceptions in one statement, read at one instant: the same rows as
        :meth:`subject_revocation` and :meth:`exceptions`, for one pass through SQLite instead of two
        (every exchange reads this; measured 20 -> 8 us).

        Kept in memory under the change generation (:mod:`sts.store.sqlite_changes`) for at most
        :data:`ISSUANCE_KEPT_SECONDS`: a kept read is used only while no kill switch or exception
        of the file has been written since, by any process, and is filtered by expiry at ``now`` as
        the statement would be.
        """
        if self._closed:
            raise StoreUnavailable(f"sqlite {self.path}: store closed")
        changes = self._changes
        generation = changes.current() if changes is not None else None  # before SQLite
        now = self._clock()
        kept = self._kept.get(spiffe_id)
        if (
            kept is not None
            and kept.generation == generation
            and kept.read_at <= now < kept.read_at + ISSUANCE_KEPT_SECONDS
        ):
            return kept.at(now)
        rows = self._conn().execute(_ISSUANCE_CHECKS, (spiffe_id, now)).fetchall()
        revocation: tuple[SubjectRevocation, float | None] | None = None
        grants: list[tuple[ExceptionGrant, float]] = []
        for kind, record, _created_at, _id, expires_at in rows:
            if kind == _KILL_SWITCH_ROW:
                revocation = (subject_from(decode(record)), expires_at)
            else:
                grants.append((exception_from(decode(record)), expires_at))
        read = _KeptChecks(generation or (0, 0), now, revocation, tuple(grants))
        if generation is not None:
            if len(self._kept) >= ISSUANCE_KEPT_ENTRIES:
                self._kept.clear()
            self._kept[spiffe_id] = read
        return read.at(now)

    @_answers
    def subject_revocations(self, *, limit: int) -> list[SubjectRevocation]:
        rows = (
            self._conn()
            .execute(
                "SELECT record FROM subject_revocations WHERE expires_at IS NULL OR expires_at > ?",
                (self._clock(),),
            )
            .fetchall()
        )
        kept = [subject_from(decode(record)) for (record,) in rows]
        return sorted(kept, key=lambda r: (-r.revoked_at, r.spiffe_id))[: max(0, limit)]

    @_answers
    def token_state(self, jti: str, task_id: str | None, spiffe_id: str) -> TokenState:
        jti_row, task, done_at, done_by, subject = (
            self._conn().execute(_TOKEN_STATE, (jti, task_id, spiffe_id, self._clock())).fetchall()[0]
        )
        return TokenState(
            jti_revoked=jti_row is not None,
            task=_task_row(task, done_at, done_by) if task is not None else None,
            subject_revocation=subject_from(decode(subject)) if subject is not None else None,
        )

    # Break-glass exceptions

    @_answers
    def add_exception(self, grant: ExceptionGrant) -> None:
        conn, now = self._writer()
        keep = grant.expires_at + RETENTION_SECONDS
        values = (grant.id, grant.spiffe_id, grant.created_at, record_json(grant), keep, now)
        with self._changing():
            added = conn.execute(_ADD_EXCEPTION, values).fetchall()
        if not added:
            raise AlreadyExists(grant.id)

    @_answers
    def withdraw_exception(self, grant_id: str, *, at: int, by: str, reason: str) -> ExceptionGrant | None:
        conn, now = self._writer()
        # Read and rewrite under the write lock: two withdrawals (any process) cannot interleave.
        with self._changing(), _immediate(conn):
            rows = conn.execute(
                "SELECT record FROM exceptions WHERE id = ? AND expires_at > ?", (grant_id, now)
            ).fetchall()
            if not rows:
                return None
            grant = exception_from(decode(rows[0][0]))
            done = withdrawn(grant, at=at, by=by, reason=reason)
            if done is not grant:
                conn.execute("UPDATE exceptions SET record = ? WHERE id = ?", (record_json(done), grant_id))
        return done

    @_answers
    def exceptions(self, spiffe_id: str | None = None) -> list[ExceptionGrant]:
        now = self._clock()
        if spiffe_id is None:
            query = "SELECT record FROM exceptions WHERE expires_at > ? ORDER BY created_at, id"
            rows = self._conn().execute(query, (now,)).fetchall()
        else:
            query = (
                "SELECT record FROM exceptions WHERE spiffe_id = ? AND expires_at > ? ORDER BY created_at, id"
            )
            rows = self._conn().execute(query, (spiffe_id, now)).fetchall()
        return [exception_from(decode(record)) for (record,) in rows]

    # Counters shared by every process

    @_answers
    def count_in_window(self, key: str, *, window: int, now: float) -> int:
        conn, current = self._writer()
        slot = int(now // window)
        ends = window_kept_until(slot, window)
        rows = conn.execute(_COUNT, (f"window:{key}:{slot}", ends, current)).fetchall()
        return int(rows[0][0])

    @_answers
    def lease_in_window(self, key: str, *, want: int, limit: int, window: int, now: float) -> int:
        conn, current = self._writer()
        slot = int(now // window)
        name = f"window:{key}:{slot}"  # the row count_in_window keeps: the same counter
        # Read then write under the write lock: no other process can take units in between.
        with _immediate(conn):
            rows = conn.execute(
                "SELECT value FROM counters WHERE key = ? AND expires_at > ?", (name, current)
            ).fetchall()
            used = int(rows[0][0]) if rows else 0
            granted = max(0, min(want, limit - used))
            if granted:
                conn.execute(
                    "INSERT OR REPLACE INTO counters (key, value, expires_at) VALUES (?, ?, ?)",
                    (name, used + granted, window_kept_until(slot, window)),
                )
        return granted

    @_answers
    def take_budget(self, key: str, *, limit: int, expires_at: int) -> bool:
        if limit <= 0:
            return False
        conn, now = self._writer()
        return bool(conn.execute(_TAKE, (f"budget:{key}", expires_at, now, limit)).fetchall())

    @_answers
    def use_once(self, key: str, *, expires_at: int) -> bool:
        conn, now = self._writer()
        return bool(conn.execute(_USE_ONCE, (key, expires_at, now)).fetchall())

    def condition(self) -> StoreCondition:
        return StoreCondition()

    def acknowledge_loss(self, *, by: str, reason: str, at: int) -> StoreLoss | None:
        return None  # one file on one host: it is not shared by replicas that could disagree about it

    def check_durability(self) -> str | None:
        return None  # WAL with synchronous=NORMAL: an application crash loses nothing (module docstring)

    def close(self) -> None:
        """Close every thread's connection; later calls raise StoreUnavailable."""
        self._closed = True
        with self._all_lock:
            connections, self._all = self._all, []
        for conn in connections:
            conn.close()
        if self._changes is not None:
            self._changes.close()

    # Connections and housekeeping

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and again in a forked child: never shared)."""
        local = self._local
        if self._closed:
            raise StoreUnavailable(f"sqlite {self.path}: store closed")
        if local.conn is None or local.pid != os.getpid():
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA synchronous = NORMAL")
            local.conn, local.pid = conn, os.getpid()
            with self._all_lock:
                self._all.append(conn)
        return local.conn

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Around a write of kill switches or exceptions (committed inside): moves the change counter.

        Another process's lock held past the busy timeout refuses the write (StoreUnavailable), as
        SQLite's own lock does. Without a counter (its file cannot be opened here, nor written) the
        write still goes ahead and says so: refusing a kill switch would be worse than other processes
        seeing it up to :data:`ISSUANCE_KEPT_SECONDS` late.
        """
        changes = self._changes
        if changes is None:  # opened again for every write: readers elsewhere need it moved
            changes = self._changes = ChangeGeneration.beside(self.path, lock_timeout=self._busy_timeout)
        with ExitStack() as moved:
            try:
                if changes is None:
                    raise FileNotFoundError("no change counter")
                moved.enter_context(changes.changing())
            except TimeoutError:
                raise
            except OSError as e:
                log.error(  # noqa: TRY400 (the cause is the message; no traceback of ours)
                    "sqlite %s: this kill switch or exception is written without moving the change counter"
                    " (%s): other processes see it within %g s, not at once",
                    self.path,
                    e,
                    ISSUANCE_KEPT_SECONDS,
                )
            yield

    def _writer(self) -> tuple[sqlite3.Connection, float]:
        """The connection and the time for a write, after deleting expired rows if one is due."""
        conn, now = self._conn(), self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            backlog = False
            with _immediate(conn):
                for table in _TABLES:
                    deleted = conn.execute(
                        f"DELETE FROM {table} WHERE rowid IN"  # noqa: S608 (fixed table names)
                        f" (SELECT rowid FROM {table} WHERE expires_at <= ? LIMIT ?)",
                        (now, SWEEP_BATCH),
                    ).rowcount
                    backlog |= deleted >= SWEEP_BATCH
            if backlog:  # more expired than one batch: keep up in short steps, not one long stall
                self._next_sweep = now + SWEEP_BACKLOG_INTERVAL
        return conn, now


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock up front, so it never fails half-way on an upgrade."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _create_private(path: Path) -> None:
    """Create the parent directory and an empty database file readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _task_row(record: str, completed_at: int | None, completed_by: str | None) -> TaskRecord:
    """A task row: the JSON record, with its completion from the columns that make it atomic."""
    return task_from(decode(record), completed_at=completed_at, completed_by=completed_by)
