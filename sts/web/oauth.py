"""OAuth endpoints: introspection, revocation, RFC 8414 metadata, JWKS (``/token``: token_endpoint)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.exceptions import NotFound

from sts.binding import DPOP_ALGORITHMS
from sts.catalog import TokenClass
from sts.errors import InvalidCallerToken, InvalidClient, InvalidRequest
from sts.exchange import CLIENT_ASSERTION_TYPE_JWT_SPIFFE, GRANT_TYPE_TOKEN_EXCHANGE
from sts.svid import ALGORITHMS as JWT_SVID_ALGORITHMS
from sts.web.common import services
from sts.web.http import client_certificate_chain, parse_form, read_wsgi_body

oauth = Blueprint("oauth", __name__)

def read_form() -> dict[str, list[str]]:
    """The form body of this request (introspection, revocation): the listener already bounded it."""
    limit = services().settings.server.max_body_bytes
    return parse_form(
        read_wsgi_body(request.environ, limit),
        request.environ.get("CONTENT_TYPE", ""),
        request.environ.get("QUERY_STRING", ""),
    )


def _token_parameter(form: dict[str, list[str]]) -> str:
    """RFC 7662 §2.1 / RFC 7009 §2.1: exactly one ``token``; ``token_type_hint`` may be ignored."""
    values = form.get("token", [])
    if len(values) != 1 or not values[0]:
        raise InvalidRequest("send exactly one 'token' parameter")
    return values[0]


@oauth.post("/introspect")
def introspect() -> Response:
    """RFC 7662: the caller (a resource server's JWT-SVID as bearer) asks whether a token is active."""
    sts = services()
    caller = sts.callers.authenticate(
        request.headers.get("Authorization"), client_certificates=client_certificate_chain(request.environ)
    )
    token = _token_parameter(read_form())
    return jsonify(sts.introspection.introspect(caller, token, request_id=g.request_id))


@oauth.post("/revoke")
def revoke() -> Response:
    """RFC 7009: the holder revokes its own token; 200 whatever the token was (§2.2).

    The caller is the client of RFC 7009 §2.1: failing to authenticate it is ``invalid_client``
    (§2.2.1), with a Bearer challenge only when it sent a Bearer credential.
    """
    sts = services()
    authorization = request.headers.get("Authorization")
    try:
        caller = sts.callers.authenticate(
            authorization, client_certificates=client_certificate_chain(request.environ)
        )
    except InvalidCallerToken as e:
        scheme = "Bearer" if authorization and not e.missing else None
        raise InvalidClient(e.description, detail=e.detail, scheme=scheme) from e
    sts.introspection.revoke(caller, _token_parameter(read_form()), request_id=g.request_id)
    return Response(status=200)


@oauth.get("/.well-known/oauth-authorization-server")
def metadata() -> Response:
    """RFC 8414 authorization server metadata: every endpoint this server offers."""
    settings = services().settings
    issuer = settings.issuer
    tls = settings.listen.tls
    scopes = sorted({scope for entry in settings.catalog for scope in entry.scopes})
    response = jsonify(
        {
            "issuer": issuer,
            "token_endpoint": f"{issuer}/token",
            "jwks_uri": f"{issuer}/jwks.json",
            "introspection_endpoint": f"{issuer}/introspect",
            "revocation_endpoint": f"{issuer}/revoke",
            "introspection_endpoint_auth_methods_supported": ["spiffe_jwt"]
            + (["spiffe_x509"] if tls else []),
            "revocation_endpoint_auth_methods_supported": ["spiffe_jwt"] + (["spiffe_x509"] if tls else []),
            "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS),
            "tls_client_certificate_bound_access_tokens": True,
            "tool_jwks_uri": f"{issuer}/jwks/tool.json",
            "data_jwks_uri": f"{issuer}/jwks/data.json",
            "grant_types_supported": [GRANT_TYPE_TOKEN_EXCHANGE],
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": ["none", "spiffe_jwt"]
            + (["spiffe_x509"] if tls else []),
            "token_endpoint_auth_signing_alg_values_supported": sorted(JWT_SVID_ALGORITHMS),
            "client_assertion_types_supported": [CLIENT_ASSERTION_TYPE_JWT_SPIFFE],
            "scopes_supported": scopes,
            "access_token_signing_alg_values_supported": [settings.keys.algorithm],
        }
    )
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


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
