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

import dataclasses
import re
import secrets
import sys
import time
from collections.abc import Mapping
from typing import Any

from sts.audit import AuditLog
from sts.callers import Caller
from sts.catalog import Catalog, is_scope_token
from sts.errors import InvalidRequest, InvalidScope, InvalidTarget, NotFound
from sts.introspection import REVOCATION_MARGIN_SECONDS
from sts.spiffeid import SpiffeId, SpiffeIdError
from sts.store import ExceptionGrant, Store, SubjectRevocation, TaskRecord, TokenRecord
from sts.strict_json import is_text
from sts.token_index import TokenIndexWriter

MAX_REASON_CHARS = 500
MAX_KILL_LIST = 1000
MAX_EXCEPTION_SECONDS = 7 * 24 * 3600
MAX_FUTURE_SECONDS = 366 * 24 * 3600
# The live view answers at most this many rows per call (``limit``; default DEFAULT_LIMIT).
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_LIMIT = re.compile(r"[0-9]{1,4}")


class Admin:
    """Kill switches and exceptions; callers are already checked to be admins."""

    def __init__(
        self,
        *,
        store: Store,
        catalog: Catalog,
        audit: AuditLog,
        max_token_ttl: int,
        index: TokenIndexWriter | None = None,
    ) -> None:
        self._store = store
        # This process's queued index entries are written before the index is read (sts.token_index).
        self._index = index
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

    # The live view: read-only, bounded (``limit`` ≤ MAX_LIMIT), every call audited with its caller.

    def view(
        self,
        caller: Caller,
        what: str,
        query: Mapping[str, str],
        *,
        request_id: str,
        now: float | None = None,
    ) -> dict[str, Any]:
        """``tasks``, ``tokens``, ``revocations`` or ``exceptions``, filtered by ``query`` (validated)."""
        current = time.time() if now is None else now
        result: dict[str, Any]
        if what == "tasks":
            fields = _query(query, {"assignee", "active", "limit"})
            assignee = str(_spiffe_id(fields["assignee"], "assignee")) if "assignee" in fields else None
            active = _flag(fields.get("active"), "active")
            tasks = self._store.list_tasks(
                now=current, assignee=assignee, active_only=active, limit=_limit(fields)
            )
            result = {"tasks": [_task_view(t, current) for t in tasks]}
        elif what == "tokens":
            fields = _query(query, {"spiffe_id", "task_id", "limit"})
            if ("spiffe_id" in fields) == ("task_id" in fields):
                raise InvalidRequest("name exactly one of spiffe_id or task_id")
            self._flush_index()
            if "spiffe_id" in fields:
                sub = str(_spiffe_id(fields["spiffe_id"], "spiffe_id"))
                tokens = self._store.tokens(spiffe_id=sub, limit=_limit(fields))
            else:
                tokens = self._store.tokens(
                    task_id=_text_id(fields["task_id"], "task_id"), limit=_limit(fields)
                )
            result = {"tokens": [self._token_view(t, current) for t in tokens]}
        elif what == "revocations":
            fields = _query(query, {"limit"})
            kept = self._store.subject_revocations(limit=_limit(fields))
            result = {"revocations": [revocation_json(r, current) for r in kept]}
        else:
            fields = _query(query, {"spiffe_id", "limit"})
            of = str(_spiffe_id(fields["spiffe_id"], "spiffe_id")) if "spiffe_id" in fields else None
            grants = self._store.exceptions(of)[: _limit(fields)]
            result = {"exceptions": [exception_json(g, current) for g in grants]}
        self._audit_view(caller, what, fields, request_id, current)
        return result

    def task(
        self, caller: Caller, task_id: str, query: Mapping[str, str], *, request_id: str
    ) -> dict[str, Any]:
        """One task with its (unexpired) tokens, each with whether it is revoked."""
        current = time.time()
        fields = _query(query, {"limit"})
        task = self._store.get_task(_text_id(task_id, "task_id"))
        if task is None:
            raise NotFound("no such task")
        self._flush_index()
        tokens = self._store.tokens(task_id=task.id, limit=_limit(fields))
        self._audit_view(caller, "task", {"task_id": task.id}, request_id, current)
        return {**_task_view(task, current), "tokens": [self._token_view(t, current) for t in tokens]}

    def withdraw_exception(
        self, caller: Caller, grant_id: str, body: Any, *, request_id: str, now: float | None = None
    ) -> dict[str, Any]:
        """End a break-glass exception now: it opens no more exchanges, and every token issued under it
        (the token index knows which) is revoked, so introspection answers inactive at once."""
        current = int(time.time() if now is None else now)
        reason = _reason(_object(body, {"reason"}))
        grant = self._store.withdraw_exception(
            _text_id(grant_id, "exception_id"), at=current, by=str(caller.spiffe_id), reason=reason
        )
        if grant is None:
            raise NotFound("no such exception")
        ended = [
            t
            # Every live token of the workload, not a page of them: a cap here would leave the rest of
            # the exception's tokens active (fail open). The index holds only unexpired tokens.
            for t in self._store.tokens(spiffe_id=grant.spiffe_id, limit=sys.maxsize)
            if t.exception_id == grant.id
        ]
        for token in ended:
            self._store.revoke_jti(token.jti, expires_at=token.expires_at + REVOCATION_MARGIN_SECONDS)
        result = {**exception_json(grant, current), "tokens_revoked": len(ended)}
        self._audit.record(
            {
                "event": "exception_withdrawn",
                "decision": "allow",
                "request_id": request_id,
                "caller": str(caller.spiffe_id),
                **result,
                "reason": reason,
            },
            now=current,
        )
        return result

    def lift_revocation(
        self, caller: Caller, body: Any, *, request_id: str, now: float | None = None
    ) -> dict[str, Any]:
        """``unrevoke-workload``: the SPIFFE ID may get new tokens from now on. Tokens issued before its
        kill switch stay inactive (the record is kept, with ``until`` now, until they have expired)."""
        current = int(time.time() if now is None else now)
        fields = _object(body, {"spiffe_id", "reason"})
        reason = _reason(fields)
        spiffe_id = str(_spiffe_id(fields.get("spiffe_id"), "spiffe_id"))
        existing = self._store.subject_revocation(spiffe_id)
        if existing is None or not existing.blocks_issuance(current):
            raise NotFound("no kill switch in force for this spiffe_id")
        lifted = dataclasses.replace(existing, until=current)
        self._store.revoke_subject(lifted, keep_until=current + self._max_token_ttl)
        result = {"lifted": spiffe_id, "revoked_at": existing.revoked_at, "at": current}
        self._audit.record(
            {
                "event": "admin_revocation_lifted",
                "decision": "allow",
                "request_id": request_id,
                "caller": str(caller.spiffe_id),
                "reason": reason,
                "previous_until": existing.until,
                **result,
            },
            now=current,
        )
        return result

    def _flush_index(self) -> None:
        if self._index is not None:
            self._index.flush()

    def _token_view(self, token: TokenRecord, now: float) -> dict[str, Any]:
        state = self._store.token_state(token.jti, token.task_id, token.spiffe_id)
        revocation = state.subject_revocation
        cut_off = revocation is not None and (
            token.issued_at <= revocation.revoked_at or revocation.blocks_issuance(now)
        )
        task_over = token.task_id is not None and (state.task is None or state.task.status(now) != "active")
        return {
            "jti": token.jti,
            "spiffe_id": token.spiffe_id,
            "task_id": token.task_id,
            "target": token.target,
            "token_class": token.token_class,
            "issued_at": token.issued_at,
            "exp": token.expires_at,
            "binding": token.binding,
            "exception_id": token.exception_id,
            # Inactive the way introspection sees it: its jti, its task ended, or its subject cut off.
            "revoked": state.jti_revoked or cut_off or task_over,
        }

    def _audit_view(
        self, caller: Caller, what: str, fields: Mapping[str, str], request_id: str, now: float
    ) -> None:
        self._audit.record(
            {
                "event": "admin_view",
                "decision": "allow",
                "request_id": request_id,
                "caller": str(caller.spiffe_id),
                "view": what,
                **{f"query_{k}": v for k, v in fields.items()},
            },
            now=now,
        )


