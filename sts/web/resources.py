"""JSON endpoints: tasks (``/tasks``) and the admin kill switches and exceptions (``/admin/...``).

Every call authenticates with the caller's JWT-SVID (``Authorization: Bearer``); admin calls also
need an admin SPIFFE ID. Views only parse and render; the rules live in ``sts.tasks`` and ``sts.admin``.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from sts import strict_json
from sts.admin import exception_json
from sts.callers import Caller
from sts.errors import InvalidRequest, StsError
from sts.store import tolerating_store_loss
from sts.tasks import task_json
from sts.web.common import audited_refusal, services
from sts.web.http import client_certificate_chain

resources = Blueprint("resources", __name__)

JSON_CONTENT_TYPE = "application/json"


@resources.errorhandler(StsError)
def refused(error: StsError) -> Response:
    """Every refused call here (bad credentials, not an admin, bad body) leaves an audit line."""
    return audited_refusal(error)


def _caller() -> Caller:
    return services().callers.authenticate(
        request.headers.get("Authorization"), client_certificates=client_certificate_chain(request.environ)
    )


def _admin() -> Caller:
    caller = _caller()
    services().callers.require_admin(caller)
    return caller


def _json_body() -> Any:
    """The JSON body, parsed strictly (``sts.strict_json``: no duplicate members, NaN or huge numbers)."""
    if request.mimetype != JSON_CONTENT_TYPE:
        raise InvalidRequest(f"the body must be {JSON_CONTENT_TYPE}")
    try:
        return strict_json.loads(request.get_data())
    except strict_json.JsonError as e:
        member = f" (member '{e.member}')" if e.member and e.member not in str(e) else ""
        raise InvalidRequest(f"the body is not valid JSON: {e}{member}") from e


@resources.post("/tasks")
def create_task() -> Response:
    caller = _caller()
    task = services().tasks.create(caller, _json_body(), request_id=g.request_id)
    response = jsonify(task_json(task, task.created_at))
    response.status_code = 201
    response.headers["Location"] = f"/tasks/{task.id}"
    return response


@resources.get("/tasks/<task_id>")
def get_task(task_id: str) -> Response:
    caller = _caller()
    return jsonify(task_json(services().tasks.get(caller, task_id), time.time()))


@resources.post("/tasks/<task_id>/complete")
def complete_task(task_id: str) -> Response:
    caller = _caller()
    task = services().tasks.complete(caller, task_id, request_id=g.request_id)
    return jsonify(task_json(task, time.time()))


@resources.post("/admin/revocations")
def admin_revocation() -> Response:
    caller = _admin()
    return jsonify(services().admin.revoke(caller, _json_body(), request_id=g.request_id))


@resources.post("/admin/exceptions")
def grant_exception() -> Response:
    caller = _admin()
    grant = services().admin.grant_exception(caller, _json_body(), request_id=g.request_id)
    response = jsonify(exception_json(grant, grant.created_at))
    response.status_code = 201
    return response


def _args() -> dict[str, str]:
    """The query string; a parameter given twice is refused (which one would count is ambiguous)."""
    for name, values in request.args.lists():
        if len(values) > 1:
            raise InvalidRequest(f"parameter '{name[:64]}' is given more than once")
    return dict(request.args.items())


@resources.get("/admin/exceptions")
def list_exceptions() -> Response:
    caller = _admin()
    return jsonify(services().admin.view(caller, "exceptions", _args(), request_id=g.request_id))


@resources.get("/admin/tasks")
def admin_tasks() -> Response:
    caller = _admin()
    return jsonify(services().admin.view(caller, "tasks", _args(), request_id=g.request_id))


@resources.get("/admin/tasks/<task_id>")
def admin_task(task_id: str) -> Response:
    caller = _admin()
    return jsonify(services().admin.task(caller, task_id, _args(), request_id=g.request_id))


@resources.get("/admin/tokens")
def admin_tokens() -> Response:
    caller = _admin()
    return jsonify(services().admin.view(caller, "tokens", _args(), request_id=g.request_id))


@resources.get("/admin/revocations")
def admin_revocations() -> Response:
    caller = _admin()
    return jsonify(services().admin.view(caller, "revocations", _args(), request_id=g.request_id))


@resources.post("/admin/revocations/lift")
def lift_revocation() -> Response:
    caller = _admin()
    return jsonify(services().admin.lift_revocation(caller, _json_body(), request_id=g.request_id))


@resources.post("/admin/exceptions/<exception_id>/withdraw")
def withdraw_exception(exception_id: str) -> Response:
    caller = _admin()
    body = _json_body()
    return jsonify(services().admin.withdraw_exception(caller, exception_id, body, request_id=g.request_id))


@resources.post("/admin/store-loss/ack")
def acknowledge_store_loss() -> Response:
    """``sts admin store-loss ack``: while the store is lost no kill switch can be proven, the admin's
    own included, so this one call reads the kill list the store holds now instead of refusing."""
    with tolerating_store_loss():
        caller = _admin()
        body = _json_body()
        return jsonify(services().admin.acknowledge_store_loss(caller, body, request_id=g.request_id))
