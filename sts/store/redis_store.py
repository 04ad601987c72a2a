"""``redis://host:port/db`` and ``rediss://``: the store shared by replicas, through one Redis (≥ 6.2).

Owns the Redis key layout (all under ``sts:``) and the JSON form of records in it:

    sts:task:<id>               task JSON (without its completion)   EXAT deadline + retention
    sts:task-done:<id>          {"completed_at", "completed_by"}      same expiry as its task
    sts:jti:<jti>               the token's expires_at                EXAT expires_at
    sts:subject:<spiffe id>     {"revocation": …, "keep_until": …}    EXAT keep_until (none: forever)
    sts:exception:<id>          grant JSON (claims the id)            EXAT expires_at + retention
    sts:exceptions-of:<id>      zset: grant JSON scored by keep-until EXPIREAT its highest score
    sts:exceptions-all          zset: every grant, the same way       EXPIREAT its highest score
    sts:tasks                   zset: task ids scored by keep-until   EXPIREAT its highest score
    sts:tokens-of:<spiffe id>   zset: token JSON scored by its exp    EXPIREAT its highest score
    sts:tokens-of-task:<id>     zset: the same, per task              EXPIREAT its highest score
    sts:window:<key>:<slot>     hits (units leased) in one window     EXPIREAT the window's end
    sts:budget:<key>            units taken                           EXAT expires_at
    sts:once:<key>              1                                     EXAT expires_at

Every key has an absolute expiry, so Redis alone keeps storage bounded. Reads also check the record's
keep-until against this store's clock, so all backends answer alike. Every check-and-set is atomic on
the server (a single command, MULTI, or a Lua script), so replicas never overshoot a limit; nothing is
cached here, so a revocation is seen by every replica on its next call.

A dead Redis fails fast (short socket timeouts, one immediate retry on a broken connection, which
also heals connections a restarted Redis closed: ``sts.store.redis_connect``); every
``redis.RedisError`` becomes StoreUnavailable, and the same object works again once Redis is back.

:class:`~sts.store.redis_durable.DurableRedisStore` adds to this layout ``sts:epoch``, ``sts:gen`` and
``sts:kills`` (``sts.store.epoch``).

Imports only ``sts.store`` of the project (and the ``redis`` package).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Concatenate, ParamSpec, TypeVar, cast

import redis

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
    newest_first,
    record_json,
    subject_from,
    task_from,
    token_from,
    window_kept_until,
    withdrawn,
)
from sts.store.redis_connect import client_defaults

PREFIX = "sts:"
COMPLETION = ("completed_at", "completed_by")  # a task's completion lives in its own key
_LATEST_EXPIRY = 2**40  # EXAT beyond this is refused by Redis; clamp instead of failing

# KEYS: budget. ARGV: limit, expires_at. 1 when a unit was taken, 0 (nothing changed) when spent.
_TAKE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], used + 1, 'EXAT', ARGV[2])
return 1
"""
# KEYS: task, task-done. ARGV: completion JSON. The task and the (first) completion, or nil.
_COMPLETE = """
local task = redis.call('GET', KEYS[1])
if not task then return false end
local left = redis.call('PTTL', KEYS[1])
if left > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', left)
else
  redis.call('SET', KEYS[2], ARGV[1], 'NX')
end
return {task, redis.call('GET', KEYS[2])}
"""
# KEYS: jti. ARGV: expires_at. Keeps the later of two revocations of one jti.
_REVOKE_JTI = """
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], ARGV[1], 'EXAT', ARGV[1])
end
return 1
"""
# KEYS: grant, workload index, global index. ARGV: grant JSON, keep-until, now.
# Claims the id, then indexes the grant; each index is pruned of ended grants and lives as long as
# its longest-lived member.
_ADD_EXCEPTION = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EXAT', ARGV[2]) then return 0 end
for i = 2, 3 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[3])
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[1])
  local last = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
  redis.call('EXPIREAT', KEYS[i], last[2])
