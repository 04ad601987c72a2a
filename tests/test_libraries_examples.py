"""The runnable examples of docs/libraries.md, run as documented against a real ``sts dev``.

The three resource servers (Flask, FastAPI, MCP) start as their own processes with the ``tool``
workload's socket in ``SPIFFE_ENDPOINT_SOCKET``; the agent runs with the ``agent`` socket and calls
all three. Each server must refuse a request without a token with a challenge that points at its
RFC 9728 metadata, serve that metadata naming our issuer, and accept the agent's tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sts.dev.story import free_port_pair
from tests.asgi_server import parameters
from tests.test_client import Dev, running_dev

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SERVERS = {"flask": "flask_resource_server.py", "fastapi": "fastapi_resource_server.py", "mcp": "mcp_server.py"}


@pytest.fixture(scope="module")
def sts_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    with running_dev(tmp_path_factory) as dev:
        yield dev


def environment(dev: Dev, workload: str) -> dict[str, str]:
    return os.environ | {"STS_ISSUER": dev.issuer, "SPIFFE_ENDPOINT_SOCKET": dev.socket(workload)}


@pytest.fixture(scope="module")
def servers(sts_dev: Dev, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Each example server on a free port, until the module ends; their base URLs."""
    logs = tmp_path_factory.mktemp("example-logs")
    started: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    try:
        for name, script in SERVERS.items():
            port = free_port_pair()
            log = logs / f"{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, str(EXAMPLES / script), "--port", str(port)],
                    env=environment(sts_dev, "tool"),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started[name] = (process, f"http://127.0.0.1:{port}", log)
        for process, url, log in started.values():
            wait_for(f"{url}/.well-known/oauth-protected-resource", process, log)
        yield {name: url for name, (_, url, _) in started.items()}
    finally:
        for process, _, _ in started.values():
            process.terminate()
        for process, _, _ in started.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_for(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer: {log.read_text()}")


@pytest.mark.parametrize("name", list(SERVERS))
def test_each_server_challenges_and_describes_itself(sts_dev: Dev, servers: dict[str, str], name: str) -> None:
    base = servers[name]
    metadata = requests.get(f"{base}/.well-known/oauth-protected-resource", timeout=10).json()
    assert metadata["resource"] == "https://search.internal/"
    assert metadata["authorization_servers"] == [sts_dev.issuer]
    assert metadata["scopes_supported"] == ["invoke"]
    path = "/mcp" if name == "mcp" else "/search"
    refused = requests.post(f"{base}{path}", json={}, timeout=10) if name == "mcp" else requests.get(f"{base}{path}", timeout=10)
    assert refused.status_code == 401
    challenge = refused.raw.headers.getlist("WWW-Authenticate")[0]
    assert challenge.startswith("Bearer")
    assert parameters(challenge)["resource_metadata"] == "https://search.internal/.well-known/oauth-protected-resource"


def test_the_agent_calls_all_three(sts_dev: Dev, servers: dict[str, str]) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "agent.py"),
            "--flask",
            servers["flask"],
            "--fastapi",
            servers["fastapi"],
            "--mcp",
            f"{servers['mcp']}/mcp",
        ],
        env=environment(sts_dev, "agent"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    agent = sts_dev.spiffe_id("agent")
    assert report["flask"] == {"query": "b", "caller": agent, "binding": "none"}
    assert len(report["fastapi"]) == 10
    assert {answer["caller"] for answer in report["fastapi"]} == {agent}
    assert {answer["binding"] for answer in report["fastapi"]} == {"dpop"}
    assert "quarterly numbers" in report["mcp"] and agent in report["mcp"]
