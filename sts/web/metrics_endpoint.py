"""``GET /metrics``: the Prometheus exposition (``sts.metrics``), on every listener.

Off (404) when ``metrics.enabled`` is false; 403 for a peer outside ``metrics.allow`` when that is
set. The peer is the connection's address (``X-Forwarded-For`` is not trusted: anyone could send it).
Everything is computed here, when scraped, so ``/token`` never pays for an exposition.
"""

from __future__ import annotations

from flask import Blueprint, Response, abort, request
from prometheus_client import CONTENT_TYPE_LATEST

from sts.errors import AccessDenied
from sts.web.common import error_response, services

metrics_blueprint = Blueprint("metrics", __name__)


@metrics_blueprint.get("/metrics")
def metrics() -> Response:
    """The exposition of this process (and, under ``sts serve``, of every worker's counters)."""
    current = services()
    observed = current.metrics
    if observed is None:
        abort(404)
    if not observed.allows(request.remote_addr or ""):
        return error_response(AccessDenied("metrics are not served to this address"))
    return Response(observed.exposition(current.store, current.trust), content_type=CONTENT_TYPE_LATEST)
