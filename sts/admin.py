"""Admin actions: the central kill switches and break-glass exceptions, each audited with who and why.

``POST /admin/revocations`` revokes one ``jti``, a whole task (every token issued under it), or every
token of a SPIFFE ID (optionally only until an end time, during which it gets no new token either).
``POST /admin/exceptions`` grants one workload one target's scopes for a bounded time; an exception
without an end is refused. ``POST /admin/store-loss/ack`` accepts a loss of the shared store
(``sts.store.epoch``), optionally re-asserting a kill list first, so exchanges resume. Only SPIFFE IDs
in ``admins`` may call these.

Must not import Flask.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from sts.audit import AuditLog
from sts.callers import Caller
from sts.catalog import Catalog, is_scope_token
from sts.errors import InvalidRequest, InvalidScope, InvalidTarget, NotFound
from sts.introspection import REVOCATION_MARGIN_SECONDS
from sts.spiffeid import SpiffeId, SpiffeIdError
from sts.store import ExceptionGrant, Store, SubjectRevocation
from sts.strict_json import is_text

MAX_REASON_CHARS = 500
MAX_KILL_LIST = 1000
MAX_EXCEPTION_SECONDS = 7 * 24 * 3600
MAX_FUTURE_SECONDS = 366 * 24 * 3600


class Admin:
    """Kill switches and exceptions; callers are already checked to be admins."""

    def __init__(self, *, store: Store, catalog: Catalog, audit: AuditLog, max_token_ttl: int) -> None:
        self._store = store
        self._catalog = catalog
        self._audit = audit
        self._max_token_ttl = max_token_ttl

    def revoke(
        self, caller: Caller, body: Any, *, request_id: str, now: float | None = None
    ) -> dict[str, Any]:
        """One of ``jti``, ``task_id`` or ``spiffe_id``, and a ``reason``; ``until`` only with spiffe_id."""
        current = int(time.time() if now is None else now)
        fields = _object(body, {"jti", "task_id", "spiffe_id", "until", "reason"})
        reason = _reason(fields)
        chosen = [name for name in ("jti", "task_id", "spiffe_id") if name in fields]
        if len(chosen) != 1:
            raise InvalidRequest("name exactly one of jti, task_id or spiffe_id")
        if "until" in fields and chosen != ["spiffe_id"]:
            raise InvalidRequest("until applies only to a spiffe_id revocation")
        kind, value = chosen[0], fields[chosen[0]]
        if not is_text(value) or not value or len(value) > 2048:
            raise InvalidRequest(f"{kind} must be a non-empty string")
        result: dict[str, Any] = {"revoked": kind, kind: value, "at": current}
        if kind == "jti":
            # The token's own exp is unknown here; no token lives longer than the global maximum.
            self._store.revoke_jti(
                value, expires_at=current + self._max_token_ttl + REVOCATION_MARGIN_SECONDS
            )
        elif kind == "task_id":
            task = self._store.complete_task(value, at=current, by=str(caller.spiffe_id))
            if task is None:
                raise NotFound("no such task")
            result["task_status"] = task.status(current)
        else:
            spiffe_id = _spiffe_id(value, "spiffe_id")
            until = _time(fields.get("until"), "until", after=current) if "until" in fields else None
            existing = self._store.subject_revocation(str(spiffe_id))
            if existing is not None and (
                existing.until is None or (until is not None and existing.until > until)
            ):
                # A kill switch only ever grows: a shorter one never lifts a longer or permanent one.
                until = existing.until
            revocation = SubjectRevocation(str(spiffe_id), current, until, str(caller.spiffe_id), reason)
            # Kept while it blocks issuance, then until every token issued before it has expired.
            keep = None if until is None else max(until, current) + self._max_token_ttl
            self._store.revoke_subject(revocation, keep_until=keep)
            result["until"] = until
        self._audit.record(
            {
                "event": "admin_revocation",
                "decision": "allow",
                "request_id": request_id,
                "caller": str(caller.spiffe_id),
                "reason": reason,
                **result,
            },
            now=current,
        )
        return result

    def grant_exception(
        self, caller: Caller, body: Any, *, request_id: str, now: float | None = None
    ) -> ExceptionGrant:
        """Break-glass: ``spiffe_id``, ``target``, ``scopes``, ``reason`` and an end (``expires_at``)."""
        current = int(time.time() if now is None else now)
        fields = _object(body, {"spiffe_id", "target", "scopes", "reason", "expires_at"})
        reason = _reason(fields)
        spiffe_id = _spiffe_id(fields.get("spiffe_id"), "spiffe_id")
        if "expires_at" not in fields:
            raise InvalidRequest(
                "an exception needs an end time (expires_at, epoch seconds); none is permanent"
            )
        expires_at = _time(fields["expires_at"], "expires_at", after=current)
        if expires_at - current > MAX_EXCEPTION_SECONDS:
            raise InvalidRequest(f"an exception may last at most {MAX_EXCEPTION_SECONDS // 86400} days")
        target = fields.get("target")
        entry = self._catalog.get(target) if isinstance(target, str) else None
        if entry is None:
            raise InvalidTarget("target must be a catalog id")
        scopes = fields.get("scopes")
        if (
            not isinstance(scopes, list)
            or not scopes
            or not all(isinstance(s, str) and is_scope_token(s) for s in scopes)
        ):
            raise InvalidScope("scopes must be a non-empty list of scope names")
        self._catalog.check_scopes(entry, frozenset(scopes))
        grant = ExceptionGrant(
            id=f"exc_{secrets.token_urlsafe(12)}",
            spiffe_id=str(spiffe_id),
            target=entry.id,
            scopes=frozenset(scopes),
            reason=reason,
            granted_by=str(caller.spiffe_id),
            created_at=current,
            expires_at=expires_at,
        )
        self._store.add_exception(grant)
        self._audit.record(
            {
                "event": "exception_granted",
                "decision": "allow",
                "request_id": request_id,
                **exception_json(grant, current),
            },
            now=current,
        )
        return grant

    def acknowledge_store_loss(
        self, caller: Caller, body: Any, *, request_id: str, now: float | None = None
    ) -> dict[str, Any]:
        """``{"reason": …, "kill_list"?: [SPIFFE ID, …]}``: end the store loss in force.

        Every ``kill_list`` entry is first revoked for good, exactly as ``POST /admin/revocations``
        with that ``spiffe_id`` (each audited); then the loss is acknowledged in the store, for every
        replica, and audited. Tokens issued before the loss stay inactive; exchanges resume once its
        not-before has passed. Nothing in force: ``acknowledged: false``, nothing changed.
        """
        current = int(time.time() if now is None else now)
        fields = _object(body, {"reason", "kill_list"})
        reason = _reason(fields)
        kill_list = fields.get("kill_list", [])
        if not isinstance(kill_list, list) or len(kill_list) > MAX_KILL_LIST:
            raise InvalidRequest(f"kill_list must be a list of at most {MAX_KILL_LIST} SPIFFE IDs")
        killed = sorted({str(_spiffe_id(value, "kill_list")) for value in kill_list})
        for spiffe_id in killed:
            kill = {"spiffe_id": spiffe_id, "reason": reason}
            self.revoke(caller, kill, request_id=request_id, now=current)
        loss = self._store.acknowledge_loss(by=str(caller.spiffe_id), reason=reason, at=current)
        result: dict[str, Any] = {"acknowledged": loss is not None, "kill_list": killed}
        if loss is not None:
            result.update(
                epoch=loss.epoch,
                previous_epoch=loss.previous,
                cause=loss.cause,
                detected_at=round(loss.detected_at, 3),
                detected_by=loss.detected_by,
                not_before=loss.not_before,
                resumes_after=loss.not_before,
            )
        else:
            result["detail"] = "no store loss is in force"
        self._audit.record(
            {
                "event": "store_loss_acknowledged",
                "decision": "allow" if loss is not None else "ignored",
                "request_id": request_id,
                "caller": str(caller.spiffe_id),
                "reason": reason,
                **result,
            },
            now=current,
        )
        return result

    def list_exceptions(self, now: float | None = None) -> list[dict[str, Any]]:
        current = time.time() if now is None else now
        return [exception_json(g, current) for g in self._store.exceptions()]


def exception_json(grant: ExceptionGrant, now: float) -> dict[str, Any]:
    return {
        "exception_id": grant.id,
        "spiffe_id": grant.spiffe_id,
        "target": grant.target,
        "scopes": sorted(grant.scopes),
        "reason": grant.reason,
        "granted_by": grant.granted_by,
        "created_at": grant.created_at,
        "expires_at": grant.expires_at,
        "status": "active" if grant.active(now) else "expired",
    }


def _object(body: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidRequest(f"unknown field '{unknown[0]}' (known: {', '.join(sorted(known))})")
    return body


def _reason(fields: dict[str, Any]) -> str:
    reason = fields.get("reason")
    # is_text: an unpaired surrogate (json.loads makes one of "\ud800") would fail in the store.
    if not is_text(reason) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
        raise InvalidRequest(f"reason is required: say why, in at most {MAX_REASON_CHARS} characters")
    return reason


def _spiffe_id(value: Any, name: str) -> SpiffeId:
    try:
        return SpiffeId.parse(value)
    except SpiffeIdError as e:
        raise InvalidRequest(f"{name} must be a SPIFFE ID: {e}") from e


def _time(value: Any, name: str, *, after: int) -> int:
    """Epoch seconds as a JSON integer: NaN, 1e999, floats, booleans and strings are refused by type,
    and an integer of any size is compared as an integer (never converted to float)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not after < value <= after + MAX_FUTURE_SECONDS
    ):
        raise InvalidRequest(f"{name} must be a future time in epoch seconds, at most a year ahead")
    return value
