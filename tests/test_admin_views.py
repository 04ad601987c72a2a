"""The operators' live view and commands: the store's indexes (every backend) and the admin API."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest
import requests

from sts.store import Budget, Store, StoreUnavailable, TokenRecord
from sts.store.memory import MemoryStore
from sts.store.redis_store import RedisStore
from sts.store.sqlite import SWEEP_INTERVAL, SqliteStore
from tests.authority import TestAuthority
from tests.conftest import ADMIN, RunningServer
from tests.test_store import (
    AGENT,
    OTHER,
    FakeClock,
    clock,
    cut_off,
    make_grant,
    make_task,
    redis_server,
    store,
)
from tests.test_tasks_http import Client, new_task

__all__ = ["clock", "redis_server", "store"]  # fixtures shared with test_store


def token(
    clock: FakeClock, jti: str, *, task_id: str | None = None, ttl: int = 60, sub: str = AGENT
) -> TokenRecord:
    now = int(clock())
    return TokenRecord(jti, sub, "tool:calc", "tool", now, now + ttl, "none", task_id=task_id)


# ---------------------------------------------------------------- store, every backend


def test_active_task_count(store: Store, clock: FakeClock) -> None:
    store.create_task(make_task(clock, "t1", ttl=100))
    store.create_task(make_task(clock, "t2", ttl=300))
    store.create_task(make_task(clock, "t3", ttl=300))
    store.complete_task("t3", at=int(clock()), by=AGENT)
    assert store.active_task_count(clock()) == 2
    clock.advance(150)
    assert store.active_task_count(clock()) == 1


def test_list_tasks_by_assignee_and_active(store: Store, clock: FakeClock) -> None:
    store.create_task(make_task(clock, "t1", ttl=100))
    clock.advance(1)
    store.create_task(make_task(clock, "t2", ttl=300))
    clock.advance(200)
    assert [t.id for t in store.list_tasks(now=clock(), limit=10)] == ["t2", "t1"]
    assert [t.id for t in store.list_tasks(now=clock(), active_only=True, limit=10)] == ["t2"]
    assert store.list_tasks(now=clock(), assignee=OTHER, limit=10) == []
    assert len(store.list_tasks(now=clock(), limit=1)) == 1


def test_tokens_by_task_and_subject_newest_first(store: Store, clock: FakeClock) -> None:
    assert store.record_token(token(clock, "a", task_id="t1"))
    clock.advance(1)
    assert store.record_token(token(clock, "b", sub=OTHER))
    clock.advance(1)
    assert store.record_token(token(clock, "c", task_id="t1"))
    assert [t.jti for t in store.tokens(task_id="t1", limit=10)] == ["c", "a"]
    assert [t.jti for t in store.tokens(spiffe_id=AGENT, limit=10)] == ["c", "a"]
    assert [t.jti for t in store.tokens(spiffe_id=OTHER, limit=10)] == ["b"]
    assert store.tokens(task_id="t1", limit=10)[0] == token(clock, "c", task_id="t1")


def test_record_token_takes_the_budget_in_the_same_write(store: Store, clock: FakeClock) -> None:
    budget = Budget("budget:t1", limit=2, expires_at=int(clock()) + 600)
    assert [store.record_token(token(clock, j, task_id="t1"), budget=budget) for j in "abc"] == [
        True,
        True,
        False,
    ]
    assert {t.jti for t in store.tokens(task_id="t1", limit=10)} == {
        "a",
        "b",
    }  # the refused one is not indexed


def test_token_index_is_pruned_after_expiry(store: Store, clock: FakeClock) -> None:
    store.record_token(token(clock, "old", task_id="t1", ttl=10))
    clock.advance(SWEEP_INTERVAL + 1)
    assert store.tokens(task_id="t1", limit=10) == []  # invisible at once
    store.record_token(token(clock, "new", task_id="t1", ttl=10))
    # ... and gone from storage after the next write, in every backend.
    if isinstance(store, MemoryStore):
        assert set(store._tokens) == {"new"}
    elif isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("SELECT jti FROM tokens").fetchall() == [("new",)]
    elif isinstance(store, RedisStore):
        raw = store._redis
        assert raw.zcard(f"sts:tokens-of:{AGENT}") == 1
        assert raw.zcard("sts:tokens-of-task:t1") == 1
        assert raw.ttl("sts:tokens-of-task:t1") > 0


def test_withdraw_exception(store: Store, clock: FakeClock) -> None:
    store.add_exception(make_grant(clock, "exc-a", ttl=600))
    clock.advance(5)
    done = store.withdraw_exception("exc-a", at=int(clock()), by=ADMIN, reason="over")
    assert done is not None and done.withdrawn_at == int(clock()) and not done.active(clock())
    assert done.status(clock()) == "withdrawn"
    (listed,) = store.exceptions(AGENT)
    assert listed == done == store.exceptions()[0]
    later = store.withdraw_exception("exc-a", at=int(clock()) + 9, by=OTHER, reason="again")
    assert later == done  # the first withdrawal wins
    assert store.withdraw_exception("exc-unknown", at=int(clock()), by=ADMIN, reason="x") is None


def test_subject_revocations_listed_newest_first(store: Store, clock: FakeClock) -> None:
    store.revoke_subject(cut_off(clock, None), keep_until=None)
    clock.advance(1)
    store.revoke_subject(cut_off(clock, int(clock()) + 5, OTHER), keep_until=int(clock()) + 5)
    assert [r.spiffe_id for r in store.subject_revocations(limit=10)] == [OTHER, AGENT]
    clock.advance(10)
    assert [r.spiffe_id for r in store.subject_revocations(limit=10)] == [AGENT]


def test_store_unavailable_names_backend_and_operation(tmp_path: Any, redis_server: Any) -> None:
    sqlite_store = SqliteStore(tmp_path / "x.db")
    sqlite_store.close()
    with pytest.raises(StoreUnavailable) as caught:
        sqlite_store.active_task_count(time.time())
    assert (caught.value.backend, caught.value.operation) == ("sqlite", "active_task_count")
    dead = RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailable) as caught:
        dead.record_token(TokenRecord("j", AGENT, "t", "tool", 1, 2, "none"))
    assert (caught.value.backend, caught.value.operation) == ("redis", "record_token")


# ---------------------------------------------------------------- admin API over HTTP


@pytest.fixture
def admin(server: RunningServer, example_org: TestAuthority) -> Client:
    return Client(server, example_org, ADMIN)


# The server is shared by the whole session: this module's workloads are its own.
VIEWER = "spiffe://example.org/agent/live-view"


@pytest.fixture
def agent(server: RunningServer, example_org: TestAuthority) -> Client:
    return Client(server, example_org, VIEWER)


def test_views_show_tasks_and_their_tokens(
    server: RunningServer, example_org: TestAuthority, admin: Client, agent: Client
) -> None:
    orchestrator = Client(server, example_org, "spiffe://example.org/orchestrator")
    task = new_task(orchestrator, assignee=VIEWER)
    issued = agent.exchange("tool:web-search", "invoke", task_id=task["task_id"])
    assert issued.status_code == 200, issued.text
    listed = admin.get(f"/admin/tasks?assignee={VIEWER}&active=1").json()["tasks"]
    assert task["task_id"] in [t["task_id"] for t in listed]
    view = admin.get(f"/admin/tasks/{task['task_id']}").json()
    (tok,) = view["tokens"]
    assert (tok["target"], tok["token_class"], tok["binding"], tok["revoked"]) == (
        "tool:web-search",
        "tool",
        "none",
        False,
    )
    by_subject = admin.get(f"/admin/tokens?spiffe_id={VIEWER}").json()["tokens"]
    assert tok["jti"] in [t["jti"] for t in by_subject]
    assert (
        admin.post_json("/admin/revocations", {"task_id": task["task_id"], "reason": "done"}).status_code
        == 200
    )
    assert admin.get(f"/admin/tokens?task_id={task['task_id']}").json()["tokens"][0]["revoked"] is True
    views = [r for r in server.audit_records() if r.get("event") == "admin_view" and r.get("caller") == ADMIN]
    assert {r["view"] for r in views} >= {"tasks", "task", "tokens"}


@pytest.mark.parametrize(
    "path",
    [
        "/admin/tasks?limit=100000",
        "/admin/tasks?limit=NaN",
        "/admin/tasks?limit=" + "9" * 400,
        "/admin/tasks?limit=0",
        "/admin/tasks?limit=-1",
        "/admin/tasks?colour=red",
        "/admin/tasks?active=maybe",
        "/admin/tasks?assignee=not-a-spiffe-id",
        "/admin/tasks?limit=1&limit=2",
        "/admin/tokens",
        f"/admin/tokens?spiffe_id={VIEWER}&task_id=t",
        "/admin/revocations?limit=1e3",
        "/admin/exceptions?spiffe_id=%00",
    ],
)
def test_hostile_queries_are_invalid_requests(admin: Client, path: str) -> None:
    response = admin.get(path)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request"), response.text


def test_non_admin_and_expired_svid_are_refused_and_audited(
    server: RunningServer, example_org: TestAuthority, agent: Client
) -> None:
    for path in ("/admin/tasks", "/admin/tokens?task_id=x", "/admin/revocations", "/admin/exceptions"):
        response = agent.get(path)
        assert (response.status_code, response.json()["error"]) == (403, "access_denied")
    response = agent.post_json("/admin/revocations/lift", {"spiffe_id": VIEWER, "reason": "let me in"})
    assert response.status_code == 403
    refusals = [r for r in server.audit_records() if r.get("event") == "api_refusal"]
    assert {(r["path"], r["error"]) for r in refusals} >= {
        ("/admin/revocations/lift", "access_denied"),
        ("/admin/tasks", "access_denied"),
    }
    expired = example_org.mint(ADMIN, server.issuer, ttl=-60)
    response = requests.get(
        f"{server.url}/admin/tasks", headers={"Authorization": f"Bearer {expired}"}, timeout=10
    )
    assert response.status_code == 401


def test_withdrawal_ends_the_exceptions_tokens(
    server: RunningServer, example_org: TestAuthority, admin: Client
) -> None:
    job = Client(server, example_org, "spiffe://example.org/batch/withdrawn")
    granted = admin.post_json(
        "/admin/exceptions",
        {
            "spiffe_id": job.spiffe_id,
            "target": "tool:calc",
            "scopes": ["invoke"],
            "reason": "incident 7",
            "expires_at": int(time.time()) + 600,
        },
    )
    assert granted.status_code == 201, granted.text
    exception_id = granted.json()["exception_id"]
    issued = job.exchange("tool:calc", "invoke")
    assert issued.status_code == 200, issued.text
    calc = Client(server, example_org, "spiffe://example.org/tool/calc")
    assert calc.introspect(issued.json()["access_token"])["active"] is True
    assert (
        admin.post_json(f"/admin/exceptions/{exception_id}/withdraw", {}).status_code == 400
    )  # reason required
    done = admin.post_json(f"/admin/exceptions/{exception_id}/withdraw", {"reason": "incident over"})
    assert done.status_code == 200, done.text
    assert (done.json()["status"], done.json()["tokens_revoked"]) == ("withdrawn", 1)
    assert calc.introspect(issued.json()["access_token"]) == {"active": False}
    assert job.exchange("tool:calc", "invoke").status_code == 400
    (line,) = [
        r
        for r in server.audit_records()
        if r.get("event") == "exception_withdrawn" and r.get("exception_id") == exception_id
    ]
    assert (line["caller"], line["reason"], line["exception_id"]) == (ADMIN, "incident over", exception_id)
    assert admin.post_json("/admin/exceptions/exc_nope/withdraw", {"reason": "x"}).status_code == 404


def test_lifting_a_kill_switch_restores_exchanges(
    server: RunningServer, example_org: TestAuthority, admin: Client, agent: Client
) -> None:
    assert agent.exchange("tool:web-search", "invoke").status_code == 200
    assert (
        admin.post_json("/admin/revocations", {"spiffe_id": VIEWER, "reason": "suspicious"}).status_code
        == 200
    )
    assert agent.exchange("tool:web-search", "invoke").status_code == 400
    listed = admin.get("/admin/revocations").json()["revocations"]
    assert (VIEWER, True) in [(r["spiffe_id"], r["in_force"]) for r in listed]
    assert admin.post_json("/admin/revocations/lift", {"spiffe_id": VIEWER}).status_code == 400  # no reason
    lifted = admin.post_json("/admin/revocations/lift", {"spiffe_id": VIEWER, "reason": "false alarm"})
    assert lifted.status_code == 200, lifted.text
    time.sleep(1.1)  # a token of the same second as the kill switch is one it ends
    assert agent.exchange("tool:web-search", "invoke").status_code == 200
    (line,) = [
        r
        for r in server.audit_records()
        if r.get("event") == "admin_revocation_lifted" and r.get("lifted") == VIEWER
    ]
    assert (line["caller"], line["reason"], line["lifted"]) == (ADMIN, "false alarm", VIEWER)
    assert (
        admin.post_json("/admin/revocations/lift", {"spiffe_id": VIEWER, "reason": "again"}).status_code
        == 404
    )
