"""The web application: the Flask app (every route but ``/token``) and the one dispatcher in front of it.

:class:`StsHttp` is what the listeners call with a complete request; :func:`create_app` gives the
same routes as a WSGI app (tests, embedding), with ``/token`` answered by the same endpoint object.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from sts.config import config_path_from_env, load_settings
from sts.errors import RequestTooLarge, StsError
from sts.logsafe import configure_logging
from sts.runtime import Services, build_services
from sts.web.common import error_response, gate_refusal
from sts.web.http import (
    HttpRequest,
    HttpResponse,
    WsgiApp,
    call_wsgi,
    environ_for,
    error_answer,
    request_from_environ,
    status_line,
)
from sts.web.metrics_endpoint import metrics_blueprint
from sts.web.oauth import oauth
from sts.web.ops import ops
from sts.web.resources import resources
from sts.web.token_endpoint import TokenEndpoint, early_refusal, request_id

log = logging.getLogger(__name__)
MAX_RECORDED_PATH = 256  # characters of a refused request's target kept in its audit record and log line


def create_app(services: Services) -> Flask:
    """One app serving the given parts; tests build it over their own Services."""
    app = Flask("sts")
    app.config["MAX_CONTENT_LENGTH"] = services.settings.server.max_body_bytes
    app.extensions["sts"] = services
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.register_blueprint(oauth)
    app.register_blueprint(ops)
    app.register_blueprint(metrics_blueprint)
    app.register_blueprint(resources)
    app.wsgi_app = _WsgiFront(services, app.wsgi_app)  # type: ignore[method-assign]

    @app.before_request
    def assign_request_id() -> None:
        g.request_id = request_id(request.headers.get("X-Request-Id"))

    @app.after_request
    def common_headers(response: Response) -> Response:
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Request-Id"] = g.get("request_id", "")
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.errorhandler(StsError)
    def protocol_error(error: StsError) -> Response:
        return error_response(gate_refusal(error))

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error: RequestEntityTooLarge) -> Response:
        limit = services.settings.server.max_body_bytes
        return error_response(RequestTooLarge(f"request body is larger than {limit} bytes"))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        code = "not_found" if error.code == 404 else "invalid_request"
        response = jsonify(error=code, error_description=error.description or error.name)
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


class _WsgiFront:
    """WSGI middleware: ``/token`` through :class:`TokenEndpoint`, everything else to the Flask app."""

    def __init__(self, services: Services, app: WsgiApp) -> None:
        self._token = TokenEndpoint(services)
        self._app = app
        self._limit = services.settings.server.max_body_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/token":
            return self._app(environ, start_response)
        answer = self._token.handle(request_from_environ(environ, self._limit))
        framing = ("Content-Length", str(len(answer.body)))
        start_response(status_line(answer.status), [*answer.headers, framing])
        return [answer.body]


class StsHttp:
    """What a listener calls with a complete request: one synchronous answer, never an exception."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._token = TokenEndpoint(services)
        self._flask = create_app(services)

    def handle(self, request: HttpRequest) -> HttpResponse:
        if request.method == "HEAD":
            # RFC 9110 §9.3.2, §8.6: the GET's fields, Content-Length included (WSGI would answer 0);
            # the listener sends the head alone.
            request = dataclasses.replace(request, method="GET")
        if request.path == "/token":
            return self._token.handle(request)
        try:
            if request.body_error is not None:
                return self.refuse(request.method, request.path, request.source, request.body_error)
            return call_wsgi(self._flask, environ_for(request))
        except Exception:  # a bug below Flask's own handlers: answered generically, never the detail
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return error_answer(StsError())

    def refuse(self, method: str, path: str, source: str, error: StsError) -> HttpResponse:
        """A request refused before any credential was read (a bad head, a body too large or too slow):
        audited like every refusal (``api_refusal``), within the source's anonymous budget."""
        rid = secrets.token_hex(8)
        if len(path) > MAX_RECORDED_PATH:  # a head may be 64 KiB: its target is not copied whole
            path = path[:MAX_RECORDED_PATH] + "..."

        def record(refused: StsError) -> None:
            self.services.audit.record(
                {
                    "event": "api_refusal",
                    "decision": "deny",
                    "request_id": rid,
                    "path": path,
                    "error": refused.error,
                    "error_description": refused.description,
                }
            )

        shown = early_refusal(self.services, error, source, record)
        log.info("refused %s %s: %s %s (request %s)", method, path, shown.error, shown.description, rid)
        return error_answer(shown, [("X-Request-Id", rid)])


def services_from_env() -> Services:
    """The services of one worker process: config from ``STS_CONFIG`` (set by ``sts serve``)."""
    settings = load_settings(config_path_from_env())
    configure_logging(settings.log_level, settings.log_format)
    return build_services(settings)


def create_app_from_env() -> Flask:
    """A WSGI app for embedding the STS in another WSGI server (``sts serve`` uses :class:`StsHttp`)."""
    return create_app(services_from_env())
