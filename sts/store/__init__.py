"""Shared state behind one protocol: tasks, revocations, exceptions, rate and budget counters.

Three backends implement :class:`Store`: ``memory://`` (tests, one process), ``sqlite:///path`` (the
embedded default: WAL, survives restarts, safe across worker processes) and ``redis://`` (replicas).
Every record carries the time it stops mattering, so storage stays bounded by live tasks and tokens.
Issued tokens are not needed to decide anything: a token is inactive when its ``jti`` is revoked, its
task is over, or its subject is cut off, and each of those is one small record. For the operators' live
view each issued token is also indexed (:class:`TokenRecord`, by task and by subject), written in the
same store write as the task budget when there is one, and dropped when the token expires.

A backend that cannot answer raises :class:`StoreUnavailable` (``temporarily_unavailable``, 503): the
callers refuse rather than guess (fail closed).

A shared store can also lose what it held (a flushed, replaced or rolled-back Redis): the Redis backend
detects that with a store epoch (``sts.store.epoch``) and reports it through :meth:`Store.condition`
(a :class:`StoreLoss`); while a loss is in force, reads that would prove a kill switch raise
:class:`StoreLost`, tokens issued before the loss are inactive, and :meth:`Store.acknowledge_loss`
(an administrator) ends it. The other backends never report a loss.

Imports ``sts.errors`` only; the record types are plain values.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sts.errors import TemporarilyUnavailable

# How long ended tasks and expired exceptions stay readable (listed as ended) before they are dropped.
RETENTION_SECONDS = 24 * 3600
# A window's counter outlives its window by this many seconds. The window is in the counter's name,
# so a later window never reads it; what the grace keeps is the count for a caller whose clock lags
# the store's (a Redis server's clock, another replica's) or whose lease waited behind the write lock
# past the window's end: expired at the end by the store's clock, that caller would read 0 used and
# be granted the whole limit again. Covers a lag up to this long.
WINDOW_GRACE_SECONDS = 30


def window_kept_until(slot: int, window: int) -> int:
    """When the store forgets the counter of fixed window ``slot`` (of ``window`` seconds): its end and
    :data:`WINDOW_GRACE_SECONDS`. Every backend's ``count_in_window`` and ``lease_in_window`` use it."""
    return (slot + 1) * window + WINDOW_GRACE_SECONDS


class StoreUnavailable(TemporarilyUnavailable):
    """The state store did not answer; nothing is decided without it.

    ``backend`` (``memory``, ``sqlite``, ``redis``) and ``operation`` (the store method) are set by the
    backend that raises it, so ``sts_store_operation_errors_total{backend, operation}`` can say which
    store call is failing without parsing ``detail``.
    """

    def __init__(self, detail: str, *, backend: str = "unknown", operation: str = "unknown") -> None:
        super().__init__("state store unavailable", detail=detail)
        self.backend = backend
        self.operation = operation


def label(exc: StoreUnavailable, backend: str, operation: str) -> None:
    """Fill in where a StoreUnavailable raised below a backend method happened (left alone if known)."""
    if exc.backend == "unknown":
        exc.backend = backend
    if exc.operation == "unknown":
        exc.operation = operation


class StoreLost(StoreUnavailable):
    """The shared store lost what it held; kill switches cannot be proven until an admin acknowledges."""

    def __init__(self, detail: str, *, backend: str = "unknown", operation: str = "unknown") -> None:
        super().__init__(detail, backend=backend, operation=operation)
        self.description = (
            "the state store lost its data; exchanges resume once an administrator acknowledges the loss"
        )


class AlreadyExists(ValueError):
    """A record with this id exists already (ids are never reused)."""


