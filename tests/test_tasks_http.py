"""Task-scoped access end to end over HTTP: tasks, introspection, revocation, kill switch, exceptions, limits."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import requests

from tests.authority import TestAuthority
from tests.conftest import ADMIN, RunningServer

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
AGENT = "spiffe://example.org/agent/researcher"
ORCHESTRATOR = "spiffe://example.org/orchestrator"
SEARCH_SERVER = "spiffe://example.org/tool/web-search"


class Client:
    """One workload talking to the server with its own JWT-SVIDs (fresh per call, as from the Workload API)."""

    def __init__(self, server: RunningServer, authority: TestAuthority, spiffe_id: str) -> None:
        self.server, self.authority, self.spiffe_id = server, authority, spiffe_id

    def svid(self) -> str:
        return self.authority.mint(self.spiffe_id, self.server.issuer)

    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.svid()}"}

    def exchange(self, audience: str, scope: str, **extra: str) -> requests.Response:
        body = {"grant_type": GRANT, "subject_token": self.svid(), "subject_token_type": JWT_TYPE}
        body.update(audience=audience, scope=scope, **extra)
        return requests.post(f"{self.server.url}/token", data=body, timeout=10)

    def post_json(self, path: str, body: Any) -> requests.Response:
        return requests.post(f"{self.server.url}{path}", json=body, headers=self.bearer(), timeout=10)

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.server.url}{path}", headers=self.bearer(), timeout=10)

    def introspect(self, token: str) -> dict[str, Any]:
        response = requests.post(
            f"{self.server.url}/introspect", data={"token": token}, headers=self.bearer(), timeout=10
        )
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def revoke(self, token: str) -> requests.Response:
        return requests.post(
            f"{self.server.url}/revoke", data={"token": token}, headers=self.bearer(), timeout=10
        )


@pytest.fixture
def agent(server: RunningServer, example_org: TestAuthority) -> Client:
    return Client(server, example_org, AGENT)


@pytest.fixture
def orchestrator(server: RunningServer, example_org: TestAuthority) -> Client:
    return Client(server, example_org, ORCHESTRATOR)


@pytest.fixture
def search_server(server: RunningServer, example_org: TestAuthority) -> Client:
    return Client(server, example_org, SEARCH_SERVER)


@pytest.fixture
def admin(server: RunningServer, example_org: TestAuthority) -> Client:
    return Client(server, example_org, ADMIN)


def new_task(orchestrator: Client, **changes: Any) -> dict[str, Any]:
    body = {
        "assignee": AGENT,
        "targets": [
            {"target": "tool:web-search", "scopes": ["invoke"]},
            {"target": "data:crm", "scopes": ["read"]},
        ],
        "purpose": "research the quarterly numbers",
        "ttl_seconds": 600,
    } | changes
    response = orchestrator.post_json("/tasks", body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def test_task_lifecycle_end_to_end(agent: Client, orchestrator: Client, search_server: Client) -> None:
    task = new_task(orchestrator)
    assert task["status"] == "active"
    assert task["expires_at"] - task["created_at"] == 600
    assert agent.get(f"/tasks/{task['task_id']}").json()["purpose"] == "research the quarterly numbers"

    issued = agent.exchange("tool:web-search", "invoke", task_id=task["task_id"])
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["task_id"] == task["task_id"]
    assert claims["exp"] <= task["expires_at"]

    active = search_server.introspect(token)
    assert active["active"] is True
    assert active["task_id"] == task["task_id"]
    assert active["token_class"] == "tool"
    assert active["sub"] == AGENT

    done = agent.post_json(f"/tasks/{task['task_id']}/complete", {})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "completed"
    assert done.json()["completed_by"] == AGENT
    assert search_server.introspect(token) == {"active": False}
    refused = agent.exchange("tool:web-search", "invoke", task_id=task["task_id"])
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_request")
    assert "completed" in refused.json()["error_description"]


def test_introspection_only_for_the_tokens_audience(
    agent: Client, search_server: Client, server: RunningServer, example_org: TestAuthority
) -> None:
    token = agent.exchange("tool:calc", "invoke").json()["access_token"]
    assert search_server.introspect(token) == {"active": False}  # calc's token, asked by web-search's server
    calc_server = Client(server, example_org, "spiffe://example.org/tool/calc")
    assert calc_server.introspect(token)["active"] is True
    assert calc_server.introspect("not-a-token") == {"active": False}


def test_revocation_by_an_unauthenticated_client_is_invalid_client(server: RunningServer) -> None:
    """RFC 7009 §2.2.1 (issue 12 #6)."""
    anonymous = requests.post(f"{server.url}/revoke", data={"token": "x"}, timeout=5)
    assert (anonymous.status_code, anonymous.json()["error"]) == (401, "invalid_client")
    assert "WWW-Authenticate" not in anonymous.headers
    bad = requests.post(
        f"{server.url}/revoke", data={"token": "x"}, headers={"Authorization": "Bearer x.y.z"}, timeout=5
    )
    assert (bad.status_code, bad.json()["error"]) == (401, "invalid_client")
    assert bad.headers["WWW-Authenticate"].startswith("Bearer ")


def test_introspection_requires_an_authenticated_caller(server: RunningServer) -> None:
    response = requests.post(f"{server.url}/introspect", data={"token": "x"}, timeout=5)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    # RFC 6750 §3.1 (issue 12 #5): no credentials at all, so the challenge carries no error code.
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="sts"'
    wrong = requests.post(
        f"{server.url}/introspect", data={"token": "x"}, headers={"Authorization": "Bearer x.y.z"}, timeout=5
    )
    assert wrong.status_code == 401


def test_holder_revokes_its_own_token(
    agent: Client, server: RunningServer, example_org: TestAuthority
) -> None:
    calc_server = Client(server, example_org, "spiffe://example.org/tool/calc")
    token = agent.exchange("tool:calc", "invoke").json()["access_token"]
    stranger = Client(server, example_org, "spiffe://example.org/agent/other")
    assert stranger.revoke(token).status_code == 200  # RFC 7009: same answer, nothing revoked
    assert calc_server.introspect(token)["active"] is True
    assert agent.revoke(token).status_code == 200
    assert calc_server.introspect(token) == {"active": False}


@pytest.mark.parametrize(
    ("changes", "status", "error"),
    [
        ({"assignee": "spiffe://example.org/batch/job"}, 403, "access_denied"),
        ({"targets": [{"target": "tool:nope", "scopes": ["invoke"]}]}, 400, "invalid_target"),
        ({"targets": [{"target": "data:crm", "scopes": ["delete"]}]}, 400, "invalid_scope"),
        ({"ttl_seconds": 999_999}, 400, "invalid_request"),
        ({"purpose": ""}, 400, "invalid_request"),
        ({"extra": 1}, 400, "invalid_request"),
    ],
    ids=[
        "policy-denies-assignee",
        "unknown-target",
        "scope-not-offered",
        "ttl-over-max",
        "no-purpose",
        "unknown-field",
    ],
)
def test_task_creation_refusals(
    orchestrator: Client, changes: dict[str, Any], status: int, error: str
) -> None:
    body = {
        "assignee": AGENT,
        "targets": [{"target": "tool:web-search", "scopes": ["invoke"]}],
        "purpose": "p",
        "ttl_seconds": 60,
    } | changes
    response = orchestrator.post_json("/tasks", body)
    assert (response.status_code, response.json()["error"]) == (status, error), response.text


def test_only_policy_allowed_workloads_create_tasks(agent: Client) -> None:
    body = {
        "assignee": AGENT,
        "targets": [{"target": "tool:calc", "scopes": ["invoke"]}],
        "purpose": "p",
        "ttl_seconds": 60,
    }
    assert agent.post_json("/tasks", body).status_code == 403


def test_tasks_refuse_unauthenticated_and_strangers(
    server: RunningServer, orchestrator: Client, example_org: TestAuthority
) -> None:
    task = new_task(orchestrator)
    assert requests.get(f"{server.url}/tasks/{task['task_id']}", timeout=5).status_code == 401
    stranger = Client(server, example_org, "spiffe://example.org/agent/other")
    assert stranger.get(f"/tasks/{task['task_id']}").status_code == 404
    assert stranger.post_json(f"/tasks/{task['task_id']}/complete", {}).status_code == 404
    assert orchestrator.get("/tasks/task_nope").status_code == 404


@pytest.mark.parametrize(
    ("who", "audience", "scope", "error"),
    [
        ("spiffe://example.org/agent/other", "tool:web-search", "invoke", "invalid_request"),
        (AGENT, "tool:calc", "invoke", "invalid_target"),
        (AGENT, "data:crm", "write", "invalid_scope"),
    ],
    ids=["task-of-another-workload", "target-outside-the-task", "scope-outside-the-task"],
)
def test_task_scoped_exchange_refusals(
    server: RunningServer,
    example_org: TestAuthority,
    orchestrator: Client,
    who: str,
    audience: str,
    scope: str,
    error: str,
) -> None:
    task = new_task(orchestrator)
    response = Client(server, example_org, who).exchange(audience, scope, task_id=task["task_id"])
    assert (response.status_code, response.json()["error"]) == (400, error), response.text


def test_task_token_budget(agent: Client, orchestrator: Client) -> None:
    task = new_task(orchestrator)
    for _ in range(3):  # tokens_per_task: 3 in the test configuration
        assert agent.exchange("tool:web-search", "invoke", task_id=task["task_id"]).status_code == 200
    spent = agent.exchange("tool:web-search", "invoke", task_id=task["task_id"])
    assert spent.status_code == 429
    assert spent.json()["error"] == "rate_limited"
    assert int(spent.headers["Retry-After"]) > 0


def test_admin_kill_switch_for_a_spiffe_id(
    server: RunningServer, example_org: TestAuthority, admin: Client
) -> None:
    victim = Client(server, example_org, "spiffe://example.org/agent/compromised")
    calc_server = Client(server, example_org, "spiffe://example.org/tool/calc")
    token = victim.exchange("tool:calc", "invoke").json()["access_token"]
    until = int(time.time()) + 2
    response = admin.post_json(
        "/admin/revocations", {"spiffe_id": victim.spiffe_id, "reason": "leaked", "until": until}
    )
    assert response.status_code == 200, response.text
    assert calc_server.introspect(token) == {"active": False}
    refused = victim.exchange("tool:calc", "invoke")
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_request")
    time.sleep(max(0.0, until - time.time()) + 1.1)
    fresh = victim.exchange("tool:calc", "invoke")
    assert fresh.status_code == 200, fresh.text  # the kill switch had an end
    assert calc_server.introspect(token) == {"active": False}  # tokens from before it stay dead
    assert calc_server.introspect(fresh.json()["access_token"])["active"] is True


def test_admin_revokes_a_jti_and_a_task(
    agent: Client, orchestrator: Client, admin: Client, search_server: Client
) -> None:
    token = agent.exchange("tool:web-search", "invoke").json()["access_token"]
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert admin.post_json("/admin/revocations", {"jti": jti, "reason": "suspicious"}).status_code == 200
    assert search_server.introspect(token) == {"active": False}

    task = new_task(orchestrator)
    task_token = agent.exchange("tool:web-search", "invoke", task_id=task["task_id"]).json()["access_token"]
    response = admin.post_json("/admin/revocations", {"task_id": task["task_id"], "reason": "runaway agent"})
    assert response.json()["task_status"] == "completed"
    assert search_server.introspect(task_token) == {"active": False}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"jti": "x"}, 400),
        ({"jti": "x", "task_id": "y", "reason": "r"}, 400),
        ({"task_id": "y", "until": 99999999999, "reason": "r"}, 400),
        ({"spiffe_id": "not-an-id", "reason": "r"}, 400),
        ({"task_id": "task_unknown", "reason": "r"}, 404),
    ],
    ids=["no-reason", "two-kinds", "until-without-spiffe-id", "bad-spiffe-id", "unknown-task"],
)
def test_admin_revocation_refusals(admin: Client, body: dict[str, Any], status: int) -> None:
    assert admin.post_json("/admin/revocations", body).status_code == status


