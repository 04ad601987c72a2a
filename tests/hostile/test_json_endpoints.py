"""Every JSON endpoint called anonymously, with bad credentials, by the wrong workload, and with bad bodies.

``/tasks``, ``/tasks/{id}``, ``/tasks/{id}/complete``, ``/introspect``, ``/revoke``,
``/admin/revocations`` and ``/admin/exceptions`` (both methods). A missing or bad bearer JWT-SVID is
``invalid_token`` (401, RFC 6750 §3.1); an authenticated caller that is not allowed is
``access_denied`` (403) on admin endpoints and ``not_found`` (404, no oracle) on another workload's
task; a body that is not the JSON object (or form) the endpoint takes is ``invalid_request`` (400),
or 413 past the size limit. Introspection by a workload that does not serve the token's audience is
``{"active": false}``; revoking someone else's token changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.hostile import tally
from tests.hostile.attacker import (
    ADMIN,
    AGENT,
    CALC,
    CRM,
    ORCHESTRATOR,
    OTHER_AGENT,
    Answer,
    http,
    inactive,
    now,
    refused,
    unsigned,
)
from tests.hostile.conftest import World

VICTIM = "spiffe://example.org/agent/victim"  # revocations a wrongly accepted request would make hit no one


@pytest.fixture(scope="module")
def agent_task(world: World) -> str:
    return world.task(AGENT)


def task_body() -> dict[str, Any]:
    return {
        "assignee": AGENT,
        "targets": [{"target": "tool:calc", "scopes": ["invoke"]}],
        "purpose": "hostile",
        "ttl_seconds": 60,
    }


def exception_body() -> dict[str, Any]:
    return {"spiffe_id": VICTIM, "target": "tool:calc", "scopes": ["invoke"], "reason": "r", "expires_at": now() + 60}


ENDPOINTS: list[tuple[str, str, str, Callable[[], Any]]] = [
    # (id, method, path, body) — "{task}" is a real task of the agent
    ("create-task", "POST", "/tasks", task_body),
    ("read-task", "GET", "/tasks/{task}", lambda: None),
    ("complete-task", "POST", "/tasks/{task}/complete", dict),
    ("introspect", "POST", "/introspect", lambda: {"token": "x.y.z"}),
    ("revoke", "POST", "/revoke", lambda: {"token": "x.y.z"}),
    ("admin-revocation", "POST", "/admin/revocations", lambda: {"spiffe_id": VICTIM, "reason": "r"}),
    ("admin-grant-exception", "POST", "/admin/exceptions", exception_body),
    ("admin-list-exceptions", "GET", "/admin/exceptions", lambda: None),
]
FORM_ENDPOINTS = {"/introspect", "/revoke"}


def call(world: World, method: str, path: str, body: Any, headers: dict[str, str], task: str) -> Answer:
    url = world.url + path.replace("{task}", task)
    if path in FORM_ENDPOINTS:
        return http(method, url, data=body, headers=headers, session=world.session)
    return http(method, url, json_body=body, headers=headers, session=world.session)


CREDENTIALS: list[tuple[str, Callable[[World], dict[str, str]]]] = [
    ("anonymous", lambda w: {}),
    ("garbage-bearer", lambda w: {"Authorization": "Bearer garbage"}),
    ("empty-bearer", lambda w: {"Authorization": "Bearer"}),
    ("basic-scheme", lambda w: {"Authorization": "Basic YWRtaW46YWRtaW4="}),
    ("dpop-scheme-with-svid", lambda w: {"Authorization": f"DPoP {w.svid(ADMIN)}"}),
    ("expired-svid", lambda w: {"Authorization": f"Bearer {w.svid(ADMIN, ttl=60, now=now() - 3600)}"}),
    ("svid-for-another-audience", lambda w: {"Authorization": f"Bearer {w.svid(ADMIN, 'https://elsewhere.example')}"}),
    ("access-token-as-bearer", lambda w: {"Authorization": f"Bearer {w.issued(AGENT)}"}),
    ("impostor-signed-admin", lambda w: {"Authorization": f"Bearer {w.auth.impostor.mint(ADMIN, w.issuer)}"}),
    ("alg-none-admin", lambda w: {"Authorization": "Bearer " + unsigned({"alg": "none", "kid": w.auth.example.kid}, {"sub": ADMIN, "aud": w.issuer, "exp": now() + 300})}),
    ("untrusted-domain", lambda w: {"Authorization": f"Bearer {w.auth.stranger.mint('spiffe://stranger.test/ops/sts-admin', w.issuer)}"}),
]


@pytest.mark.parametrize(
    ("endpoint", "credential"),
    [
        pytest.param(e, c, id=f"{e[0]}-{c[0]}")
        for e in ENDPOINTS
        for c in CREDENTIALS
    ],
)
def test_unauthenticated_callers_are_refused(
    world: World, agent_task: str, endpoint: tuple[str, str, str, Callable[[], Any]], credential: tuple[str, Callable[[World], dict[str, str]]]
) -> None:
    _, method, path, body = endpoint
    answer = call(world, method, path, body(), credential[1](world), agent_task)
    challenge = answer.headers.get("WWW-Authenticate", "")
    if path == "/revoke":  # RFC 7009 §2.2.1: the revoking client failed to authenticate
        refused(answer, 401, "invalid_client")
        assert "error=" not in challenge or challenge.startswith("Bearer")
    else:
        refused(answer, 401, "invalid_token")
        assert challenge.startswith("Bearer")
    if credential[0] == "anonymous":  # RFC 6750 §3.1: no credentials, no error code in the challenge
        assert "error=" not in challenge, challenge


ADMIN_ENDPOINTS = [e for e in ENDPOINTS if e[2].startswith("/admin/")]
NOT_ADMINS = [
    AGENT,
    ORCHESTRATOR,
    CRM,
    "spiffe://partner.test/ops/sts-admin",
    "spiffe://example.org/ops/sts-admin/x",
    "spiffe://example.org/ops",
    "spiffe://rsa.test/ops/sts-admin",
]


@pytest.mark.parametrize(
    ("endpoint", "caller"),
    [pytest.param(e, c, id=f"{e[0]}-by-{c.removeprefix('spiffe://')}") for e in ADMIN_ENDPOINTS for c in NOT_ADMINS],
)
def test_admin_endpoints_refuse_non_admins(
    world: World, agent_task: str, endpoint: tuple[str, str, str, Callable[[], Any]], caller: str
) -> None:
    _, method, path, body = endpoint
    refused(call(world, method, path, body(), world.bearer(caller), agent_task), 403, "access_denied")


STRANGERS = [OTHER_AGENT, CALC, "spiffe://partner.test/agent/summarizer", "spiffe://example.org/orchestrator/x"]


@pytest.mark.parametrize(
    ("method", "suffix", "caller"),
    [
        pytest.param(m, s, c, id=f"{name}-by-{c.removeprefix('spiffe://')}")
        for m, s, name in [("GET", "", "read"), ("POST", "/complete", "complete")]
        for c in STRANGERS
    ],
)
def test_another_workloads_task_does_not_exist(
    world: World, agent_task: str, method: str, suffix: str, caller: str
) -> None:
    answer = http(method, f"{world.url}/tasks/{agent_task}{suffix}", json_body={} if method == "POST" else None, headers=world.bearer(caller))
    refused(answer, 404, "not_found")


@pytest.mark.parametrize(
    "task_id",
    ["task_nope", "%2e%2e", "task_" + "x" * 5000, "task_%00", "task_'%20OR%20'1'='1", "%0Aforged-log-line"],
    ids=["unknown", "encoded-dot-dot", "huge", "nul", "sql", "newline"],
)
def test_unknown_task_ids(world: World, task_id: str) -> None:
    refused(http("GET", f"{world.url}/tasks/{task_id}", headers=world.bearer(AGENT)), 404, "not_found")


@pytest.mark.parametrize("caller", [AGENT, "spiffe://partner.test/agent/summarizer", CALC], ids=["agent", "partner", "service"])
def test_task_creation_by_workloads_policy_does_not_allow(world: World, caller: str) -> None:
    refused(http("POST", f"{world.url}/tasks", json_body=task_body(), headers=world.bearer(caller)), 403, "access_denied")


def test_revoking_someone_elses_token_changes_nothing(world: World) -> None:
    token = world.issued(AGENT)
    answer = http("POST", f"{world.url}/revoke", data={"token": token}, headers=world.bearer(OTHER_AGENT))
    assert answer.status == 200
    after = http("POST", f"{world.url}/introspect", data={"token": token}, headers=world.bearer(CALC))
    tally.note(accepted=not (isinstance(after.body, dict) and after.body.get("active") is True))
    assert after.body["active"] is True, "a stranger's revocation took effect"


def test_introspection_by_the_holder_is_inactive(world: World) -> None:
    inactive(http("POST", f"{world.url}/introspect", data={"token": world.issued(AGENT)}, headers=world.bearer(AGENT)))


# --- malformed bodies -----------------------------------------------------------------------------

JSON_TARGETS: dict[str, tuple[str, str, str]] = {
    # endpoint: (caller, valid body with NUMBER where a number goes, the member names)
    "/tasks": (
        ORCHESTRATOR,
        json.dumps(task_body()).replace('"ttl_seconds": 60', '"ttl_seconds": NUMBER'),
        "assignee",
    ),
    "/admin/revocations": (ADMIN, json.dumps({"spiffe_id": VICTIM, "reason": "r"})[:-1] + ', "until": NUMBER}', "spiffe_id"),
    "/admin/exceptions": (
        ADMIN,
        json.dumps(exception_body()).replace(f'"expires_at": {exception_body()["expires_at"]}', '"expires_at": NUMBER'),
        "spiffe_id",
    ),
}


def _number(template: str, literal: str) -> str:
    return template.replace("NUMBER", literal)


def _duplicate(template: str, member: str) -> str:
    """The first member repeated in front, with a value that would differ (a lenient parser keeps the last)."""
    valid = _number(template, str(now() + 60))
    return valid.replace("{", '{"' + member + '": "spiffe://example.org/agent/decoy", ', 1)


def _huge(template: str, text: str) -> str:
    """The body with its free-text member (purpose or reason) replaced by ``text``."""
    valid = _number(template, str(now() + 60))
    return valid.replace('"purpose": "hostile"', f'"purpose": "{text}"').replace('"reason": "r"', f'"reason": "{text}"')


BODIES: list[tuple[str, Callable[[str, str], bytes], int]] = [
    ("NaN", lambda t, m: _number(t, "NaN").encode(), 400),
    ("Infinity", lambda t, m: _number(t, "Infinity").encode(), 400),
    ("minus-Infinity", lambda t, m: _number(t, "-Infinity").encode(), 400),
    ("1e999", lambda t, m: _number(t, "1e999").encode(), 400),
    ("10e400-int", lambda t, m: _number(t, "1" + "0" * 400).encode(), 400),
    ("minus-10e400-int", lambda t, m: _number(t, "-1" + "0" * 400).encode(), 400),
    ("float", lambda t, m: _number(t, "60.5").encode(), 400),
    ("string-number", lambda t, m: _number(t, '"60"').encode(), 400),
    ("true", lambda t, m: _number(t, "true").encode(), 400),
    ("duplicate-keys", lambda t, m: _duplicate(t, m).encode(), 400),
    ("deep-array-nesting", lambda t, m: b"[" * 30000 + b"]" * 30000, 400),  # under the 64 KiB limit
    ("deep-object-nesting", lambda t, m: b'{"a":' * 10000 + b"1" + b"}" * 10000, 400),
    ("array-instead-of-object", lambda t, m: ("[" + _number(t, "60") + "]").encode(), 400),
    ("json-string", lambda t, m: b'"hello"', 400),
    ("json-number", lambda t, m: b"42", 400),
    ("json-null", lambda t, m: b"null", 400),
    ("empty-object", lambda t, m: b"{}", 400),
    ("huge-string-member", lambda t, m: _huge(t, "x" * 60000).encode(), 400),
    ("body-over-limit", lambda t, m: _number(t, "60").replace("{", '{"pad": "' + "x" * 200000 + '", ', 1).encode(), 413),
    ("truncated", lambda t, m: _number(t, "60")[:-5].encode(), 400),
    ("trailing-comma", lambda t, m: _number(t, "60")[:-1].encode() + b",}", 400),
    ("single-quotes", lambda t, m: _number(t, "60").replace('"', "'").encode(), 400),
    ("comment", lambda t, m: b"/* hi */" + _number(t, "60").encode(), 400),
    ("trailing-garbage", lambda t, m: _number(t, "60").encode() + b"x", 400),
    ("two-documents", lambda t, m: _number(t, "60").encode() * 2, 400),
    ("not-utf8", lambda t, m: _huge(t, "r\udcff").encode("utf-8", "surrogateescape"), 400),
    ("empty", lambda t, m: b"", 400),
    ("unknown-member", lambda t, m: _number(t, "60").replace("{", '{"x-admin": true, ', 1).encode(), 400),
]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [pytest.param(p, b, s, id=f"{p.strip('/').replace('/', '-')}-{name}") for p in JSON_TARGETS for name, b, s in BODIES],
)
def test_malformed_json_bodies_are_refused(world: World, path: str, body: Callable[[str, str], bytes], status: int) -> None:
    caller, template, member = JSON_TARGETS[path]
    headers = world.bearer(caller) | {"Content-Type": "application/json"}
    refused(http("POST", f"{world.url}{path}", data=body(template, member), headers=headers, session=world.session), status, "invalid_request")


@pytest.mark.parametrize("path", list(JSON_TARGETS), ids=[p.strip("/").replace("/", "-") for p in JSON_TARGETS])
def test_json_endpoints_take_json_only(world: World, path: str) -> None:
    caller, template, _ = JSON_TARGETS[path]
    headers = world.bearer(caller) | {"Content-Type": "text/plain"}
    refused(http("POST", f"{world.url}{path}", data=_number(template, "60").encode(), headers=headers), 400, "invalid_request")


FORMS: list[tuple[str, Callable[[World], dict[str, Any]], int]] = [
    ("json-instead-of-form", lambda w: {"json_body": {"token": w.issued(AGENT)}}, 400),
    ("missing-token", lambda w: {"data": {"token_type_hint": "access_token"}}, 400),
    ("two-tokens", lambda w: {"data": [("token", w.issued(AGENT)), ("token", w.issued(AGENT))]}, 400),
    ("empty-token", lambda w: {"data": {"token": ""}}, 400),
    ("token-in-query", lambda w: {"query": "?token=" + w.issued(AGENT), "data": {"x": "1"}}, 400),
    ("text-plain", lambda w: {"data": b"token=x", "headers": {"Content-Type": "text/plain"}}, 400),
    ("not-utf8", lambda w: {"data": b"token=\xff\xfe", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 400),
    ("body-over-limit", lambda w: {"data": {"token": "x" * 70000}}, 413),
]


@pytest.mark.parametrize(
    ("path", "shape", "status"),
    [pytest.param(p, f, s, id=f"{p.strip('/')}-{name}") for p in ("/introspect", "/revoke") for name, f, s in FORMS],
)
def test_malformed_forms_are_refused(world: World, path: str, shape: Callable[[World], dict[str, Any]], status: int) -> None:
    options = shape(world)
    headers = world.bearer(CALC) | options.get("headers", {})
    answer = http(
        "POST",
        f"{world.url}{path}{options.get('query', '')}",
        data=options.get("data"),
        json_body=options.get("json_body"),
        headers=headers,
        session=world.session,
    )
    refused(answer, status, "invalid_request")
