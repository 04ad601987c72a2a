"""``sts admin …`` against a running server: tables, --json, exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.authority import TestAuthority
from tests.conftest import ADMIN, RunningServer
from tests.test_tasks_http import Client, new_task

AGENT = "spiffe://example.org/agent/admin-cli"  # this module's own workload (the server is shared)


def sts(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sts.cli", "admin", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.fixture
def as_admin(server: RunningServer, example_org: TestAuthority, tmp_path: Path) -> list[str]:
    svid = tmp_path / "admin.jwt"
    svid.write_text(example_org.mint(ADMIN, server.issuer, ttl=600))
    return ["--issuer", server.url, "--svid-file", str(svid)]


def test_every_view_and_command(
    server: RunningServer, example_org: TestAuthority, as_admin: list[str]
) -> None:
    orchestrator = Client(server, example_org, "spiffe://example.org/orchestrator")
    agent = Client(server, example_org, AGENT)
    task = new_task(orchestrator, assignee=AGENT)["task_id"]
    issued = agent.exchange("tool:web-search", "invoke", task_id=task)
    assert issued.status_code == 200, issued.text

    listed = sts("tasks", "--assignee", AGENT, "--active", *as_admin)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split()[:2] == ["TASK_ID", "STATUS"] and task in listed.stdout
    one = sts("task", task, "--json", *as_admin)
    assert one.returncode == 0, one.stderr
    (token,) = json.loads(one.stdout)["tokens"]
    assert token["target"] == "tool:web-search"
    by_workload = json.loads(sts("tokens", "--spiffe-id", AGENT, "--json", *as_admin).stdout)["tokens"]
    assert token["jti"] in [t["jti"] for t in by_workload]
    assert token["jti"] in sts("tokens", "--task", task, *as_admin).stdout

    revoked = sts("revoke", "--jti", token["jti"], "--reason", "leaked", *as_admin)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(sts("task", task, "--json", *as_admin).stdout)["tokens"][0]["revoked"] is True

    assert sts("revoke", "--spiffe-id", AGENT, "--reason", "incident", *as_admin).returncode == 0
    kills = json.loads(sts("revocations", "--json", *as_admin).stdout)["revocations"]
    assert AGENT in [k["spiffe_id"] for k in kills if k["in_force"]]
    lifted = sts("unrevoke-workload", AGENT, "--reason", "false alarm", *as_admin)
    assert lifted.returncode == 0, lifted.stderr
    again = sts("unrevoke-workload", AGENT, "--reason", "again", *as_admin)
    assert again.returncode == 1 and "not_found" in again.stderr

    granted = Client(server, example_org, ADMIN).post_json(
        "/admin/exceptions",
        {
            "spiffe_id": AGENT,
            "target": "tool:calc",
            "scopes": ["invoke"],
            "reason": "r",
            "expires_at": int(time.time()) + 600,
        },
    )
    exception_id = granted.json()["exception_id"]
    assert exception_id in sts("exceptions", *as_admin).stdout
    withdrawn = sts("withdraw-exception", exception_id, "--reason", "over", "--json", *as_admin)
    assert withdrawn.returncode == 0, withdrawn.stderr
    assert json.loads(withdrawn.stdout)["status"] == "withdrawn"

    events = {r.get("event") for r in server.audit_records() if r.get("caller") == ADMIN}
    assert {"admin_view", "admin_revocation", "admin_revocation_lifted", "exception_withdrawn"} <= events


def test_refusals_and_usage_errors(server: RunningServer, example_org: TestAuthority, tmp_path: Path) -> None:
    svid = tmp_path / "agent.jwt"
    svid.write_text(example_org.mint(AGENT, server.issuer, ttl=600))
    refused = sts("tasks", "--issuer", server.url, "--svid-file", str(svid))
    assert refused.returncode == 1 and "403 access_denied" in refused.stderr
    assert sts("tasks", "--issuer", server.url, "--svid-file", str(tmp_path / "none")).returncode == 2
    no_issuer = sts("tasks", "--svid-file", str(svid), env={"PATH": "/usr/bin"})
    assert no_issuer.returncode == 2 and "STS_ISSUER" in no_issuer.stderr
    assert sts("tokens", "--issuer", server.url).returncode == 2  # argparse: --spiffe-id or --task
    assert sts("revoke", "--jti", "x", "--issuer", server.url).returncode == 2  # --reason is required
