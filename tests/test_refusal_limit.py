"""Anonymous refusals are budgeted per source, and the budget cannot lock out workloads (issue 11)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import requests

from sts.refusal_limit import OVERFLOW_SOURCE, RefusalLimiter, source_key
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


def test_an_ipv6_source_is_budgeted_by_its_slash_64() -> None:
    limit, _ = limiter(per_window=2)
    assert limit.admit("2001:db8::1", 0.0)
    assert limit.admit("2001:db8::ffff:1", 0.0)
    assert not limit.admit("2001:db8:0:0:1234::9", 0.0), "one /64, one budget"
    assert limit.admit("2001:db8:0:1::1", 0.0), "another /64 has its own"
    assert source_key("2001:db8::1") == "2001:db8::/64"
    assert source_key("10.0.0.1") == "10.0.0.1"
    assert source_key("not:an:address") == "not:an:address"


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


def _raw(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send ``data``; the answer, and whether the server closed the connection after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(data)
        answer, closed = b"", False
        connection.settimeout(3)
        try:
            while chunk := connection.recv(65536):
                answer += chunk
            closed = True
        except TimeoutError:
            pass
    return answer, closed


def test_a_429_in_place_of_a_body_refusal_still_closes_the_connection(limited: RunningServer) -> None:
    """Past the budget a 413 becomes 429; the unread body must still end the connection (else a slow
    sender would be held open with no deadline left)."""
    port = int(limited.url.rsplit(":", 1)[1])
    oversized = (
        b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 999999999\r\n\r\ngrant"
    )
    answers = [_raw(port, oversized) for _ in range(8)]
    assert any(a.startswith(b"HTTP/1.1 429") for a, _ in answers), [a[:20] for a, _ in answers]
    assert all(closed for _, closed in answers), "every refused unread body closes its connection"


def test_a_malformed_head_is_refused_closed_and_audited(server: RunningServer) -> None:
    """RFC 9112 §3.2: two Host fields are 400; the refusal is audited like any other."""
    port = int(server.url.rsplit(":", 1)[1])
    answer, closed = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and closed, answer
    assert b'"error":"invalid_request"' in answer
    time.sleep(0.2)
    audited = [r for r in server.audit_records() if r.get("event") == "api_refusal" and r.get("path") == "/healthz"]
    assert audited and "host" in audited[-1]["error_description"].lower()
