"""The Redis store as deployed: durable security writes, loss detection, Sentinel failover.

:class:`DurableRedisStore` is :class:`~sts.store.redis_store.RedisStore` (same key layout) plus:

**Durable security writes.** Revoking a ``jti``, a kill switch, completing a task, re-asserting a kill
switch and every write of the store epoch are answered only once Redis has them durably enough: when
the primary has a replica, the write, ``INCR sts:gen`` and ``WAIT 1 <store.redis.wait_timeout>`` go in
one pipeline (one round trip; a failover promotes a replica that has the write), and a WAIT that no
replica confirmed is re-checked: without replicas left but with the AOF on it stands, otherwise the
caller gets 503 (the write may have landed; every one of them can be repeated safely). Without a
replica the primary's AOF (``appendonly yes``) must be on. Which case holds is probed (``ROLE``,
``CONFIG GET appendonly`` or ``INFO persistence``) at start (:meth:`check_durability`, which
``sts serve`` turns into a refusal naming the setting) and every :data:`PROBE_INTERVAL` seconds.
Other writes (rate windows, budgets, DPoP ``jti``\\ s, tasks, exceptions) are not waited for: losing
one of them fails closed or costs little.

**Loss detection** (``sts.store.epoch``): the epoch is read with every kill-switch read and
introspection (one more key of the same MGET, no extra round trip), on every new connection, and by a
monitor thread every :data:`CHECK_INTERVAL` seconds, which also keeps this process's mirror of the kill
list (``sts:kills``, read only when ``sts:gen`` moved) and checks ``sts:gen`` for a rollback. While a
loss is in force: the rate check of an exchange (:meth:`lease_in_window`; :meth:`count_in_window` too)
and every kill-switch read (:meth:`subject_revocation`, outside
:func:`~sts.store.tolerating_store_loss`) raise :class:`~sts.store.StoreLost` (503);
:meth:`token_state` reports every token issued at or before the not-before as cut off (introspection:
inactive), and for good; :meth:`use_once` refuses keys that may have been used before the loss.

**Failover.** With a ``redis+sentinel://`` URL the pool asks the Sentinels for the primary when it
connects, a connection that reaches a replica is refused (``ROLE``), and the monitor asks the
Sentinels every :data:`CHECK_INTERVAL` seconds, so a promoted replica is used without a restart; a
request in flight when the primary dies gets 503 (``StoreUnavailable``), never an answer from a
replica.

Keys added to the layout of ``redis_store``:

    sts:epoch                   the epoch record (``sts.store.epoch``)         no expiry
    sts:gen                     durable writes so far (rollback detection)    no expiry
    sts:kills                   hash: SPIFFE ID -> the sts:subject value      entries pruned at keep-until

Imports only ``sts.store`` of the project (and ``redis``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import redis
from redis.client import Pipeline

from sts.store import (
    IssuanceChecks,
    StoreCondition,
    StoreLoss,
    StoreUnavailable,
    SubjectRevocation,
    TaskRecord,
    TokenState,
    label,
    store_loss_tolerated,
)
from sts.store.epoch import (
    EPOCH_KEY,
    GEN_KEY,
    KILLS_KEY,
    SINGLE_USE_LOOKBACK_SECONDS,
    EpochGuard,
    Report,
)
from sts.store.redis_connect import RedisOptions, connect
from sts.store.redis_store import _COMPLETE, _REVOKE_JTI, PREFIX, RedisStore, _at, _task_keys

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.5  # seconds between the monitor's epoch checks (and Sentinel questions)
PROBE_INTERVAL = 5.0  # seconds between durability probes (ROLE, CONFIG GET appendonly)
_SCAN_ROUNDS = 10  # at most this many SCAN calls to tell an empty keyspace (undecided counts as empty)

# KEYS: subject, kills. ARGV: value, exat ('' = none), spiffe id, now.
# The kill switch, its entry in the kill list, and the kill list pruned of entries past their keep-until.
_REVOKE_SUBJECT = """
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'EXAT', ARGV[2])
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local ok, entry = pcall(cjson.decode, all[i + 1])
  if ok and type(entry) == 'table' and type(entry['keep_until']) == 'number'
     and entry['keep_until'] <= tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[2], all[i])
  end
