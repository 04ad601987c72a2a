"""Our server as unmodified third-party Python clients see it (issue 12).

Each client is used the way its own documentation says, against the real server (both listeners of
``tests/interop/conftest.py``), with nothing mocked and nothing patched:

- authlib: ``OAuth2Session`` (requests) and ``AsyncOAuth2Client`` (httpx) for metadata, the token
  exchange, errors, client authentication, introspection, revocation and mTLS; its RFC 8414
  metadata model and its RFC 9068 resource-server validator;
- joserfc: RFC 9068 access-token validation against the per-class JWKS, and DPoP proofs (RFC 9449);
- google-auth: ``google.oauth2.sts.Client`` (RFC 8693) for the exchange, errors, DPoP, mTLS and
  revocation;
- requests-oauthlib / oauthlib: ``OAuth2Session`` with ``BackendApplicationClient``;
- PyJWT: ``PyJWKClient`` on the per-class JWKS.

Our client authentication is a SPIFFE JWT-SVID minted by the workload's SPIRE agent, not something a
client library signs: with authlib it is a client-auth method registered under its metadata name
``spiffe_jwt`` (``register_client_auth_method``) that adds ``client_assertion_type=…:jwt-spiffe`` and
the SVID to the body. Where a client cannot do something, the test that shows it says so in its name
(``…_limitation``) and asserts the client's own behaviour, so a new release that changes it shows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import google.auth.exceptions
import google.auth.transport.requests
import jwt
import pytest
import requests
from authlib.integrations.base_client import OAuthError, UnsupportedTokenTypeError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc6750.errors import InvalidTokenError as AuthlibInvalidTokenError
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from authlib.oauth2.rfc9068 import JWTBearerTokenValidator
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from google.oauth2 import sts as google_sts
from joserfc import jwt as jose_jwt
from joserfc.errors import BadSignatureError, InvalidClaimError, InvalidKeyIdError, JoseError
from joserfc.jwk import ECKey, KeySet
from oauthlib.oauth2 import BackendApplicationClient
from oauthlib.oauth2.rfc6749.errors import (
    CustomOAuth2Error,
    InvalidClientError,
    OAuth2Error,
    UnsupportedGrantTypeError,
)
from requests_oauthlib import OAuth2Session as OAuthlibSession

from tests.authority import TestAuthority, b64url
from tests.interop.conftest import AGENT, RESOURCE_SERVER, Interop
from tests.test_mtls_http import issue

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
ORCHESTRATOR = "spiffe://example.org/orchestrator"
WELL_KNOWN = "/.well-known/oauth-authorization-server"

# An authlib client-auth hook: (client, method, uri, headers, body) -> (uri, headers, body).
AuthHook = Callable[[Any, str, str, dict[str, str], str], tuple[str, dict[str, str], str]]


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def metadata(interop: Interop) -> dict[str, Any]:
    document: dict[str, Any] = requests.get(f"{interop.plain.url}{WELL_KNOWN}", timeout=5).json()
    return document


@pytest.fixture(scope="module")
def calc_certificate(interop: Interop, example_org: TestAuthority) -> tuple[str, str]:
    """An X.509-SVID of the resource server ``tool:calc`` names, for mTLS introspection."""
    cert, key, _ = issue(example_org, interop.directory, "py-clients-calc", uris=(RESOURCE_SERVER,))
    return str(cert), str(key)


def agent_cert(interop: Interop) -> tuple[str, str]:
    return str(interop.client_cert), str(interop.client_key)


def svid(authority: TestAuthority, interop: Interop, sub: str = AGENT) -> str:
    """A JWT-SVID for this issuer, as the workload's SPIRE agent would hand it out."""
    return authority.mint(sub, interop.issuer)


def claims_of(token: str) -> dict[str, Any]:
    """The claims, unverified: only for looking at what a verified token (elsewhere) carries."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def x5t_s256(certificate_pem: Path) -> str:
    """RFC 8705 §3.1: base64url(SHA-256(DER of the certificate)), computed here, not by the server's code."""
    der = x509.load_pem_x509_certificate(certificate_pem.read_bytes()).public_bytes(Encoding.DER)
    return b64url(hashlib.sha256(der).digest())


def pyjwt_verify(jwks_uri: str, token: str, audience: str, issuer: str) -> dict[str, Any]:
    """An independent signature check of an issued token: PyJWT's JWKS client on the class key set."""
    key = jwt.PyJWKClient(jwks_uri).get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=["ES256"],
        audience=audience,
        issuer=issuer,
        options={"require": ["exp", "iat", "jti", "sub", "aud", "iss"]},
    )
    return claims


def form_auth(**parameters: str) -> AuthHook:
    """An authlib client-auth method that adds form parameters (RFC 6749 §2.3 "other methods")."""

    def encode(
        client: Any, method: str, uri: str, headers: dict[str, str], body: str
    ) -> tuple[str, dict[str, str], str]:
        extra = dict(parameters)
        if client.client_id:
            extra["client_id"] = client.client_id
        body = f"{body}&{urlencode(extra)}" if body else urlencode(extra)
        if "Content-Length" in headers:
            headers["Content-Length"] = str(len(body))
        return uri, headers, body

    return encode


