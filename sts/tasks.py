"""Task lifecycle: create, read, complete, expire; and the task check of a task-scoped exchange.

A task is declared intent: an orchestrator (allowed by Cedar action ``task:create``) names the
assignee, the targets and scopes the task may use, a purpose and a lifetime (at most
``tasks.max_ttl``). Tokens exchanged with its ``task_id`` carry it and never outlive it; completing
the task (creator, assignee or an admin) or reaching the deadline makes every one of them inactive,
because introspection asks the store about the task of every token.

Must not import Flask; it is handed parsed JSON and an authenticated caller.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sts.audit import AuditLog
from sts.callers import Caller
from sts.catalog import Catalog, is_scope_token
from sts.errors import (
    AccessDenied,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    NotFound,
    StsError,
    TemporarilyUnavailable,
)
from sts.policy import Policy, TaskCreateRequest
from sts.spiffeid import SpiffeId, SpiffeIdError
from sts.store import Store, TaskRecord, TaskTarget
from sts.strict_json import is_text

MAX_PURPOSE_CHARS = 500
MAX_TARGETS = 32
_KNOWN_FIELDS = frozenset({"assignee", "targets", "purpose", "ttl_seconds"})


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """The body of ``POST /tasks``, parsed and checked against the catalog."""

    assignee: SpiffeId
    targets: tuple[TaskTarget, ...]
    purpose: str
    ttl_seconds: int

    @classmethod
    def from_json(cls, body: Any, catalog: Catalog, max_ttl: int) -> TaskRequest:
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        unknown = sorted(set(body) - _KNOWN_FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown field '{unknown[0]}' (known: {', '.join(sorted(_KNOWN_FIELDS))})")
        try:
            assignee = SpiffeId.parse(body.get("assignee", ""))  # parse refuses what is not a str
        except SpiffeIdError as e:
            raise InvalidRequest(f"assignee must be a SPIFFE ID: {e}") from e
        purpose = body.get("purpose")
        # is_text: an unpaired surrogate (json.loads makes one of "\ud800") would fail in the store.
        if not is_text(purpose) or not purpose.strip() or len(purpose) > MAX_PURPOSE_CHARS:
            raise InvalidRequest(
                f"purpose must be a non-empty string of at most {MAX_PURPOSE_CHARS} characters"
            )
        ttl = body.get("ttl_seconds")
        # A whole JSON number: NaN, 1e999 (inf), 60.0, true and "60" are not; integers of any size are
        # compared as integers, never converted to float.
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= max_ttl:
            raise InvalidRequest(f"ttl_seconds must be a whole number from 1 to {max_ttl}")
        return cls(assignee, _targets(body.get("targets"), catalog), purpose, ttl)


def _targets(raw: Any, catalog: Catalog) -> tuple[TaskTarget, ...]:
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_TARGETS:
        raise InvalidRequest(f"targets must be a list of 1 to {MAX_TARGETS} {{target, scopes}} objects")
    targets: dict[str, TaskTarget] = {}
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"target", "scopes"}:
            raise InvalidRequest('each target must be {"target": "<catalog id>", "scopes": ["..."]}')
        entry = catalog.get(item["target"]) if isinstance(item["target"], str) else None
        if entry is None:
            raise InvalidTarget(f"unknown target {item['target']!r}")
        scopes = item["scopes"]
        if (
            not isinstance(scopes, list)
            or not scopes
            or not all(isinstance(s, str) and is_scope_token(s) for s in scopes)
        ):
            raise InvalidScope(f"scopes of {entry.id} must be a non-empty list of scope names")
        wanted = frozenset(scopes)
        catalog.check_scopes(entry, wanted)
        if entry.id in targets:
            raise InvalidRequest(f"target {entry.id} is listed twice")
        targets[entry.id] = TaskTarget(entry.id, wanted)
    return tuple(targets.values())


def task_json(task: TaskRecord, now: float) -> dict[str, Any]:
    """The JSON shape of a task (``POST /tasks``, ``GET /tasks/{id}``)."""
    return {
        "task_id": task.id,
        "status": task.status(now),
        "creator": task.creator,
        "assignee": task.assignee,
        "targets": [{"target": t.target, "scopes": sorted(t.scopes)} for t in task.targets],
        "purpose": task.purpose,
        "created_at": task.created_at,
        "expires_at": task.deadline,
        "completed_at": task.completed_at,
        "completed_by": task.completed_by,
    }


class TaskService:
    """Creates, reads and completes tasks; checks a task for an exchange. Every change is audited."""

    def __init__(
        self,
        *,
        store: Store,
        catalog: Catalog,
        policy: Policy,
        audit: AuditLog,
        max_ttl: int,
        admins: frozenset[SpiffeId],
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._policy = policy
        self._audit = audit
        self._max_ttl = max_ttl
        self._admins = admins

    def create(self, caller: Caller, body: Any, *, request_id: str, now: float | None = None) -> TaskRecord:
        current = time.time() if now is None else now
        try:
            request = TaskRequest.from_json(body, self._catalog, self._max_ttl)
            decision = self._policy.decide_task(
                TaskCreateRequest(
                    creator=caller.spiffe_id,
                    assignee=request.assignee,
                    targets=frozenset(t.target for t in request.targets),
                    purpose=request.purpose,
                    ttl_seconds=request.ttl_seconds,
                    now=int(current),
                    client_auth=caller.method,
                )
            )
            if decision.errors:
                raise TemporarilyUnavailable(
                    "policy could not be evaluated", detail="; ".join(decision.errors)
                )
            if not decision.allowed:
                raise AccessDenied(
                    f"policy does not permit {caller.spiffe_id} to create tasks for {request.assignee}",
                    detail=decision.reason,
                )
            task = TaskRecord(
                id=f"task_{secrets.token_urlsafe(16)}",
                creator=str(caller.spiffe_id),
                assignee=str(request.assignee),
                targets=request.targets,
                purpose=request.purpose,
                created_at=int(current),
                deadline=int(current) + request.ttl_seconds,
            )
            self._store.create_task(task)
        except StsError as e:
            self._record(
                "task_create", "deny", caller, request_id, current, error=e.error, reason=e.description
            )
            raise
        self._record(
            "task_create",
            "allow",
            caller,
            request_id,
            current,
            task_id=task.id,
            assignee=task.assignee,
            targets=[t.target for t in task.targets],
            policy_ids=list(decision.policy_ids),
        )
        return task

    def get(self, caller: Caller, task_id: str) -> TaskRecord:
        """Creator, assignee and admins may read a task; to anyone else it does not exist (no oracle)."""
        task = self._store.get_task(task_id)
        if task is None or not self._may_see(caller, task):
            raise NotFound("no such task")
        return task

    def complete(
        self, caller: Caller, task_id: str, *, request_id: str, now: float | None = None
    ) -> TaskRecord:
        """End the task now: every token issued under it becomes inactive at once."""
        current = time.time() if now is None else now
        task = self.get(caller, task_id)
        done = self._store.complete_task(task.id, at=int(current), by=str(caller.spiffe_id))
        if done is None:
            raise NotFound("no such task")
        self._record(
            "task_complete",
            "allow",
            caller,
            request_id,
            current,
            task_id=task.id,
            status=done.status(current),
        )
        return done

    def check_for_exchange(
        self, task_id: str, principal: SpiffeId, target_id: str, scopes: frozenset[str], now: float
    ) -> TaskRecord:
        """Extension ``task_id``: the task exists, is active, is this workload's, covers target and scopes."""
        task = self._store.get_task(task_id)
        if task is None or task.assignee != str(principal):
            raise InvalidRequest("unknown task: no active task with this id is assigned to this workload")
        status = task.status(now)
        if status != "active":
            raise InvalidRequest(f"the task is {status}; it allows no new tokens")
        declared: Mapping[str, frozenset[str]] = {t.target: t.scopes for t in task.targets}
        if target_id not in declared:
            raise InvalidTarget(f"target {target_id} is not among the targets of the task")
        outside = scopes - declared[target_id]
        if outside:
            raise InvalidScope(f"scope outside the task for {target_id}: {' '.join(sorted(outside))}")
        return task

    def _may_see(self, caller: Caller, task: TaskRecord) -> bool:
        who = str(caller.spiffe_id)
        return who in (task.creator, task.assignee) or caller.spiffe_id in self._admins

    def _record(
        self, event: str, decision: str, caller: Caller, request_id: str, now: float, **fields: Any
    ) -> None:
        self._audit.record(
            {
                "event": event,
                "decision": decision,
                "request_id": request_id,
                "caller": str(caller.spiffe_id),
                **fields,
            },
            now=now,
        )
