"""``POST /token`` outside Flask: the hot path of every exchange.

Flask's request and response machinery cost more per exchange than the exchange itself (bench/:
~170 µs of ~510 µs), so this one route is answered here, from a complete :class:`HttpRequest`,
with the same rules, headers, error bodies, logging and audit as every other endpoint.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable

from sts.errors import InvalidClient, InvalidRequest, RateLimited, StsError
from sts.exchange import ExchangeRequest
from sts.logsafe import log_direct
from sts.metrics import Metrics
from sts.runtime import Services
from sts.store import StoreUnavailable
from sts.web.http import HttpRequest, HttpResponse, error_answer, json_response, parse_form

log = logging.getLogger("sts.web")

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id(supplied: str | None) -> str:
    """The caller's ``X-Request-Id`` when it is a safe token, else a fresh one."""
    return supplied if supplied is not None and REQUEST_ID.fullmatch(supplied) else secrets.token_hex(8)


def count_store_error(metrics: Metrics | None, error: StsError) -> None:
    """``sts_store_operation_errors_total``: counted where a store failure becomes a 503 answer."""
    if metrics is not None and isinstance(error, StoreUnavailable):
        metrics.store_error(error)


def anonymous_refusal(services: Services, error: StsError, source: str, now: float) -> StsError | None:
    """The 429 that replaces an anonymous refusal once ``source`` spent its budget, else None.

    Called only for refusals of requests that never authenticated; see ``sts.refusal_limit``.
    """
    limiter = services.refusals
    if not source or limiter.admit(source, now):
        return None
    return RateLimited(
        "too many refused requests from this address; wait before trying again",
        retry_after=limiter.retry_after(source, now),
        detail=f"suppressed: {error.error} {error.description}",
    )


def early_refusal(
    services: Services, error: StsError, source: str, record: Callable[[StsError], None]
) -> StsError:
    """A refusal met before any credential was looked at (anonymous by definition): ``record`` audits
    it, or past the source's budget it becomes 429 without an audit line of its own."""
    limited = anonymous_refusal(services, error, source, time.time())
    if limited is not None:
        return limited
    record(error)
    return error


_AUTH_SCHEME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,32}")  # RFC 9110 §11.1 auth-scheme (a token)


def _refuse_http_client_auth(authorization: str | None) -> None:
    """RFC 6749 §2.3, §5.2: no HTTP authentication scheme authenticates clients here.

    Ignoring ``Authorization: Basic`` would let a confidential client believe it authenticated; it is
    refused with a challenge for the scheme it used. Clients authenticate by mTLS (an X.509-SVID) or
    a ``jwt-spiffe`` ``client_assertion``, so two methods in one request cannot arise this way.
    """
    if authorization is None:
        return
    scheme = authorization.split(" ", 1)[0]
    raise InvalidClient(
        "clients authenticate here by mTLS or a jwt-spiffe client_assertion, not the Authorization header",
        scheme=scheme if _AUTH_SCHEME.fullmatch(scheme) else "Basic",
    )


class TokenEndpoint:
    """RFC 8693 §2.1 / RFC 6749 §3.2: answers ``POST /token`` from a complete request."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._metrics = services.metrics

    def handle(self, request: HttpRequest) -> HttpResponse:
        """One answer; its duration observed in ``sts_token_exchange_duration_seconds`` (two clock
        reads and one histogram update: the exchange itself is counted from its audit record)."""
        metrics = self._metrics
        if metrics is None:
            return self._handle(request)
        start = time.perf_counter()
        try:
            return self._handle(request)
        finally:
            metrics.observe_duration(time.perf_counter() - start)

    def _handle(self, request: HttpRequest) -> HttpResponse:
        rid = request_id(request.headers.get("x-request-id"))
        exchange = self._services.exchange

        def record(error: StsError) -> None:
            exchange.record_refusal(error, request_id=rid)

        if request.method != "POST":
            wrong_method = InvalidRequest("the token endpoint takes POST only")
            refused = early_refusal(self._services, wrong_method, request.source, record)
            if refused is not wrong_method:
                return self._refusal(refused, rid)  # past the anonymous budget: 429
            return self._respond(405, wrong_method.to_json(), rid, [("Allow", "POST")])

        try:
            if request.body_error is not None:
                # Answered without raising it: a raised exception's traceback would link the stored
                # error to the listener's frame and keep the request's body stream alive (granian
                # RSGI kept the connection open after a "Connection: close" answer; measured).
                refused = early_refusal(self._services, request.body_error, request.source, record)
                return self._refusal(refused, rid)
            try:
                _refuse_http_client_auth(request.headers.get("authorization"))
                form = parse_form(request.body, request.headers.get("content-type", ""), request.query)
                parsed = ExchangeRequest.from_form(
                    form,
                    dpop_proof=request.headers.get("dpop"),
                    client_certificates=request.client_certificates,
                )
            except StsError as e:
                raise early_refusal(self._services, e, request.source, record) from None
            services, source = self._services, request.source
            issued = exchange.exchange(
                parsed,
                request_id=rid,
                anonymous_refusal=lambda error, now: anonymous_refusal(services, error, source, now),
            )
        except StsError as e:
            return self._refusal(e, rid)
        except Exception:  # a bug: logged with its traceback, answered generically (never the detail)
            log.exception("unexpected error serving POST /token (request %s)", rid)
            return self._respond(500, StsError().to_json(), rid, [])
        log_direct(
            log,
            logging.INFO,
            "issued %s token for %s to %s (task %s, binding %s, jti %s, request %s)",
            (
                issued.token_class,
                issued.target,
                issued.subject,
                issued.task_id or "-",
                issued.binding,
                issued.jti,
                rid,
            ),
            {
                "request_id": rid,
                "sub": issued.subject,
                "target": issued.target,
                "token_class": issued.token_class,
                "task_id": issued.task_id,
                "binding": issued.binding,
                "jti": issued.jti,
            },
        )
        return self._respond(200, issued.to_json(), rid, [("Pragma", "no-cache")])

    def _refusal(self, error: StsError, rid: str) -> HttpResponse:
        count_store_error(self._metrics, error)
        level = logging.ERROR if error.status >= 500 else logging.INFO
        detail = f" [{error.detail}]" if error.detail else ""
        log_direct(
            log,
            level,
            "refused POST /token: %s %s%s (request %s)",
            (error.error, error.description, detail, rid),
            {"request_id": rid, "error": error.error},
        )
        return error_answer(error, [("X-Request-Id", rid)])

    @staticmethod
    def _respond(status: int, body: object, rid: str, extra: list[tuple[str, str]]) -> HttpResponse:
        return json_response(status, body, [("X-Request-Id", rid), *extra])
