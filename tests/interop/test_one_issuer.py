"""One issuer, one metadata document, every client authentication method on every form endpoint.

RFC 8414 §3: the metadata at the issuer's well-known URL is the issuer's; its TLS listener serves the
same bytes. RFC 8705 §5: ``mtls_endpoint_aliases`` send mTLS clients to the TLS listener.
draft-ietf-oauth-spiffe-client-auth: ``spiffe_jwt`` (``jwt-spiffe`` client assertion) and
``spiffe_x509`` at the token, introspection and revocation endpoints. RFC 6749 §2.3: one method per
request. Checked on the wire, with plain ``requests``.
"""

from __future__ import annotations

from typing import Any

import jwt
import pytest
import requests
from cryptography import x509

from sts.binding import DpopKey, certificate_thumbprint
from sts.client_auth import CLIENT_ASSERTION_TYPE_JWT_SPIFFE
from tests.authority import TestAuthority
from tests.conftest import RunningServer
from tests.interop.conftest import AGENT, RESOURCE_SERVER, Interop

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
WELL_KNOWN = "/.well-known/oauth-authorization-server"


def metadata(interop: Interop, listener: RunningServer) -> requests.Response:
    return requests.get(f"{listener.url}{WELL_KNOWN}", verify=str(interop.ca), timeout=10)


def exchange(interop: Interop, example_org: TestAuthority, **extra: Any) -> requests.Response:
    form = {
        "grant_type": GRANT,
        "subject_token": example_org.mint(AGENT, interop.issuer),
        "subject_token_type": JWT_TYPE,
        "audience": "tool:calc",
        "scope": "invoke",
    }
    return requests.post(f"{interop.plain.url}/token", data=form | extra, timeout=10)


def a_token(interop: Interop, example_org: TestAuthority) -> str:
    response = exchange(interop, example_org)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def assertion_form(example_org: TestAuthority, interop: Interop, token: str, **extra: str) -> dict[str, str]:
    return {
        "token": token,
        "client_assertion_type": CLIENT_ASSERTION_TYPE_JWT_SPIFFE,
        "client_assertion": example_org.mint(RESOURCE_SERVER, interop.issuer),
    } | extra


def test_both_listeners_serve_one_identical_document(interop: Interop) -> None:
    plain, tls = metadata(interop, interop.plain), metadata(interop, interop.tls)
    assert plain.status_code == tls.status_code == 200
    assert plain.content == tls.content
    assert plain.headers["Cache-Control"] == tls.headers["Cache-Control"]
    document = plain.json()
    assert document["issuer"] == interop.issuer
    assert document["token_endpoint"] == f"{interop.issuer}/token"
    assert document["mtls_endpoint_aliases"] == {
        "token_endpoint": f"{interop.tls.url}/token",
        "introspection_endpoint": f"{interop.tls.url}/introspect",
        "revocation_endpoint": f"{interop.tls.url}/revoke",
    }
    for endpoint in ("token", "introspection", "revocation"):
        assert "spiffe_x509" in document[f"{endpoint}_endpoint_auth_methods_supported"]
        assert "spiffe_jwt" in document[f"{endpoint}_endpoint_auth_methods_supported"]
    assert document["tls_client_certificate_bound_access_tokens"] is True
    assert document["client_assertion_types_supported"] == [CLIENT_ASSERTION_TYPE_JWT_SPIFFE]


def test_without_a_tls_listener_nothing_mtls_is_announced(server: RunningServer) -> None:
    document = requests.get(f"{server.url}{WELL_KNOWN}", timeout=10).json()
    assert "mtls_endpoint_aliases" not in document
    assert document["tls_client_certificate_bound_access_tokens"] is False
    for endpoint in ("token", "introspection", "revocation"):
        assert "spiffe_x509" not in document[f"{endpoint}_endpoint_auth_methods_supported"]


def test_mtls_through_the_alias_binds_the_token(interop: Interop, example_org: TestAuthority) -> None:
    alias = metadata(interop, interop.plain).json()["mtls_endpoint_aliases"]["token_endpoint"]
    form = {
        "grant_type": GRANT,
        "subject_token": example_org.mint(AGENT, interop.issuer),
        "subject_token_type": JWT_TYPE,
        "audience": "tool:calc",
        "scope": "invoke",
        "client_id": AGENT,
    }
    response = requests.post(
        alias, data=form, cert=(str(interop.client_cert), str(interop.client_key)), verify=str(interop.ca), timeout=10
    )
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    leaf = x509.load_pem_x509_certificate(interop.client_cert.read_bytes())
    assert claims["cnf"] == {"x5t#S256": certificate_thumbprint(leaf)}
    assert claims["iss"] == interop.issuer


