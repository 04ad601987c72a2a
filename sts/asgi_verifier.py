"""Starlette and FastAPI resource servers: our access tokens, checked before a handler runs.

One :class:`TokenAuth` wraps the service's :class:`~sts.verify.TokenVerifier` and offers three ways
in, all answering refusals the same way (RFC 6750 §3 / RFC 9449 §7.1 challenges in
``WWW-Authenticate``, the JSON error body, ``Cache-Control: no-store``; the verifier logs each once
with its rule):

* **FastAPI**: ``token: VerifiedToken = Depends(auth.require("invoke"))`` on a route; the handler gets
  the verified token. ``auth.install(app)`` serves the RFC 9728 metadata and renders refusals with
  both challenges and the RFC 6750 body (without it FastAPI's own handler answers
  ``{"detail": …}`` with the same status and challenge).
* **Starlette**: ``@auth.requires("invoke")`` on an endpoint (``request.state.sts_token`` holds the
  token), and :meth:`TokenAuth.metadata_route` among the routes.
* **Middleware** (any ASGI app, the MCP SDK's included): :class:`TokenMiddleware` requires a token
  on every path but the ``exempt`` ones and the metadata, which it serves itself; routes that need
  more scopes use ``require``/``requires``, which reuse the middleware's verified token (a DPoP proof
  is single-use, so a request is verified once).

Non-blocking: the checks run through :meth:`~sts.verify.TokenVerifier.averify_request`, in a worker
thread, so a key-set refresh, an introspection call or a shared replay store never waits on the
event loop. The DPoP ``htu`` is checked against ``public_base_url`` + the request path when given
(behind a proxy), else against the URL the request names (scheme, ``Host``, path). A TLS client
certificate reaches the verifier through the ASGI TLS extension (``client_cert_chain``) when the
server provides it.

Imports Starlette (the ``asgi`` extra: ``pip install 'spiffe-sts[asgi]'``); FastAPI is never
imported (its ``Depends`` takes any callable). Nothing else in ``sts`` imports this module.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from cryptography import x509

from sts.errors import StsError
from sts.logsafe import escape
from sts.verify import InvalidAccessToken, Refusal, TokenVerifier, VerifiedToken

try:
    from starlette.datastructures import URL
    from starlette.exceptions import HTTPException
    from starlette.requests import HTTPConnection, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from starlette.types import ASGIApp, Receive, Scope, Send
except ModuleNotFoundError as missing:  # pragma: no cover - the base install has no Starlette
    raise ModuleNotFoundError(
        "sts.asgi_verifier needs Starlette: pip install 'spiffe-sts[asgi]'", name=missing.name
    ) from missing

__all__ = [
    "STATE_KEY",
    "TokenAuth",
    "TokenMiddleware",
    "TokenRefused",
    "client_certificate",
    "render",
    "verified_token",
]

log = logging.getLogger(__name__)

STATE_KEY = "sts_token"  # request.state.sts_token: the VerifiedToken of this request
Endpoint = Callable[[Request], Awaitable[Response]]


class TokenRefused(HTTPException):
    """A refusal raised by the FastAPI dependency: an ``HTTPException`` with its status and challenge,
    so FastAPI answers it even without :meth:`TokenAuth.install` (which renders the RFC 6750 body and
    each challenge as its own field)."""

    def __init__(self, error: StsError, answer: Refusal) -> None:
        challenges = [value for name, value in answer.headers if name == "WWW-Authenticate"]
        headers = {name: value for name, value in answer.headers if name != "WWW-Authenticate"}
        if challenges:
            headers["WWW-Authenticate"] = ", ".join(challenges)  # RFC 9110 §11.6.1: one field, listed
        super().__init__(answer.status, detail=answer.body.get("error_description"), headers=headers)
        self.error = error
        self.answer = answer


def render(answer: Refusal) -> Response:
    """A Starlette response for a refusal: its JSON body, and each header field as its own line."""
    response = JSONResponse(dict(answer.body), status_code=answer.status)
    for name, value in answer.headers:
        response.headers.append(name, value)
    return response


def verified_token(request: HTTPConnection) -> VerifiedToken | None:
    """The token verified for this request (by the middleware, ``require`` or ``requires``), if any."""
    token = request.scope.get("state", {}).get(STATE_KEY)
    return token if isinstance(token, VerifiedToken) else None


def client_certificate(scope: Scope) -> x509.Certificate | None:
    """The TLS client certificate of this connection, from the ASGI TLS extension (leaf first, PEM)."""
    tls = scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") if isinstance(tls, dict) else None
    if not chain or not isinstance(chain[0], str):
        return None
    try:
        return x509.load_pem_x509_certificate(chain[0].encode("ascii"))
    except ValueError:
        return None


class TokenAuth:
    """Our access tokens for one Starlette or FastAPI app: see the module docstring.

    ``verifier``: the service's :class:`~sts.verify.TokenVerifier` (with ``resource=`` the
    challenges name its RFC 9728 metadata, which :meth:`install` / :meth:`metadata_route` serve).
    ``public_base_url``: the scheme and host clients use, when a proxy stands in front.
    """

    def __init__(self, verifier: TokenVerifier, *, public_base_url: str | None = None) -> None:
        self.verifier = verifier
        self._public_base_url = public_base_url.rstrip("/") if public_base_url else None

    # --- checking one request -------------------------------------------------------------------

    def url_of(self, scope: Scope) -> str:
        """The request's URL without query, as the client named it (DPoP ``htu``)."""
        url = URL(scope=scope)
        if self._public_base_url is not None:
            return f"{self._public_base_url}{url.path}"
        return str(url.replace(query="", fragment=""))

    async def check(self, connection: HTTPConnection, scope: str | Iterable[str] = ()) -> VerifiedToken:
        """The verified token of this request with ``scope``, or :class:`~sts.errors.StsError`.

        A token the middleware (or an outer check) verified already is reused: only the scope is
        checked again. Otherwise the whole check runs, in a worker thread.
        """
        required = frozenset(scope.split() if isinstance(scope, str) else scope)
        earlier = verified_token(connection)
        url = self.url_of(connection.scope)
        if earlier is not None:
            self.verifier.check_scope(earlier, required, method=_method(connection), url=url)
            return earlier
        token = await self.verifier.averify_request(
            authorization=connection.headers.get("authorization"),
            dpop=connection.headers.getlist("dpop"),
            method=_method(connection),
            url=url,
            client_certificate=client_certificate(connection.scope),
            scope=required,
        )
        connection.scope.setdefault("state", {})[STATE_KEY] = token
        return token

    def refusal(self, error: StsError, connection: HTTPConnection) -> Refusal:
        """The answer to ``error`` (logged here when it is not about the token: the verifier logs those)."""
        if not isinstance(error, InvalidAccessToken):
            log.info(
                "refused %s %s: %s %s",
                _method(connection),
                escape(connection.url.path),
                error.error,
                escape(error.detail or error.description),
            )
        return self.verifier.refusal(error)

    # --- FastAPI --------------------------------------------------------------------------------

    def require(self, scope: str | Iterable[str] = ()) -> Callable[[Request], Awaitable[VerifiedToken]]:
        """A FastAPI dependency: ``token: VerifiedToken = Depends(auth.require("invoke"))``.

        Raises :class:`TokenRefused` (an ``HTTPException``) on refusal.
        """

        async def dependency(request: Request) -> VerifiedToken:
            try:
                return await self.check(request, scope)
            except StsError as e:
                raise TokenRefused(e, self.refusal(e, request)) from e

        return dependency

    def install(self, app: Any) -> None:
        """On a Starlette or FastAPI ``app``: serve the RFC 9728 metadata (when the verifier has a
        ``resource``) and answer :class:`TokenRefused` with the RFC 6750 body and challenges."""
        if self.verifier.resource is not None:
            app.router.routes.append(self.metadata_route())

        async def refused(request: Request, exc: Exception) -> Response:
            if not isinstance(exc, TokenRefused):  # pragma: no cover - registered for TokenRefused only
                raise exc
            return render(exc.answer)

        app.add_exception_handler(TokenRefused, refused)

    # --- Starlette ------------------------------------------------------------------------------

    def requires(self, scope: str | Iterable[str] = ()) -> Callable[[Endpoint], Endpoint]:
        """A decorator for Starlette endpoints (``async def endpoint(request) -> Response``): the endpoint
        runs only with a verified token (``request.state.sts_token``), else the refusal is the answer."""

        def decorator(endpoint: Endpoint) -> Endpoint:
            @functools.wraps(endpoint)
            async def guarded(request: Request) -> Response:
                try:
                    await self.check(request, scope)
                except StsError as e:
                    return render(self.refusal(e, request))
                return await endpoint(request)

            return guarded

        return decorator

    def metadata_route(self) -> Route:
        """``GET`` :attr:`~sts.verify.TokenVerifier.resource_metadata_path`: the RFC 9728 document."""
        path = self.verifier.resource_metadata_path
        if path is None:
            raise ValueError("resource metadata needs TokenVerifier(resource=<this service's catalog URI>)")
        document = self.verifier.resource_metadata()

        async def metadata(request: Request) -> Response:
            return _metadata_response(document)

        return Route(path, metadata, methods=["GET"], name="sts_protected_resource_metadata")


