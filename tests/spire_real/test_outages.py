"""Outages: the agent stopped and restarted, the SPIRE server stopped, the STS running throughout
(issue 14, scenarios 7 and 8). Each test has a deployment of its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.spire_real.harness import Deployment, HarnessError, Sts, deployment, wait_for

MAX_STALENESS = 5.0


@pytest.fixture
def outage(spire_bin_dir: Path) -> Iterator[tuple[Deployment, Sts]]:
    try:
        with deployment(spire_bin_dir) as spire:
            server = Sts(spire.directory / "sts", spire.socket, max_staleness=f"{MAX_STALENESS:.0f}s")
            try:
                server.start()
                yield spire, server
            finally:
                server.stop()
    except HarnessError as e:
        pytest.fail(f"SPIRE did not come up: {e}")


def test_agent_stopped_bundles_serve_for_max_staleness_then_503_and_it_resumes_after_restart(
    outage: tuple[Deployment, Sts],
) -> None:
    spire, sts = outage
    researcher = spire.workloads["researcher"]
    [svid] = researcher.jwt(sts.issuer)
    assert sts.exchange(svid).status_code == 200

    stopped = time.monotonic()
    spire.agent.stop()
    # within max_staleness the last bundles still verify
    response = sts.exchange(svid)
    assert time.monotonic() - stopped < MAX_STALENESS, "too slow to check the grace period"
    assert response.status_code == 200, response.text

    # past it: 503, and /readyz says why
    def unavailable() -> dict[str, Any] | None:
        # The two streams go stale each on its own clock: the answer is 503 as soon as one is past
        # max_staleness, and names each stream once it is past it too.
        status, body = sts.readyz()
        named = " | ".join(str(p) for p in body.get("problems", []))
        both = all(f"Workload API {kind} bundles: broken for" in named for kind in ("JWT", "X.509"))
        return body if status == 503 and both else None

    body = wait_for("/readyz 503 after the agent stopped", unavailable, timeout=MAX_STALENESS + 10)
    assert time.monotonic() - stopped > MAX_STALENESS - 1
    problems = " | ".join(str(p) for p in body["problems"])
    assert "Workload API JWT bundles: broken for" in problems, body
    assert "Workload API X.509 bundles: broken for" in problems, body
    assert str(spire.agent.socket) in problems or "agent.sock" in problems, body
    refused = sts.exchange(svid)
    assert (refused.status_code, refused.json()["error"]) == (503, "temporarily_unavailable"), refused.text
    assert "stale" in refused.json()["error_description"], refused.text

    # a new agent (its key was in memory: it attests again with a new join token); no STS restart
    spire.start_agent()
    spire.wait_served(researcher)
    sts.wait_ready(timeout=30)
    [fresh] = researcher.jwt(sts.issuer)
    assert fresh != svid  # the new agent's cache started empty
    resumed = sts.exchange(fresh)
    assert resumed.status_code == 200, resumed.text
    assert all(p.alive() for p in sts.processes)


def test_spire_server_stopped_the_agent_serves_cached_svids_and_the_sts_keeps_working(
    outage: tuple[Deployment, Sts],
) -> None:
    spire, sts = outage
    researcher = spire.workloads["researcher"]
    [svid] = researcher.jwt(sts.issuer)

    spire.server.stop()
    time.sleep(MAX_STALENESS + 1)  # longer than the STS would serve stale bundles
    assert researcher.jwt(sts.issuer) == [svid], "the agent's cached JWT-SVID"
    status, body = sts.readyz()
    assert status == 200, body  # the agent's streams stay up
    response = sts.exchange(svid)
    assert response.status_code == 200, response.text
    assert researcher.run("ids") == {"ids": [researcher.spiffe_id]}  # X.509-SVIDs are cached too

    # an audience set the agent has no cached SVID for needs the server: refused (Unavailable)
    answer = researcher.run("jwt", "--audience", "spiffe://example.org/new-audience")
    assert "error" in answer, answer
    assert "could not fetch JWT-SVID" in answer["error"] or "Unavailable" in answer["error"], answer
