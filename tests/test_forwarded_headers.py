"""The peer address is the connection's, whatever ``X-Forwarded-For`` or ``Forwarded`` claim.

uvicorn trusts ``X-Forwarded-For`` from 127.0.0.1 by default (``proxy_headers``): behind a sidecar
proxy on the same host, or for any local process, a caller could then pick its own source address and
walk past ``metrics.allow`` or spread its anonymous refusals over invented addresses. ``sts serve``
turns that off; these tests hold it to that, on the real server over a real socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.authority import TestAuthority
from tests.conftest import RunningServer, free_port, running_server, write_config

SPOOFED = "203.0.113.9"


@pytest.fixture(scope="module")
def allow_only_spoofed(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[RunningServer]:
    directory: Path = tmp_path_factory.mktemp("forwarded")
    port = free_port()
    config = write_config(directory, port, example_org, partner_test)
    text = config.read_text()
    limits = "limits: {per_workload_per_second: 1000, tokens_per_task: 3}"
    assert limits in text
    budget = limits.replace("}", ", anonymous_refusals_per_minute: 5}")
    config.write_text(text.replace(limits, budget) + "metrics: {allow: [203.0.113.0/24]}\n")
    with running_server(config, port) as server:
        yield server


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": SPOOFED},
        {"X-Forwarded-For": f"{SPOOFED}, 127.0.0.1"},
        {"Forwarded": f"for={SPOOFED}"},
        {"X-Real-IP": SPOOFED},
    ],
)
def test_a_claimed_source_does_not_pass_the_metrics_allow_list(
    allow_only_spoofed: RunningServer, headers: dict[str, str]
) -> None:
    response = requests.get(f"{allow_only_spoofed.url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 403
    assert response.json()["error"] == "access_denied"


def test_invented_sources_share_the_connections_anonymous_refusal_budget(
    allow_only_spoofed: RunningServer,
) -> None:
    """Each refusal claims another address; the budget (5 a minute) is still the one of 127.0.0.1."""
    statuses = []
    for i in range(12):
        response = requests.post(
            f"{allow_only_spoofed.url}/token",
            data={"grant_type": "password"},
            headers={"X-Forwarded-For": f"198.51.100.{i + 1}"},
            timeout=10,
        )
        statuses.append(response.status_code)
    assert statuses[:5] == [400] * 5
    assert 429 in statuses[5:]