end
return 1
"""
# KEYS: kills, then one sts:subject key per entry. ARGV: per entry its SPIFFE ID, value, exat ('' = none).
# Writes back the remembered kill switches the store lacks; how many it wrote.
_REASSERT = """
local written = 0
for i = 2, #KEYS do
  local id, value, exat = ARGV[3 * i - 5], ARGV[3 * i - 4], ARGV[3 * i - 3]
  local set
  if exat == '' then
    set = redis.call('SET', KEYS[i], value, 'NX')
  else
    set = redis.call('SET', KEYS[i], value, 'NX', 'EXAT', exat)
  end
  if set then written = written + 1 end
  redis.call('HSETNX', KEYS[1], id, value)
end
return written
"""
# KEYS: epoch. ARGV: expected, new. Compare-and-set of the epoch record.
_SWAP_EPOCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
# The completion and jti-revocation scripts are redis_store's own (_COMPLETE, _REVOKE_JTI).


LOSS_REVOKER = "sts:store-loss"

_P = ParamSpec("_P")
_R = TypeVar("_R")
_Method = Callable[Concatenate["DurableRedisStore", _P], _R]


def _answers(method: _Method[_P, _R]) -> _Method[_P, _R]:
    """Every Redis failure (refused, timed out, reset, error reply) becomes StoreUnavailable."""

    @functools.wraps(method)
    def guarded(self: DurableRedisStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
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


class DurableRedisStore(RedisStore):
    """The Redis store with durable security writes, the store epoch and Sentinel; see the module."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        options: RedisOptions | None = None,
        report: Report | None = None,
    ) -> None:
        self._options = options or RedisOptions()
        connected = connect(url, self._options, self._on_connect)
        super().__init__(url, clock=clock, client=connected.client, address=connected.address)
        self._sentinel = connected.sentinel
        self._writer = connected.writer  # its read timeout covers WAIT
        self._guard = EpochGuard(_EpochRedis(self), clock=clock, report=report)
        self._replicas: int | None = None
        self._aof: bool | None = None
        self._probed_at: float | None = None
        self._probe_problem: str | None = None
        self._eviction: str | None = None  # why Redis may evict our keys, when it may
        self._not_durable_logged = 0.0
        self._monitor: threading.Thread | None = None
        self._monitor_pid = 0
        self._monitor_lock = threading.Lock()
        self._stop = threading.Event()

    # ---------------------------------------------------------------- connections

    def _on_connect(self, connection: Any) -> None:
        """Every new connection: authenticate and select (redis-py), reach the primary, note the epoch."""
        connection.on_connect()
        try:
            connection.send_command("ROLE")
            role = connection.read_response()
        except redis.ResponseError:  # NOPERM: the ACL does not allow ROLE; the pool still asks Sentinel
            role = None
        if isinstance(role, list) and role and _text(role[0]) != "master":
            raise redis.ConnectionError(
                f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '?')} is a "
                f"{_text(role[0])}, not the primary: the STS writes, so store.url must name the primary "
                "(or its Sentinels)"
            )
        if isinstance(role, list) and len(role) > 2 and isinstance(role[2], list):
            self._replicas = len(role[2])
        connection.send_command("GET", EPOCH_KEY)
        self._guard.note(cast("bytes | None", connection.read_response()))

    def _ensure_monitor(self) -> None:
        if self._monitor_pid == os.getpid() or self._stop.is_set():
            return
        with self._monitor_lock:
            if self._monitor_pid == os.getpid():
                return
            self._monitor_pid = os.getpid()
            self._monitor = threading.Thread(target=self._watch, name="sts-store-monitor", daemon=True)
            self._monitor.start()

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL):
            try:
                self.check_now()
            except (redis.RedisError, StoreUnavailable) as e:
                log.debug("store monitor: %s", e)
            except Exception:  # a bug here must not end the monitor
                log.exception("store monitor")

    def check_now(self) -> None:
        """One round of the monitor: Sentinel's primary, the epoch, a rollback, the kill list, durability."""
        if self._sentinel is not None:
            # Asks the Sentinels; when the primary moved, idle connections to the old one are closed.
            for client in (self._redis, self._writer):
                client.connection_pool.get_master_address()  # type: ignore[attr-defined]
        floor = self._guard.generation_floor()  # before the read: writes acknowledged so far must show
        raw, generation = cast("list[bytes | None]", self._redis.mget(EPOCH_KEY, GEN_KEY))
        self._guard.observe(raw)
        count = int(generation or 0)
        self._guard.check_generation(raw, count, floor)
        if count != self._guard.mirror_generation:
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(EPOCH_KEY)
            pipe.hgetall(KILLS_KEY)
            pipe.get(GEN_KEY)
            epoch, entries, generation = pipe.execute()
            self._guard.merge_kills(epoch, entries, int(generation or 0))
        if self._probed_at is None or time.monotonic() - self._probed_at >= PROBE_INTERVAL:
            self._probe()

    # ---------------------------------------------------------------- durability

    def _probe(self) -> None:
        """How durable a write is right now: replicas of the primary, and its AOF."""
        self._probed_at = time.monotonic()
        problem = None
        try:
            role = self._redis.role()
            if isinstance(role, list) and role and _text(role[0]) == "master":
                self._replicas = len(role[2]) if len(role) > 2 and isinstance(role[2], list) else 0
        except redis.ResponseError:
            problem = "ROLE"
        try:
            answer = {
                _text(k): _text(v)
                for k, v in cast("Mapping[Any, Any]", self._redis.config_get("appendonly")).items()
            }
            answer |= {
                _text(k): _text(v)
                for k, v in cast("Mapping[Any, Any]", self._redis.config_get("maxmemory*")).items()
            }
            self._aof = answer["appendonly"] == "yes" if "appendonly" in answer else None
            policy = answer.get("maxmemory-policy", "noeviction")
            limited = answer.get("maxmemory", "0") not in ("0", "")
            self._eviction = (
                f"its maxmemory-policy is {policy}: it may evict revocations when full; set "
                "maxmemory-policy noeviction (or maxmemory 0)"
                if limited and policy != "noeviction"
                else None
            )
        except redis.ResponseError:  # CONFIG not permitted (or renamed): INFO says it too
            try:
                info = self._redis.info("persistence")
                self._aof = bool(int(info["aof_enabled"]))
            except (redis.ResponseError, KeyError, ValueError):
                self._aof = None
                problem = "CONFIG GET appendonly and INFO persistence"
        self._probe_problem = problem

    def durability(self) -> str | None:
        """``replica`` (writes are WAITed for), ``aof``, ``none``, or None before the first probe."""
        if self._replicas:
            return "replica"
        if self._aof:
            return "aof"
        if self._replicas == 0 and self._aof is False:
            return "none"
        return None

    def check_durability(self) -> str | None:
        try:
            self._probe()
        except redis.RedisError as e:
            log.warning(
                "cannot check the durability of Redis %s now (%s): checked again once it answers",
                self.address,
                e,
            )
            return None
        mode = self.durability()
        if self._eviction is not None:
            return f"Redis {self.address} would lose acknowledged revocations: {self._eviction}"
        if mode in ("replica", "aof"):
            log.info("state store %s: security writes are durable (%s)", self.address, mode)
            return None
        if mode == "none":
            return (
                f"Redis {self.address} would lose acknowledged revocations: it has no replica and its "
                "appendonly is no; set 'appendonly yes' on it (redis.conf, or CONFIG SET appendonly yes) "
                "or give it a replica (recommended: primary + replica + three Sentinels, "
                "docs/operations.md)"
            )
        return (
            f"cannot tell whether Redis {self.address} keeps acknowledged revocations: it shows no "
            f"replica and {self._probe_problem or 'its persistence'} is not permitted to the STS "
            "(grant +info and +config|get in its ACL, or give it a replica)"
        )

    def _durably(self, build: Callable[[Pipeline], object], what: str) -> list[Any]:
        """Run ``build``'s commands, then ``INCR sts:gen`` (and WAIT with replicas), in one round trip;
        answer only when the writes are durable (see the module). The results of ``build``'s commands."""
        if self._probed_at is None:
            with contextlib.suppress(redis.RedisError):  # the pipeline below fails the same way
                self._probe()
        wait = self.durability() in ("replica", None)
        under = self._guard.known_raw
        pipe = self._writer.pipeline(transaction=False)
        build(pipe)
        pipe.incr(GEN_KEY)
        if wait:
            pipe.wait(1, max(1, int(self._options.wait_timeout * 1000)))
        results = pipe.execute()
        generation = int(results[-2] if wait else results[-1])
        if wait and int(results[-1]) < 1:
            self._probe()  # the replica went away, or was never there
            if self.durability() != "aof":
                self._not_durable(
                    f"{what}: no replica of Redis {self.address} confirmed it within "
                    f"{self._options.wait_timeout:g} s (store.redis.wait_timeout)"
                )
                return results[: -2 if wait else -1]
        elif not wait and self.durability() == "none":
            self._not_durable(f"{what}: Redis {self.address} has no replica and appendonly is no")
            return results[: -2 if wait else -1]
        self._guard.acknowledged_write(generation, under)
        return results[: -2 if wait else -1]

    def _not_durable(self, message: str) -> None:
        if self._options.require_durability:
            raise StoreUnavailable(
                f"{message}: not acknowledged (store.redis.require_durability)", backend="redis"
            )
        now = time.monotonic()
        if now - self._not_durable_logged > 60:
            self._not_durable_logged = now
            log.warning("%s; accepted anyway (store.redis.require_durability: false)", message)

    # ---------------------------------------------------------------- security writes, durably

    @_answers
    def revoke_jti(self, jti: str, *, expires_at: int) -> None:
        self._ensure_monitor()
        key = f"{PREFIX}jti:{jti}"
        self._durably(lambda p: p.eval(_REVOKE_JTI, 1, key, _at(expires_at)), "jti revocation")

    @_answers
    def revoke_subject(self, revocation: SubjectRevocation, *, keep_until: int | None) -> None:
        self._ensure_monitor()
        value = json.dumps(
            {"revocation": _as_dict(revocation), "keep_until": keep_until}, separators=(",", ":")
        )
        keys = [f"{PREFIX}subject:{revocation.spiffe_id}", KILLS_KEY]
        args = ["" if keep_until is None else _at(keep_until), revocation.spiffe_id, int(self._clock())]
        self._durably(lambda p: p.eval(_REVOKE_SUBJECT, 2, *keys, value, *args), "kill switch")
        self._guard.remember_kill(revocation.spiffe_id, value.encode(), keep_until)

    @_answers
    def complete_task(self, task_id: str, *, at: int, by: str) -> TaskRecord | None:
        self._ensure_monitor()
        done = json.dumps({"completed_at": at, "completed_by": by})
        keys = _task_keys(task_id)
        (found,) = self._durably(lambda p: p.eval(_COMPLETE, 2, *keys, done), "task completion")
        return None if found is None else self._task(found[0], found[1])

    # ---------------------------------------------------------------- reads that prove, with the epoch

    @_answers
    def subject_revocation(self, spiffe_id: str) -> SubjectRevocation | None:
        self._ensure_monitor()
        key = f"{PREFIX}subject:{spiffe_id}"
        value, raw = self._redis.mget(key, EPOCH_KEY)
        if self._guard.observe(cast("bytes | None", raw)):  # the store changed under this read: read again
            value = self._redis.get(key)
        if self._guard.unacknowledged and not store_loss_tolerated():
            raise self._guard.refusal()
        return self._subject(value)

    @_answers
    def issuance_checks(self, spiffe_id: str) -> IssuanceChecks:
        """The kill switch (read as :meth:`subject_revocation` reads it: refused during a loss) and the
        exceptions, with the epoch, in one pipeline."""
        self._ensure_monitor()
        key = f"{PREFIX}subject:{spiffe_id}"
        pipe = self._redis.pipeline(transaction=False)
        pipe.mget(key, EPOCH_KEY)
        self._queue_exceptions(pipe, spiffe_id)
        (value, raw), members = pipe.execute()
        if self._guard.observe(cast("bytes | None", raw)):  # the store changed under this read: read again
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(key)
            self._queue_exceptions(pipe, spiffe_id)
            value, members = pipe.execute()
        if self._guard.unacknowledged and not store_loss_tolerated():
            raise self._guard.refusal()
        return IssuanceChecks(self._subject(value), self._grants(members))

    @_answers
    def subject_revocations(self, *, limit: int) -> list[SubjectRevocation]:
        """Every kill switch is also in the kill list (``sts:kills``): read those, not the keyspace."""
        names = cast("list[bytes]", self._redis.hkeys(KILLS_KEY))
        return self._revocations([f"{PREFIX}subject:{_text(n)}".encode() for n in names], limit)

    @_answers
    def token_state(self, jti: str, task_id: str | None, spiffe_id: str) -> TokenState:
        self._ensure_monitor()
        keys = [f"{PREFIX}jti:{jti}", f"{PREFIX}subject:{spiffe_id}"]
        if task_id is not None:
            keys += _task_keys(task_id)
        values = self._redis.mget([*keys, EPOCH_KEY])
        if self._guard.observe(cast("bytes | None", values[-1])):
            values = [*self._redis.mget(keys), values[-1]]
        revoked_until, subject = values[0], values[1]
        task = self._task(values[2], values[3]) if task_id is not None else None
        revocation = self._subject(subject)
        not_before = self._guard.not_before
        if self._guard.unacknowledged:
            # Nothing issued before the loss is active, and nothing has been issued since.
            revocation = _cut_off(spiffe_id, revocation, not_before, blocking=True)
        elif not_before:
            revocation = _cut_off(spiffe_id, revocation, not_before, blocking=False)
        return TokenState(
            jti_revoked=revoked_until is not None and int(revoked_until) > self._clock(),
            task=task,
            subject_revocation=revocation,
        )

    # ---------------------------------------------------------------- the exchange's gates

    @_answers
    def count_in_window(self, key: str, *, window: int, now: float) -> int:
        """The rate check every exchange makes once its subject verified: refused during a loss."""
        self._ensure_monitor()
        if self._guard.refusing(self._clock()):
            raise self._guard.refusal()
        return super().count_in_window(key, window=window, now=now)

    @_answers
    def lease_in_window(self, key: str, *, want: int, limit: int, window: int, now: float) -> int:
        """The rate limiter's lease (:mod:`sts.rate_lease`), refused during a loss as the count is."""
        self._ensure_monitor()
        if self._guard.refusing(self._clock()):
            raise self._guard.refusal()
        return super().lease_in_window(key, want=want, limit=limit, window=window, now=now)

    @_answers
    def use_once(self, key: str, *, expires_at: int) -> bool:
        not_before = self._guard.not_before
        if not_before and expires_at <= not_before + SINGLE_USE_LOOKBACK_SECONDS:
            return False  # it may have been used before the loss, and the store forgot it
        return super().use_once(key, expires_at=expires_at)

    # ---------------------------------------------------------------- condition, acknowledgement

    def condition(self) -> StoreCondition:
        self._ensure_monitor()
        guard = self._guard
        loss = guard.loss
        warnings: list[str] = []
        if guard.unacknowledged and loss is not None:
            warnings.append(
                f"lost its data ({loss.cause}, detected at {loss.detected_at:.0f} by {loss.detected_by}; "
                f"epoch {loss.previous or '-'} -> {loss.epoch}): tokens issued at or before "
                f"{loss.not_before} are inactive, {loss.reasserted} kill switches were re-asserted here, "
                "and exchanges are refused until an admin acknowledges: "
                "sts admin store-loss ack --reason ..."
            )
        elif guard.lost and loss is not None:
            warnings.append(
                f"store loss acknowledged by {loss.acknowledged_by}; exchanges resume after {loss.not_before}"
            )
        mode = self.durability()
        if self._eviction is not None:
            warnings.append(f"Redis {self.address} may lose revocations: {self._eviction}")
        if mode == "none":
            refused = "are refused (503)" if self._options.require_durability else "are not durable"
            warnings.append(
                f"security writes (revocations, kill switches, task completions) {refused}: Redis "
                f"{self.address} has no replica and appendonly is no"
            )
        return StoreCondition(
            lost=guard.lost,
            loss=loss,
            epoch=guard.epoch,
            not_before=guard.not_before,
            durability=mode,
            warnings=tuple(warnings),
        )

    @_answers
    def acknowledge_loss(self, *, by: str, reason: str, at: int) -> StoreLoss | None:
        self._ensure_monitor()
        return self._guard.acknowledge(by=by, reason=reason, at=at)

    @_answers
    def ping(self) -> None:
        self._ensure_monitor()
        self._redis.ping()

    def close(self) -> None:
        self._stop.set()
        monitor = self._monitor
        if monitor is not None and monitor.is_alive() and self._monitor_pid == os.getpid():
            monitor.join(timeout=2)
        super().close()
        self._writer.close()
        if self._sentinel is not None:
            with contextlib.suppress(redis.RedisError):
                self._sentinel.close()