def test_admin_endpoints_refuse_non_admins(agent: Client) -> None:
    response = agent.post_json("/admin/revocations", {"spiffe_id": AGENT, "reason": "me"})
    assert (response.status_code, response.json()["error"]) == (403, "access_denied")
    assert agent.get("/admin/exceptions").status_code == 403


def test_break_glass_exception(server: RunningServer, example_org: TestAuthority, admin: Client) -> None:
    job = Client(server, example_org, "spiffe://example.org/batch/nightly")
    assert job.exchange("tool:calc", "invoke").status_code == 400  # default deny
    no_end = admin.post_json(
        "/admin/exceptions",
        {"spiffe_id": job.spiffe_id, "target": "tool:calc", "scopes": ["invoke"], "reason": "incident"},
    )
    assert (no_end.status_code, no_end.json()["error"]) == (400, "invalid_request")
    expires_at = int(time.time()) + 2
    granted = admin.post_json(
        "/admin/exceptions",
        {
            "spiffe_id": job.spiffe_id,
            "target": "tool:calc",
            "scopes": ["invoke"],
            "reason": "incident 42",
            "expires_at": expires_at,
        },
    )
    assert granted.status_code == 201, granted.text
    exception_id = granted.json()["exception_id"]
    allowed = job.exchange("tool:calc", "invoke")
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["expires_in"] <= 30
    listed = {e["exception_id"]: e for e in admin.get("/admin/exceptions").json()["exceptions"]}
    assert listed[exception_id]["status"] == "active"
    uses = [
        r
        for r in server.audit_records()
        if r.get("exception_id") == exception_id
        and r.get("decision") == "allow"
        and r.get("event") != "exception_granted"
    ]
    assert len(uses) == 1
    time.sleep(max(0.0, expires_at - time.time()) + 0.2)
    assert job.exchange("tool:calc", "invoke").status_code == 400
    listed = {e["exception_id"]: e for e in admin.get("/admin/exceptions").json()["exceptions"]}
    assert listed[exception_id]["status"] == "expired"


