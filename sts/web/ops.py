"""Operations endpoints: liveness (``/healthz``) and readiness (``/readyz``)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from sts.web.common import services

ops = Blueprint("ops", __name__)


@ops.get("/healthz")
def healthz() -> Response:
    """The process answers; says nothing about its dependencies (that is /readyz)."""
    return jsonify(status="ok")


@ops.get("/readyz")
def readyz() -> Response:
    """Ready only when every trust domain has a bundle with JWT authorities (later: the store answers)."""
    problems = services().readiness()
    response = jsonify(status="ready" if not problems else "not ready", problems=problems)
    response.status_code = 200 if not problems else 503
    return response
