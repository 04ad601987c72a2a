"""OAuth endpoints: introspection, revocation, RFC 8414 metadata, JWKS (``/token``: token_endpoint)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.exceptions import NotFound

from sts.binding import DPOP_ALGORITHMS
from sts.callers import Caller
from sts.catalog import TokenClass
from sts.client_auth import CLIENT_ASSERTION_TYPE_JWT_SPIFFE
from sts.config import Settings
from sts.errors import InvalidCallerToken, InvalidClient, InvalidRequest, StsError
from sts.exchange import GRANT_TYPE_TOKEN_EXCHANGE
from sts.svid import ALGORITHMS as JWT_SVID_ALGORITHMS
from sts.web.common import audited_refusal, services
from sts.web.http import client_certificate_chain, parse_form, read_wsgi_body

oauth = Blueprint("oauth", __name__)


@oauth.errorhandler(StsError)
def refused(error: StsError) -> Response:
    """A refused introspection or revocation (bad credentials, bad body) leaves an audit line."""
    return audited_refusal(error)

def read_form() -> dict[str, list[str]]:
    """The form body of this request (introspection, revocation): the listener already bounded it."""
    limit = services().settings.server.max_body_bytes
    return parse_form(
        read_wsgi_body(request.environ, limit),
        request.environ.get("CONTENT_TYPE", ""),
        request.environ.get("QUERY_STRING", ""),
    )


def _single(form: dict[str, list[str]], name: str) -> str | None:
    """RFC 6749 §3.2: parameters must not be included more than once."""
    values = form.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise InvalidRequest(f"send '{name}' once")
    return values[0]


def _token_parameter(form: dict[str, list[str]]) -> str:
    """RFC 7662 §2.1 / RFC 7009 §2.1: exactly one ``token``; ``token_type_hint`` may be ignored."""
    values = form.get("token", [])
    if len(values) != 1 or not values[0]:
        raise InvalidRequest("send exactly one 'token' parameter")
    return values[0]


def _read_form_after_authentication() -> tuple[dict[str, list[str]], InvalidRequest | None]:
    """The form, or an empty one and why it could not be read: a caller must be refused as
    unauthenticated (401) before it is told what is wrong with its body (400)."""
    try:
        return read_form(), None
    except InvalidRequest as e:
        return {}, e


def _authenticate_form_caller(form: dict[str, list[str]], unreadable: InvalidRequest | None) -> Caller:
    """The caller of a form endpoint: Bearer JWT-SVID, ``jwt-spiffe`` client assertion or mTLS.

    A ``client_id`` (RFC 6749 §2.2; optional with an assertion, RFC 7521 §4.2) must be the SPIFFE ID
    that authenticated. An unreadable body is refused only once the caller has authenticated.
    """
    caller = services().callers.authenticate(
        request.headers.get("Authorization"),
        client_certificates=client_certificate_chain(request.environ),
        client_assertion=_single(form, "client_assertion"),
        client_assertion_type=_single(form, "client_assertion_type"),
    )
    if unreadable is not None:
        raise unreadable
    client_id = _single(form, "client_id")
    if client_id is not None and client_id != str(caller.spiffe_id):
        raise InvalidClient("client_id does not match the authenticated client")
    return caller


@oauth.post("/introspect")
def introspect() -> Response:
    """RFC 7662: a resource server (Bearer JWT-SVID, client assertion or mTLS) asks whether a token is
    active. A failed bearer token is ``invalid_token`` (§2.3 via RFC 6750), a failed client
    assertion ``invalid_client`` (§2.3 via RFC 6749 §5.2)."""
    form, unreadable = _read_form_after_authentication()
    caller = _authenticate_form_caller(form, unreadable)
    token = _token_parameter(form)
    return jsonify(services().introspection.introspect(caller, token, request_id=g.request_id))


@oauth.post("/revoke")
def revoke() -> Response:
    """RFC 7009: the holder revokes its own token; 200 whatever the token was (§2.2).

    The caller is the client of RFC 7009 §2.1: failing to authenticate it is ``invalid_client``
    (§2.2.1), with a Bearer challenge only when it sent a Bearer credential.
    """
    form, unreadable = _read_form_after_authentication()
    authorization = request.headers.get("Authorization")
    try:
        caller = _authenticate_form_caller(form, unreadable)
    except InvalidCallerToken as e:
        scheme = "Bearer" if authorization and not e.missing else None
        raise InvalidClient(e.description, detail=e.detail, scheme=scheme) from e
    services().introspection.revoke(caller, _token_parameter(form), request_id=g.request_id)
    return Response(status=200, mimetype="text/plain")  # RFC 7009 §2.2: the body is not read


@oauth.get("/.well-known/oauth-authorization-server")
def metadata() -> Response:
    """RFC 8414 authorization server metadata: this issuer's one document (:func:`metadata_document`)."""
    response = jsonify(metadata_document(services().settings))
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