@dataclass(frozen=True, slots=True)
class TaskTarget:
    """One target a task may use, with the scopes it declared."""

    target: str
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as stored: who created it, for whom, what it may touch, until when, and how it ended."""

    id: str
    creator: str
    assignee: str
    targets: tuple[TaskTarget, ...]
    purpose: str
    created_at: int
    deadline: int
    completed_at: int | None = None
    completed_by: str | None = None

    def status(self, now: float) -> str:
        """``active``, ``completed`` or ``expired`` at ``now``."""
        if self.completed_at is not None:
            return "completed"
        return "expired" if now >= self.deadline else "active"

    @property
    def ended_at(self) -> int:
        """When the task stopped (or will stop) allowing access."""
        return self.completed_at if self.completed_at is not None else self.deadline


@dataclass(frozen=True, slots=True)
class SubjectRevocation:
    """The kill switch for one SPIFFE ID: tokens issued up to ``revoked_at`` are dead, and no new one is
    issued before ``until`` (forever when None)."""

    spiffe_id: str
    revoked_at: int
    until: int | None
    by: str
    reason: str

    def blocks_issuance(self, now: float) -> bool:
        return self.until is None or now < self.until


@dataclass(frozen=True, slots=True)
class ExceptionGrant:
    """Break-glass: extra access for one workload to one target's scopes, always with an end."""

    id: str
    spiffe_id: str
    target: str
    scopes: frozenset[str]
    reason: str
    granted_by: str
    created_at: int
    expires_at: int
    # Withdrawn early by an administrator (``sts admin withdraw-exception``): inactive from then on.
    withdrawn_at: int | None = None
    withdrawn_by: str | None = None
    withdraw_reason: str | None = None

    def active(self, now: float) -> bool:
        ends = self.expires_at if self.withdrawn_at is None else min(self.expires_at, self.withdrawn_at)
        return self.created_at <= now < ends

    def status(self, now: float) -> str:
        """``active``, ``withdrawn`` or ``expired`` at ``now``."""
        if self.active(now):
            return "active"
        return "withdrawn" if self.withdrawn_at is not None and self.withdrawn_at <= now else "expired"


@dataclass(frozen=True, slots=True)
class IssuanceChecks:
    """A workload's kill switch (if any is kept) and its exceptions live now, read together."""

    revocation: SubjectRevocation | None
    exceptions: list[ExceptionGrant]


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One issued token in the live view's index (never the token itself): kept until ``expires_at``."""

    jti: str
    spiffe_id: str  # its ``sub``
    target: str
    token_class: str
    issued_at: int
    expires_at: int
    binding: str  # "none", "dpop" or "mtls"
    task_id: str | None = None
    exception_id: str | None = None  # the break-glass exception it was issued under, if any


@dataclass(frozen=True, slots=True)
class Budget:
    """A task's token budget, taken in the same store write that records the token."""

    key: str
    limit: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class TokenState:
    """What the store knows about one token, read in one round trip for introspection."""

    jti_revoked: bool
    task: TaskRecord | None
    subject_revocation: SubjectRevocation | None


@dataclass(frozen=True, slots=True)
class StoreLoss:
    """A loss of the shared store, as recorded in its epoch (``sts.store.epoch``).

    Every token issued at or before ``not_before`` is inactive from then on, on every replica. Until the
    loss is acknowledged (and ``not_before`` has passed) exchanges are refused, because no kill switch can
    be proven; ``reasserted`` kill switches were written back from this process's memory of the kill list.
    """

    epoch: str  # the epoch that records the loss
    previous: str | None  # the epoch that was lost (None: first seen by a process that knew none)
    cause: str  # "vanished", "replaced" or "rolled back"
    detected_at: float
    detected_by: str  # host:pid of the process that detected it
    not_before: int
    acknowledged_at: int | None = None
    acknowledged_by: str | None = None
    reason: str | None = None
    reasserted: int = 0

    @property
    def acknowledged(self) -> bool:
        return self.acknowledged_at is not None


@dataclass(frozen=True, slots=True)
class StoreCondition:
    """What this process knows about the store beyond "it answers": continuity and durability.

    ``lost`` is the gauge: 1 while a loss is in force (exchanges refused), else 0.
    """

    lost: bool = False
    loss: StoreLoss | None = None  # the latest loss known, acknowledged or not
    epoch: str | None = None
    not_before: int = 0  # tokens issued at or before it are inactive (0: none)
    durability: str | None = None  # "replica" (WAIT), "aof", "none"; None: not applicable or not known yet
    warnings: tuple[str, ...] = ()

    @property
    def lost_gauge(self) -> int:
        """1 while exchanges are refused because of a store loss, else 0 (a Prometheus gauge)."""
        return int(self.lost)


_TOLERATE_LOSS: contextvars.ContextVar[bool] = contextvars.ContextVar("sts_tolerate_loss", default=False)