def test_metadata_names_introspection_and_revocation(server: RunningServer) -> None:
    metadata = requests.get(f"{server.url}/.well-known/oauth-authorization-server", timeout=5).json()
    assert metadata["introspection_endpoint"] == f"{server.issuer}/introspect"
    assert metadata["revocation_endpoint"] == f"{server.issuer}/revoke"


def test_kill_switch_reaches_actors_and_callers(
    server: RunningServer, example_org: TestAuthority, admin: Client
) -> None:
    issuer = server.issuer
    orchestrator, middleman = "spiffe://example.org/orchestrator", "spiffe://example.org/agent/middleman"
    body = {
        "grant_type": GRANT,
        "subject_token": example_org.mint(orchestrator, issuer),
        "subject_token_type": JWT_TYPE,
        "actor_token": example_org.mint(middleman, issuer),
        "actor_token_type": JWT_TYPE,
        "audience": "tool:calc",
        "scope": "invoke",
    }
    token = requests.post(f"{server.url}/token", data=body, timeout=10).json()["access_token"]
    calc = Client(server, example_org, "spiffe://example.org/tool/calc")
    assert calc.introspect(token)["active"] is True
    assert (
        admin.post_json(
            "/admin/revocations", {"spiffe_id": middleman, "reason": "compromised actor"}
        ).status_code
        == 200
    )
    assert calc.introspect(token) == {"active": False}
    killed = Client(server, example_org, middleman)
    assert killed.get("/tasks/task_x").status_code == 401  # its JWT-SVID no longer opens JSON endpoints