end
return 1
"""
# KEYS: task, task index. ARGV: task JSON, keep-until, id, now. Claims the id, then indexes the task.
_CREATE_TASK = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EXAT', ARGV[2]) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('EXPIREAT', KEYS[2], last[2])
return 1
"""
# KEYS: budget, subject's token index, task's token index (only with a task).
# ARGV: limit ('' = no budget), budget exat, token JSON, token exp, now.
# Takes one unit of the budget (0, nothing written, when spent), then indexes the token: each index is
# pruned of expired tokens and lives as long as its longest-lived member, so it never outgrows them.
_RECORD_TOKEN = """
if ARGV[1] ~= '' then
  local used = tonumber(redis.call('GET', KEYS[1]) or '0')
  if used >= tonumber(ARGV[1]) then return 0 end
  redis.call('SET', KEYS[1], used + 1, 'EXAT', ARGV[2])
end
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[5])
  redis.call('ZADD', KEYS[i], ARGV[4], ARGV[3])
  local ttl = redis.call('TTL', KEYS[i])
  if ttl < 0 or tonumber(ARGV[5]) + ttl < tonumber(ARGV[4]) then
    redis.call('EXPIREAT', KEYS[i], ARGV[4])
  end
end
return 1
"""
# KEYS: window. ARGV: want, limit, the window's end. Grants min(want, limit - used) units (0 when
# spent) and returns how many; the window key is the one count_in_window increments.
_LEASE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local granted = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used)
if granted <= 0 then return 0 end
redis.call('INCRBY', KEYS[1], string.format('%d', granted))
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return granted
"""
# KEYS: grant, workload index, global index. ARGV: the grant JSON read, its withdrawn JSON.
# Replaces the grant everywhere it is kept, unless it changed since it was read (0: read again).
_WITHDRAW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
for i = 2, 3 do
  local score = redis.call('ZSCORE', KEYS[i], ARGV[1])
  if score then
    redis.call('ZREM', KEYS[i], ARGV[1])
    redis.call('ZADD', KEYS[i], score, ARGV[2])
  end
end
return 1
"""
_SCAN_BATCH = 500  # keys per MGET when the live view reads many records

_P = ParamSpec("_P")
_R = TypeVar("_R")
_Method = Callable[Concatenate["RedisStore", _P], _R]


