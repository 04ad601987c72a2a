"""What every blueprint shares: the services of this app, and how a refusal is rendered and logged."""

from __future__ import annotations

import logging

from flask import Response, current_app, g, jsonify, request

from sts.errors import StsError
from sts.runtime import Services

log = logging.getLogger("sts.web")


def services() -> Services:
    return current_app.extensions["sts"]  # type: ignore[no-any-return]


def error_response(error: StsError) -> Response:
    """Render a refusal as its RFC 6749 §5.2 body with its status and headers; log the detail."""
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
