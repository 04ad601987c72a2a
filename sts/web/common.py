"""What every blueprint shares: the services of this app, and how a refusal is rendered and logged."""

from __future__ import annotations

import logging
import time

from flask import Response, current_app, g, jsonify, request

from sts.errors import StsError
from sts.runtime import Services
from sts.web.token_endpoint import anonymous_refusal, count_store_error

log = logging.getLogger("sts.web")


def services() -> Services:
    return current_app.extensions["sts"]  # type: ignore[no-any-return]


def gate_refusal(error: StsError) -> StsError:
    """A refusal of an unauthenticated caller (401) counts against its address's refusal budget.

    Past the budget the answer becomes 429 and no per-request audit line is written (a summary line
    is: ``sts.refusal_limit``). Refusals of authenticated callers are never limited here.
    """
    if error.status != 401 or g.get("refusal_gated"):
        return error
    g.refusal_gated = True
    limited = anonymous_refusal(services(), error, request.remote_addr or "", time.time())
    if limited is not None:
        g.refusal_suppressed = True
    return limited or error


def error_response(error: StsError) -> Response:
    """Render a refusal as its RFC 6749 §5.2 body with its status and headers; log the detail."""
    count_store_error(services().metrics, error)
    level = logging.ERROR if error.status >= 500 else logging.INFO
    log.log(
        level,
        "refused %s %s: %s %s%s (request %s)",
        request.method,
        request.path,
        error.error,
        error.description,
        f" [{error.detail}]" if error.detail else "",
        g.get("request_id"),
    )
    response = jsonify(error.to_json())
    response.status_code = error.status
    response.headers.update(error.headers())
    return response


def audited_refusal(error: StsError) -> Response:
    """A refused call of a JSON or form endpoint: one ``api_refusal`` audit line, then the answer.

    Except past an anonymous caller's refusal budget (``gate_refusal``): then one summary line.
    """
    error = gate_refusal(error)
    if g.get("refusal_suppressed"):
        return error_response(error)
    services().audit.record(
        {
            "event": "api_refusal",
            "decision": "deny",
            "request_id": g.request_id,
            "path": request.path,
            "error": error.error,
            "error_description": error.description,
        }
    )
    return error_response(error)