def spiffe_jwt(mint: Callable[[], str]) -> tuple[str, AuthHook]:
    """The ``spiffe_jwt`` method (draft-ietf-oauth-spiffe-client-auth) for authlib: a fresh JWT-SVID as
    ``client_assertion`` with ``client_assertion_type=…:jwt-spiffe``, on every request."""

    def encode(
        client: Any, method: str, uri: str, headers: dict[str, str], body: str
    ) -> tuple[str, dict[str, str], str]:
        return form_auth(client_assertion_type=JWT_SPIFFE, client_assertion=mint())(
            client, method, uri, headers, body
        )

    return "spiffe_jwt", encode


def authlib_session(
    client_id: str, metadata: dict[str, Any], method: str = "none", **kwargs: Any
) -> OAuth2Session:
    """An authlib requests session configured from the metadata document, as its docs show."""
    return OAuth2Session(
        client_id=client_id,
        token_endpoint_auth_method=method,
        revocation_endpoint_auth_method=method,
        token_endpoint=metadata["token_endpoint"],
        default_timeout=10,
        **kwargs,
    )


def exchange_parameters(subject: str, audience: str = "tool:calc", scope: str = "invoke") -> dict[str, str]:
    return {"subject_token": subject, "subject_token_type": JWT_TYPE, "audience": audience, "scope": scope}