@contextlib.contextmanager
def tolerating_store_loss() -> Iterator[None]:
    """Within the block, a kill-switch read during a store loss answers with what the store holds now
    (the re-asserted kill list) instead of raising :class:`StoreLost`: the one caller that needs this is
    the administrator acknowledging the loss, whose own kill switch cannot be proven either."""
    token = _TOLERATE_LOSS.set(True)
    try:
        yield
    finally:
        _TOLERATE_LOSS.reset(token)


def store_loss_tolerated() -> bool:
    return _TOLERATE_LOSS.get()


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """The ``store.redis`` settings, as the Redis store needs them (``sts.store.redis_connect``)."""

    require_durability: bool = True
    wait_timeout: float = 2.0  # seconds a durable write waits for a replica (WAIT)
    master_name: str = "mymaster"
    username: str | None = None
    password_file: Path | None = None
    sentinel_password_file: Path | None = None
    tls_ca_file: Path | None = None


class Store(Protocol):
    """The state every replica shares. All methods may raise StoreUnavailable."""

    def ping(self) -> None:
        """Raise StoreUnavailable unless the backend answers right now."""

    # Tasks
    def create_task(self, task: TaskRecord) -> None:
        """Store a new task (AlreadyExists if the id is taken); kept until deadline + retention."""

    def get_task(self, task_id: str) -> TaskRecord | None: ...

    def complete_task(self, task_id: str, *, at: int, by: str) -> TaskRecord | None:
        """Mark the task completed (the first completion wins, later calls return it); None if unknown."""

    def active_task_count(self, now: float) -> int:
        """How many tasks are active at ``now`` (not completed, deadline not reached): a gauge."""

    # Revocation
    def revoke_jti(self, jti: str, *, expires_at: int) -> None:
        """Remember ``jti`` as revoked until the token would have expired anyway."""

    def revoke_subject(self, revocation: SubjectRevocation, *, keep_until: int | None) -> None:
        """Store (replace) the kill switch of one SPIFFE ID; kept until ``keep_until`` (forever if None)."""

    def subject_revocation(self, spiffe_id: str) -> SubjectRevocation | None: ...

    def token_state(self, jti: str, task_id: str | None, spiffe_id: str) -> TokenState:
        """Everything that can make a token inactive, in one round trip."""

    # Break-glass exceptions
    def add_exception(self, grant: ExceptionGrant) -> None:
        """Store a grant (AlreadyExists if the id is taken); kept until expires_at + retention."""

    def exceptions(self, spiffe_id: str | None = None) -> list[ExceptionGrant]:
        """Grants of one workload (or all), active and recently expired, oldest first."""

    def withdraw_exception(self, grant_id: str, *, at: int, by: str, reason: str) -> ExceptionGrant | None:
        """End a grant early (the first withdrawal wins, later calls return it); None if unknown."""

    def subject_revocations(self, *, limit: int) -> list[SubjectRevocation]:
        """Kill switches still kept (in force, or still ending older tokens), newest first."""

    def issuance_checks(self, spiffe_id: str) -> IssuanceChecks:
        """What an exchange for ``spiffe_id`` reads before it issues: its kill switch and its live
        exceptions, in one round trip (``subject_revocation`` and ``exceptions`` together)."""

    # The live view
    def list_tasks(
        self, *, now: float, assignee: str | None = None, active_only: bool = False, limit: int
    ) -> list[TaskRecord]:
        """Tasks still kept (optionally one assignee's, optionally active at ``now`` only), newest first."""

    def record_token(self, token: TokenRecord, *, budget: Budget | None = None) -> bool:
        """Index an issued token until it expires, taking one unit of ``budget`` in the same write;
        False (nothing recorded, nothing taken) when the budget is spent."""

    def record_tokens(self, tokens: Sequence[TokenRecord]) -> None:
        """Index many issued tokens (no budget) in one transaction or round trip: the batches of
        :class:`~sts.token_index.TokenIndexWriter`, stored exactly as :meth:`record_token` stores one."""

    def tokens(
        self, *, task_id: str | None = None, spiffe_id: str | None = None, limit: int
    ) -> list[TokenRecord]:
        """Unexpired indexed tokens of one task or one subject (exactly one is given), newest first."""

    # Counters shared by every replica
    def count_in_window(self, key: str, *, window: int, now: float) -> int:
        """Add one hit to ``key``'s fixed window of ``window`` seconds containing ``now``; the new count."""

    def lease_in_window(self, key: str, *, want: int, limit: int, window: int, now: float) -> int:
        """Take up to ``want`` units of ``key``'s fixed window of ``window`` seconds containing ``now``,
        which holds ``limit`` units in all, atomically for every replica: ``min(want, limit - used)``
        are granted (0 when spent) and their number returned (:mod:`sts.rate_lease` lends them out).
        The counter is kept :data:`WINDOW_GRACE_SECONDS` past the window's end."""

    def take_budget(self, key: str, *, limit: int, expires_at: int) -> bool:
        """Consume one unit of ``key``'s budget of ``limit``; False (and nothing consumed) when spent."""

    def use_once(self, key: str, *, expires_at: int) -> bool:
        """True the first time ``key`` is seen before ``expires_at``, False on every replay."""

    # Continuity and durability (only the Redis backend has anything to say)
    def condition(self) -> StoreCondition:
        """The store's continuity (a loss in force) and durability, as this process knows them; no I/O."""

    def acknowledge_loss(self, *, by: str, reason: str, at: int) -> StoreLoss | None:
        """An administrator accepts the loss in force (durably, for every replica); None: there is none."""

    def check_durability(self) -> str | None:
        """At start: why acknowledged security writes would not be durable (None: they are, or unknown)."""

    def close(self) -> None: ...


