"""``POST /token`` as a plain WSGI handler in front of Flask: the hot path of every exchange.

Flask's request and response machinery cost more per exchange than the exchange itself (bench/:
~170 µs of ~510 µs), so this one route is served here with the same rules, headers, error bodies,
logging and audit as every other endpoint; all other requests go on to the Flask app.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterable
from typing import Any

from sts.errors import StsError
from sts.exchange import ExchangeRequest
from sts.runtime import Services
from sts.web.oauth import form_from_environ
from sts.web.tls import client_certificate_chain

log = logging.getLogger("sts.web")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_STATUS = {
    200: "200 OK",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    413: "413 Content Too Large",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}


def request_id(environ: dict[str, Any]) -> str:
    """The caller's ``X-Request-Id`` when it is a safe token, else a fresh one."""
    supplied = str(environ.get("HTTP_X_REQUEST_ID", ""))
    return supplied if REQUEST_ID.fullmatch(supplied) else secrets.token_hex(8)


class TokenEndpoint:
    """WSGI middleware: answers ``POST /token`` itself, passes everything else to ``app``."""

    def __init__(self, services: Services, app: WsgiApp) -> None:
        self._services = services
        self._app = app
        self._limit = services.settings.server.max_body_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/token":
            return self._app(environ, start_response)
        rid = request_id(environ)
        if environ.get("REQUEST_METHOD") != "POST":
            body = {"error": "invalid_request", "error_description": "the token endpoint takes POST only"}
            return self._respond(start_response, 405, body, rid, [("Allow", "POST")])
        exchange = self._services.exchange
        extra: list[tuple[str, str]] = []
        try:
            try:
                parsed = dataclasses.replace(
                    ExchangeRequest.from_form(form_from_environ(environ, self._limit)),
                    dpop_proof=environ.get("HTTP_DPOP"),
                    client_certificates=client_certificate_chain(environ),
                )
            except StsError as e:
                exchange.record_refusal(e, request_id=rid)
                raise
            status, body = 200, exchange.exchange(parsed, request_id=rid).to_json()
            extra.append(("Pragma", "no-cache"))
        except StsError as e:
            level = logging.ERROR if e.status >= 500 else logging.INFO
            detail = f" [{e.detail}]" if e.detail else ""
            log.log(level, "refused POST /token: %s %s%s (request %s)", e.error, e.description, detail, rid)
            status, body = e.status, e.to_json()
            extra.extend(e.headers().items())
        except Exception:  # a bug: logged with its traceback, answered generically (never the detail)
            log.exception("unexpected error serving POST /token (request %s)", rid)
            status, body = 500, StsError().to_json()
        return self._respond(start_response, status, body, rid, extra)

    @staticmethod
    def _respond(
        start_response: Callable[..., Any], status: int, body: Any, rid: str, extra: list[tuple[str, str]]
    ) -> Iterable[bytes]:
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Request-Id", rid),
            *extra,
        ]
        start_response(_STATUS.get(status, f"{status} Error"), headers)
        return [payload]
