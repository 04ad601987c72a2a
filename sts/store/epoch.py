"""The store epoch: how every replica learns that the shared store lost what it held, and agrees on it.

A Redis can lose its data without going away: ``FLUSHALL``, a restart without persistence, a pod
rescheduled onto an empty volume, another Redis behind the same name, a restored backup, a failover to a
replica that missed writes. Revocations, kill switches and task completions would then silently
disappear, and revoked tokens would be active again. So the STS keeps one record in the store, the
*epoch*, at ``sts:epoch`` (JSON, written only by the STS, durably, never expiring)::

    {"id": "<128-bit hex>", "created_at": 1767000000.25, "not_before": 1767000002 | null,
     "loss": null | {"cause": "vanished" | "replaced" | "rolled back", "previous": "<id>" | null,
                     "detected_at": 1767000000.25, "detected_by": "host:pid"},
     "acknowledged": null | {"at": 1767000100, "by": "<admin SPIFFE ID>", "reason": "…"},
     "lineage": ["<id of an epoch this one supersedes>", …]}

Each process remembers the record it last saw (``known``) and compares what it reads with it: on
every connection (``note``), piggybacked on the reads that prove a kill switch (``observe``: the epoch
is one more key of the same MGET, so no extra round trip) and periodically (the monitor):

* no record and nothing known: the first contact. A *genesis* record is created (SET NX). When no other
  ``sts:`` key exists either (a new deployment, or a store lost while no STS ran), its ``not_before`` is
  its creation time less ``1 + CLOCK_SKEW_SECONDS`` (rounded down): tokens from before the store's history
  began are never active (its kill switches, though, are gone with nobody to remember them).
* no record, but one was known: the store **vanished**.
* the known record, byte for byte: nothing happened (the fast path: one bytes comparison).
* a record whose ``lineage`` names the known one (another replica handled the loss first), or any
  record when nothing was known yet (a process starting): it is adopted.
* any other record (a **replaced** Redis, a restored backup, a genesis written by a process that started
  after an unnoticed loss): a loss.
* the generation ``sts:gen`` (incremented by every durable write) below the generation of this process's
  last acknowledged durable write: the store **rolled back** (a failover to a replica without it).

A loss is recorded by writing a new record (SET NX when there is none, else compare-and-set over the
one read) with ``loss`` set, a fresh id, and a lineage naming every epoch it supersedes; whoever loses
the race reads again and adopts the winner's record, and a record is only ever replaced by one whose
lineage names it, so every replica converges on one record. Its ``not_before`` is the detection time
rounded up plus :data:`CLOCK_SKEW_SECONDS`, never lower than one seen before: **every token issued at or
before it is inactive, for good** (a global not-before: what the revocations lost would have ended).
Until the record is acknowledged by an administrator *and* its not-before has passed, kill switches cannot
be proven and every exchange is refused (``StoreLost``, 503), so no token is issued that the not-before
would then kill. A process entering a loss first writes back every kill switch it remembers (its
mirror of the kill list ``sts:kills``, refreshed by the monitor whenever ``sts:gen`` moves), so the kill
switches of every replica still running survive the loss.

Imports only ``sts.store`` of the project; the Redis side is behind :class:`EpochBackend`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sts.store import StoreLoss, StoreLost, StoreUnavailable

log = logging.getLogger(__name__)

EPOCH_KEY = "sts:epoch"
GEN_KEY = "sts:gen"
KILLS_KEY = "sts:kills"
# Replicas' clocks may disagree by this much: a token another replica issued just before the loss may
# carry an iat up to this far past our detection time, and must still fall under the not-before.
CLOCK_SKEW_SECONDS = 1
# The longest time between a single-use key's first valid use and its expiry (DPoP: a proof is valid
# within 60 s of its iat and remembered for 2 x 60 s). After a loss, single-use keys that may have been
# used before it (expiring no later than not_before + this) are refused as replays.
SINGLE_USE_LOOKBACK_SECONDS = 120
LINEAGE_KEPT = 16
_SETTLE_ATTEMPTS = 8

Report = Callable[[Mapping[str, Any]], None]


def process_name() -> str:
    """``host:pid``: who detected a loss, in the record and the audit log."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """The parsed ``sts:epoch`` record."""

    id: str
    created_at: float
    not_before: int | None
    loss: Mapping[str, Any] | None
    acknowledged: Mapping[str, Any] | None
    lineage: tuple[str, ...]

    @classmethod
    def parse(cls, raw: bytes) -> EpochRecord | None:
        """The record, or None when it is not one of ours (corrupt or foreign: treated as replaced)."""
        try:
            data = json.loads(raw)
            record = cls(
                id=str(data["id"]),
                created_at=float(data["created_at"]),
                not_before=None if data.get("not_before") is None else int(data["not_before"]),
                loss=data.get("loss"),
                acknowledged=data.get("acknowledged"),
                lineage=tuple(str(i) for i in data.get("lineage", ())),
            )
        except (ValueError, TypeError, KeyError, RecursionError):
            return None
        if not record.id or (record.loss is not None and not isinstance(record.loss, dict)):
            return None
        if record.acknowledged is not None and not isinstance(record.acknowledged, dict):
            return None
        return record

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "created_at": self.created_at,
                "not_before": self.not_before,
                "loss": dict(self.loss) if self.loss is not None else None,
                "acknowledged": dict(self.acknowledged) if self.acknowledged is not None else None,
                "lineage": list(self.lineage),
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @property
    def unacknowledged_loss(self) -> bool:
        return self.loss is not None and self.acknowledged is None


class EpochBackend(Protocol):
    """What the guard needs from the store; every write is durable (replicated or on the AOF)."""

    def read_epoch(self) -> bytes | None: ...

    def create_epoch(self, text: str) -> bool:
        """SET NX: False when a record exists already."""

    def swap_epoch(self, expected: bytes, text: str) -> bool:
        """Compare-and-set: False when the record is no longer ``expected``."""

    def keyspace_empty(self) -> bool:
        """No ``sts:`` key at all (as far as a bounded scan can tell; undecided counts as empty)."""

    def index_kills(self) -> None:
        """Genesis over existing data (an upgrade): index the kill switches already stored."""

    def reassert_kills(self, entries: Mapping[str, bytes]) -> int:
        """Write back remembered kill switches that are missing; how many were written."""


class EpochGuard:
    """One process's view of the epoch, the not-before it implies, and its memory of the kill list.

    Thread-safe. ``observe`` and ``refusing`` are on the request path: when nothing changed they cost a
    bytes comparison and an attribute read.
    """

    def __init__(
        self,
        backend: EpochBackend,
        *,
        clock: Callable[[], float],
        report: Report | None = None,
        name: str | None = None,
    ) -> None:
        self._backend = backend
        self._clock = clock
        self._report = report
        self.name = name or process_name()
        self._lock = threading.RLock()
        self._known: EpochRecord | None = None
        self._known_raw: bytes | None = None
        self._suspect = False  # a connection saw another record: check before trusting the known one
        self.not_before = 0
        self._refuse_until = 0  # exchanges refused while now <= this (a loss's not-before)
        self._unacknowledged = False
        self._loss: StoreLoss | None = None
        self._mirror: dict[str, tuple[bytes, float]] = {}  # spiffe id -> (stored value, keep until)
        self.mirror_generation: int | None = None
        self._acknowledged_generation = 0

    # ---------------------------------------------------------------- the request path

    @property
    def epoch(self) -> str | None:
        known = self._known
        return known.id if known is not None else None

    def observe(self, raw: bytes | None) -> bool:
        """Compare a record read with the known one, settling any difference; True when it changed."""
        if raw is not None and raw == self._known_raw and not self._suspect:
            return False
        with self._lock:
            before = self._known_raw
            self._settle(raw)
            return self._known_raw != before

    def note(self, raw: bytes | None) -> None:
        """What a new connection read: when it differs, the next ``refusing`` settles it first."""
        if raw is None or raw != self._known_raw:
            self._suspect = True

    def refusing(self, now: float) -> bool:
        """Whether exchanges must be refused now: a loss in force (settling what is unsettled first)."""
        if self._suspect or self._known is None:
            with self._lock:
                if self._suspect or self._known is None:
                    self._settle(self._backend.read_epoch())
        # A token issued now has iat = floor(now): it must lie past the not-before, or it is dead at birth.
        return self._unacknowledged or math.floor(now) <= self._refuse_until

    @property
    def unacknowledged(self) -> bool:
        """A loss no admin has acknowledged yet: no kill switch can be proven."""
        return self._unacknowledged

    def refusal(self) -> StoreLost:
        loss = self._loss
        if loss is None:
            return StoreLost("the store epoch is not settled yet")
        if not loss.acknowledged:
            return StoreLost(
                f"store loss ({loss.cause}) detected at {loss.detected_at:.0f} by {loss.detected_by}: "
                "kill switches cannot be proven until an admin acknowledges it (sts admin store-loss ack)"
            )
        return StoreLost(f"store loss acknowledged; exchanges resume after {loss.not_before}")

    @property
    def lost(self) -> bool:
        return self._unacknowledged or math.floor(self._clock()) <= self._refuse_until

    @property
    def loss(self) -> StoreLoss | None:
        return self._loss

    # ---------------------------------------------------------------- settling a difference

    def _settle(self, raw: bytes | None) -> None:
        for _ in range(_SETTLE_ATTEMPTS):
            self._suspect = False
            if raw is not None and raw == self._known_raw:
                return
            known = self._known
            if raw is None:
                text = self._genesis() if known is None else self._loss_record("vanished", None)
                if self._backend.create_epoch(text):
                    self._take(text.encode(), entered_loss=known is not None)
                    return
            else:
                record = EpochRecord.parse(raw)
                if record is not None and (
                    known is None or record.id == known.id or known.id in record.lineage
                ):
                    self._take(raw, entered_loss=False)
                    return
                text = self._loss_record("replaced", record)
                if self._backend.swap_epoch(raw, text):
                    self._take(text.encode(), entered_loss=True)
                    return
            raw = self._backend.read_epoch()  # another process wrote first: look again
        raise StoreUnavailable("the store epoch keeps changing; refusing until it settles")

    def generation_floor(self) -> tuple[bytes | None, int]:
        """Taken *before* reading ``sts:gen``: the known record and the generation of this process's
        last acknowledged durable write, which that read must then show (or the store rolled back)."""
        with self._lock:
            return self._known_raw, self._acknowledged_generation

    def check_generation(self, raw: bytes | None, generation: int, floor: tuple[bytes | None, int]) -> None:
        """The monitor's rollback check: the store's generation below a write acknowledged before it."""
        with self._lock:
            floor_raw, acknowledged = floor
            if raw is None or raw != self._known_raw or raw != floor_raw or generation >= acknowledged:
                return
            log.error(
                "state store rolled back: generation %d < %d, a durable write of this process",
                generation,
                acknowledged,
            )
            record = EpochRecord.parse(raw)
            text = self._loss_record("rolled back", record)
            if self._backend.swap_epoch(raw, text):
                self._take(text.encode(), entered_loss=True)
            else:
                self._settle(self._backend.read_epoch())

    @property
    def known_raw(self) -> bytes | None:
        """The known record as read (taken before a durable write: see ``acknowledged_write``)."""
        return self._known_raw

    def acknowledged_write(self, generation: int, under: bytes | None) -> None:
        """A durable write of this process was acknowledged at this generation (for rollback checks);
        ``under`` is the record known when it was sent: a write that raced a change of epoch is not
        counted against the new store."""
        with self._lock:
            if under is not None and under == self._known_raw:
                self._acknowledged_generation = max(self._acknowledged_generation, generation)

    def _genesis(self) -> str:
        now = self._clock()
        empty = self._backend.keyspace_empty()
        if not empty:
            self._backend.index_kills()
        return EpochRecord(
            id=secrets.token_hex(16),
            created_at=now,
            not_before=math.floor(now) - 1 - CLOCK_SKEW_SECONDS if empty else None,
            loss=None,
            acknowledged=None,
            lineage=(),
        ).to_json()

    def _loss_record(self, cause: str, over: EpochRecord | None) -> str:
        now = self._clock()
        known = self._known
        lineage: list[str] = []
        for epoch_id in (
            *((known.id,) if known else ()),
            *((over.id,) if over else ()),
            *(over.lineage if over else ()),
            *(known.lineage if known else ()),
        ):
            if epoch_id not in lineage:
                lineage.append(epoch_id)
        floor = max(self.not_before, over.not_before or 0 if over else 0)
        return EpochRecord(
            id=secrets.token_hex(16),
            created_at=now,
            not_before=max(math.ceil(now) + CLOCK_SKEW_SECONDS, floor),
            loss={
                "cause": cause,
                "previous": known.id if known else None,
                "detected_at": round(now, 3),
                "detected_by": self.name,
            },
            acknowledged=None,
            lineage=tuple(lineage[:LINEAGE_KEPT]),
        ).to_json()

    def _take(self, raw: bytes, *, entered_loss: bool) -> None:
        """Make ``raw`` the known record; re-assert the kill list when this process enters a loss."""
        record = EpochRecord.parse(raw)
        if record is None:  # we only take records we wrote or parsed
            raise StoreUnavailable("the store epoch record is corrupt")
        previous = self._known
        new_loss = record.loss is not None and (previous is None or previous.id != record.id)
        self._known, self._known_raw = record, raw
        if record.not_before is not None and record.not_before > self.not_before:
            self.not_before = record.not_before
        was_unacknowledged = self._unacknowledged
        self._unacknowledged = record.unacknowledged_loss
        if record.not_before is not None and record.loss is not None:
            self._refuse_until = max(self._refuse_until, record.not_before)
        if previous is not None and previous.id != record.id:
            self._acknowledged_generation = 0  # a new store: its generation counts from scratch
            self.mirror_generation = None
        reasserted = 0
        if new_loss and previous is not None:
            # Entering a loss this process lived through: what it remembers of the kill list goes back.
            reasserted = self._reassert()
        if record.loss is not None:
            self._loss = _loss_of(record, reasserted if new_loss else self._loss_reasserted(record))
        loss = self._loss
        if new_loss and loss is not None and (previous is not None or record.unacknowledged_loss):
            log.error(
                "state store loss (%s) %s: epoch %s -> %s; tokens issued at or before %d are inactive; "
                "%d kill switches re-asserted; exchanges refused until an admin acknowledges "
                "(sts admin store-loss ack --reason ...)",
                loss.cause,
                "detected" if entered_loss else "seen",
                previous.id if previous else "-",
                record.id,
                loss.not_before,
                reasserted,
            )
            self._emit(
                {
                    "event": "store_loss",
                    "decision": "deny",
                    "cause": loss.cause,
                    "detected_by": loss.detected_by,
                    "detected_here": entered_loss,
                    "previous_epoch": loss.previous,
                    "epoch": record.id,
                    "not_before": loss.not_before,
                    "acknowledged": loss.acknowledged,
                    "reasserted_kill_switches": reasserted,
                }
            )
        elif previous is None:
            log.info("state store epoch %s (created %.0f)", record.id, record.created_at)
        if was_unacknowledged and not self._unacknowledged and self._loss is not None:
            log.warning(
                "state store loss acknowledged by %s (%s); exchanges resume after %d",
                self._loss.acknowledged_by,
                self._loss.reason,
                self._loss.not_before,
            )

    def _loss_reasserted(self, record: EpochRecord) -> int:
        loss = self._loss
        return loss.reasserted if loss is not None and loss.epoch == record.id else 0

    def _emit(self, event: Mapping[str, Any]) -> None:
        if self._report is None:
            return
        try:
            self._report(event)
        except Exception:  # the audit log failing must not stop loss handling
            log.exception("could not record %s", event.get("event"))

    # ---------------------------------------------------------------- acknowledgement

    def acknowledge(self, *, by: str, reason: str, at: int) -> StoreLoss | None:
        """Mark the loss in force acknowledged, in the store (compare-and-set) and here."""
        with self._lock:
            raw = self._backend.read_epoch()
            self._settle(raw)
            known, known_raw = self._known, self._known_raw
            if known is None or known_raw is None or not known.unacknowledged_loss:
                return None
            acknowledged = EpochRecord(
                id=known.id,
                created_at=known.created_at,
                not_before=known.not_before,
                loss=known.loss,
                acknowledged={"at": at, "by": by, "reason": reason},
                lineage=known.lineage,
            ).to_json()
            if not self._backend.swap_epoch(known_raw, acknowledged):
                raise StoreUnavailable("the store epoch changed while acknowledging; look again and retry")
            self._take(acknowledged.encode(), entered_loss=False)
            return self._loss

    # ---------------------------------------------------------------- the kill-list mirror

    def remember_kill(self, spiffe_id: str, value: bytes, keep_until: int | None) -> None:
        """A kill switch this process wrote or read: remembered until it stops mattering."""
        keep = math.inf if keep_until is None else float(keep_until)
        with self._lock:
            current = self._mirror.get(spiffe_id)
            if current is None or keep >= current[1]:
                self._mirror[spiffe_id] = (value, keep)

    def merge_kills(self, raw: bytes | None, entries: Mapping[bytes, bytes], generation: int) -> None:
        """The kill list as read together with ``raw`` (the epoch): merged only if it is the known one."""
        with self._lock:
            if raw is None or raw != self._known_raw:
                return
            for name, value in entries.items():
                keep = _keep_until(value)
                if keep is not None:
                    self.remember_kill(name.decode(), value, None if math.isinf(keep) else int(keep))
            self.mirror_generation = generation

    def remembered_kills(self) -> dict[str, bytes]:
        now = self._clock()
        with self._lock:
            for spiffe_id in [k for k, (_, keep) in self._mirror.items() if keep <= now]:
                del self._mirror[spiffe_id]
            return {k: value for k, (value, _) in self._mirror.items()}

    def _reassert(self) -> int:
        entries = self.remembered_kills()
        if not entries:
            return 0
        try:
            return self._backend.reassert_kills(entries)
        except StoreUnavailable:
            log.exception("could not re-assert %d kill switches after the store loss", len(entries))
            return 0


def _loss_of(record: EpochRecord, reasserted: int) -> StoreLoss:
    loss = record.loss or {}
    acknowledged = record.acknowledged or {}
    return StoreLoss(
        epoch=record.id,
        previous=loss.get("previous"),
        cause=str(loss.get("cause", "replaced")),
        detected_at=float(loss.get("detected_at", record.created_at)),
        detected_by=str(loss.get("detected_by", "?")),
        not_before=record.not_before or 0,
        acknowledged_at=acknowledged.get("at"),
        acknowledged_by=acknowledged.get("by"),
        reason=acknowledged.get("reason"),
        reasserted=reasserted,
    )


def _keep_until(value: bytes) -> float | None:
    """A stored kill switch's keep-until (inf: kept forever); None when the value is not one."""
    try:
        data = json.loads(value)
        keep = data["keep_until"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if keep is None:
        return math.inf
    return float(keep) if isinstance(keep, int | float) and not isinstance(keep, bool) else None
