"""Anonymous refusals are budgeted per source, and the budget cannot lock out workloads (issue 11)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from sts.refusal_limit import OVERFLOW_SOURCE, RefusalLimiter
from tests.authority import TestAuthority
from tests.conftest import RunningServer, free_port, running_server, write_config

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
AGENT = "spiffe://example.org/agent/researcher"


def limiter(per_window: int = 3, max_sources: int = 100) -> tuple[RefusalLimiter, list[tuple[str, int]]]:
    reports: list[tuple[str, int]] = []
    return (
        RefusalLimiter(
            per_window=per_window,
            window_seconds=60,
            max_sources=max_sources,
            report=lambda source, count, start, end: reports.append((source, count)),
        ),
        reports,
    )


def test_budget_per_source_then_one_summary_when_the_window_ends() -> None:
    limit, reports = limiter()
    assert [limit.admit("10.0.0.1", 1000.0) for _ in range(5)] == [True, True, True, False, False]
    assert limit.admit("10.0.0.2", 1000.0), "another source has its own budget"
    assert limit.retry_after("10.0.0.1", 1010.0) == 50
    assert reports == []
    assert limit.admit("10.0.0.1", 1061.0), "a new window, a new budget"
    assert reports == [("10.0.0.1", 2)], "the suppressed refusals are reported once"


def test_sources_are_bounded_past_which_they_share_one_bucket() -> None:
    limit, reports = limiter(per_window=2, max_sources=3)
    for i in range(3):
        assert limit.admit(f"10.0.0.{i}", 0.0)
    assert [limit.admit(f"10.1.0.{i}", 0.0) for i in range(4)] == [True, True, False, False]
    limit.close(1.0)
    assert (OVERFLOW_SOURCE, 2) in reports


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("limited")
    port = free_port()
    config = write_config(directory, port, example_org, partner_test)
    config.write_text(
        config.read_text().replace(
            "limits: {per_workload_per_second: 1000, tokens_per_task: 3}",
            "limits: {per_workload_per_second: 1000, tokens_per_task: 3, anonymous_refusals_per_minute: 5}",
        )
    )
    with running_server(config, port) as server:
        yield server


def test_over_budget_anonymous_refusals_get_429_but_workloads_are_still_served(
    limited: RunningServer, example_org: TestAuthority
) -> None:
    bad = {"grant_type": GRANT, "subject_token_type": JWT_TYPE, "subject_token": "not-a-jwt", "scope": "invoke"}
    statuses = [requests.post(f"{limited.url}/token", data=bad, timeout=5) for _ in range(8)]
    assert [r.status_code for r in statuses[:5]] == [400] * 5
    assert [r.status_code for r in statuses[5:]] == [429] * 3
    assert all(r.json()["error"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1 for r in statuses[5:])
    # Anonymous refusals at the JSON endpoints share the budget.
    assert requests.post(f"{limited.url}/tasks", json={}, timeout=5).status_code == 429
    good = {
        "grant_type": GRANT,
        "subject_token_type": JWT_TYPE,
        "subject_token": example_org.mint(AGENT, limited.issuer),
        "audience": "tool:calc",
        "scope": "invoke",
    }
    response = requests.post(f"{limited.url}/token", data=good, timeout=5)
    assert response.status_code == 200, "a valid workload on the same address is never locked out"
    time.sleep(0.2)
    denials = [r for r in limited.audit_records() if r.get("decision") == "deny" and r.get("event") == "token_exchange"]
    assert len(denials) == 5, "refusals past the budget are not audited one by one"


def test_the_suppressed_refusals_are_summarised_in_the_audit_log_at_shutdown(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    directory = tmp_path_factory.mktemp("summary")
    port = free_port()
    config = write_config(directory, port, example_org, partner_test)
    config.write_text(config.read_text().replace("tokens_per_task: 3}", "tokens_per_task: 3, anonymous_refusals_per_minute: 2}"))
    with running_server(config, port) as server:
        for _ in range(6):
            requests.post(f"{server.url}/token", data={"grant_type": "x"}, timeout=5)
    summary = [r for r in server.audit_records() if r.get("event") == "refusals_suppressed"]
    assert [(r["source"], r["count"]) for r in summary] == [("127.0.0.1", 4)]
