"""Issue 16 end to end: two ``sts serve`` replicas on Redis that fails over, is flushed, or is not durable.

Real processes only: ``redis-server`` and ``redis-sentinel`` (Debian's) started in temp dirs on loopback
(``tests/redis_server.py``), and the STS as ``sts serve`` (``tests/conftest.py``: ``running_server``).
The failover under load is ``test_store_durability_load.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import requests

from tests.authority import TestAuthority
from tests.conftest import ADMIN, RunningServer, free_port, running_server, write_config
from tests.redis_server import RedisServer, SentinelTopology
from tests.test_replicas_http import start
from tests.test_tasks_http import AGENT, ORCHESTRATOR, SEARCH_SERVER, Client, new_task

KILLED = "spiffe://example.org/agent/compromised"


@contextmanager
def two_replicas(
    directory: Path, example: TestAuthority, partner: TestAuthority, store: str
) -> Iterator[tuple[RunningServer, RunningServer]]:
    """Two STS processes on one store, sharing the keys directory and the issuer (as behind one LB)."""
    one_dir, two_dir = directory / "one", directory / "two"
    with start(one_dir, example, partner, store=store) as one:
        two_dir.mkdir()
        (two_dir / "keys").symlink_to(one_dir / "keys")
        with start(two_dir, example, partner, store, one.issuer) as two:
            yield one, two


def token_of(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def introspection(server: RunningServer, authority: TestAuthority, token: str) -> tuple[int, Any]:
    """(status, body) of /introspect by the search tool's server; 503 is a refusal too."""
    caller = Client(server, authority, SEARCH_SERVER)
    answer = requests.post(f"{server.url}/introspect", data={"token": token}, headers=caller.bearer(), timeout=10)
    return answer.status_code, answer.json()


def refused_token(server: RunningServer, authority: TestAuthority, token: str) -> bool:
    status, body = introspection(server, authority, token)
    return status == 503 or (status == 200 and body == {"active": False})


def readiness(server: RunningServer) -> dict[str, Any]:
    answer = requests.get(f"{server.url}/readyz", timeout=5)
    document: dict[str, Any] = answer.json()
    document["http_status"] = answer.status_code
    return document