def revocation_json(revocation: SubjectRevocation, now: float) -> dict[str, Any]:
    return {
        "spiffe_id": revocation.spiffe_id,
        "revoked_at": revocation.revoked_at,
        "until": revocation.until,
        "by": revocation.by,
        "reason": revocation.reason,
        "in_force": revocation.blocks_issuance(now),
    }


def _task_view(task: TaskRecord, now: float) -> dict[str, Any]:
    return {
        "task_id": task.id,
        "creator": task.creator,
        "assignee": task.assignee,
        "purpose": task.purpose,
        "targets": [{"target": t.target, "scopes": sorted(t.scopes)} for t in task.targets],
        "created_at": task.created_at,
        "deadline": task.deadline,
        "status": task.status(now),
        "completed_at": task.completed_at,
        "completed_by": task.completed_by,
    }


def _query(query: Mapping[str, str], known: set[str]) -> dict[str, str]:
    """Query parameters: only known names, and each once (a repeated one is ambiguous)."""
    unknown = sorted(set(query) - known)
    if unknown:
        raise InvalidRequest(f"unknown parameter '{unknown[0][:64]}' (known: {', '.join(sorted(known))})")
    fields = dict(query)
    for name, value in fields.items():
        if not is_text(value) or len(value) > 2048:
            raise InvalidRequest(f"{name} must be at most 2048 characters of text")
    return fields


def _limit(fields: Mapping[str, str]) -> int:
    value = fields.get("limit")
    if value is None:
        return DEFAULT_LIMIT
    if not _LIMIT.fullmatch(value) or not 1 <= int(value) <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(value)


def _flag(value: str | None, name: str) -> bool:
    if value in (None, "", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise InvalidRequest(f"{name} must be 1 or 0")


def _text_id(value: str, name: str) -> str:
    if not is_text(value) or not value or len(value) > 2048:
        raise InvalidRequest(f"{name} must be a non-empty string")
    return value


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
        "status": grant.status(now),
        "withdrawn_at": grant.withdrawn_at,
        "withdrawn_by": grant.withdrawn_by,
        "withdraw_reason": grant.withdraw_reason,
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