class _EpochRedis:
    """:class:`~sts.store.epoch.EpochBackend` over the store's client; every write durable."""

    def __init__(self, store: DurableRedisStore) -> None:
        self._store = store

    @property
    def _redis(self) -> redis.Redis:
        return self._store._redis

    def read_epoch(self) -> bytes | None:
        return cast("bytes | None", self._redis.get(EPOCH_KEY))

    def create_epoch(self, text: str) -> bool:
        (created,) = self._store._durably(lambda p: p.set(EPOCH_KEY, text, nx=True), "store epoch")
        return bool(created)

    def swap_epoch(self, expected: bytes, text: str) -> bool:
        (swapped,) = self._store._durably(
            lambda p: p.eval(_SWAP_EPOCH, 1, EPOCH_KEY, expected, text), "store epoch"
        )
        return bool(swapped)

    def keyspace_empty(self) -> bool:
        cursor: int = 0
        for _ in range(_SCAN_ROUNDS):
            cursor, keys = self._redis.scan(cursor, match=f"{PREFIX}*", count=1000)
            if keys:
                return False
            if cursor == 0:
                return True
        return True  # undecided: the stricter answer (tokens from before are inactive)

    def index_kills(self) -> None:
        names = list(self._redis.scan_iter(match=f"{PREFIX}subject:*", count=1000))
        if not names:
            return
        values = self._redis.mget(names)
        pipe = self._redis.pipeline(transaction=False)
        for name, value in zip(names, values, strict=True):
            if value is not None:
                pipe.hsetnx(KILLS_KEY, _text(name).removeprefix(f"{PREFIX}subject:"), value)
        pipe.execute()

    def reassert_kills(self, entries: Mapping[str, bytes]) -> int:
        keys = [KILLS_KEY]
        args: list[Any] = []
        now = self._store._clock()
        for spiffe_id, value in entries.items():
            keep = _keep_until(value)
            if keep is not None and keep <= now:
                continue
            keys.append(f"{PREFIX}subject:{spiffe_id}")
            args += [spiffe_id, value, "" if keep is None else _at(keep)]
        if len(keys) == 1:
            return 0
        (written,) = self._store._durably(
            lambda p: p.eval(_REASSERT, len(keys), *keys, *args), "kill switch re-assertion"
        )
        return int(written)


def _cut_off(
    spiffe_id: str, real: SubjectRevocation | None, not_before: int, *, blocking: bool
) -> SubjectRevocation:
    """The subject's kill switch with the store loss's not-before folded in: tokens issued at or before
    ``not_before`` are dead; ``blocking`` (a loss not yet acknowledged) ends every token."""
    if real is None:
        return SubjectRevocation(
            spiffe_id,
            not_before,
            None if blocking else not_before,
            LOSS_REVOKER,
            "issued before the state store lost its data",
        )
    return SubjectRevocation(
        real.spiffe_id,
        max(real.revoked_at, not_before),
        None if blocking else real.until,
        real.by,
        real.reason,
    )


def _as_dict(revocation: SubjectRevocation) -> dict[str, Any]:
    return {
        "spiffe_id": revocation.spiffe_id,
        "revoked_at": revocation.revoked_at,
        "until": revocation.until,
        "by": revocation.by,
        "reason": revocation.reason,
    }


def _keep_until(value: bytes) -> int | None:
    try:
        keep = json.loads(value).get("keep_until")
    except (ValueError, AttributeError, RecursionError):
        return None
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not math.isfinite(keep):
        return None
    return int(keep)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