def test_a_shorter_kill_never_lifts_a_permanent_one(
    server: RunningServer, example_org: TestAuthority, admin: Client
) -> None:
    victim = Client(server, example_org, "spiffe://example.org/agent/permanently-out")
    assert (
        admin.post_json("/admin/revocations", {"spiffe_id": victim.spiffe_id, "reason": "gone"}).json()[
            "until"
        ]
        is None
    )
    shorter = admin.post_json(
        "/admin/revocations", {"spiffe_id": victim.spiffe_id, "reason": "oops", "until": int(time.time()) + 1}
    )
    assert shorter.json()["until"] is None
    time.sleep(1.2)
    assert victim.exchange("tool:calc", "invoke").status_code == 400


def test_break_glass_is_not_lent_to_an_actor(
    server: RunningServer, example_org: TestAuthority, admin: Client
) -> None:
    job, helper = "spiffe://example.org/batch/lender", "spiffe://example.org/batch/borrower"
    expires_at = int(time.time()) + 20
    granted = admin.post_json(
        "/admin/exceptions",
        {
            "spiffe_id": job,
            "target": "tool:calc",
            "scopes": ["invoke"],
            "reason": "incident",
            "expires_at": expires_at,
        },
    )
    assert granted.status_code == 201
    own = Client(server, example_org, job).exchange("tool:calc", "invoke")
    assert own.status_code == 200
    assert jwt.decode(own.json()["access_token"], options={"verify_signature": False})["exp"] <= expires_at
    body = {
        "grant_type": GRANT,
        "subject_token": example_org.mint(job, server.issuer),
        "subject_token_type": JWT_TYPE,
        "actor_token": example_org.mint(helper, server.issuer),
        "actor_token_type": JWT_TYPE,
        "audience": "tool:calc",
        "scope": "invoke",
    }
    assert requests.post(f"{server.url}/token", data=body, timeout=10).status_code == 400


@pytest.mark.parametrize(
    ("path", "body"),
    [("/tasks", "[" * 30000 + "]" * 30000), ("/admin/revocations", '{"spiffe_id": 1')],
    ids=["deeply-nested", "truncated"],
)
def test_malformed_json_is_a_400(admin: Client, path: str, body: str) -> None:
    response = requests.post(
        f"{admin.server.url}{path}",
        data=body,
        headers={**admin.bearer(), "Content-Type": "application/json"},
        timeout=10,
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


def test_admin_times_are_bounded(admin: Client) -> None:
    response = admin.post_json(
        "/admin/revocations", {"spiffe_id": AGENT + "-x", "reason": "r", "until": 2**63 - 10}
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
