"""``memory://``: the store in one process's memory, for tests and single-process experiments."""

from __future__ import annotations

import dataclasses
import heapq
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from sts.store import (
    RETENTION_SECONDS,
    AlreadyExists,
    Budget,
    ExceptionGrant,
    IssuanceChecks,
    StoreCondition,
    StoreLoss,
    SubjectRevocation,
    TaskRecord,
    TokenRecord,
    TokenState,
    newest_first,
    window_kept_until,
    withdrawn,
)

_T = TypeVar("_T")


class MemoryStore:
    """Dicts behind one lock; expired records are dropped when touched and on every write.

    The token index is pruned through a heap of expiry times, so recording a token (every exchange)
    costs O(log n) and never a scan of every live token.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tasks: dict[str, tuple[TaskRecord, float]] = {}
        self._revoked: dict[str, float] = {}
        self._subjects: dict[str, tuple[SubjectRevocation, float]] = {}
        self._exceptions: dict[str, tuple[ExceptionGrant, float]] = {}
        self._counters: dict[str, tuple[int, float]] = {}
        self._once: dict[str, float] = {}
        self._tokens: dict[str, TokenRecord] = {}
        self._token_expiry: list[tuple[int, str]] = []
        self._tokens_of_task: dict[str, set[str]] = {}
        self._tokens_of_subject: dict[str, set[str]] = {}

    def ping(self) -> None:
        return None

    def create_task(self, task: TaskRecord) -> None:
        with self._lock:
            self._sweep()
            if task.id in self._tasks:
                raise AlreadyExists(task.id)
            self._tasks[task.id] = (task, task.deadline + RETENTION_SECONDS)

    def get_task(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            return self._live(self._tasks, task_id)

    def complete_task(self, task_id: str, *, at: int, by: str) -> TaskRecord | None:
        with self._lock:
            task = self._live(self._tasks, task_id)
            if task is None or task.completed_at is not None:
                return task
            done = dataclasses.replace(task, completed_at=at, completed_by=by)
            self._tasks[task_id] = (done, self._tasks[task_id][1])
            return done

    def active_task_count(self, now: float) -> int:
        with self._lock:
            return sum(
                1 for task, keep in self._tasks.values() if keep > now and task.status(now) == "active"
            )

    def list_tasks(
        self, *, now: float, assignee: str | None = None, active_only: bool = False, limit: int
    ) -> list[TaskRecord]:
        with self._lock:
            live = [task for task, keep in self._tasks.values() if keep > self._clock()]
        chosen = [
            t
            for t in live
            if (assignee is None or t.assignee == assignee) and (not active_only or t.status(now) == "active")
        ]
        return sorted(chosen, key=lambda t: (-t.created_at, t.id))[: max(0, limit)]

    def record_token(self, token: TokenRecord, *, budget: Budget | None = None) -> bool:
        with self._lock:
            self._prune_tokens()
            if budget is not None:
                used = self._counter(budget.key)
                if used >= budget.limit:
                    return False
                self._counters[budget.key] = (used + 1, budget.expires_at)
            self._index(token)
            return True

    def record_tokens(self, tokens: Sequence[TokenRecord]) -> None:
        with self._lock:
            self._prune_tokens()
            for token in tokens:
                self._index(token)

    def _index(self, token: TokenRecord) -> None:
        if token.expires_at <= self._clock():
            return  # already expired: never visible, as in the other backends
        self._tokens[token.jti] = token
        heapq.heappush(self._token_expiry, (token.expires_at, token.jti))
        if token.task_id is not None:
            self._tokens_of_task.setdefault(token.task_id, set()).add(token.jti)
        self._tokens_of_subject.setdefault(token.spiffe_id, set()).add(token.jti)

    def tokens(
        self, *, task_id: str | None = None, spiffe_id: str | None = None, limit: int
    ) -> list[TokenRecord]:
        with self._lock:
            self._prune_tokens()
            if task_id is not None:
                jtis = self._tokens_of_task.get(task_id, set())
            else:
                jtis = self._tokens_of_subject.get(spiffe_id or "", set())
            chosen = [self._tokens[j] for j in jtis]
        return newest_first(chosen, limit)

    def _prune_tokens(self) -> None:
        now = self._clock()
        heap = self._token_expiry
        while heap and heap[0][0] <= now:
            _, jti = heapq.heappop(heap)
            token = self._tokens.pop(jti, None)
            if token is None:
                continue
            for index, key in (
                (self._tokens_of_task, token.task_id),
                (self._tokens_of_subject, token.spiffe_id),
            ):
                if key is not None and key in index:
                    index[key].discard(jti)
                    if not index[key]:
                        del index[key]

    def revoke_jti(self, jti: str, *, expires_at: int) -> None:
        with self._lock:
            self._sweep()
            self._revoked[jti] = max(expires_at, self._revoked.get(jti, 0))

    def revoke_subject(self, revocation: SubjectRevocation, *, keep_until: int | None) -> None:
        with self._lock:
            self._sweep()
            self._subjects[revocation.spiffe_id] = (
                revocation,
                math.inf if keep_until is None else keep_until,
            )

    def subject_revocation(self, spiffe_id: str) -> SubjectRevocation | None:
        with self._lock:
            return self._live(self._subjects, spiffe_id)

    def issuance_checks(self, spiffe_id: str) -> IssuanceChecks:
        return IssuanceChecks(self.subject_revocation(spiffe_id), self.exceptions(spiffe_id))

    def subject_revocations(self, *, limit: int) -> list[SubjectRevocation]:
        with self._lock:
            now = self._clock()
            kept = [r for r, keep in self._subjects.values() if keep > now]
        return sorted(kept, key=lambda r: (-r.revoked_at, r.spiffe_id))[: max(0, limit)]

    def token_state(self, jti: str, task_id: str | None, spiffe_id: str) -> TokenState:
        with self._lock:
            revoked_until = self._revoked.get(jti)
            return TokenState(
                jti_revoked=revoked_until is not None and revoked_until > self._clock(),
                task=self._live(self._tasks, task_id) if task_id else None,
                subject_revocation=self._live(self._subjects, spiffe_id),
            )

    def add_exception(self, grant: ExceptionGrant) -> None:
        with self._lock:
            self._sweep()
            if grant.id in self._exceptions:
                raise AlreadyExists(grant.id)
            self._exceptions[grant.id] = (grant, grant.expires_at + RETENTION_SECONDS)

    def withdraw_exception(self, grant_id: str, *, at: int, by: str, reason: str) -> ExceptionGrant | None:
        with self._lock:
            grant = self._live(self._exceptions, grant_id)
            if grant is None:
                return None
            done = withdrawn(grant, at=at, by=by, reason=reason)
            self._exceptions[grant_id] = (done, self._exceptions[grant_id][1])
            return done

    def exceptions(self, spiffe_id: str | None = None) -> list[ExceptionGrant]:
        with self._lock:
            now = self._clock()
            grants = [g for g, keep in self._exceptions.values() if keep > now]
        chosen = [g for g in grants if spiffe_id is None or g.spiffe_id == spiffe_id]
        return sorted(chosen, key=lambda g: (g.created_at, g.id))

    def count_in_window(self, key: str, *, window: int, now: float) -> int:
        slot = f"{key}:{int(now // window)}"
        with self._lock:
            count = self._counter(slot) + 1
            self._counters[slot] = (count, window_kept_until(int(now // window), window))
            return count

    def lease_in_window(self, key: str, *, want: int, limit: int, window: int, now: float) -> int:
        slot = int(now // window)
        name = f"{key}:{slot}"
        with self._lock:
            used = self._counter(name)
            granted = max(0, min(want, limit - used))
            if granted:
                self._counters[name] = (used + granted, window_kept_until(slot, window))
            return granted

    def take_budget(self, key: str, *, limit: int, expires_at: int) -> bool:
        with self._lock:
            used = self._counter(key)
            if used >= limit:
                return False
            self._counters[key] = (used + 1, expires_at)
            return True

    def use_once(self, key: str, *, expires_at: int) -> bool:
        with self._lock:
            seen = self._once.get(key)
            if seen is not None and seen > self._clock():
                return False
            self._once[key] = expires_at
            return True

    def condition(self) -> StoreCondition:
        return StoreCondition()

    def acknowledge_loss(self, *, by: str, reason: str, at: int) -> StoreLoss | None:
        return None  # one process's memory: nothing to lose that the process would not lose with it

    def check_durability(self) -> str | None:
        return None

    def close(self) -> None:
        return None

    def _counter(self, key: str) -> int:
        value = self._counters.get(key)
        return value[0] if value is not None and value[1] > self._clock() else 0

    def _live(self, table: dict[str, tuple[_T, float]], key: str) -> _T | None:
        entry = table.get(key)
        return entry[0] if entry is not None and entry[1] > self._clock() else None

    def _sweep(self) -> None:
        now = self._clock()
        _drop_expired(self._tasks, now)
        _drop_expired(self._subjects, now)
        _drop_expired(self._exceptions, now)
        _drop_expired(self._counters, now)
        for simple in (self._revoked, self._once):
            for key in [k for k, keep in simple.items() if keep <= now]:
                del simple[key]


def _drop_expired(table: dict[str, tuple[_T, float]], now: float) -> None:
    for key in [k for k, (_, keep) in table.items() if keep <= now]:
        del table[key]
