"""``POST /token`` end to end: the real server process over HTTP, tokens checked with PyJWT against /jwks.json."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.authority import TestAuthority, forge, hmac_token
from tests.conftest import RunningServer

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
AGENT = "spiffe://example.org/agent/researcher"


def form(subject_token: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "grant_type": GRANT,
        "subject_token": subject_token,
        "subject_token_type": JWT_TYPE,
    }
    body.update(extra)
    return body


def post(server: RunningServer, data: Any, **kwargs: Any) -> requests.Response:
    return requests.post(f"{server.url}/token", data=data, timeout=10, **kwargs)


def jwks(server: RunningServer) -> jwt.PyJWKSet:
    return jwt.PyJWKSet.from_dict(requests.get(f"{server.url}/jwks.json", timeout=5).json())


def verify_issued(server: RunningServer, token: str, audience: str) -> dict[str, Any]:
    """An independent check of what we issued: PyJWT, keys from /jwks.json only."""
    header = jwt.get_unverified_header(token)
    key = next(k for k in jwks(server).keys if k.key_id == header["kid"])
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=["ES256"],
        audience=audience,
        issuer=server.issuer,
        options={"require": ["exp", "iat", "nbf", "jti", "sub", "aud", "iss"]},
    )
    return {"header": header, **claims}


def test_tool_token_issued_and_verifiable(server: RunningServer, example_org: TestAuthority) -> None:
    svid = example_org.mint(AGENT, server.issuer)
    response = post(server, form(svid, audience="tool:web-search", scope="invoke"))
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert body["scope"] == "invoke"
    assert body["expires_in"] == 200  # the permit's @ttl("200") under the catalog's 300 s
    claims = verify_issued(server, body["access_token"], "tool:web-search")
    assert claims["header"]["typ"] == "at+jwt"
    assert claims["header"]["kid"].startswith("tool-")
    assert claims["sub"] == AGENT
    assert claims["client_id"] == AGENT
    assert claims["token_class"] == "tool"
    assert claims["exp"] - claims["iat"] == 200
    assert "task_id" not in claims and "act" not in claims


def test_data_token_signed_by_data_key(server: RunningServer, example_org: TestAuthority) -> None:
    response = post(server, form(example_org.mint(AGENT, server.issuer), audience="data:crm", scope="read"))
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    claims = verify_issued(server, token, "data:crm")
    assert claims["token_class"] == "data"
    assert claims["header"]["kid"].startswith("data-")
    assert response.json()["expires_in"] == 60


def test_tool_and_data_key_sets_are_disjoint(server: RunningServer, example_org: TestAuthority) -> None:
    keys = requests.get(f"{server.url}/jwks.json", timeout=5).json()["keys"]
    tool = {k["kid"] for k in keys if k["kid"].startswith("tool-")}
    data = {k["kid"] for k in keys if k["kid"].startswith("data-")}
    assert tool and data and not tool & data and len(keys) == len(tool) + len(data)
    assert all(k["use"] == "sig" and k["alg"] == "ES256" and "d" not in k for k in keys)
    tool_token = post(
        server, form(example_org.mint(AGENT, server.issuer), audience="tool:calc", scope="invoke")
    )
    kid = jwt.get_unverified_header(tool_token.json()["access_token"])["kid"]
    assert kid in tool and kid not in data


def test_a_tool_token_fails_a_data_verifier(server: RunningServer, example_org: TestAuthority) -> None:
    """A resource server trusting only data keys cannot be unlocked by a tool token."""
    token = post(server, form(example_org.mint(AGENT, server.issuer), audience="tool:calc", scope="invoke"))
    data_keys = [k for k in jwks(server).keys if str(k.key_id).startswith("data-")]
    for key in data_keys:
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(token.json()["access_token"], key.key, algorithms=["ES256"], audience="tool:calc")


def test_target_by_resource_uri(server: RunningServer, example_org: TestAuthority) -> None:
    response = post(
        server,
        form(example_org.mint(AGENT, server.issuer), resource="https://search.internal/", scope="invoke"),
    )
    assert response.status_code == 200, response.text
    assert (
        verify_issued(server, response.json()["access_token"], "tool:web-search")["aud"] == "tool:web-search"
    )


def test_lifetime_never_outlives_the_subject_svid(server: RunningServer, example_org: TestAuthority) -> None:
    svid = example_org.mint(AGENT, server.issuer, ttl=20)
    response = post(server, form(svid, audience="tool:web-search", scope="invoke"))
    assert response.status_code == 200, response.text
    claims = verify_issued(server, response.json()["access_token"], "tool:web-search")
    assert claims["exp"] <= json.loads(jwt.api_jws.base64url_decode(svid.split(".")[1]))["exp"]
    assert response.json()["expires_in"] <= 20


def test_federated_partner_allowed_only_what_policy_says(
    server: RunningServer, partner_test: TestAuthority
) -> None:
    svid = partner_test.mint("spiffe://partner.test/agent/summarizer", server.issuer)
    assert post(server, form(svid, audience="tool:web-search", scope="invoke")).status_code == 200
    refused = post(server, form(svid, audience="tool:calc", scope="invoke"))
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_target")


def test_delegation_carries_act(server: RunningServer, example_org: TestAuthority) -> None:
    subject = example_org.mint(AGENT, server.issuer)
    actor = example_org.mint("spiffe://example.org/orchestrator", server.issuer)
    response = post(
        server,
        form(subject, audience="tool:calc", scope="invoke", actor_token=actor, actor_token_type=JWT_TYPE),
    )
    assert response.status_code == 200, response.text
    claims = verify_issued(server, response.json()["access_token"], "tool:calc")
    assert claims["act"] == {"sub": "spiffe://example.org/orchestrator"}
    assert claims["sub"] == AGENT


def test_client_assertion_authenticates_the_client(server: RunningServer, example_org: TestAuthority) -> None:
    subject = example_org.mint(AGENT, server.issuer)
    assertion = example_org.mint(AGENT, server.issuer)
    response = post(
        server,
        form(
            subject,
            audience="tool:calc",
            scope="invoke",
            client_assertion_type=JWT_SPIFFE,
            client_assertion=assertion,
            client_id=AGENT,
        ),
    )
    assert response.status_code == 200, response.text
    assert verify_issued(server, response.json()["access_token"], "tool:calc")["client_id"] == AGENT


def now() -> int:
    return int(time.time())


def refusals(example: TestAuthority, issuer: str) -> list[tuple[str, Any, int, str, str]]:
    """(case id, form body, status, error, text the description must hold)."""
    good = example.mint(AGENT, issuer)
    stranger = TestAuthority("stranger.test")
    header = {"alg": "ES256", "kid": example.kid, "typ": "JWT"}
    claims = {"sub": AGENT, "aud": [issuer], "exp": now() + 300, "iat": now()}
    public_pem = example.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return [
        ("unsupported-grant", {"grant_type": "client_credentials"}, 400, "unsupported_grant_type", ""),
        (  # JWT-SVID.md §2 (issue 12 #8): correctly signed, but a key location in the header
            "signed-svid-with-jku",
            form(example.mint(AGENT, issuer, header={"jku": "https://evil.test/jwks"})),
            400,
            "invalid_request",
            "jku",
        ),
        ("missing-grant", {"subject_token": good}, 400, "invalid_request", "grant_type"),
        (
            "missing-subject-token",
            {"grant_type": GRANT, "subject_token_type": JWT_TYPE},
            400,
            "invalid_request",
            "subject_token",
        ),
        (
            "missing-subject-type",
            {"grant_type": GRANT, "subject_token": good, "audience": "tool:calc"},
            400,
            "invalid_request",
            "subject_token_type",
        ),
        (
            "wrong-subject-type",
            form(
                good,
                subject_token_type="urn:ietf:params:oauth:token-type:saml2",
                audience="tool:calc",
                scope="invoke",
            ),
            400,
            "invalid_request",
            "subject_token_type",
        ),
        (
            "expired-svid",
            form(example.mint(AGENT, issuer, ttl=60, now=now() - 3600), audience="tool:calc", scope="invoke"),
            400,
            "invalid_request",
            "expired",
        ),
        (
            "not-yet-valid",
            form(
                example.mint(AGENT, issuer, extra_claims={"nbf": now() + 3600}),
                audience="tool:calc",
                scope="invoke",
            ),
            400,
            "invalid_request",
            "subject_token",
        ),
        (
            "wrong-audience",
            form(example.mint(AGENT, "https://other.example"), audience="tool:calc", scope="invoke"),
            400,
            "invalid_request",
            "audience",
        ),
        (
            "untrusted-domain",
            form(stranger.mint("spiffe://stranger.test/agent", issuer), audience="tool:calc", scope="invoke"),
            400,
            "invalid_request",
            "subject_token",
        ),
        (
            "alg-none",
            form(
                forge({"alg": "none", "typ": "JWT", "kid": example.kid}, claims),
                audience="tool:calc",
                scope="invoke",
            ),
            400,
            "invalid_request",
            "subject_token",
        ),
        (
            "hmac-with-public-key",
            form(
                hmac_token({"alg": "HS256", "kid": example.kid, "typ": "JWT"}, claims, public_pem),
                audience="tool:calc",
                scope="invoke",
            ),
            400,
            "invalid_request",
            "subject_token",
        ),
        (
            "unknown-kid",
            form(example.mint(AGENT, issuer, header={"kid": "nope"}), audience="tool:calc", scope="invoke"),
            400,
            "invalid_request",
            "subject_token",
        ),
        (
            "bad-signature",
            form(forge(header, claims, b"\x00" * 64), audience="tool:calc", scope="invoke"),
            400,
            "invalid_request",
            "subject_token",
        ),
        (
            "malformed-token",
            form("not.a.jwt", audience="tool:calc", scope="invoke"),
            400,
            "invalid_request",
            "subject_token",
        ),
        (
            "oversized-token",
            form("a" * 20000, audience="tool:calc", scope="invoke"),
            400,
            "invalid_request",
            "subject_token",
        ),
        (
            "unknown-audience",
            form(good, audience="tool:nope", scope="invoke"),
            400,
            "invalid_target",
            "not a known target",
        ),
        (
            "unknown-resource",
            form(good, resource="https://nope.internal/", scope="invoke"),
            400,
            "invalid_target",
            "not a known target",
        ),
        (
            "two-audiences",
            form(good, audience=["tool:calc", "tool:web-search"], scope="invoke"),
            400,
            "invalid_target",
            "exactly one target",
        ),
        (
            "audience-and-resource",
            form(good, audience="tool:calc", resource="https://search.internal/", scope="invoke"),
            400,
            "invalid_target",
            "exactly one target",
        ),
        ("no-target", form(good, scope="invoke"), 400, "invalid_request", "audience"),
        (
            "scope-not-offered",
            form(good, audience="tool:calc", scope="invoke admin"),
            400,
            "invalid_scope",
            "admin",
        ),
        ("scope-missing", form(good, audience="tool:calc"), 400, "invalid_scope", "required"),
        (
            "policy-denies-write",
            form(good, audience="data:crm", scope="write"),
            400,
            "invalid_target",
            "policy",
        ),
        (
            "policy-forbids-restricted",
            form(good, audience="data:vault", scope="read"),
            400,
            "invalid_target",
            "policy",
        ),
        (
            "default-deny-other-path",
            form(
                example.mint("spiffe://example.org/batch/job", issuer), audience="tool:calc", scope="invoke"
            ),
            400,
            "invalid_target",
            "policy",
        ),
        (
            "unknown-task",
            form(good, audience="tool:calc", scope="invoke", task_id="t-1"),
            400,
            "invalid_request",
            "task",
        ),
        (
            "bad-requested-type",
            form(good, audience="tool:calc", scope="invoke", requested_token_type="urn:x"),
            400,
            "invalid_request",
            "requested_token_type",
        ),
        (
            "actor-without-type",
            form(good, audience="tool:calc", scope="invoke", actor_token=good),
            400,
            "invalid_request",
            "actor_token",
        ),
        (
            "bad-actor",
            form(good, audience="tool:calc", scope="invoke", actor_token="x.y.z", actor_token_type=JWT_TYPE),
            400,
            "invalid_request",
            "actor_token",
        ),
        (
            "client-id-mismatch",
            form(good, audience="tool:calc", scope="invoke", client_id="spiffe://example.org/other"),
            401,
            "invalid_client",
            "client_id",
        ),
        (
            "client-assertion-bad",
            form(
                good,
                audience="tool:calc",
                scope="invoke",
                client_assertion_type=JWT_SPIFFE,
                client_assertion="x.y.z",
            ),
            401,
            "invalid_client",
            "client_assertion",
        ),
        (
            "client-assertion-extra-aud",
            form(
                good,
                audience="tool:calc",
                scope="invoke",
                client_assertion_type=JWT_SPIFFE,
                client_assertion=example.mint(AGENT, [issuer, "https://x"]),
            ),
            401,
            "invalid_client",
            "audience",
        ),
        (
            "client-is-someone-else",
            form(
                good,
                audience="tool:calc",
                scope="invoke",
                client_assertion_type=JWT_SPIFFE,
                client_assertion=example.mint("spiffe://example.org/other", issuer),
            ),
            401,
            "invalid_client",
            "neither",
        ),
    ]


CASE_IDS = [case[0] for case in refusals(TestAuthority("example.org"), "http://x")]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_refusals(server: RunningServer, example_org: TestAuthority, index: int) -> None:
    _, body, status, error, text = refusals(example_org, server.issuer)[index]
    response = post(server, body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["error"] == error
    assert text in payload["error_description"]
    assert "access_token" not in payload
    assert response.headers["Cache-Control"] == "no-store"
    assert example_org.kid not in payload["error_description"]
    if status == 401:  # no HTTP authentication scheme was used: no challenge (RFC 6749 §5.2)
        assert "WWW-Authenticate" not in response.headers


def test_issued_token_replayed_as_subject_is_refused(
    server: RunningServer, example_org: TestAuthority
) -> None:
    issued = post(server, form(example_org.mint(AGENT, server.issuer), audience="tool:calc", scope="invoke"))
    replay = post(server, form(issued.json()["access_token"], audience="data:crm", scope="read"))
    assert (replay.status_code, replay.json()["error"]) == (400, "invalid_request")


def test_duplicated_parameter_refused(server: RunningServer, example_org: TestAuthority) -> None:
    svid = example_org.mint(AGENT, server.issuer)
    body = [
        ("grant_type", GRANT),
        ("subject_token", svid),
        ("subject_token", svid),
        ("subject_token_type", JWT_TYPE),
        ("audience", "tool:calc"),
        ("scope", "invoke"),
    ]
    response = post(server, body)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert "repeated" in response.json()["error_description"]


def test_only_form_bodies(server: RunningServer, example_org: TestAuthority) -> None:
    body = form(example_org.mint(AGENT, server.issuer), audience="tool:calc", scope="invoke")
    response = requests.post(f"{server.url}/token", json=body, timeout=5)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


def test_parameters_in_query_refused(server: RunningServer, example_org: TestAuthority) -> None:
    body = form(example_org.mint(AGENT, server.issuer), audience="tool:calc", scope="invoke")
    response = requests.post(f"{server.url}/token?scope=invoke", data=body, timeout=5)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


def test_oversized_body_is_413(server: RunningServer, example_org: TestAuthority) -> None:
    body = form(
        example_org.mint(AGENT, server.issuer), audience="tool:calc", scope="invoke", padding="x" * 70_000
    )
    response = post(server, body)
    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"


def test_get_token_not_allowed(server: RunningServer) -> None:
    response = requests.get(f"{server.url}/token", timeout=5)
    assert response.status_code == 405
    assert response.json()["error"] == "invalid_request"


def test_metadata_names_the_endpoints(server: RunningServer) -> None:
    metadata = requests.get(f"{server.url}/.well-known/oauth-authorization-server", timeout=5).json()
    assert metadata["issuer"] == server.issuer
    assert metadata["token_endpoint"] == f"{server.issuer}/token"
    assert metadata["jwks_uri"] == f"{server.issuer}/jwks.json"
    assert metadata["grant_types_supported"] == [GRANT]
    assert "invoke" in metadata["scopes_supported"]


def test_health_and_readiness(server: RunningServer) -> None:
    assert requests.get(f"{server.url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(f"{server.url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["problems"] == []


def test_every_decision_is_audited(server: RunningServer, example_org: TestAuthority) -> None:
    allowed = post(
        server,
        form(example_org.mint(AGENT, server.issuer), audience="tool:calc", scope="invoke"),
        headers={"X-Request-Id": "audit-allow-1"},
    )
    denied = post(
        server,
        form(example_org.mint(AGENT, server.issuer), audience="data:crm", scope="write"),
        headers={"X-Request-Id": "audit-deny-1"},
    )
    assert allowed.headers["X-Request-Id"] == "audit-allow-1"
    assert denied.status_code == 400
    records = {r["request_id"]: r for r in map(json.loads, server.audit_lines())}
    allow, deny = records["audit-allow-1"], records["audit-deny-1"]
    assert allow["decision"] == "allow" and allow["spiffe_id"] == AGENT and allow["target"] == "tool:calc"
    assert (
        allow["jti"] == jwt.decode(allowed.json()["access_token"], options={"verify_signature": False})["jti"]
    )
    assert allow["policy_ids"] == ["agents-invoke-tools"]
    assert deny["decision"] == "deny" and deny["error"] == "invalid_target" and deny["scopes"] == ["write"]
    assert "jti" not in deny


def test_refusals_before_the_grant_are_audited_too(server: RunningServer, example_org: TestAuthority) -> None:
    body = form(example_org.mint(AGENT, server.issuer), audience="tool:calc", scope="invoke")
    requests.post(f"{server.url}/token", json=body, headers={"X-Request-Id": "pre-json"}, timeout=5)
    post(server, {**body, "padding": "x" * 70_000}, headers={"X-Request-Id": "pre-large"})
    post(server, [*body.items(), ("scope", "invoke")], headers={"X-Request-Id": "pre-repeat"})
    records = {r["request_id"]: r for r in map(json.loads, server.audit_lines())}
    assert records["pre-json"]["decision"] == "deny"
    assert records["pre-json"]["error"] == "invalid_request"
    assert "larger than" in records["pre-large"]["error_description"]
    assert "repeated" in records["pre-repeat"]["error_description"]


def test_chunked_body_over_the_limit_is_refused_not_truncated(
    server: RunningServer, example_org: TestAuthority
) -> None:
    """Parameters past the limit must not vanish: a chunked oversized body is a 413, never a token."""
    good = "&".join(
        f"{k}={v}"
        for k, v in form(example_org.mint(AGENT, server.issuer), audience="tool:calc", scope="invoke").items()
    )
    chunks = iter([good.encode(), b"&x=" + b"a" * 70_000, b"&audience=data:crm"])
    response = requests.post(
        f"{server.url}/token",
        data=chunks,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert response.status_code == 413
    assert "access_token" not in response.json()


def test_per_class_jwks_endpoints(server: RunningServer) -> None:
    tool = requests.get(f"{server.url}/jwks/tool.json", timeout=5).json()["keys"]
    data = requests.get(f"{server.url}/jwks/data.json", timeout=5).json()["keys"]
    assert tool and all(k["kid"].startswith("tool-") for k in tool)
    assert data and all(k["kid"].startswith("data-") for k in data)
    assert requests.get(f"{server.url}/jwks/admin.json", timeout=5).status_code == 404


@pytest.mark.parametrize(
    ("authorization", "scheme"),
    [
        ("Basic " + base64.b64encode(b"unknown-client:secret").decode(), "Basic"),
        ("Basic " + base64.b64encode(b"spiffe%3A%2F%2Fexample.org%2Fagent%2Fresearcher:x").decode(), "Basic"),
        ("Bearer some-token", "Bearer"),
        ("Negotiate YII=", "Negotiate"),
        ("@@@ garbage", "Basic"),
    ],
    ids=["basic-unknown-client", "basic-named-like-the-subject", "bearer", "negotiate", "no-valid-scheme"],
)
def test_http_client_authentication_is_refused_not_ignored(
    server: RunningServer, example_org: TestAuthority, authorization: str, scheme: str
) -> None:
    """RFC 6749 §2.3/§5.2 (issue 12 #3): a valid request with HTTP client credentials gets no token."""
    response = post(
        server,
        form(example_org.mint(AGENT, server.issuer), audience="tool:calc", scope="invoke"),
        headers={"Authorization": authorization},
    )
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client"), response.text
    assert response.headers["WWW-Authenticate"].startswith(f"{scheme} "), response.headers


def test_body_client_authentication_failure_carries_no_challenge(
    server: RunningServer, example_org: TestAuthority
) -> None:
    """The client used no HTTP scheme, so no WWW-Authenticate (issue 12 #5): the description shows."""
    response = post(
        server,
        form(
            example_org.mint(AGENT, server.issuer),
            client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            client_assertion="x",
        ),
    )
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")
    assert "WWW-Authenticate" not in response.headers


def test_refusals_of_every_endpoint_leave_an_audit_line(server: RunningServer) -> None:
    """Every decision is one audit line: refused introspection and revocation, and a GET of /token."""
    before = len(server.audit_lines())
    answers = [
        requests.post(f"{server.url}/introspect", data={"token": "x"}, timeout=5),
        requests.post(
            f"{server.url}/revoke", data={"token": "x"}, headers={"Authorization": "Bearer x"}, timeout=5
        ),
        requests.get(f"{server.url}/token", timeout=5),
    ]
    assert [a.status_code for a in answers] == [401, 401, 405]
    records = server.audit_records()[before:]
    by_request = {r.get("request_id"): r for r in records}
    for answer in answers:
        record = by_request[answer.headers["X-Request-Id"]]
        assert record["decision"] == "deny", record


def test_an_unknown_path_is_not_found(server: RunningServer) -> None:
    response = requests.get(f"{server.url}/no/such/endpoint", timeout=5)
    assert (response.status_code, response.json()["error"]) == (404, "not_found")
