"""Delegation and actor abuse (RFC 8693 §4, issue 11's rules): who may act, with what, and for what.

Rules under attack: an actor token must be for this STS and its holder must take part (a JWT-SVID
of its own, or an issued token whose subject authenticates on this request); a bound token (``cnf``)
is usable as subject or actor only with the proof its ``cnf`` demands, on this request; ``may_act``
that is not an object naming the actor refuses (fail closed); chains stop at depth 3; re-exchanging
an issued token never crosses token class (a tool token never unlocks data). All refusals are
``invalid_request`` except the class crossing, a refused target (``invalid_target``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sts.binding import DpopKey
from tests.hostile.attacker import (
    ACCESS_TYPE,
    AGENT,
    CALC,
    CRM,
    JWT_SPIFFE,
    JWT_TYPE,
    ORCHESTRATOR,
    OTHER_AGENT,
    SEARCH,
    Answer,
    b64,
    form,
    http,
    issue,
    now,
    refused,
)
from tests.hostile.conftest import World


@dataclass
class Certs:
    agent: tuple[Path, Path]
    agent_twin: tuple[Path, Path]  # another certificate for the same SPIFFE ID
    calc: tuple[Path, Path]


@pytest.fixture(scope="module")
def certs(world: World) -> Certs:
    ca = world.auth.example_ca
    pair = lambda name, uri: issue(ca, world.directory, f"delegation-{name}", uris=(uri,))[:2]  # noqa: E731
    return Certs(pair("agent", AGENT), pair("agent-twin", AGENT), pair("calc", CALC))


@dataclass(frozen=True)
class Send:
    """One ``POST /token``: where (plain or TLS), the body, DPoP header and client certificate."""

    data: dict[str, Any]
    dpop: str | None = None
    cert: tuple[Path, Path] | None = None
    tls: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    def __call__(self, w: World) -> Answer:
        base = w.tls_url if self.tls or self.cert else w.url
        headers = dict(self.headers) | ({"DPoP": self.dpop} if self.dpop else {})
        return http("POST", f"{base}/token", data=self.data, headers=headers, cert=self.cert, verify=str(w.ca_file))


def dpop_bound(w: World, sub: str = AGENT, audience: str = "tool:calc") -> str:
    proof = DpopKey.generate().proof("POST", f"{w.issuer}/token")
    response = w.session.post(
        f"{w.url}/token",
        data=form(w.svid(sub), audience=audience, scope="invoke"),
        headers={"DPoP": proof},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def mtls_bound(w: World, cert: tuple[Path, Path], sub: str = AGENT, audience: str = "tool:calc") -> str:
    answer = http(
        "POST",
        f"{w.tls_url}/token",
        data=form(w.svid(sub), audience=audience, scope="invoke"),
        cert=cert,
        verify=str(w.ca_file),
    )
    assert answer.status == 200, answer.text
    assert "x5t#S256" in _claims(answer.body["access_token"]).get("cnf", {})
    return str(answer.body["access_token"])


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]


def act_as(w: World, subject: str, actor: str, *, subject_type: str = ACCESS_TYPE, actor_type: str = JWT_TYPE, audience: str = "tool:web-search", scope: str = "invoke", **extra: str) -> dict[str, Any]:
    return form(
        subject,
        subject_token_type=subject_type,
        actor_token=actor,
        actor_token_type=actor_type,
        audience=audience,
        scope=scope,
        **extra,
    )


def with_may_act(w: World, may_act: Any) -> dict[str, Any]:
    """The orchestrator's SVID carrying ``may_act``, the agent's own SVID as the actor."""
    subject = w.svid(ORCHESTRATOR, extra_claims={"may_act": may_act})
    return act_as(w, subject, w.svid(AGENT), subject_type=JWT_TYPE, audience="tool:calc")


def chain_of_three(w: World) -> str:
    """orchestrator ← agent, then calc, then web-search: a token whose ``act`` is three deep."""
    t1 = Send(act_as(w, w.svid(ORCHESTRATOR), w.svid(AGENT), subject_type=JWT_TYPE, audience="tool:calc"))(w)
    assert t1.status == 200, t1.text
    t2 = Send(act_as(w, t1.body["access_token"], w.svid(CALC), audience="tool:web-search"))(w)
    assert t2.status == 200, t2.text
    t3 = Send(act_as(w, t2.body["access_token"], w.svid(SEARCH), audience="tool:calc"))(w)
    assert t3.status == 200, t3.text
    return str(t3.body["access_token"])


def revoked(w: World) -> str:
    token = w.issued(AGENT)
    answer = http("POST", f"{w.url}/revoke", data={"token": token}, headers=w.bearer(AGENT))
    assert answer.status == 200
    return token


def in_completed_task(w: World) -> str:
    task_id = w.task(AGENT)
    token = w.issued(AGENT, task_id=task_id)
    answer = http("POST", f"{w.url}/tasks/{task_id}/complete", json_body={}, headers=w.bearer(ORCHESTRATOR))
    assert answer.status == 200
    return token


def tampered(w: World) -> str:
    head, payload, signature = w.issued(AGENT).split(".")
    claims = _claims(f"{head}.{payload}.{signature}") | {"sub": ORCHESTRATOR}
    return f"{head}.{b64(json.dumps(claims))}.{signature}"


def tool_token_in_task(w: World) -> tuple[str, str]:
    task_id = w.task(AGENT, {"tool:web-search": ["invoke"], "data:crm": ["read"]})
    return w.issued(AGENT, audience="tool:web-search", task_id=task_id), task_id


def _tool_to_data_in_task(w: World) -> Send:
    token, task_id = tool_token_in_task(w)
    return Send(act_as(w, token, w.svid(SEARCH), audience="data:crm", scope="read", task_id=task_id))


def _delegated_calc_token(w: World) -> str:
    """The orchestrator's tool:calc token obtained with the agent as actor (it carries ``act``)."""
    answer = Send(act_as(w, w.svid(ORCHESTRATOR), w.svid(AGENT), subject_type=JWT_TYPE, audience="tool:calc"))(w)
    assert answer.status == 200, answer.text
    return str(answer.body["access_token"])