def _answers(method: _Method[_P, _R]) -> _Method[_P, _R]:
    """Turn every Redis failure (refused, timed out, reset, error reply) into StoreUnavailable."""

    @functools.wraps(method)
    def guarded(self: RedisStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise StoreUnavailable(
                f"redis {self.address}: {type(exc).__name__}: {exc}",
                backend="redis",
                operation=method.__name__,
            ) from exc
        except StoreUnavailable as exc:  # a loss in force, a corrupt record: name where it happened
            label(exc, "redis", method.__name__)
            raise

    return guarded


class RedisStore:
    """The :class:`~sts.store.Store` in Redis, shared by every replica; one connection pool per store.

    Options in the URL's query string (``?socket_timeout=2``) override the defaults above. This class
    is the plain key layout; production uses its subclass
    :class:`~sts.store.redis_durable.DurableRedisStore` (durable security writes, the store epoch,
    Sentinel), which ``open_store`` returns.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        client: redis.Redis | None = None,
        address: str | None = None,
    ) -> None:
        self._clock = clock
        self._redis = client if client is not None else redis.Redis.from_url(url, **client_defaults())
        kwargs = self._redis.connection_pool.connection_kwargs
        self.address = address or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
        self._take = self._redis.register_script(_TAKE)
        self._complete = self._redis.register_script(_COMPLETE)
        self._revoke_jti = self._redis.register_script(_REVOKE_JTI)
        self._add_exception = self._redis.register_script(_ADD_EXCEPTION)
        self._create_task = self._redis.register_script(_CREATE_TASK)
        self._record_token = self._redis.register_script(_RECORD_TOKEN)
        self._withdraw = self._redis.register_script(_WITHDRAW)
        self._lease = self._redis.register_script(_LEASE)

    @_answers
    def ping(self) -> None:
        self._redis.ping()

    # Tasks

    @_answers
    def create_task(self, task: TaskRecord) -> None:
        keep = task.deadline + RETENTION_SECONDS
        if keep <= self._clock():
            return  # already past its retention: invisible at once, as in the other backends
        keys = [f"{PREFIX}task:{task.id}", f"{PREFIX}tasks"]
        args: list[str | int | float] = [
            record_json(task, omit=COMPLETION),
            _at(keep),
            task.id,
            self._clock(),
        ]
        if not self._create_task(keys=keys, args=args):
            raise AlreadyExists(task.id)

    @_answers
    def get_task(self, task_id: str) -> TaskRecord | None:
        record, done = self._redis.mget(_task_keys(task_id))
        return self._task(record, done)

    @_answers
    def complete_task(self, task_id: str, *, at: int, by: str) -> TaskRecord | None:
        done = json.dumps({"completed_at": at, "completed_by": by})
        found = self._complete(keys=_task_keys(task_id), args=[done])
        return None if found is None else self._task(found[0], found[1])

    def _kept_task_ids(self, floor: float) -> list[str]:
        ids = cast("list[bytes]", self._redis.zrangebyscore(f"{PREFIX}tasks", f"({floor}", "+inf"))
        return [i.decode() for i in ids]

    @_answers
    def active_task_count(self, now: float) -> int:
        # Scored by deadline + retention: a task whose deadline is still ahead scores above now + retention.
        ids = self._kept_task_ids(now + RETENTION_SECONDS)
        count = 0
        for start in range(0, len(ids), _SCAN_BATCH):
            batch = ids[start : start + _SCAN_BATCH]
            done = self._redis.mget([f"{PREFIX}task-done:{i}" for i in batch])
            count += sum(1 for value in done if value is None)
        return count

    @_answers
    def list_tasks(
        self, *, now: float, assignee: str | None = None, active_only: bool = False, limit: int
    ) -> list[TaskRecord]:
        ids = self._kept_task_ids(now + RETENTION_SECONDS if active_only else self._clock())
        tasks: list[TaskRecord] = []
        for start in range(0, len(ids), _SCAN_BATCH):
            batch = ids[start : start + _SCAN_BATCH]
            values = self._redis.mget([key for i in batch for key in _task_keys(i)])
            for record, done in zip(values[::2], values[1::2], strict=True):
                task = self._task(record, done)
                if task is None or (assignee is not None and task.assignee != assignee):
                    continue
                if not active_only or task.status(now) == "active":
                    tasks.append(task)
        return sorted(tasks, key=lambda t: (-t.created_at, t.id))[: max(0, limit)]

    @_answers
    def record_token(self, token: TokenRecord, *, budget: Budget | None = None) -> bool:
        keys, args = self._token_call(token, budget, self._clock())
        return bool(self._record_token(keys=keys, args=args))

    @_answers
    def record_tokens(self, tokens: Sequence[TokenRecord]) -> None:
        if not tokens:
            return
        now = self._clock()
        # The script of record_token once per token, all in one MULTI/EXEC: one round trip.
        pipe = self._redis.pipeline(transaction=True)
        for token in tokens:
            keys, args = self._token_call(token, None, now)
            self._record_token(keys=keys, args=args, client=pipe)
        pipe.execute()

    def _token_call(
        self, token: TokenRecord, budget: Budget | None, now: float
    ) -> tuple[list[str], list[str | int]]:
        """The keys and arguments of the ``_RECORD_TOKEN`` script for one token."""
        keys = [
            f"{PREFIX}budget:{budget.key}" if budget is not None else f"{PREFIX}budget:-",
            f"{PREFIX}tokens-of:{token.spiffe_id}",
        ]
        if token.task_id is not None:
            keys.append(f"{PREFIX}tokens-of-task:{token.task_id}")
        if token.expires_at <= now:
            keys = keys[:1]  # already expired: nothing to index (the budget is still taken)
        args: list[str | int] = [
            "" if budget is None else budget.limit,
            _at(budget.expires_at) if budget is not None else 0,
            record_json(token),
            _at(token.expires_at),
            int(now),
        ]
        return keys, args

    @_answers
    def tokens(
        self, *, task_id: str | None = None, spiffe_id: str | None = None, limit: int
    ) -> list[TokenRecord]:
        index = (
            f"{PREFIX}tokens-of-task:{task_id}" if task_id is not None else f"{PREFIX}tokens-of:{spiffe_id}"
        )
        members = cast("list[bytes]", self._redis.zrangebyscore(index, f"({self._clock()}", "+inf"))
        return newest_first([token_from(decode(m)) for m in members], limit)

    # Revocation

    @_answers
    def revoke_jti(self, jti: str, *, expires_at: int) -> None:
        self._revoke_jti(keys=[f"{PREFIX}jti:{jti}"], args=[_at(expires_at)])

    @_answers
    def revoke_subject(self, revocation: SubjectRevocation, *, keep_until: int | None) -> None:
        value = json.dumps({"revocation": dataclasses.asdict(revocation), "keep_until": keep_until})
        key = f"{PREFIX}subject:{revocation.spiffe_id}"
        self._redis.set(key, value, exat=None if keep_until is None else _at(keep_until))

    @_answers
    def subject_revocation(self, spiffe_id: str) -> SubjectRevocation | None:
        return self._subject(self._redis.get(f"{PREFIX}subject:{spiffe_id}"))

    @_answers
    def issuance_checks(self, spiffe_id: str) -> IssuanceChecks:
        """The kill switch and the exceptions in one pipeline: one round trip instead of two."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(f"{PREFIX}subject:{spiffe_id}")
        self._queue_exceptions(pipe, spiffe_id)
        value, members = pipe.execute()
        return IssuanceChecks(self._subject(value), self._grants(members))

    @_answers
    def subject_revocations(self, *, limit: int) -> list[SubjectRevocation]:
        """Read by SCAN: this plain layout keeps no list of kill switches (the durable store does)."""
        names = list(self._redis.scan_iter(match=f"{PREFIX}subject:*", count=1000))
        return self._revocations(names, limit)

    def _revocations(self, names: list[bytes], limit: int) -> list[SubjectRevocation]:
        kept: list[SubjectRevocation] = []
        for start in range(0, len(names), _SCAN_BATCH):
            for value in self._redis.mget(names[start : start + _SCAN_BATCH]):
                revocation = self._subject(value)
                if revocation is not None:
                    kept.append(revocation)
        return sorted(kept, key=lambda r: (-r.revoked_at, r.spiffe_id))[: max(0, limit)]

    @_answers
    def token_state(self, jti: str, task_id: str | None, spiffe_id: str) -> TokenState:
        keys = [f"{PREFIX}jti:{jti}", f"{PREFIX}subject:{spiffe_id}"]
        if task_id is None:
            revoked_until, subject = self._redis.mget(keys)
            task = None
        else:
            revoked_until, subject, record, done = self._redis.mget(keys + _task_keys(task_id))
            task = self._task(record, done)
        return TokenState(
            jti_revoked=revoked_until is not None and int(revoked_until) > self._clock(),
            task=task,
            subject_revocation=self._subject(subject),
        )

    # Break-glass exceptions

    @_answers
    def add_exception(self, grant: ExceptionGrant) -> None:
        keys = [
            f"{PREFIX}exception:{grant.id}",
            f"{PREFIX}exceptions-of:{grant.spiffe_id}",
            f"{PREFIX}exceptions-all",
        ]
        keep = grant.expires_at + RETENTION_SECONDS
        if keep <= self._clock():
            return  # already past its retention: invisible at once, as in the other backends
        if not self._add_exception(keys=keys, args=[record_json(grant), _at(keep), self._clock()]):
            raise AlreadyExists(grant.id)

    @_answers
    def withdraw_exception(self, grant_id: str, *, at: int, by: str, reason: str) -> ExceptionGrant | None:
        key = f"{PREFIX}exception:{grant_id}"
        for _ in range(5):  # a concurrent withdrawal changed it: read it again
            raw = cast("bytes | None", self._redis.get(key))
            if raw is None:
                return None
            grant = exception_from(decode(raw))
            if grant.expires_at + RETENTION_SECONDS <= self._clock():
                return None
            done = withdrawn(grant, at=at, by=by, reason=reason)
            if done is grant:
                return grant
            keys = [key, f"{PREFIX}exceptions-of:{grant.spiffe_id}", f"{PREFIX}exceptions-all"]
            if self._withdraw(keys=keys, args=[raw, record_json(done)]):
                return done
        raise StoreUnavailable(f"exception {grant_id} keeps changing", backend="redis", operation="withdraw")

    @_answers
    def exceptions(self, spiffe_id: str | None = None) -> list[ExceptionGrant]:
        pipe = self._redis.pipeline(transaction=False)
        self._queue_exceptions(pipe, spiffe_id)
        (members,) = pipe.execute()
        return self._grants(members)

    def _queue_exceptions(self, pipe: redis.client.Pipeline, spiffe_id: str | None) -> None:
        """The read of the grants live now (all, or one workload's), queued on ``pipe``."""
        index = f"{PREFIX}exceptions-all" if spiffe_id is None else f"{PREFIX}exceptions-of:{spiffe_id}"
        # Without WITHSCORES the reply is the members alone.
        pipe.zrangebyscore(index, f"({self._clock()}", "+inf")

    @staticmethod
    def _grants(members: list[bytes]) -> list[ExceptionGrant]:
        grants = [exception_from(decode(member)) for member in members]
        return sorted(grants, key=lambda g: (g.created_at, g.id))

    # Counters shared by every replica

    @_answers
    def count_in_window(self, key: str, *, window: int, now: float) -> int:
        slot = int(now // window)
        name = f"{PREFIX}window:{key}:{slot}"
        pipe = self._redis.pipeline(transaction=True)
        pipe.incr(name)
        pipe.expireat(name, _at(window_kept_until(slot, window)))
        count, _ = pipe.execute()
        return int(count)

    @_answers
    def lease_in_window(self, key: str, *, want: int, limit: int, window: int, now: float) -> int:
        slot = int(now // window)
        name = f"{PREFIX}window:{key}:{slot}"
        return int(self._lease(keys=[name], args=[want, limit, _at(window_kept_until(slot, window))]))

    @_answers
    def take_budget(self, key: str, *, limit: int, expires_at: int) -> bool:
        return bool(self._take(keys=[f"{PREFIX}budget:{key}"], args=[limit, _at(expires_at)]))

    @_answers
    def use_once(self, key: str, *, expires_at: int) -> bool:
        if expires_at <= self._clock():
            return True  # as in the other backends: a key already past its end is never remembered
        return bool(self._redis.set(f"{PREFIX}once:{key}", 1, nx=True, exat=_at(expires_at)))

    def condition(self) -> StoreCondition:
        return StoreCondition()

    def acknowledge_loss(self, *, by: str, reason: str, at: int) -> StoreLoss | None:
        return None  # this class keeps no epoch (DurableRedisStore does)

    def check_durability(self) -> str | None:
        return None

    def close(self) -> None:
        self._redis.close()

    # Decoding, with the keep-until checked against this store's clock

    def _task(self, record: bytes | str | None, done: bytes | str | None) -> TaskRecord | None:
        if record is None:
            return None
        data = decode(record)
        if data.get("deadline", 0) + RETENTION_SECONDS <= self._clock():
            return None
        return task_from(data, **(decode(done) if done is not None else {}))

    def _subject(self, value: bytes | str | None) -> SubjectRevocation | None:
        if value is None:
            return None
        data = decode(value)
        keep_until = data.get("keep_until")
        if keep_until is not None and keep_until <= self._clock():
            return None
        return subject_from(data.get("revocation", {}))


def _task_keys(task_id: str) -> list[str]:
    return [f"{PREFIX}task:{task_id}", f"{PREFIX}task-done:{task_id}"]


def _at(timestamp: float) -> int:
    """An EXAT Redis accepts: at least 1 (an instant in the past expires the key at once)."""
    return min(max(int(timestamp), 1), _LATEST_EXPIRY)