# The JSON form of records, shared by the backends that store text (SQLite, Redis).


def record_json(
    record: TaskRecord | SubjectRevocation | ExceptionGrant | TokenRecord, *, omit: tuple[str, ...] = ()
) -> str:
    """Compact JSON of a record (sets as sorted lists); ``omit`` drops fields a backend keeps elsewhere.

    The same text as ``dataclasses.asdict`` would give, without its deep copy of every value: only a
    task's targets nest records; every other field is a string, a number, None or a set of strings.
    Every plain exchange's index entry passes here (measured 38 -> 8 us per token record).
    """
    data: dict[str, Any] = {}
    for name in _FIELD_NAMES[type(record)]:
        if name not in omit:
            value = getattr(record, name)
            data[name] = [dataclasses.asdict(t) for t in value] if name == "targets" else value
    return _RECORD_JSON.encode(data)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {
    kind: tuple(f.name for f in dataclasses.fields(kind))
    for kind in (TaskRecord, SubjectRevocation, ExceptionGrant, TokenRecord)
}
_RECORD_JSON = json.JSONEncoder(default=sorted, separators=(",", ":"))


def decode(text: str | bytes) -> dict[str, Any]:
    """A stored JSON object; anything else means the store is corrupt, which we treat as unavailable."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise StoreUnavailable(f"corrupt record: {e}") from e
    if not isinstance(data, dict):
        raise StoreUnavailable("corrupt record: not a JSON object")
    return data


def task_from(data: Mapping[str, Any], **completion: Any) -> TaskRecord:
    fields = {**data, **completion}
    try:
        fields["targets"] = tuple(TaskTarget(t["target"], frozenset(t["scopes"])) for t in fields["targets"])
        return TaskRecord(**fields)
    except (KeyError, TypeError) as e:
        raise StoreUnavailable(f"corrupt task record: {e}") from e


def subject_from(data: Mapping[str, Any]) -> SubjectRevocation:
    try:
        return SubjectRevocation(**data)
    except TypeError as e:
        raise StoreUnavailable(f"corrupt revocation record: {e}") from e


def exception_from(data: Mapping[str, Any]) -> ExceptionGrant:
    try:
        return ExceptionGrant(**{**data, "scopes": frozenset(data["scopes"])})
    except (KeyError, TypeError) as e:
        raise StoreUnavailable(f"corrupt exception record: {e}") from e


def token_from(data: Mapping[str, Any]) -> TokenRecord:
    try:
        return TokenRecord(**data)
    except TypeError as e:
        raise StoreUnavailable(f"corrupt token record: {e}") from e


def withdrawn(grant: ExceptionGrant, *, at: int, by: str, reason: str) -> ExceptionGrant:
    """The grant withdrawn at ``at``; a grant withdrawn already keeps its first withdrawal."""
    if grant.withdrawn_at is not None:
        return grant
    return dataclasses.replace(grant, withdrawn_at=at, withdrawn_by=by, withdraw_reason=reason)


def newest_first(tokens: list[TokenRecord], limit: int) -> list[TokenRecord]:
    return sorted(tokens, key=lambda t: (-t.issued_at, t.jti))[: max(0, limit)]
