"""The Flask app factory: no global app, one error handler for the whole error tree."""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from sts.config import config_path_from_env, load_settings
from sts.errors import RequestTooLarge, StsError
from sts.runtime import Services, build_services
from sts.web.common import error_response
from sts.web.oauth import oauth
from sts.web.ops import ops
from sts.web.resources import resources
from sts.web.token_endpoint import TokenEndpoint, request_id

log = logging.getLogger(__name__)


def create_app(services: Services) -> Flask:
    """One app serving the given parts; tests build it over their own Services."""
    app = Flask("sts")
    app.config["MAX_CONTENT_LENGTH"] = services.settings.server.max_body_bytes
    app.extensions["sts"] = services
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.register_blueprint(oauth)
    app.register_blueprint(ops)
    app.register_blueprint(resources)
    app.wsgi_app = TokenEndpoint(services, app.wsgi_app)  # type: ignore[method-assign]

    @app.before_request
    def assign_request_id() -> None:
        g.request_id = request_id(request.environ)

    @app.after_request
    def common_headers(response: Response) -> Response:
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Request-Id"] = g.get("request_id", "")
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.errorhandler(StsError)
    def protocol_error(error: StsError) -> Response:
        return error_response(error)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error: RequestEntityTooLarge) -> Response:
        limit = services.settings.server.max_body_bytes
        return error_response(RequestTooLarge(f"request body is larger than {limit} bytes"))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        response = jsonify(error="invalid_request", error_description=error.description or error.name)
        response.status_code = error.code or 400
        if error.code == 405:
            response.headers["Allow"] = ", ".join(error.valid_methods or [])  # type: ignore[attr-defined]
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        log.exception(
            "unexpected error serving %s %s (request %s)", request.method, request.path, g.get("request_id")
        )
        return error_response(StsError("internal error"))

    return app


def create_app_from_env() -> Flask:
    """Factory for the WSGI server's worker processes: config from ``STS_CONFIG`` (set by ``sts serve``)."""
    settings = load_settings(config_path_from_env())
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(build_services(settings))