def metadata_document(settings: Settings) -> dict[str, Any]:
    """RFC 8414 §2 metadata, identical on the plain and the TLS listener of one issuer (§3).

    With a TLS listener (``mtls_url``), RFC 8705 §5 ``mtls_endpoint_aliases`` name its token,
    introspection and revocation endpoints, ``spiffe_x509`` joins every auth-method list and
    certificate-bound tokens are announced (§3.3). Auth-method names follow
    draft-ietf-oauth-spiffe-client-auth (``spiffe_jwt``, ``spiffe_x509``);
    ``client_assertion_types_supported`` and the per-class JWKS URIs are extensions of this server,
    not registered metadata.
    """
    issuer = settings.issuer
    mtls = settings.mtls_url
    client_methods = ["spiffe_jwt"] + (["spiffe_x509"] if mtls else [])
    document: dict[str, Any] = {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/token",
        "jwks_uri": f"{issuer}/jwks.json",
        "introspection_endpoint": f"{issuer}/introspect",
        "revocation_endpoint": f"{issuer}/revoke",
        "grant_types_supported": [GRANT_TYPE_TOKEN_EXCHANGE],
        "response_types_supported": [],
        "scopes_supported": sorted({scope for entry in settings.catalog for scope in entry.scopes}),
        "token_endpoint_auth_methods_supported": ["none", *client_methods],
        "token_endpoint_auth_signing_alg_values_supported": sorted(JWT_SVID_ALGORITHMS),
        "introspection_endpoint_auth_methods_supported": client_methods,
        "introspection_endpoint_auth_signing_alg_values_supported": sorted(JWT_SVID_ALGORITHMS),
        "revocation_endpoint_auth_methods_supported": client_methods,
        "revocation_endpoint_auth_signing_alg_values_supported": sorted(JWT_SVID_ALGORITHMS),
        "client_assertion_types_supported": [CLIENT_ASSERTION_TYPE_JWT_SPIFFE],
        "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS),
        "tls_client_certificate_bound_access_tokens": mtls is not None,
        "access_token_signing_alg_values_supported": [settings.keys.algorithm],
        "tool_jwks_uri": f"{issuer}/jwks/tool.json",
        "data_jwks_uri": f"{issuer}/jwks/data.json",
    }
    if mtls is not None:
        document["mtls_endpoint_aliases"] = {
            "token_endpoint": f"{mtls}/token",
            "introspection_endpoint": f"{mtls}/introspect",
            "revocation_endpoint": f"{mtls}/revoke",
        }
    return document


@oauth.get("/jwks.json")
def jwks() -> Response:
    """All public signing keys of every token class; each ``kid`` names its class."""
    return _jwks_response(services().keys.jwks())


@oauth.get("/jwks/<token_class>.json")
def class_jwks(token_class: str) -> Response:
    """One class's keys only: a data service loading ``/jwks/data.json`` cannot accept a tool token."""
    try:
        wanted = TokenClass(token_class)
    except ValueError:
        raise NotFound(f"no key set for token class {token_class!r}") from None
    return _jwks_response(services().keys.jwks(wanted))


def _jwks_response(jwks: Mapping[str, Any]) -> Response:
    response = jsonify(jwks)
    response.headers["Cache-Control"] = "public, max-age=60"
    return response
