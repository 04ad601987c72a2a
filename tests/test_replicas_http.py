"""State that outlives a process and spans replicas: SQLite restart, two STS processes on one Redis,
and Redis going away and coming back (fail closed, then resume without restarting the STS)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import jwt
import pytest
import requests

from tests.authority import TestAuthority
from tests.conftest import ADMIN, RunningServer, free_port, running_server, write_config
from tests.redis_server import RedisServer
from tests.test_tasks_http import AGENT, ORCHESTRATOR, SEARCH_SERVER, Client, new_task


def start(
    directory: Path,
    example: TestAuthority,
    partner: TestAuthority,
    store: str | None = None,
    issuer: str | None = None,
    **limits: int,
) -> AbstractContextManager[RunningServer]:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(directory, port, example, partner, store=store, issuer=issuer)
    if limits:
        text = config.read_text()
        for name, value in limits.items():
            text = text.replace(
                f"{name}: {1000 if name == 'per_workload_per_second' else 3}", f"{name}: {value}"
            )
        config.write_text(text)
    return running_server(config, port)


def test_sqlite_state_survives_a_restart(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    directory = tmp_path / "sts"
    with start(directory, example_org, partner_test) as first:
        orchestrator, agent = Client(first, example_org, ORCHESTRATOR), Client(first, example_org, AGENT)
        admin = Client(first, example_org, ADMIN)
        task = new_task(orchestrator)
        token = agent.exchange("tool:web-search", "invoke").json()["access_token"]
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        assert admin.post_json("/admin/revocations", {"jti": jti, "reason": "test"}).status_code == 200
        grant = admin.post_json(
            "/admin/exceptions",
            {
                "spiffe_id": "spiffe://example.org/batch/x",
                "target": "tool:calc",
                "scopes": ["invoke"],
                "reason": "r",
                "expires_at": int(time.time()) + 600,
            },
        ).json()
    with start(directory, example_org, partner_test) as second:
        agent, admin = Client(second, example_org, AGENT), Client(second, example_org, ADMIN)
        assert agent.get(f"/tasks/{task['task_id']}").json()["status"] == "active"
        assert Client(second, example_org, SEARCH_SERVER).introspect(token) == {"active": False}
        listed = [e["exception_id"] for e in admin.get("/admin/exceptions").json()["exceptions"]]
        assert grant["exception_id"] in listed
        assert agent.exchange("tool:web-search", "invoke", task_id=task["task_id"]).status_code == 200


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    # A Redis with a persistent volume (AOF kept across restarts): coming back, it has its data and
    # the STS's store epoch, so service resumes. An empty Redis is a store loss (tests/test_store_durability*).
    with RedisServer(tmp_path / "redis", keep_data=True) as server:
        yield server


@pytest.fixture
def replicas(
    tmp_path: Path, redis: RedisServer, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[tuple[RunningServer, RunningServer]]:
    """Two STS processes sharing one Redis (and the same keys directory, as replicas share a Secret)."""
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    with start(one_dir, example_org, partner_test, store=redis.url, per_workload_per_second=6) as one:
        two_dir.mkdir()
        (two_dir / "keys").symlink_to(one_dir / "keys")
        # Replicas behind one load balancer share the issuer (it is the audience SVIDs carry).
        with start(
            two_dir, example_org, partner_test, redis.url, one.issuer, per_workload_per_second=6
        ) as two:
            yield one, two


def test_revocation_on_one_replica_is_seen_by_the_other(
    replicas: tuple[RunningServer, RunningServer], example_org: TestAuthority
) -> None:
    one, two = replicas
    agent_one = Client(one, example_org, AGENT)
    token = agent_one.exchange("tool:web-search", "invoke").json()["access_token"]
    search_two = Client(two, example_org, SEARCH_SERVER)
    assert search_two.introspect(token)["active"] is True
    assert agent_one.revoke(token).status_code == 200
    revoked_at = time.monotonic()
    while search_two.introspect(token)["active"]:
        assert time.monotonic() - revoked_at < 1.0, "the other replica still says active after 1 s"
        time.sleep(0.02)


def test_rate_limit_counts_across_replicas(
    replicas: tuple[RunningServer, RunningServer], example_org: TestAuthority
) -> None:
    one, two = replicas
    workload = "spiffe://example.org/agent/looping"
    codes = []
    deadline = time.monotonic() + 10
    while 429 not in codes and time.monotonic() < deadline:
        # Start at a fresh second: a retry in the second a straddling attempt ended in would find that
        # second's quota already partly (or wholly) spent by it.
        time.sleep(1 - time.time() % 1)
        window_start = time.time()
        codes = []
        for server in (one, two) * 4:  # 8 requests across both replicas, limit 6 per second per workload
            codes.append(Client(server, example_org, workload).exchange("tool:calc", "invoke").status_code)
        if time.time() // 1 != window_start // 1:
            codes = []  # straddled a second boundary: try again within one window
    assert codes.count(200) == 6, codes
    assert codes.count(429) == 2, codes


def test_redis_down_fails_closed_then_resumes(
    replicas: tuple[RunningServer, RunningServer], redis: RedisServer, example_org: TestAuthority
) -> None:
    one, _ = replicas
    agent, search = Client(one, example_org, AGENT), Client(one, example_org, SEARCH_SERVER)
    token = agent.exchange("tool:web-search", "invoke").json()["access_token"]
    redis.stop()
    refused = agent.exchange("tool:web-search", "invoke")
    assert (refused.status_code, refused.json()["error"]) == (503, "temporarily_unavailable")
    asked = requests.post(f"{one.url}/introspect", data={"token": token}, headers=search.bearer(), timeout=10)
    assert (asked.status_code, asked.json()["error"]) == (503, "temporarily_unavailable")
    assert "active" not in asked.json()
    assert requests.get(f"{one.url}/readyz", timeout=5).status_code == 503
    redis.start()
    deadline = time.monotonic() + 10
    while (again := agent.exchange("tool:web-search", "invoke")).status_code != 200:
        assert time.monotonic() < deadline, again.text
        time.sleep(0.1)
    assert search.introspect(again.json()["access_token"])["active"] is True