def plain_exchange(interop: Interop, authority: TestAuthority, audience: str, scope: str) -> str:
    """A token to look at, from a plain form POST (the clients under test are used elsewhere)."""
    body = {"grant_type": GRANT, **exchange_parameters(svid(authority, interop), audience, scope)}
    response = requests.post(f"{interop.plain.url}/token", data=body, timeout=10)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def introspect_as_calc(interop: Interop, authority: TestAuthority, token: str) -> dict[str, Any]:
    """RFC 7662 answer for the resource server of ``tool:calc`` (Bearer JWT-SVID)."""
    response = requests.post(
        f"{interop.plain.url}/introspect",
        data={"token": token},
        headers={"Authorization": f"Bearer {svid(authority, interop, RESOURCE_SERVER)}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def dpop_proof(key: ECKey, method: str, url: str) -> str:
    """RFC 9449 §4.2 proof made with joserfc alone: typ dpop+jwt, the public JWK, jti/htm/htu/iat."""
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    claims = {"jti": secrets.token_urlsafe(16), "htm": method, "htu": url, "iat": int(time.time())}
    return jose_jwt.encode(header, claims, key, algorithms=["ES256"])


# ------------------------------------------------------------------------------------------------ authlib


def test_authlib_fetches_the_same_metadata_from_both_listeners(interop: Interop) -> None:
    """RFC 8414 §3 as authlib's own ``load_server_metadata`` fetches it (a GET with withhold_token)."""
    with OAuth2Session(default_timeout=10) as session:
        plain = session.request("GET", f"{interop.plain.url}{WELL_KNOWN}", withhold_token=True)
        tls = session.request(
            "GET", f"{interop.tls.url}{WELL_KNOWN}", withhold_token=True, verify=str(interop.ca)
        )
    assert plain.status_code == tls.status_code == 200
    document = plain.json()
    assert tls.json() == document
    assert document["issuer"] == interop.issuer
    assert document["token_endpoint"] == f"{interop.issuer}/token"
    assert document["grant_types_supported"] == [GRANT]
    assert document["mtls_endpoint_aliases"] == {
        "token_endpoint": f"{interop.tls.url}/token",
        "introspection_endpoint": f"{interop.tls.url}/introspect",
        "revocation_endpoint": f"{interop.tls.url}/revoke",
    }
    assert document["tool_jwks_uri"] == f"{interop.issuer}/jwks/tool.json"
    assert document["data_jwks_uri"] == f"{interop.issuer}/jwks/data.json"


def test_authlib_metadata_validation_limitation(
    metadata: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """authlib 1.9 ``AuthorizationServerMetadata.validate()`` refuses ``response_types_supported: []``.

    RFC 8414 §2 makes the member REQUIRED and a "JSON array containing a list of the OAuth 2.0
    response_type values that this authorization server supports"; it sets no minimum length. We have
    no authorization endpoint, so the true list is empty (RFC 7591 §2.1: the token-endpoint-only grants
    use no response type). authlib tests ``if not value`` and so cannot tell empty from absent: its
    limitation, not ours. Every other validator of authlib accepts the document.

    The loopback test issuer is http (production issuers are https, which RFC 8414 §2 requires); the
    authlib switch for local development, ``AUTHLIB_INSECURE_TRANSPORT``, lets its https checks pass.
    """
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    document = AuthorizationServerMetadata(metadata)
    with pytest.raises(ValueError, match=r'^"response_types_supported" is required$'):
        document.validate()
    assert metadata["response_types_supported"] == []  # present, a JSON array: what RFC 8414 §2 asks
    for key in AuthorizationServerMetadata.REGISTRY_KEYS:
        if key != "response_types_supported":
            getattr(document, f"validate_{key}")()
    with_one = AuthorizationServerMetadata({**metadata, "response_types_supported": ["code"]})
    with_one.validate()  # the same document with a non-empty list passes: the empty list alone is refused


def test_authlib_token_exchange_as_public_client(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """``fetch_token(grant_type=…token-exchange, subject_token=…)`` with method ``none`` (client_id in
    the body, RFC 6749 §2.3 public client): our RFC 8693 §2.2.1 answer parses into an OAuth2Token."""
    with authlib_session(AGENT, metadata) as session:
        token = session.fetch_token(grant_type=GRANT, **exchange_parameters(svid(example_org, interop)))
    assert token["token_type"] == "Bearer"
    assert token["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert token["scope"] == "invoke"
    assert token["expires_in"] == 200
    assert abs(token["expires_at"] - (time.time() + 200)) < 10  # authlib computed it from expires_in
    assert not token.is_expired()
    claims = pyjwt_verify(metadata["tool_jwks_uri"], token["access_token"], "tool:calc", interop.issuer)
    assert claims["sub"] == claims["client_id"] == AGENT


def test_authlib_method_none_without_client_id_limitation(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """authlib's ``none`` method always adds ``client_id``; without one it sends the text ``None``.
    We refuse that client_id (it is not the subject's SPIFFE ID): RFC 6749 §5.2 ``invalid_client``,
    which authlib raises as ``OAuthError`` with our description."""
    sent: list[str] = []
    with OAuth2Session(token_endpoint_auth_method="none", default_timeout=10) as session:
        session.hooks["response"].append(lambda r, *a, **k: sent.append(r.request.body))
        with pytest.raises(OAuthError) as refused:
            session.fetch_token(
                metadata["token_endpoint"],
                grant_type=GRANT,
                **exchange_parameters(svid(example_org, interop)),
            )
    assert "client_id=None" in sent[0]
    assert refused.value.error == "invalid_client"
    assert "client_id" in refused.value.description


@pytest.mark.parametrize(
    ("audience", "scope", "error", "text"),
    [
        ("data:crm", "write", "invalid_target", "policy"),
        ("tool:nope", "invoke", "invalid_target", "not a known target"),
        ("tool:calc", "invoke admin", "invalid_scope", "admin"),
    ],
    ids=["policy-denies", "unknown-audience", "scope-not-offered"],
)
def test_authlib_raises_our_error_and_description(
    interop: Interop,
    example_org: TestAuthority,
    metadata: dict[str, Any],
    audience: str,
    scope: str,
    error: str,
    text: str,
) -> None:
    """RFC 6749 §5.2 / RFC 8693 §2.2.2 errors come out of authlib as ``OAuthError(error, description)``."""
    with authlib_session(AGENT, metadata) as session, pytest.raises(OAuthError) as refused:
        session.fetch_token(
            grant_type=GRANT, **exchange_parameters(svid(example_org, interop), audience, scope)
        )
    assert refused.value.error == error
    assert text in refused.value.description
    assert session.token is None


def test_authlib_spiffe_jwt_client_assertion(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """Client authentication by ``jwt-spiffe`` assertion, as an authlib auth method registered under the
    metadata's name ``spiffe_jwt``: the token names the authenticated client."""
    assert "spiffe_jwt" in metadata["token_endpoint_auth_methods_supported"]
    assert JWT_SPIFFE in metadata["client_assertion_types_supported"]
    sent: list[str] = []
    with authlib_session(AGENT, metadata, "spiffe_jwt") as session:
        session.register_client_auth_method(spiffe_jwt(lambda: svid(example_org, interop)))
        session.hooks["response"].append(lambda r, *a, **k: sent.append(r.request.body))
        token = session.fetch_token(grant_type=GRANT, **exchange_parameters(svid(example_org, interop)))
    assert "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-spiffe" in sent[0]
    assert claims_of(token["access_token"])["client_id"] == AGENT


def test_authlib_spiffe_jwt_refused_assertion(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """An assertion that also names another audience is ``invalid_client`` (RFC 7523 §3), via authlib."""
    with authlib_session(AGENT, metadata, "spiffe_jwt") as session:
        session.register_client_auth_method(
            spiffe_jwt(lambda: example_org.mint(AGENT, [interop.issuer, "https://elsewhere.example"]))
        )
        with pytest.raises(OAuthError) as refused:
            session.fetch_token(grant_type=GRANT, **exchange_parameters(svid(example_org, interop)))
    assert refused.value.error == "invalid_client"
    assert "audience" in refused.value.description


def test_authlib_introspection_with_client_assertion(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """RFC 7662 via ``introspect_token`` for the resource server, authenticated with ``spiffe_jwt``."""
    assert "spiffe_jwt" in metadata["introspection_endpoint_auth_methods_supported"]
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    with authlib_session(RESOURCE_SERVER, metadata, "spiffe_jwt") as session:
        session.register_client_auth_method(spiffe_jwt(lambda: svid(example_org, interop, RESOURCE_SERVER)))
        response = session.introspect_token(
            metadata["introspection_endpoint"], token=token, token_type_hint="access_token"
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["active"] is True
    assert answer["token_type"] == "Bearer"
    assert (answer["sub"], answer["aud"], answer["scope"]) == (AGENT, "tool:calc", "invoke")
    assert answer["iss"] == interop.issuer


def test_authlib_introspection_with_bearer_svid(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """The same with the resource server's JWT-SVID as ``Authorization: Bearer`` (authlib headers=)."""
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    with authlib_session(RESOURCE_SERVER, metadata) as session:
        response = session.introspect_token(
            metadata["introspection_endpoint"],
            token=token,
            headers={"Authorization": f"Bearer {svid(example_org, interop, RESOURCE_SERVER)}"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["active"] is True
    with authlib_session(RESOURCE_SERVER, metadata) as session:
        anonymous = session.introspect_token(metadata["introspection_endpoint"], token=token)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "invalid_token"


def test_authlib_introspection_by_another_resource_server_is_inactive(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """A resource server that does not serve the token's audience learns nothing (RFC 7662 §4)."""
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    crm = "spiffe://example.org/data/crm"
    with authlib_session(crm, metadata, "spiffe_jwt") as session:
        session.register_client_auth_method(spiffe_jwt(lambda: svid(example_org, interop, crm)))
        response = session.introspect_token(metadata["introspection_endpoint"], token=token)
    assert response.status_code == 200, response.text
    assert response.json() == {"active": False}


def test_authlib_dpop_token_response_and_its_limitation(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """authlib 1.9's clients have no DPoP (RFC 9449): a proof made with joserfc goes in ``headers=``
    and authlib parses the ``token_type: DPoP`` answer, but its ``TokenAuth`` signs only Bearer, so
    the session cannot use the token: ``UnsupportedTokenTypeError`` before any request is sent."""
    assert "ES256" in metadata["dpop_signing_alg_values_supported"]
    key = ECKey.generate_key("P-256")
    proof = dpop_proof(key, "POST", metadata["token_endpoint"])
    with authlib_session(AGENT, metadata) as session:
        token = session.fetch_token(
            grant_type=GRANT,
            headers={"Accept": "application/json", "DPoP": proof},
            **exchange_parameters(svid(example_org, interop)),
        )
        assert token["token_type"] == "DPoP"
        assert claims_of(token["access_token"])["cnf"] == {"jkt": key.thumbprint()}
        sent: list[requests.Response] = []
        session.hooks["response"].append(lambda r, *a, **k: sent.append(r))
        with pytest.raises(UnsupportedTokenTypeError):
            session.get(f"{interop.plain.url}/healthz")
    assert sent == []


def test_authlib_revocation_by_the_holder(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """RFC 7009 via ``revoke_token``: the agent revokes its token (spiffe_jwt); then it is inactive."""
    assert "spiffe_jwt" in metadata["revocation_endpoint_auth_methods_supported"]
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    with authlib_session(AGENT, metadata, "spiffe_jwt") as holder:
        holder.register_client_auth_method(spiffe_jwt(lambda: svid(example_org, interop)))
        revoked = holder.revoke_token(  # type: ignore[no-untyped-call]  # unannotated in types-Authlib 1.8
            metadata["revocation_endpoint"], token=token, token_type_hint="access_token"
        )
    assert revoked.status_code == 200, revoked.text
    assert introspect_as_calc(interop, example_org, token) == {"active": False}


def test_authlib_revocation_by_a_non_holder_is_a_silent_no_op(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """The resource server of ``tool:calc``, with valid credentials, revokes a token that is not its
    own: 200 and nothing revoked. RFC 7009 §2.1 has the server refuse it; this server answers as §2.2
    does for an invalid token, so that /revoke is no oracle telling a caller whether a token string is
    live and whose it is (issue 12, item 6; README, HTTP)."""
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    with authlib_session(RESOURCE_SERVER, metadata, "spiffe_jwt") as server_side:
        server_side.register_client_auth_method(
            spiffe_jwt(lambda: svid(example_org, interop, RESOURCE_SERVER))
        )
        response = server_side.revoke_token(  # type: ignore[no-untyped-call]
            metadata["revocation_endpoint"], token=token
        )
    assert response.status_code == 200, (response.status_code, response.text)
    assert introspect_as_calc(interop, example_org, token)["active"] is True  # nothing was revoked


def test_authlib_mtls_alias_binds_the_token(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """RFC 8705: to the ``mtls_endpoint_aliases`` token endpoint with the X.509-SVID (requests cert=),
    the token carries ``cnf.x5t#S256`` of that certificate."""
    alias = metadata["mtls_endpoint_aliases"]["token_endpoint"]
    assert metadata["tls_client_certificate_bound_access_tokens"] is True
    with authlib_session(AGENT, metadata) as session:
        token = session.fetch_token(
            alias,
            grant_type=GRANT,
            cert=agent_cert(interop),
            verify=str(interop.ca),
            **exchange_parameters(svid(example_org, interop)),
        )
    claims = pyjwt_verify(metadata["tool_jwks_uri"], token["access_token"], "tool:calc", interop.issuer)
    assert claims["cnf"] == {"x5t#S256": x5t_s256(interop.client_cert)}
    assert claims["client_id"] == AGENT


def test_authlib_mtls_introspection(
    interop: Interop,
    example_org: TestAuthority,
    metadata: dict[str, Any],
    calc_certificate: tuple[str, str],
) -> None:
    """``spiffe_x509`` (client_id in the body, like RFC 8705 tls_client_auth) at the introspection alias."""
    assert "spiffe_x509" in metadata["introspection_endpoint_auth_methods_supported"]
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    with authlib_session(RESOURCE_SERVER, metadata, "spiffe_x509") as session:
        session.register_client_auth_method(("spiffe_x509", form_auth()))
        response = session.introspect_token(
            metadata["mtls_endpoint_aliases"]["introspection_endpoint"],
            token=token,
            cert=calc_certificate,
            verify=str(interop.ca),
        )
    assert response.status_code == 200, response.text
    assert response.json()["active"] is True
    assert response.json()["client_id"] == AGENT


def test_authlib_async_client_token_exchange(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """authlib's httpx ``AsyncOAuth2Client``: the same exchange and the same error parsing."""

    async def run() -> tuple[Any, Any]:
        async with AsyncOAuth2Client(
            client_id=AGENT, token_endpoint_auth_method="none", timeout=10
        ) as client:
            token = await client.fetch_token(
                metadata["token_endpoint"],
                grant_type=GRANT,
                **exchange_parameters(svid(example_org, interop)),
            )
            try:
                await client.fetch_token(
                    metadata["token_endpoint"],
                    grant_type=GRANT,
                    **exchange_parameters(svid(example_org, interop), "data:crm", "write"),
                )
            except OAuthError as error:
                return token, error
            return token, None

    token, error = asyncio.run(run())
    assert token["token_type"] == "Bearer"
    assert pyjwt_verify(metadata["tool_jwks_uri"], token["access_token"], "tool:calc", interop.issuer)
    assert error is not None and error.error == "invalid_target"


class ClassKeysValidator(JWTBearerTokenValidator):
    """authlib's RFC 9068 §4 validator, completed the documented way: ``get_jwks`` from the metadata."""

    def __init__(self, issuer: str, resource_server: str, jwks_uri: str) -> None:
        super().__init__(issuer, resource_server)
        self.jwks_uri = jwks_uri

    def get_jwks(self) -> KeySet:
        return KeySet.import_key_set(requests.get(self.jwks_uri, timeout=5).json())


def test_authlib_rfc9068_resource_server_validator(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """authlib's ``JWTBearerTokenValidator`` accepts our tool token (typ at+jwt, iss, aud, client_id, …)
    for its audience and scope, and refuses it for another audience or with the data keys."""
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    validator = ClassKeysValidator(interop.issuer, "tool:calc", metadata["tool_jwks_uri"])
    claims = validator.authenticate_token(token)
    validator.validate_token(claims, scopes=["invoke"], request=None)
    assert claims.header["typ"] == "at+jwt"
    wrong_audience = ClassKeysValidator(interop.issuer, "data:crm", metadata["tool_jwks_uri"])
    with pytest.raises(AuthlibInvalidTokenError):
        wrong_audience.validate_token(
            wrong_audience.authenticate_token(token), scopes=["invoke"], request=None
        )
    data_keys = ClassKeysValidator(interop.issuer, "tool:calc", metadata["data_jwks_uri"])
    with pytest.raises(AuthlibInvalidTokenError):
        data_keys.authenticate_token(token)


# ------------------------------------------------------------------------------------------------ joserfc


def joserfc_registry(issuer: str, audience: str) -> jose_jwt.JWTClaimsRegistry:
    """RFC 9068 §4 claims checks: iss and aud exact, the required claims present, times valid."""
    return jose_jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": audience},
        sub={"essential": True},
        client_id={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
        jti={"essential": True},
    )


def class_keys(uri: str) -> KeySet:
    return KeySet.import_key_set(requests.get(uri, timeout=5).json())


def test_joserfc_validates_a_tool_token_with_the_tool_jwks(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    decoded = jose_jwt.decode(token, class_keys(metadata["tool_jwks_uri"]), algorithms=["ES256"])
    joserfc_registry(interop.issuer, "tool:calc").validate(decoded.claims)
    assert decoded.header["typ"] == "at+jwt"  # RFC 9068 §2.1
    assert decoded.header["kid"].startswith("tool-")
    assert decoded.claims["token_class"] == "tool"
    assert decoded.claims["scope"] == "invoke"


def test_joserfc_validates_a_data_token_with_the_data_jwks(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    token = plain_exchange(interop, example_org, "data:crm", "read")
    decoded = jose_jwt.decode(token, class_keys(metadata["data_jwks_uri"]), algorithms=["ES256"])
    joserfc_registry(interop.issuer, "data:crm").validate(decoded.claims)
    assert decoded.claims["token_class"] == "data"


def test_joserfc_data_jwks_does_not_verify_a_tool_token(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """The data key set has no key for a tool token's kid; even forcing each data key, the signature fails."""
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    data_keys = class_keys(metadata["data_jwks_uri"])
    with pytest.raises(InvalidKeyIdError, match="No key for kid"):
        jose_jwt.decode(token, data_keys, algorithms=["ES256"])
    for key in data_keys.keys:
        with pytest.raises(BadSignatureError):
            jose_jwt.decode(token, key, algorithms=["ES256"])


def test_joserfc_refuses_the_wrong_audience_and_issuer(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    decoded = jose_jwt.decode(token, class_keys(metadata["tool_jwks_uri"]), algorithms=["ES256"])
    with pytest.raises(InvalidClaimError, match="aud"):
        joserfc_registry(interop.issuer, "tool:web-search").validate(decoded.claims)
    with pytest.raises(InvalidClaimError, match="iss"):
        joserfc_registry("https://other-issuer.example", "tool:calc").validate(decoded.claims)


def test_joserfc_refuses_other_algorithms(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """A verifier that allows only RS256 does not accept our ES256 token (alg pinned by the verifier)."""
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    assert metadata["access_token_signing_alg_values_supported"] == ["ES256"]
    with pytest.raises(JoseError):
        jose_jwt.decode(token, class_keys(metadata["tool_jwks_uri"]), algorithms=["RS256"])


# ------------------------------------------------------------------------------------------------ google-auth


def tls_session(interop: Interop, cert: tuple[str, str]) -> requests.Session:
    """A requests session for the TLS listener. ``trust_env`` off: requests lets REQUESTS_CA_BUNDLE
    override ``Session.verify`` (psf/requests#3829), and google-auth passes no per-call ``verify``."""
    session = requests.Session()
    session.trust_env = False
    session.cert, session.verify = cert, str(interop.ca)
    return session


def google_exchange(
    interop: Interop,
    authority: TestAuthority,
    *,
    endpoint: str | None = None,
    session: requests.Session | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    client = google_sts.Client(endpoint or f"{interop.issuer}/token")  # type: ignore[no-untyped-call]
    request = google.auth.transport.requests.Request(session)
    arguments: dict[str, Any] = {"audience": "tool:calc", "scopes": ["invoke"]} | kwargs
    response: dict[str, Any] = client.exchange_token(  # type: ignore[no-untyped-call]
        request, GRANT, svid(authority, interop), JWT_TYPE, **arguments
    )
    return response


def test_google_auth_sts_exchange(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """``google.oauth2.sts.Client.exchange_token`` with the parameters it sends by default plus
    ``requested_token_type`` (RFC 8693 §2.1, which it always fills in for Google's own flows)."""
    response = google_exchange(interop, example_org, requested_token_type=ACCESS_TOKEN_TYPE)
    assert response["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert response["token_type"] == "Bearer"
    assert response["expires_in"] == 200
    claims = pyjwt_verify(metadata["tool_jwks_uri"], response["access_token"], "tool:calc", interop.issuer)
    assert claims["scope"] == "invoke"


def test_google_auth_requests_a_jwt(interop: Interop, example_org: TestAuthority) -> None:
    """``requested_token_type=…:jwt`` is honoured: the same token, announced as a JWT (RFC 8693 §3)."""
    response = google_exchange(interop, example_org, requested_token_type=JWT_TYPE)
    assert response["issued_token_type"] == JWT_TYPE
    assert claims_of(response["access_token"])["aud"] == "tool:calc"


def test_google_auth_target_by_resource(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    response = google_exchange(interop, example_org, audience=None, resource="https://search.internal/")
    pyjwt_verify(metadata["tool_jwks_uri"], response["access_token"], "tool:web-search", interop.issuer)


def test_google_auth_additional_options_are_ignored(interop: Interop, example_org: TestAuthority) -> None:
    """google-auth's non-standard ``options`` parameter is unknown to us and ignored (RFC 6749 §3.2)."""
    sent: list[Any] = []
    session = requests.Session()
    session.hooks["response"].append(lambda r, *a, **k: sent.append(r.request.body))
    response = google_exchange(
        interop, example_org, session=session, additional_options={"userProject": "interop"}
    )
    assert b"options=" in sent[0]
    assert response["token_type"] == "Bearer"


def test_google_auth_error_is_oauth_error(interop: Interop, example_org: TestAuthority) -> None:
    with pytest.raises(google.auth.exceptions.OAuthError) as refused:
        google_exchange(interop, example_org, audience="data:crm", scopes=["write"])
    message, body = refused.value.args
    assert message.startswith("Error code invalid_target: ")
    assert "policy" in message
    assert json.loads(body)["error"] == "invalid_target"


def test_google_auth_actor_token(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """RFC 8693 §4.1 delegation through google-auth's ``actor_token``/``actor_token_type``."""
    response = google_exchange(
        interop,
        example_org,
        actor_token=svid(example_org, interop, ORCHESTRATOR),
        actor_token_type=JWT_TYPE,
    )
    claims = pyjwt_verify(metadata["tool_jwks_uri"], response["access_token"], "tool:calc", interop.issuer)
    assert claims["act"] == {"sub": ORCHESTRATOR}
    assert claims["sub"] == AGENT


def test_google_auth_dpop_proof_made_with_joserfc(interop: Interop, example_org: TestAuthority) -> None:
    """RFC 9449: a joserfc-made proof in google-auth's ``additional_headers`` gets a DPoP-bound token
    whose ``cnf.jkt`` is joserfc's RFC 7638 thumbprint of the key."""
    key = ECKey.generate_key("P-256")
    proof = dpop_proof(key, "POST", f"{interop.issuer}/token")
    response = google_exchange(interop, example_org, additional_headers={"DPoP": proof})
    assert response["token_type"] == "DPoP"
    assert claims_of(response["access_token"])["cnf"] == {"jkt": key.thumbprint()}
    assert introspect_as_calc(interop, example_org, response["access_token"])["token_type"] == "DPoP"


def test_google_auth_mtls_alias(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """The transport's requests session carries the X.509-SVID to the mTLS alias: ``cnf.x5t#S256``."""
    session = tls_session(interop, agent_cert(interop))
    response = google_exchange(
        interop, example_org, endpoint=metadata["mtls_endpoint_aliases"]["token_endpoint"], session=session
    )
    assert claims_of(response["access_token"])["cnf"] == {"x5t#S256": x5t_s256(interop.client_cert)}


def test_google_auth_dpop_and_mtls_together(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """A client that sender-constrains both ways at once: a DPoP proof on the mTLS alias.

    RFC 7800 §3.1: "The 'cnf' claim value MUST represent only a single proof-of-possession key".
    Refusing the combination (400) conforms, and so does binding to one key; a ``cnf`` naming both the
    DPoP key (``jkt``) and the certificate (``x5t#S256``) does not."""
    alias = metadata["mtls_endpoint_aliases"]["token_endpoint"]
    proof = dpop_proof(ECKey.generate_key("P-256"), "POST", alias)
    refusal: dict[str, Any] | None = None
    try:
        response = google_exchange(
            interop,
            example_org,
            endpoint=alias,
            session=tls_session(interop, agent_cert(interop)),
            additional_headers={"DPoP": proof},
        )
    except google.auth.exceptions.OAuthError as refused:
        refusal = json.loads(refused.args[1])
    assert refusal is None, refusal
    # This server's choice (README): the certificate authenticates the client, the DPoP key binds.
    cnf = claims_of(response["access_token"])["cnf"]
    assert list(cnf) == ["jkt"], f"cnf must name exactly the DPoP key: {cnf}"
    assert response["token_type"] == "DPoP"


def test_google_auth_revocation_with_a_bearer_session(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """``sts.Client.revoke_token`` (RFC 7009): google-auth's client authentication is client_secret
    only, so the holder's JWT-SVID rides as ``Authorization: Bearer`` on the transport's session."""
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {svid(example_org, interop)}"
    client = google_sts.Client(metadata["token_endpoint"])  # type: ignore[no-untyped-call]
    request = google.auth.transport.requests.Request(session)
    answer = client.revoke_token(  # type: ignore[no-untyped-call]
        request, token, "access_token", metadata["revocation_endpoint"]
    )
    assert answer == {}  # RFC 7009 §2.2: 200 with an empty body
    assert introspect_as_calc(interop, example_org, token) == {"active": False}


# ------------------------------------------------------------------------------------------ requests-oauthlib


def capture(session: requests.Session) -> list[requests.Response]:
    responses: list[requests.Response] = []
    session.hooks["response"].append(lambda r, *a, **k: responses.append(r))
    return responses


def oauthlib_session(interop: Interop, scope: str | None = None) -> OAuthlibSession:
    """requests-oauthlib insists on https (RFC 6749 §3.2), so it talks to the TLS listener; the CA goes
    on the session (``trust_env`` off, see :func:`tls_session`). The scope goes on the oauthlib
    client: ``BackendApplicationClient`` sends its own ``scope``, not the session's."""
    session = OAuthlibSession(client=BackendApplicationClient(client_id=AGENT, scope=scope))
    session.trust_env = False
    session.verify = str(interop.ca)
    return session


def test_requests_oauthlib_client_credentials_is_unsupported_grant_type(interop: Interop) -> None:
    """``BackendApplicationClient`` asks for client_credentials, which we do not offer: RFC 6749 §5.2
    ``unsupported_grant_type`` (400, JSON, no-store), parsed by oauthlib into its own error class."""
    session = oauthlib_session(interop)
    responses = capture(session)
    with pytest.raises(UnsupportedGrantTypeError) as refused:
        session.fetch_token(f"{interop.tls.url}/token", include_client_id=True, timeout=10)
    assert refused.value.description == f"only {GRANT} is supported here"
    response = responses[-1]
    assert "grant_type=client_credentials" in str(response.request.body)
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert set(response.json()) == {"error", "error_description"}


def test_requests_oauthlib_default_basic_credentials_are_invalid_client(interop: Interop) -> None:
    """By default requests-oauthlib sends ``client_id`` with an empty secret as HTTP Basic: we
    authenticate clients only by mTLS or jwt-spiffe, so 401 ``invalid_client`` with a Basic challenge
    (RFC 6749 §5.2), parsed by oauthlib as ``InvalidClientError``."""
    session = oauthlib_session(interop)
    responses = capture(session)
    with pytest.raises(InvalidClientError) as refused:
        session.fetch_token(f"{interop.tls.url}/token", timeout=10)
    assert "mTLS" in str(refused.value.description)
    assert str(responses[-1].request.headers["Authorization"]).startswith("Basic ")
    assert responses[-1].status_code == 401
    assert responses[-1].headers["WWW-Authenticate"].startswith("Basic ")


def test_requests_oauthlib_grant_type_keyword_limitation(interop: Interop) -> None:
    """oauthlib has no token-exchange client: every client class fixes its own grant_type, so
    ``fetch_token(grant_type=…)`` fails inside oauthlib before any request is sent."""
    session = oauthlib_session(interop)
    responses = capture(session)
    with pytest.raises(TypeError, match="grant_type"):
        session.fetch_token(f"{interop.tls.url}/token", grant_type=GRANT)
    assert responses == []


def token_exchange_hook(
    url: str, headers: dict[str, str], request_kwargs: dict[str, Any]
) -> tuple[str, dict[str, str], dict[str, Any]]:
    """requests-oauthlib's ``access_token_request`` compliance hook (its documented way to adapt a
    request to a server), turning the client's client_credentials request into the RFC 8693 grant."""
    request_kwargs["data"]["grant_type"] = GRANT
    return url, headers, request_kwargs


def oauthlib_exchange_session(interop: Interop, scope: str | None = None) -> OAuthlibSession:
    session = oauthlib_session(interop, scope)
    # types-requests-oauthlib 2.0.0.20261006 lacks requests-oauthlib 2.0's "access_token_request" hook
    session.register_compliance_hook("access_token_request", token_exchange_hook)  # type: ignore[call-overload]
    return session


def test_requests_oauthlib_token_exchange_through_a_compliance_hook(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """The exchange with requests-oauthlib: extra parameters as keywords, the grant set by the hook,
    client_id in the body (public client); the RFC 8693 answer passes oauthlib's token checks
    (including its scope-changed check against the requested scope)."""
    session = oauthlib_exchange_session(interop, "invoke")
    responses = capture(session)
    token = session.fetch_token(
        f"{interop.tls.url}/token",
        include_client_id=True,
        timeout=10,
        subject_token=svid(example_org, interop),
        subject_token_type=JWT_TYPE,
        audience="tool:calc",
    )
    sent = str(responses[-1].request.body)
    assert "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange" in sent
    assert "scope=invoke" in sent
    assert token["token_type"] == "Bearer"
    assert token["scope"] == ["invoke"]  # oauthlib splits scope into a list
    assert token["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert session.authorized
    pyjwt_verify(metadata["tool_jwks_uri"], token["access_token"], "tool:calc", interop.issuer)


def test_requests_oauthlib_token_exchange_error(interop: Interop, example_org: TestAuthority) -> None:
    """oauthlib knows no class for RFC 8693's ``invalid_target``: ``CustomOAuth2Error`` with our code."""
    session = oauthlib_exchange_session(interop, "write")
    with pytest.raises(OAuth2Error) as refused:
        session.fetch_token(
            f"{interop.tls.url}/token",
            include_client_id=True,
            timeout=10,
            subject_token=svid(example_org, interop),
            subject_token_type=JWT_TYPE,
            audience="data:crm",
        )
    assert isinstance(refused.value, CustomOAuth2Error)
    assert refused.value.error == "invalid_target"
    assert "policy" in str(refused.value.description)


def test_requests_oauthlib_mtls_exchange(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    """``fetch_token(cert=…)`` (its RFC 8705 option) at the alias: the token is certificate-bound."""
    session = oauthlib_exchange_session(interop, "invoke")
    token = session.fetch_token(
        metadata["mtls_endpoint_aliases"]["token_endpoint"],
        include_client_id=True,
        cert=agent_cert(interop),
        timeout=10,
        subject_token=svid(example_org, interop),
        subject_token_type=JWT_TYPE,
        audience="tool:calc",
    )
    assert claims_of(token["access_token"])["cnf"] == {"x5t#S256": x5t_s256(interop.client_cert)}


# ------------------------------------------------------------------------------------------------ PyJWT


def test_pyjwt_jwks_client_validates_a_tool_token(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    key = jwt.PyJWKClient(metadata["tool_jwks_uri"]).get_signing_key_from_jwt(token)
    assert key.key_id is not None and key.key_id.startswith("tool-")
    claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="tool:calc", issuer=interop.issuer)
    assert claims["sub"] == AGENT
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"


def test_pyjwt_jwks_client_validates_a_data_token(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    token = plain_exchange(interop, example_org, "data:crm", "read")
    claims = pyjwt_verify(metadata["data_jwks_uri"], token, "data:crm", interop.issuer)
    assert claims["token_class"] == "data"


def test_pyjwt_data_jwks_client_finds_no_key_for_a_tool_token(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    with pytest.raises(jwt.PyJWKClientError, match="Unable to find a signing key"):
        jwt.PyJWKClient(metadata["data_jwks_uri"]).get_signing_key_from_jwt(token)


def test_pyjwt_refuses_the_wrong_audience(
    interop: Interop, example_org: TestAuthority, metadata: dict[str, Any]
) -> None:
    token = plain_exchange(interop, example_org, "tool:calc", "invoke")
    key = jwt.PyJWKClient(metadata["tool_jwks_uri"]).get_signing_key_from_jwt(token)
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key.key, algorithms=["ES256"], audience="tool:web-search", issuer=interop.issuer)