def test_introspection_with_a_client_assertion(interop: Interop, example_org: TestAuthority) -> None:
    token = a_token(interop, example_org)
    response = requests.post(
        f"{interop.plain.url}/introspect", data=assertion_form(example_org, interop, token), timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.json()["active"] is True


def test_revocation_with_a_client_assertion(interop: Interop, example_org: TestAuthority) -> None:
    token = a_token(interop, example_org)
    agent_assertion = {
        "token": token,
        "client_assertion_type": CLIENT_ASSERTION_TYPE_JWT_SPIFFE,
        "client_assertion": example_org.mint(AGENT, interop.issuer),
        "client_id": AGENT,
    }
    assert requests.post(f"{interop.plain.url}/revoke", data=agent_assertion, timeout=10).status_code == 200
    response = requests.post(
        f"{interop.plain.url}/introspect", data=assertion_form(example_org, interop, token), timeout=10
    )
    assert response.json() == {"active": False}


def test_introspection_over_mtls_alias(interop: Interop, example_org: TestAuthority) -> None:
    token = a_token(interop, example_org)
    alias = metadata(interop, interop.plain).json()["mtls_endpoint_aliases"]["introspection_endpoint"]
    response = requests.post(
        alias,
        data={"token": token},
        cert=(str(interop.client_cert), str(interop.client_key)),
        verify=str(interop.ca),
        timeout=10,
    )
    # The agent is not the token's audience (tool:calc's resource server is): inactive, not an error.
    assert response.status_code == 200, response.text
    assert response.json() == {"active": False}


@pytest.mark.parametrize("endpoint", ["introspect", "revoke"])
@pytest.mark.parametrize(
    ("case", "status", "error"),
    [
        ("forged-assertion", 401, "invalid_client"),
        ("wrong-assertion-type", 401, "invalid_client"),
        ("assertion-without-type", 401, "invalid_client"),
        ("assertion-for-two-audiences", 401, "invalid_client"),
        ("assertion-and-bearer", 400, "invalid_request"),
        ("assertion-twice", 400, "invalid_request"),
        ("client-id-of-someone-else", 401, "invalid_client"),
    ],
)
def test_form_client_authentication_refusals(
    interop: Interop, example_org: TestAuthority, endpoint: str, case: str, status: int, error: str
) -> None:
    token = a_token(interop, example_org)
    form: dict[str, Any] = assertion_form(example_org, interop, token)
    headers: dict[str, str] = {}
    if case == "forged-assertion":
        form["client_assertion"] = TestAuthority("example.org").mint(RESOURCE_SERVER, interop.issuer)
    elif case == "wrong-assertion-type":
        form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    elif case == "assertion-without-type":
        del form["client_assertion_type"]
    elif case == "assertion-for-two-audiences":
        form["client_assertion"] = example_org.mint(RESOURCE_SERVER, [interop.issuer, "https://other.test"])
    elif case == "assertion-and-bearer":
        headers["Authorization"] = f"Bearer {example_org.mint(RESOURCE_SERVER, interop.issuer)}"
    elif case == "assertion-twice":
        form["client_assertion"] = [form["client_assertion"], form["client_assertion"]]
    elif case == "client-id-of-someone-else":
        form["client_id"] = "spiffe://example.org/tool/web-search"
    response = requests.post(f"{interop.plain.url}/{endpoint}", data=form, headers=headers, timeout=10)
    assert (response.status_code, response.json()["error"]) == (status, error), response.text
    assert response.json()["error_description"]
    # RFC 6749 §5.2: a challenge only for an HTTP authentication scheme the client used.
    if case != "assertion-and-bearer":
        assert "WWW-Authenticate" not in response.headers


@pytest.mark.parametrize("endpoint", ["introspect", "revoke"])
def test_assertion_on_a_certificate_connection_is_two_methods(
    interop: Interop, example_org: TestAuthority, endpoint: str
) -> None:
    token = a_token(interop, example_org)
    response = requests.post(
        f"{interop.tls.url}/{endpoint}",
        data=assertion_form(example_org, interop, token),
        cert=(str(interop.client_cert), str(interop.client_key)),
        verify=str(interop.ca),
        timeout=10,
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request"), response.text


def test_a_refused_assertion_leaves_the_token_alive(interop: Interop, example_org: TestAuthority) -> None:
    token = a_token(interop, example_org)
    forged = assertion_form(TestAuthority("example.org"), interop, token)
    assert requests.post(f"{interop.plain.url}/revoke", data=forged, timeout=10).status_code == 401
    response = requests.post(
        f"{interop.plain.url}/introspect", data=assertion_form(example_org, interop, token), timeout=10
    )
    assert response.json()["active"] is True


def test_dpop_on_an_mtls_connection_binds_one_key(interop: Interop, example_org: TestAuthority) -> None:
    """RFC 7800 §3.1: one key per ``cnf``. The certificate authenticates the client; the DPoP key binds."""
    key = DpopKey.generate()
    alias = f"{interop.tls.url}/token"
    form = {
        "grant_type": GRANT,
        "subject_token": example_org.mint(AGENT, interop.issuer),
        "subject_token_type": JWT_TYPE,
        "audience": "tool:calc",
        "scope": "invoke",
    }
    response = requests.post(
        alias,
        data=form,
        headers={"DPoP": key.proof("POST", alias)},
        cert=(str(interop.client_cert), str(interop.client_key)),
        verify=str(interop.ca),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"jkt": key.jkt}
    assert claims["client_id"] == AGENT
    assert response.json()["token_type"] == "DPoP"


@pytest.mark.parametrize("listener", ["plain", "tls"])
def test_a_dpop_proof_for_the_other_listener_is_refused(
    interop: Interop, example_org: TestAuthority, listener: str
) -> None:
    """RFC 9449 §4.3 step 9: ``htu`` is the URL this request was sent to, not the other listener's."""
    here, there = (interop.plain, interop.tls) if listener == "plain" else (interop.tls, interop.plain)
    form = {
        "grant_type": GRANT,
        "subject_token": example_org.mint(AGENT, interop.issuer),
        "subject_token_type": JWT_TYPE,
        "audience": "tool:calc",
        "scope": "invoke",
    }
    response = requests.post(
        f"{here.url}/token",
        data=form,
        headers={"DPoP": DpopKey.generate().proof("POST", f"{there.url}/token")},
        verify=str(interop.ca),
        timeout=10,
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_dpop_proof"), response.text


@pytest.mark.parametrize(
    ("audience", "accepted"),
    [
        ("issuer", True),
        ("this-token-endpoint", True),
        ("other-listener-token-endpoint", False),
        ("token-endpoint-and-another", False),
    ],
)
def test_client_assertion_audience_is_the_issuer_or_this_token_endpoint(
    interop: Interop, example_org: TestAuthority, audience: str, accepted: bool
) -> None:
    """RFC 7523 §3: the assertion's one audience identifies this server (issuer or token endpoint
    URL), so a SPIRE agent's cache yields an assertion distinct from the subject token (issue 14)."""
    here = f"{interop.plain.url}/token"
    aud: str | list[str] = {
        "issuer": interop.issuer,
        "this-token-endpoint": here,
        "other-listener-token-endpoint": f"{interop.tls.url}/token",
        "token-endpoint-and-another": [here, "https://elsewhere.test"],
    }[audience]
    response = exchange(
        interop,
        example_org,
        client_assertion_type=CLIENT_ASSERTION_TYPE_JWT_SPIFFE,
        client_assertion=example_org.mint(AGENT, aud),
    )
    if accepted:
        assert response.status_code == 200, response.text
        claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
        assert claims["client_id"] == AGENT
    else:
        assert (response.status_code, response.json()["error"]) == (401, "invalid_client"), response.text


def test_the_subject_token_again_as_assertion_is_refused_with_the_remedy(
    interop: Interop, example_org: TestAuthority
) -> None:
    subject = example_org.mint(AGENT, interop.issuer)
    response = exchange(
        interop,
        example_org,
        subject_token=subject,
        client_assertion_type=CLIENT_ASSERTION_TYPE_JWT_SPIFFE,
        client_assertion=subject,
    )
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")
    assert "token endpoint URL as audience" in response.json()["error_description"]
