"""``sts demo`` (the whole agent story) against real SPIRE (issue 14, scenario 10).

The demo is one process playing four parties (orchestrator, agent, tool service, data service), each
with a ``TokenClient`` or ``TokenVerifier`` on the socket ``dev.json`` names for it. One SPIRE agent
gives one process one identity (attestation by uid/gid), so each party gets an agent of its own: four
agents (nodes ``spiffe://example.org/node/<party>``), each with one entry for the demo process's gid,
parented to its node. The STS takes its bundles from a fifth agent (``spiffe://example.org/host``),
as in the other tests. ``dev.json`` is written by the test in the shape ``sts dev`` writes it.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sts.dev.environment import DEMO_CATALOG, DEMO_POLICIES
from tests.spire_real.harness import (
    HOST_ID,
    REPO,
    STS_ID,
    TRUST_DOMAIN,
    HarnessError,
    SpireAgent,
    SpireServer,
    Sts,
    short_tempdir,
    wait_for,
)

DEMO_GID = 2000
PARTIES = {
    "orchestrator": f"spiffe://{TRUST_DOMAIN}/orchestrator",
    "agent": f"spiffe://{TRUST_DOMAIN}/agent/researcher",
    "tool": f"spiffe://{TRUST_DOMAIN}/tool/web-search",
    "data": f"spiffe://{TRUST_DOMAIN}/data/crm",
}


def serves(agent: SpireAgent, spiffe_id: str) -> bool:
    """The agent gives the demo process's gid exactly ``spiffe_id``."""
    return agent.served_ids(DEMO_GID) == [spiffe_id]


@pytest.fixture(scope="module")
def demo_environment(spire_bin_dir: Path) -> Iterator[Path]:
    """SPIRE with one agent per party, the STS with the demo's policies and catalog, and ``dev.json``."""
    directory = short_tempdir("spd-")
    server = SpireServer(spire_bin_dir, directory)
    agents: list[SpireAgent] = []
    sts: Sts | None = None
    try:
        server.start()
        server.entry_create(STS_ID, HOST_ID, ["unix:uid:0", "unix:gid:0"], dns=["localhost"])
        host = SpireAgent(spire_bin_dir, directory, server, "host")
        agents.append(host)
        sockets: dict[str, str] = {}
        for party, spiffe_id in PARTIES.items():
            node = f"spiffe://{TRUST_DOMAIN}/node/{party}"
            server.entry_create(spiffe_id, node, ["unix:uid:0", f"unix:gid:{DEMO_GID}"])
            agent = SpireAgent(spire_bin_dir, directory, server, party)
            agent.start(server.token_generate(node))
            agents.append(agent)
            sockets[party] = agent.workload_api
        host.start(server.token_generate(HOST_ID))
        for party, agent in zip(PARTIES, agents[1:], strict=True):
            wait_for(
                f"{party} served by its own agent",
                functools.partial(serves, agent, PARTIES[party]),
                timeout=30,
                interval=0.3,
            )
        wait_for("the STS's SVID", lambda: host.served_ids(0) == [STS_ID], timeout=30, interval=0.3)
        catalog = "catalog: " + json.dumps(DEMO_CATALOG)
        sts = Sts(directory / "sts", host.workload_api, catalog=catalog, policy_dir=DEMO_POLICIES)
        sts.start()
        state = directory / "demo"
        state.mkdir()
        (state / "dev.json").write_text(
            json.dumps(
                {
                    "issuer": sts.issuer,
                    "token_endpoint": f"{sts.issuer}/token",
                    "trust_domain": TRUST_DOMAIN,
                    "workloads": {
                        party: {"spiffe_id": spiffe_id, "socket": sockets[party]}
                        for party, spiffe_id in PARTIES.items()
                    },
                },
                indent=2,
            )
        )
        yield state
    except HarnessError as e:
        pytest.fail(f"SPIRE for the demo did not come up: {e}")
    finally:
        if sts is not None:
            sts.stop()
        for agent in agents:
            agent.kill()
        server.process.kill()


def test_sts_demo_plays_the_whole_story_against_real_spire(demo_environment: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sts.cli", "demo", "--state-dir", str(demo_environment)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=REPO,
        group=DEMO_GID,
        extra_groups=[],
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-3000:]}"
    assert "all 8 steps behaved as expected" in done.stdout, done.stdout
    print(done.stdout)