def exchange_until_200(client: Client, timeout: float, **extra: str) -> tuple[requests.Response, list[int]]:
    """Exchange until one is issued; the statuses met before it (503 while the store fails over)."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while (answer := client.exchange("tool:web-search", "invoke", **extra)).status_code != 200:
        seen.append(answer.status_code)
        assert answer.status_code == 503, answer.text  # never another refusal, never a 5xx but 503
        assert answer.json()["error"] == "temporarily_unavailable"
        assert time.monotonic() < deadline, f"no token within {timeout} s: {answer.text}"
        time.sleep(0.05)
    return answer, seen


def test_a_failover_loses_no_revocation(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    with (
        SentinelTopology(tmp_path / "redis") as redis,
        two_replicas(tmp_path, example_org, partner_test, redis.url) as (one, two),
    ):
        orchestrator, agent, admin = (Client(one, example_org, who) for who in (ORCHESTRATOR, AGENT, ADMIN))
        task = new_task(orchestrator)
        task_token = token_of(agent.exchange("tool:web-search", "invoke", task_id=task["task_id"]))
        revoked = token_of(agent.exchange("tool:web-search", "invoke"))
        assert agent.revoke(revoked).status_code == 200
        killed_token = token_of(Client(one, example_org, KILLED).exchange("tool:web-search", "invoke"))
        kill = admin.post_json("/admin/revocations", {"spiffe_id": KILLED, "reason": "compromised"})
        assert kill.status_code == 200, kill.text
        assert agent.post_json(f"/tasks/{task['task_id']}/complete", {}).status_code == 200
        live = token_of(agent.exchange("tool:web-search", "invoke"))

        old = redis.current_primary()
        old.stop()  # SIGKILL: whatever was not on the replica is gone
        killed_at = time.monotonic()
        new = redis.wait_failover(old)
        promoted = time.monotonic() - killed_at
        issued, refusals = exchange_until_200(Client(two, example_org, AGENT), timeout=20)
        print(
            f"\nfailover: Sentinel promoted port {new.port} {promoted:.1f} s after the primary died; "
            f"{len(refusals)} exchanges answered 503 on the other STS before it issued again"
        )
        for token in (revoked, task_token, killed_token):
            assert introspection(two, example_org, token) == (200, {"active": False})
        assert introspection(two, example_org, live)[1]["active"] is True, "a failover is not a loss"
        assert introspection(two, example_org, token_of(issued))[1]["active"] is True
        still_killed = Client(two, example_org, KILLED).exchange("tool:web-search", "invoke")
        assert still_killed.status_code == 400, still_killed.text
        assert "revoked by an administrator" in still_killed.json()["error_description"]
        ended = Client(two, example_org, AGENT).exchange("tool:web-search", "invoke", task_id=task["task_id"])
        assert ended.status_code == 400 and "completed" in ended.json()["error_description"]
        exchange_until_200(Client(one, example_org, AGENT), timeout=10)
        for server in (one, two):
            document = readiness(server)
            assert document["http_status"] == 200, document
            assert not any("lost" in w for w in document["warnings"]), document
            assert not any(r["event"] == "store_loss" for r in server.audit_records())
        # New security writes are durable on the new primary alone (its AOF), and are seen by the other.
        again = token_of(agent.exchange("tool:web-search", "invoke"))
        assert agent.revoke(again).status_code == 200
        assert introspection(two, example_org, again) == (200, {"active": False})


def ack(server: RunningServer, svid_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sts.cli", "admin", "store-loss", "ack", "--url", server.url,
         "--audience", server.issuer, "--svid-file", str(svid_file), *extra],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_flushall_under_two_replicas_fails_closed_until_acknowledged(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    with (
        RedisServer(tmp_path / "redis") as redis,
        two_replicas(tmp_path, example_org, partner_test, redis.url) as (one, two),
    ):
        agent_one, agent_two = Client(one, example_org, AGENT), Client(two, example_org, AGENT)
        before = token_of(agent_one.exchange("tool:web-search", "invoke"))
        killed_before = token_of(Client(two, example_org, KILLED).exchange("tool:web-search", "invoke"))
        kill = Client(one, example_org, ADMIN).post_json(
            "/admin/revocations", {"spiffe_id": KILLED, "reason": "compromised"}
        )
        assert kill.status_code == 200, kill.text
        for server in (one, two):
            assert introspection(server, example_org, before)[1]["active"] is True
            assert Client(server, example_org, KILLED).exchange("tool:web-search", "invoke").status_code == 400
        time.sleep(0.7)  # every replica's monitor has mirrored the kill list

        redis.client().flushall()
        flushed = time.monotonic()
        refused_after = {}
        while len(refused_after) < 2:
            for name, server in (("one", one), ("two", two)):
                if name not in refused_after and refused_token(server, example_org, before):
                    refused_after[name] = time.monotonic() - flushed
            assert time.monotonic() - flushed < 1.0, f"a replica still accepts a token 1 s after FLUSHALL: {refused_after}"
        print(f"\nFLUSHALL: the token issued before is refused after {refused_after} s")

        for server in (one, two):
            for who in (AGENT, KILLED):
                refused = Client(server, example_org, who).exchange("tool:web-search", "invoke")
                assert (refused.status_code, refused.json()["error"]) == (503, "temporarily_unavailable")
                assert "administrator acknowledges" in refused.json()["error_description"]
            document = readiness(server)
            assert document["http_status"] == 200, "the pods stay reachable for the acknowledgement"
            assert any("lost its data" in w and "store-loss ack" in w for w in document["warnings"]), document
            losses = [r for r in server.audit_records() if r["event"] == "store_loss"]
            assert len(losses) == 1 and losses[0]["decision"] == "deny"
        assert sum(r["detected_here"] for s in (one, two) for r in s.audit_records() if r["event"] == "store_loss") == 1

        svid = tmp_path / "admin.jwt"
        svid.write_text(example_org.mint(ADMIN, one.issuer))
        not_admin = tmp_path / "agent.jwt"
        not_admin.write_text(example_org.mint(AGENT, one.issuer))
        refused_ack = ack(two, not_admin, "--reason", "not mine to say")
        assert refused_ack.returncode == 1 and "access_denied" in refused_ack.stderr
        acknowledged = ack(two, svid, "--reason", "Redis flushed by mistake (INC-42)")
        assert acknowledged.returncode == 0, acknowledged.stdout + acknowledged.stderr
        assert "acknowledged:" in acknowledged.stdout and "vanished" in acknowledged.stdout
        assert ack(one, svid, "--reason", "again").returncode == 1  # nothing left to acknowledge

        for client in (agent_one, agent_two):
            issued, _ = exchange_until_200(client, timeout=5)
            new = token_of(issued)
            for server in (one, two):
                assert introspection(server, example_org, new)[1]["active"] is True
        for server in (one, two):
            for token in (before, killed_before):
                assert introspection(server, example_org, token) == (200, {"active": False})
            killed = Client(server, example_org, KILLED).exchange("tool:web-search", "invoke")
            assert killed.status_code == 400, "killed workloads stay refused after the acknowledgement"
            assert not any("lost its data" in w for w in readiness(server)["warnings"])
        records = two.audit_records()
        acknowledged_record = next(r for r in records if r["event"] == "store_loss_acknowledged")
        assert acknowledged_record["decision"] == "allow" and acknowledged_record["caller"] == ADMIN
        assert acknowledged_record["reason"] == "Redis flushed by mistake (INC-42)"
        assert jwt.decode(new, options={"verify_signature": False})["iat"] > acknowledged_record["not_before"]


def test_start_up_refused_without_durability_and_warned_when_allowed(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    with RedisServer(tmp_path / "redis", appendonly=False) as redis:
        directory = tmp_path / "sts"
        directory.mkdir()
        port = free_port()
        config = write_config(directory, port, example_org, partner_test, store=redis.url)
        refused = subprocess.run(
            [sys.executable, "-m", "sts.cli", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        line = refused.stderr.strip().splitlines()[-1]
        print(f"\nrefused: {line}")
        assert line.startswith("sts: configuration error: store.redis.require_durability: ")
        assert "no replica" in line and "'appendonly yes'" in line
        assert "store.redis.require_durability: false" in line

        text = config.read_text().replace(
            f"store: {{url: '{redis.url}'}}", f"store: {{url: '{redis.url}', redis: {{require_durability: false}}}}"
        )
        config.write_text(text)
        with running_server(config, port) as server:
            document = readiness(server)
            assert document["http_status"] == 200
            assert any("are not durable" in w and "appendonly is no" in w for w in document["warnings"]), document
            log = (directory / "server.log").read_text()
            assert "store.redis.require_durability: false" in log
            agent = Client(server, example_org, AGENT)
            token = token_of(agent.exchange("tool:web-search", "invoke"))
            assert agent.revoke(token).status_code == 200  # accepted, with a warning
