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
    """Ready (200) only when the store answers and the trust domains can be verified; the body lists
    every trust domain, what the Workload API serves, and warnings (e.g. a configured trust domain
    the Workload API does not serve) that do not stop serving."""
    readiness = services().readiness()
    response = jsonify(readiness.to_json())
    response.status_code = 200 if not readiness.problems else 503
    return response