class TokenMiddleware:
    """ASGI middleware: every HTTP request needs a good token (``scope``: the scopes all need), but
    ``exempt`` paths (health checks) and the RFC 9728 metadata, which this middleware serves.

    ``auth``: a :class:`TokenAuth`, or a :class:`~sts.verify.TokenVerifier` (wrapped with
    ``public_base_url``). With Starlette: ``Middleware(TokenMiddleware, auth=auth, scope="invoke")``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        auth: TokenAuth | TokenVerifier,
        scope: str | Iterable[str] = (),
        exempt: Iterable[str] = (),
        public_base_url: str | None = None,
    ) -> None:
        self.app = app
        self.auth = auth if isinstance(auth, TokenAuth) else TokenAuth(auth, public_base_url=public_base_url)
        self._scope = frozenset(scope.split() if isinstance(scope, str) else scope)
        self._exempt = frozenset(exempt)
        verifier = self.auth.verifier
        self._metadata_path = verifier.resource_metadata_path
        self._metadata = verifier.resource_metadata() if verifier.resource is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._exempt:
            await self.app(scope, receive, send)
            return
        if self._metadata is not None and scope["path"] == self._metadata_path and scope["method"] in (
            "GET",
            "HEAD",
        ):
            await _metadata_response(self._metadata)(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        try:
            await self.auth.check(connection, self._scope)
        except StsError as e:
            await render(self.auth.refusal(e, connection))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _metadata_response(document: Mapping[str, Any]) -> Response:
    """The metadata document: public, the same for everyone, readable from any origin."""
    return Response(
        json.dumps(document, separators=(",", ":")),
        media_type="application/json",
        headers={"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"},
    )


def _method(connection: HTTPConnection) -> str:
    return str(connection.scope.get("method", "GET"))