def _assert_as(w: World, sub: str) -> dict[str, str]:
    return {"client_assertion_type": JWT_SPIFFE, "client_assertion": w.svid(sub)}


Build = Callable[[World, Certs], Send]


def D(case_id: str, build: Build, error: str = "invalid_request") -> Any:
    return pytest.param(build, error, id=case_id)


INVALID_TARGET = "invalid_target"

CASES = [
    # --- actor tokens that are not for this exchange, or whose holder does not take part ---
    D("actor-issued-token-of-another-audience", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.issued(AGENT, audience="tool:web-search"), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc"))),
    D("actor-issued-token-without-authentication", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.issued(AGENT), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc"))),
    D("actor-issued-token-client-is-the-subject", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.issued(AGENT), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc", **_assert_as(w, ORCHESTRATOR)))),
    D("actor-issued-token-of-the-subject-itself", lambda w, c: Send(act_as(w, w.svid(AGENT), w.issued(AGENT, audience="tool:web-search"), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc"))),
    D("actor-issued-token-authenticated-but-for-another-target", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.issued(AGENT, audience="tool:web-search"), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc", **_assert_as(w, AGENT)))),
    D("actor-issued-token-authenticated-by-mtls-but-for-another-target", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.issued(AGENT, audience="tool:web-search"), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc"), cert=c.agent)),
    D("actor-issued-token-authenticated-as-someone-else", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.issued(AGENT), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc"), cert=c.calc)),
    D("actor-issued-delegated-token", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), _delegated_calc_token(w), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc", **_assert_as(w, ORCHESTRATOR)))),
    D("actor-svid-with-a-second-audience", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.svid(AGENT, [w.issuer, "https://elsewhere.example"]), subject_type=JWT_TYPE, audience="tool:calc"))),
    D("actor-svid-for-another-service", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.svid(AGENT, "https://elsewhere.example"), subject_type=JWT_TYPE, audience="tool:calc"))),
    D("actor-svid-for-a-catalog-target", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.svid(AGENT, "tool:calc"), subject_type=JWT_TYPE, audience="tool:calc"))),
    D("actor-svid-expired", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.svid(AGENT, ttl=60, now=now() - 3600), subject_type=JWT_TYPE, audience="tool:calc"))),
    D("actor-svid-untrusted-domain", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.auth.stranger.mint("spiffe://stranger.test/agent", w.issuer), subject_type=JWT_TYPE, audience="tool:calc"))),
    D("actor-svid-of-impostor", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.auth.impostor.mint(AGENT, w.issuer), subject_type=JWT_TYPE, audience="tool:calc"))),
    D("actor-svid-declared-access-token", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.svid(AGENT), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc"))),
    D("actor-issued-token-declared-jwt", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), w.issued(AGENT), subject_type=JWT_TYPE, actor_type=JWT_TYPE, audience="tool:calc"))),
    # --- bound tokens without their proof ---
    D("actor-dpop-bound-without-proof", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), dpop_bound(w), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc", **_assert_as(w, AGENT)))),
    D("actor-dpop-bound-proof-of-another-key", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), dpop_bound(w), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc", **_assert_as(w, AGENT)), dpop=DpopKey.generate().proof("POST", f"{w.issuer}/token"))),
    D("actor-mtls-bound-without-certificate", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), mtls_bound(w, c.agent), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc", **_assert_as(w, AGENT)))),
    D("actor-mtls-bound-without-certificate-on-tls", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), mtls_bound(w, c.agent), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc", **_assert_as(w, AGENT)), tls=True)),
    D("actor-mtls-bound-other-certificate-same-id", lambda w, c: Send(act_as(w, w.svid(ORCHESTRATOR), mtls_bound(w, c.agent), subject_type=JWT_TYPE, actor_type=ACCESS_TYPE, audience="tool:calc"), cert=c.agent_twin)),
    D("subject-dpop-bound-without-proof", lambda w, c: Send(act_as(w, dpop_bound(w), w.svid(CALC)))),
    D("subject-dpop-bound-proof-of-another-key", lambda w, c: Send(act_as(w, dpop_bound(w), w.svid(CALC)), dpop=DpopKey.generate().proof("POST", f"{w.issuer}/token"))),
    D("subject-mtls-bound-without-certificate", lambda w, c: Send(act_as(w, mtls_bound(w, c.agent), w.svid(CALC)))),
    D("subject-mtls-bound-without-certificate-on-tls", lambda w, c: Send(act_as(w, mtls_bound(w, c.agent), w.svid(CALC)), tls=True)),
    D("subject-mtls-bound-actors-own-certificate", lambda w, c: Send(act_as(w, mtls_bound(w, c.agent), w.svid(CALC)), cert=c.calc)),
    # --- may_act (fail closed) ---
    D("may-act-string", lambda w, c: Send(with_may_act(w, AGENT))),
    D("may-act-list", lambda w, c: Send(with_may_act(w, [{"sub": AGENT}]))),
    D("may-act-number", lambda w, c: Send(with_may_act(w, 1))),
    D("may-act-true", lambda w, c: Send(with_may_act(w, True))),
    D("may-act-empty-object", lambda w, c: Send(with_may_act(w, {}))),
    D("may-act-sub-number", lambda w, c: Send(with_may_act(w, {"sub": 1}))),
    D("may-act-sub-list", lambda w, c: Send(with_may_act(w, {"sub": [AGENT]}))),
    D("may-act-names-another-actor", lambda w, c: Send(with_may_act(w, {"sub": OTHER_AGENT}))),
    D("may-act-names-actor-in-uppercase", lambda w, c: Send(with_may_act(w, {"sub": AGENT.upper()}))),
    D("may-act-only-nested-act", lambda w, c: Send(with_may_act(w, {"act": {"sub": AGENT}}))),
    # --- chains ---
    D("depth-four", lambda w, c: Send(act_as(w, chain_of_three(w), w.svid(CALC), audience="tool:web-search"))),
    # --- issued tokens as subject ---
    D("issued-subject-without-actor", lambda w, c: Send(form(w.issued(AGENT), subject_token_type=ACCESS_TYPE, audience="tool:web-search", scope="invoke"))),
    D("issued-subject-actor-does-not-serve-it", lambda w, c: Send(act_as(w, w.issued(AGENT), w.svid(SEARCH)))),
    D("issued-subject-actor-is-its-own-subject", lambda w, c: Send(act_as(w, w.issued(AGENT), w.svid(AGENT)))),
    D("issued-subject-revoked", lambda w, c: Send(act_as(w, revoked(w), w.svid(CALC)))),
    D("issued-subject-task-completed", lambda w, c: Send(act_as(w, in_completed_task(w), w.svid(CALC)))),
    D("issued-subject-moved-to-another-task", lambda w, c: Send(act_as(w, w.issued(AGENT, task_id=w.task(AGENT)), w.svid(CALC), task_id=w.task(AGENT, {"tool:web-search": ["invoke"]})))),
    D("issued-subject-tampered", lambda w, c: Send(act_as(w, tampered(w), w.svid(CALC)))),
    D("issued-subject-declared-jwt", lambda w, c: Send(act_as(w, w.issued(AGENT), w.svid(CALC), subject_type=JWT_TYPE))),
    # --- a token for a tool never unlocks data (nor the other way round) ---
    D("tool-token-reexchanged-for-data", lambda w, c: Send(act_as(w, w.issued(AGENT, audience="tool:web-search"), w.svid(SEARCH), audience="data:crm", scope="read")), INVALID_TARGET),
    D("tool-token-reexchanged-for-data-in-task", lambda w, c: _tool_to_data_in_task(w), INVALID_TARGET),
    D("tool-token-reexchanged-for-data-by-resource", lambda w, c: Send(act_as(w, w.issued(AGENT, audience="tool:calc"), w.svid(CALC), audience="data:crm", scope="read")), INVALID_TARGET),
    D("tool-token-reexchanged-for-data-client-authenticated", lambda w, c: Send(act_as(w, w.issued(AGENT, audience="tool:calc"), w.svid(CALC), audience="data:crm", scope="read", **_assert_as(w, CALC))), INVALID_TARGET),
    D("data-token-reexchanged-for-a-tool", lambda w, c: Send(act_as(w, w.issued(AGENT, audience="data:crm", scope="read"), w.svid(CRM), audience="tool:calc")), INVALID_TARGET),
]


@pytest.mark.parametrize(("build", "error"), CASES)
def test_delegation_abuse_is_refused(world: World, certs: Certs, build: Build, error: str) -> None:
    refused(build(world, certs)(world), 400, error)


def test_control_an_authenticated_actor_with_its_own_token_may_act(world: World) -> None:
    """Not a case: the honest form of the actor cases above is accepted."""
    body = act_as(
        world,
        world.svid(ORCHESTRATOR),
        world.issued(AGENT),
        subject_type=JWT_TYPE,
        actor_type=ACCESS_TYPE,
        audience="tool:calc",
        **_assert_as(world, AGENT),
    )
    answer = Send(body)(world)
    assert answer.status == 200, answer.text
