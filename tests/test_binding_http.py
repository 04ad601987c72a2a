"""Sender-constrained tokens over the real server: DPoP proofs (RFC 9449) and delegation chains (RFC 8693 §4)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import requests

from sts.binding import DpopKey, jwk_thumbprint
from tests.authority import TestAuthority, b64url, forge
from tests.conftest import RunningServer

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
AGENT = "spiffe://example.org/agent/researcher"
ORCHESTRATOR = "spiffe://example.org/orchestrator"
CALC_SERVER = "spiffe://example.org/tool/calc"
SEARCH_SERVER = "spiffe://example.org/tool/web-search"


def exchange(
    server: RunningServer, subject: str, *, headers: dict[str, str] | None = None, **extra: str
) -> requests.Response:
    body = {
        "grant_type": GRANT,
        "subject_token": subject,
        "subject_token_type": JWT_TYPE,
        "scope": "invoke",
    } | extra
    return requests.post(f"{server.url}/token", data=body, headers=headers or {}, timeout=10)


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "Ed25519"])  # Ed25519: RFC 9864 (issue 12 #4)
def test_dpop_bound_token(server: RunningServer, example_org: TestAuthority, alg: str) -> None:
    key = DpopKey.generate(alg)
    proof = key.proof("POST", f"{server.issuer}/token")
    response = exchange(
        server, example_org.mint(AGENT, server.issuer), headers={"DPoP": proof}, audience="tool:calc"
    )
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"
    assert claims_of(response.json()["access_token"])["cnf"] == {"jkt": key.jkt}
    assert key.jkt == jwk_thumbprint(key.public_jwk)


def test_dpop_replayed_proof_refused(server: RunningServer, example_org: TestAuthority) -> None:
    proof = DpopKey.generate().proof("POST", f"{server.issuer}/token")
    assert (
        exchange(
            server, example_org.mint(AGENT, server.issuer), headers={"DPoP": proof}, audience="tool:calc"
        ).status_code
        == 200
    )
    replay = exchange(
        server, example_org.mint(AGENT, server.issuer), headers={"DPoP": proof}, audience="tool:calc"
    )
    assert (replay.status_code, replay.json()["error"]) == (400, "invalid_dpop_proof")
    assert "replayed" in replay.json()["error_description"]


def bad_proofs(issuer: str) -> list[tuple[str, str, str]]:
    key = DpopKey.generate()
    url = f"{issuer}/token"
    private = DpopKey.generate()
    private_jwk = dict(private.public_jwk) | {
        "d": b64url(private._private_key.private_numbers().private_value.to_bytes(32, "big"))
    }  # type: ignore[union-attr]
    claims = {"jti": "x1", "htm": "POST", "htu": url, "iat": int(time.time())}
    return [
        ("wrong-htu", key.proof("POST", "https://elsewhere.example/token"), "htu"),
        ("wrong-htm", key.proof("GET", url), "htm"),
        ("stale-iat", key.proof("POST", url, now=time.time() - 600), "iat"),
        ("future-iat", key.proof("POST", url, now=time.time() + 600), "iat"),
        ("alg-none", forge({"typ": "dpop+jwt", "alg": "none", "jwk": key.public_jwk}, claims), "alg"),
        (
            "private-key-in-jwk",
            jwt.encode(
                claims,
                private._private_key,
                algorithm="ES256",
                headers={"typ": "dpop+jwt", "jwk": private_jwk},
            ),
            "public key",
        ),
        (
            "wrong-typ",
            jwt.encode(
                claims, key._private_key, algorithm="ES256", headers={"typ": "JWT", "jwk": key.public_jwk}
            ),
            "typ",
        ),
        (
            "signed-by-another-key",
            jwt.encode(
                claims,
                private._private_key,
                algorithm="ES256",
                headers={"typ": "dpop+jwt", "jwk": key.public_jwk},
            ),
            "signature",
        ),
        ("not-a-jwt", "garbage", "not a JWT"),
    ]


PROOF_IDS = [case[0] for case in bad_proofs("http://x")]


@pytest.mark.parametrize("index", range(len(PROOF_IDS)), ids=PROOF_IDS)
def test_bad_dpop_proofs_refused(server: RunningServer, example_org: TestAuthority, index: int) -> None:
    _, proof, text = bad_proofs(server.issuer)[index]
    response = exchange(
        server, example_org.mint(AGENT, server.issuer), headers={"DPoP": proof}, audience="tool:calc"
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_dpop_proof"), response.text
    assert text in response.json()["error_description"]


def test_two_dpop_headers_refused(server: RunningServer, example_org: TestAuthority) -> None:
    key = DpopKey.generate()
    url = f"{server.issuer}/token"
    body = {
        "grant_type": GRANT,
        "subject_token": example_org.mint(AGENT, server.issuer),
        "subject_token_type": JWT_TYPE,
        "scope": "invoke",
        "audience": "tool:calc",
    }
    session = requests.Session()
    request = requests.Request("POST", url, data=body).prepare()
    request.headers["DPoP"] = key.proof("POST", url) + ", " + key.proof("POST", url)
    # A comma-joined pair is one header with an invalid value; two separate headers are refused the same way.
    response = session.send(request, timeout=10)
    assert response.json()["error"] == "invalid_dpop_proof"


def delegate(
    server: RunningServer, subject: str, subject_type: str, actor: str, audience: str
) -> requests.Response:
    return exchange(
        server,
        subject,
        subject_token_type=subject_type,
        actor_token=actor,
        actor_token_type=JWT_TYPE,
        audience=audience,
    )


def test_delegation_chain_nests_act_and_is_bounded(server: RunningServer, example_org: TestAuthority) -> None:
    issuer = server.issuer
    first = delegate(
        server, example_org.mint(ORCHESTRATOR, issuer), JWT_TYPE, example_org.mint(AGENT, issuer), "tool:calc"
    )
    assert first.status_code == 200, first.text
    t1 = first.json()["access_token"]
    assert claims_of(t1)["act"] == {"sub": AGENT}

    # The calc service received t1 (it serves tool:calc) and acts with it towards web search.
    second = delegate(server, t1, ACCESS_TOKEN_TYPE, example_org.mint(CALC_SERVER, issuer), "tool:web-search")
    assert second.status_code == 200, second.text
    t2 = second.json()["access_token"]
    assert claims_of(t2)["sub"] == ORCHESTRATOR
    assert claims_of(t2)["act"] == {"sub": CALC_SERVER, "act": {"sub": AGENT}}

    third = delegate(server, t2, ACCESS_TOKEN_TYPE, example_org.mint(SEARCH_SERVER, issuer), "tool:calc")
    assert third.status_code == 200, third.text
    t3 = third.json()["access_token"]
    assert claims_of(t3)["act"] == {"sub": SEARCH_SERVER, "act": {"sub": CALC_SERVER, "act": {"sub": AGENT}}}
    introspected = requests.post(
        f"{server.url}/introspect",
        data={"token": t3},
        headers={"Authorization": f"Bearer {example_org.mint(CALC_SERVER, issuer)}"},
        timeout=10,
    ).json()
    assert introspected["act"] == claims_of(t3)["act"]

    too_deep = delegate(
        server, t3, ACCESS_TOKEN_TYPE, example_org.mint(CALC_SERVER, issuer), "tool:web-search"
    )
    assert (too_deep.status_code, too_deep.json()["error"]) == (400, "invalid_request")
    assert "longer than 3" in too_deep.json()["error_description"]


def test_only_the_tokens_own_service_may_act_with_it(
    server: RunningServer, example_org: TestAuthority
) -> None:
    issuer = server.issuer
    t1 = delegate(
        server, example_org.mint(ORCHESTRATOR, issuer), JWT_TYPE, example_org.mint(AGENT, issuer), "tool:calc"
    )
    stolen = delegate(
        server,
        t1.json()["access_token"],
        ACCESS_TOKEN_TYPE,
        example_org.mint(SEARCH_SERVER, issuer),
        "tool:web-search",
    )
    assert (stolen.status_code, stolen.json()["error"]) == (400, "invalid_request")
    alone = exchange(
        server, t1.json()["access_token"], subject_token_type=ACCESS_TOKEN_TYPE, audience="tool:web-search"
    )
    assert (alone.status_code, alone.json()["error"]) == (400, "invalid_request")


def test_policy_forbidding_an_actor_refuses(server: RunningServer, example_org: TestAuthority) -> None:
    issuer = server.issuer
    response = delegate(
        server,
        example_org.mint(ORCHESTRATOR, issuer),
        JWT_TYPE,
        example_org.mint("spiffe://example.org/agent/evil", issuer),
        "tool:calc",
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_target")


def test_may_act_in_the_subject_token_is_honoured(server: RunningServer, example_org: TestAuthority) -> None:
    issuer = server.issuer
    subject = example_org.mint(ORCHESTRATOR, issuer, extra_claims={"may_act": {"sub": AGENT}})
    assert (
        delegate(server, subject, JWT_TYPE, example_org.mint(AGENT, issuer), "tool:calc").status_code == 200
    )
    other = delegate(
        server, subject, JWT_TYPE, example_org.mint("spiffe://example.org/agent/other", issuer), "tool:calc"
    )
    assert (other.status_code, other.json()["error"]) == (400, "invalid_request")


def test_delegating_a_task_token_keeps_it_in_the_task(
    server: RunningServer, example_org: TestAuthority
) -> None:
    """Completing the task ends tokens derived from its tokens too."""
    issuer = server.issuer
    bearer = {"Authorization": f"Bearer {example_org.mint(ORCHESTRATOR, issuer)}"}
    task = requests.post(
        f"{server.url}/tasks",
        json={
            "assignee": AGENT,
            "targets": [{"target": "tool:calc", "scopes": ["invoke"]}],
            "purpose": "p",
            "ttl_seconds": 300,
        },
        headers=bearer,
        timeout=10,
    ).json()
    t1 = exchange(
        server, example_org.mint(AGENT, issuer), audience="tool:calc", task_id=task["task_id"]
    ).json()["access_token"]
    derived = delegate(
        server, t1, ACCESS_TOKEN_TYPE, example_org.mint(CALC_SERVER, issuer), "tool:web-search"
    )
    assert derived.status_code == 200, derived.text
    assert claims_of(derived.json()["access_token"])["task_id"] == task["task_id"]
    requests.post(f"{server.url}/tasks/{task['task_id']}/complete", json={}, headers=bearer, timeout=10)
    search = {"Authorization": f"Bearer {example_org.mint(SEARCH_SERVER, issuer)}"}
    answer = requests.post(
        f"{server.url}/introspect", data={"token": derived.json()["access_token"]}, headers=search, timeout=10
    )
    assert answer.json() == {"active": False}
