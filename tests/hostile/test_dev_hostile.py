"""The same attacks against ``sts dev``: its own CA and Workload API, its demo policies and catalog.

An attacker with a workload's socket gets that workload's genuine SVIDs and the trust bundles (the
JWT public keys), nothing more. Kept under ~150 refused requests in all, well below the default
anonymous-refusal limit (600 a minute per source and worker).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sts.binding import DpopKey
from tests.authority import TestAuthority
from tests.hostile.attacker import (
    ACCESS_TYPE,
    JWT_SPIFFE,
    JWT_TYPE,
    b64,
    closed,
    form,
    http,
    inactive,
    issue,
    jws,
    now,
    refused,
    sign,
    unsigned,
)
from tests.hostile.conftest import Dev

AGENT_ID = "spiffe://example.org/agent/researcher"


def agent_kid(dev: Dev) -> tuple[str, Any]:
    keys = dev.jwt_keys()["example.org"]
    kid = json.loads(b64_decode(dev.svid("agent").split(".")[0]))["kid"]
    return kid, keys[kid]


def b64_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def claims(dev: Dev, **override: Any) -> dict[str, Any]:
    return {"sub": AGENT_ID, "aud": [dev.issuer], "exp": now() + 300, "iat": now()} | override


def _hmac(dev: Dev, encoding: str) -> str:
    kid, key = agent_kid(dev)
    secret = key.public_bytes(
        serialization.Encoding.PEM if encoding == "pem" else serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    head = {"alg": "HS256", "kid": kid, "typ": "JWT"}
    signing_input = f"{b64(json.dumps(head))}.{b64(json.dumps(claims(dev)))}"
    return f"{signing_input}.{b64(sign('HS256', secret, signing_input.encode()))}"


def _impostor(dev: Dev, **head: Any) -> str:
    attacker = TestAuthority("example.org")
    kid, _ = agent_kid(dev)
    return attacker.mint(AGENT_ID, dev.issuer, header={"kid": kid, **head})


def _splice(dev: Dev) -> str:
    agent = dev.svid("agent").split(".")
    admin = dev.svid("admin").split(".")
    return f"{agent[0]}.{admin[1]}.{agent[2]}"


Forgery = Callable[[Dev], str]
FORGERIES: list[tuple[str, Forgery]] = [
    ("hs256-keyed-with-bundle-pem", lambda d: _hmac(d, "pem")),
    ("hs256-keyed-with-bundle-der", lambda d: _hmac(d, "der")),
    ("alg-none", lambda d: unsigned({"alg": "none", "kid": agent_kid(d)[0]}, claims(d))),
    ("impostor-key-with-real-kid", _impostor),
    ("impostor-key-with-embedded-jwk", lambda d: _impostor(d, jwk={"kty": "EC"})),
    ("impostor-key-with-jku", lambda d: _impostor(d, jku="https://attacker.test/jwks")),
    ("kid-unknown", lambda d: TestAuthority("example.org").mint(AGENT_ID, d.issuer)),
    ("splice-admin-payload", _splice),
    ("svid-for-another-audience", lambda d: d.svid("agent", "https://elsewhere.example")),
    ("svid-for-a-catalog-target", lambda d: d.svid("agent", "tool:web-search")),
    ("truncated-signature", lambda d: d.svid("agent")[:-6]),
    ("jwe", lambda d: ".".join(["eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIn0", "", "aXY", b64(b"x"), b64(b"t")])),
]


@pytest.mark.parametrize(("build"), [pytest.param(b, id=f"subject-{n}") for n, b in FORGERIES])
def test_forged_subject_token(dev: Dev, build: Forgery) -> None:
    refused(http("POST", dev.token_endpoint, data=form(build(dev), audience="tool:web-search", scope="invoke")), 400, "invalid_request")


@pytest.mark.parametrize(("build"), [pytest.param(b, id=f"client-assertion-{n}") for n, b in FORGERIES])
def test_forged_client_assertion(dev: Dev, build: Forgery) -> None:
    body = form(dev.svid("agent"), audience="tool:web-search", scope="invoke", client_assertion_type=JWT_SPIFFE, client_assertion=build(dev))
    refused(http("POST", dev.token_endpoint, data=body), 401, "invalid_client")


@pytest.mark.parametrize(("build"), [pytest.param(b, id=f"bearer-{n}") for n, b in FORGERIES])
def test_forged_bearer_at_admin(dev: Dev, build: Forgery) -> None:
    refused(http("GET", f"{dev.issuer}/admin/exceptions", headers={"Authorization": f"Bearer {build(dev)}"}), 401, "invalid_token")


def _task(dev: Dev, targets: dict[str, list[str]]) -> str:
    body = {
        "assignee": AGENT_ID,
        "targets": [{"target": t, "scopes": s} for t, s in targets.items()],
        "purpose": "hostile",
        "ttl_seconds": 300,
    }
    answer = http("POST", f"{dev.issuer}/tasks", json_body=body, headers={"Authorization": f"Bearer {dev.svid('orchestrator')}"})
    assert answer.status == 201, answer.text
    return str(answer.body["task_id"])


def _token(dev: Dev, workload: str = "agent", **extra: str) -> str:
    fields: dict[str, str] = {"audience": "tool:web-search", "scope": "invoke"} | extra
    answer = http("POST", dev.token_endpoint, data=form(dev.svid(workload), **fields))
    assert answer.status == 200, answer.text
    return str(answer.body["access_token"])


def _tool_to_data(dev: Dev) -> dict[str, Any]:
    """The issue's own example: web search re-exchanges the agent's tool token for data:crm in the task."""
    task_id = _task(dev, {"tool:web-search": ["invoke"], "data:crm": ["read"]})
    tool_token = _token(dev, task_id=task_id)
    return form(
        tool_token,
        subject_token_type=ACCESS_TYPE,
        actor_token=dev.svid("tool"),
        actor_token_type=JWT_TYPE,
        audience="data:crm",
        scope="read",
        task_id=task_id,
    )


Exchange = Callable[[Dev], dict[str, Any]]
POLICY_CASES: list[tuple[str, Exchange, str]] = [
    ("tool-token-unlocks-no-data", _tool_to_data, "invalid_target"),
    ("partner-reads-data", lambda d: form(d.svid("partner"), audience="data:crm", scope="read"), "invalid_target"),
    ("agent-reads-data-without-task", lambda d: form(d.svid("agent"), audience="data:crm", scope="read"), "invalid_target"),
    ("agent-writes-data-unbound", lambda d: form(d.svid("agent"), audience="data:crm", scope="write", task_id=_task(d, {"data:crm": ["write"]})), "invalid_target"),
    ("tool-service-invokes-tools", lambda d: form(d.svid("tool"), audience="tool:web-search", scope="invoke"), "invalid_target"),
    ("unknown-target", lambda d: form(d.svid("agent"), audience="tool:calc", scope="invoke"), "invalid_target"),
    ("resource-ipv6-unclosed", lambda d: form(d.svid("agent"), resource="http://[::1", scope="invoke"), "invalid_target"),
    ("issued-token-without-actor", lambda d: form(_token(d), subject_token_type=ACCESS_TYPE, audience="tool:web-search", scope="invoke"), "invalid_request"),
    ("actor-not-serving-the-token", lambda d: form(_token(d), subject_token_type=ACCESS_TYPE, actor_token=d.svid("data"), actor_token_type=JWT_TYPE, audience="tool:web-search", scope="invoke"), "invalid_request"),
    ("issued-actor-unauthenticated", lambda d: form(d.svid("orchestrator"), actor_token=_token(d), actor_token_type=ACCESS_TYPE, audience="tool:web-search", scope="invoke"), "invalid_request"),
    ("dpop-bound-subject-without-proof", lambda d: form(_dpop_token(d), subject_token_type=ACCESS_TYPE, actor_token=d.svid("tool"), actor_token_type=JWT_TYPE, audience="tool:web-search", scope="invoke"), "invalid_request"),
    ("actor-token-type-unknown", lambda d: form(_token(d), subject_token_type=ACCESS_TYPE, actor_token=d.svid("tool"), actor_token_type="urn:x", audience="tool:web-search", scope="invoke"), "invalid_request"),
    ("grant-client-credentials", lambda d: form(d.svid("agent"), grant_type="client_credentials"), "unsupported_grant_type"),
    ("scope-not-offered", lambda d: form(d.svid("agent"), audience="tool:web-search", scope="admin"), "invalid_scope"),
]


def _dpop_token(dev: Dev) -> str:
    proof = DpopKey.generate().proof("POST", dev.token_endpoint)
    answer = http("POST", dev.token_endpoint, data=form(dev.svid("agent"), audience="tool:web-search", scope="invoke"), headers={"DPoP": proof})
    assert answer.status == 200, answer.text
    return str(answer.body["access_token"])


@pytest.mark.parametrize(("build", "error"), [pytest.param(b, e, id=n) for n, b, e in POLICY_CASES])
def test_demo_rules_hold(dev: Dev, build: Exchange, error: str) -> None:
    refused(http("POST", dev.token_endpoint, data=build(dev)), 400, error)


def _dpop(dev: Dev, **claims: Any) -> str:
    private = ec.generate_private_key(ec.SECP256R1())
    key = DpopKey(private)
    base = {"jti": f"j{time.time_ns()}", "htm": "POST", "htu": dev.token_endpoint, "iat": now()} | claims
    return jws({"typ": "dpop+jwt", "alg": "ES256", "jwk": key.public_jwk}, base, private, "ES256")


def _dpop_raw_iat(dev: Dev, literal: str) -> str:
    private = ec.generate_private_key(ec.SECP256R1())
    key = DpopKey(private)
    text = '{"jti":"j1","htm":"POST","htu":' + json.dumps(dev.token_endpoint) + ',"iat":' + literal + "}"
    return jws({"typ": "dpop+jwt", "alg": "ES256", "jwk": key.public_jwk}, text, private, "ES256")


DPOP_CASES: list[tuple[str, Callable[[Dev], str]]] = [
    ("iat-NaN", lambda d: _dpop_raw_iat(d, "NaN")),
    ("iat-400-digits", lambda d: _dpop_raw_iat(d, "7" * 400)),
    ("iat-string", lambda d: _dpop(d, iat="now")),
    ("htu-ipv6-unclosed", lambda d: _dpop(d, htu="http://[::1")),
    ("htu-other-endpoint", lambda d: _dpop(d, htu=d.issuer + "/introspect")),
    ("htm-get", lambda d: _dpop(d, htm="GET")),
    ("stale", lambda d: _dpop(d, iat=now() - 600)),
    ("alg-none", lambda d: unsigned({"typ": "dpop+jwt", "alg": "none", "jwk": DpopKey.generate().public_jwk}, {"jti": "x", "htm": "POST", "htu": d.token_endpoint, "iat": now()})),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=n) for n, b in DPOP_CASES])
def test_bad_dpop_proofs(dev: Dev, build: Callable[[Dev], str]) -> None:
    body = form(dev.svid("agent"), audience="tool:web-search", scope="invoke")
    refused(http("POST", dev.token_endpoint, data=body, headers={"DPoP": build(dev)}), 400, "invalid_dpop_proof")


ENDPOINTS = [
    ("POST", "/tasks"),
    ("GET", "/tasks/task_x"),
    ("POST", "/tasks/task_x/complete"),
    ("POST", "/introspect"),
    ("POST", "/revoke"),
    ("POST", "/admin/revocations"),
    ("POST", "/admin/exceptions"),
    ("GET", "/admin/exceptions"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=[f"{m.lower()}-{p.strip('/').replace('/', '-')}" for m, p in ENDPOINTS])
def test_json_endpoints_refuse_anonymous_callers(dev: Dev, method: str, path: str) -> None:
    expected = "invalid_client" if path == "/revoke" else "invalid_token"  # RFC 7009 §2.2.1 for revocation
    refused(http(method, f"{dev.issuer}{path}", json_body={} if method == "POST" else None), 401, expected)


@pytest.mark.parametrize(
    ("method", "path"), [e for e in ENDPOINTS if e[1].startswith("/admin/")], ids=["revocations", "grant-exception", "list-exceptions"]
)
def test_admin_endpoints_refuse_the_agent(dev: Dev, method: str, path: str) -> None:
    answer = http(method, f"{dev.issuer}{path}", json_body={} if method == "POST" else None, headers={"Authorization": f"Bearer {dev.svid('agent')}"})
    refused(answer, 403, "access_denied")


def test_introspection_by_a_service_that_does_not_serve_the_token(dev: Dev) -> None:
    token = _token(dev)
    inactive(http("POST", f"{dev.issuer}/introspect", data={"token": token}, headers={"Authorization": f"Bearer {dev.svid('data')}"}))


def test_mtls_client_id_must_be_the_certificates_id(dev: Dev) -> None:
    body = form(dev.svid("agent"), audience="tool:web-search", scope="invoke", client_id="spiffe://example.org/orchestrator")
    answer = http("POST", dev.description["mtls_token_endpoint"], data=body, cert=dev.x509_pair("agent"), verify=str(dev.server_ca()))
    refused(answer, 401, "invalid_client")


def test_mtls_certificate_of_another_workload(dev: Dev) -> None:
    body = form(dev.svid("agent"), audience="tool:web-search", scope="invoke")
    answer = http("POST", dev.description["mtls_token_endpoint"], data=body, cert=dev.x509_pair("data"), verify=str(dev.server_ca()))
    refused(answer, 401, "invalid_client")


def test_mtls_certificate_from_an_unknown_ca(dev: Dev, attacker_ca: Any) -> None:
    cert, key, _ = issue(attacker_ca, dev.directory, "attacker-agent", uris=(AGENT_ID,))
    body = form(dev.svid("agent"), audience="tool:web-search", scope="invoke")
    closed(http("POST", dev.description["mtls_token_endpoint"], data=body, cert=(cert, key), verify=str(dev.server_ca())))
