"""``sts.mcp_verifier.McpTokenVerifier`` inside the official MCP SDK: a real MCPServer over HTTP (uvicorn).

The server requires the ``invoke`` scope through the SDK's own ``AuthSettings``; tokens come from the
agent's ``TokenClient`` against a real ``sts dev``, and a tool is called with the SDK's own client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import pytest
import requests
import uvicorn
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer

from sts.binding import DpopKey
from sts.client import TokenClient
from sts.dev.story import free_port_pair
from sts.mcp_verifier import McpTokenVerifier
from tests.test_client import DATA, TOOL, Dev, running_dev

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}


@pytest.fixture(scope="module")
def sts_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    with running_dev(tmp_path_factory) as dev:
        yield dev


@pytest.fixture(scope="module")
def agent(sts_dev: Dev) -> Iterator[TokenClient]:
    with sts_dev.client() as client:
        yield client


@pytest.fixture(scope="module")
def mcp_url(sts_dev: Dev) -> Iterator[str]:
    """A web-search MCP server requiring our tool tokens, verifying as the ``tool`` workload."""
    port = free_port_pair()
    url = f"http://127.0.0.1:{port}"
    verifier = McpTokenVerifier(sts_dev.verifier(TOOL, "tool", introspection_cache_seconds=0))
    server = MCPServer(
        "web-search",
        token_verifier=verifier,
        auth=AuthSettings(
            issuer_url=sts_dev.issuer,
            resource_server_url=f"{url}/mcp",
            required_scopes=["invoke"],
            validate_token_resource=False,  # our verifier checks aud itself
        ),
    )

    @server.tool()
    def search(query: str) -> str:
        """Search the web (a stand-in); says who asked."""
        token = get_access_token()
        return f"results for {query!r}, asked by {token.subject if token else None}"

    app = server.streamable_http_app(stateless_http=True, json_response=True)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not runner.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"{url}/mcp"
    finally:
        runner.should_exit = True
        thread.join(timeout=10)


def initialize(url: str, authorization: str | None) -> requests.Response:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    return requests.post(url, json=INITIALIZE, headers=headers, timeout=10)


def test_a_tool_token_is_accepted(agent: TokenClient, mcp_url: str) -> None:
    token = agent.token(audience=TOOL, scope="invoke")
    response = initialize(mcp_url, f"Bearer {token.value}")
    assert response.status_code == 200, response.text
    assert response.json()["result"]["serverInfo"]["name"] == "web-search"


def refused_tokens(sts_dev: Dev, agent: TokenClient) -> dict[str, str | None]:
    task_id = sts_dev.new_task()
    ended = agent.token(audience=TOOL, scope="invoke", task_id=task_id).value
    agent.complete_task(task_id)
    return {
        "no token": None,
        "garbage": "Bearer not-a-token",
        "data token": "Bearer "
        + agent.token(
            audience=DATA,
            scope="read",
            task_id=sts_dev.new_task(),
            dpop=DpopKey.generate(),
            client_assertion=True,
        ).value,
        "dpop-bound token as bearer": (
            f"Bearer {agent.token(audience=TOOL, scope='invoke', dpop=DpopKey.generate()).value}"
        ),
        "token of an ended task": f"Bearer {ended}",
    }


RULES = {  # the rule each refusal must name in the verifier's log line (none: the SDK never asks us)
    "no token": None,
    "garbage": "malformed",
    "data token": "key",
    "dpop-bound token as bearer": "scheme",
    "token of an ended task": "revoked",
}


def test_bad_tokens_are_refused(
    sts_dev: Dev, agent: TokenClient, mcp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's challenge is its own; the reason, with its rule, is in one log line of the verifier."""
    for case, authorization in refused_tokens(sts_dev, agent).items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sts"):
            response = initialize(mcp_url, authorization)
        assert response.status_code == 401, (case, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), case
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        rule = RULES[case]
        if rule is None:
            assert refusals == [], case
        else:
            assert len(refusals) == 1 and f"(rule: {rule})" in refusals[0], (case, refusals)
            assert refusals[0].startswith("access token refused"), refusals  # not repeated by the adapter


def test_the_sdk_client_calls_a_tool_with_our_token(sts_dev: Dev, agent: TokenClient, mcp_url: str) -> None:
    token = agent.token(audience=TOOL, scope="invoke")

    async def call() -> Any:
        headers = {"Authorization": f"Bearer {token.value}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=10) as http,
            Client(streamable_http_client(mcp_url, http_client=http)) as client,
        ):
            return await client.call_tool("search", {"query": "quarterly numbers"})

    result = anyio.run(call)
    assert not result.is_error, result
    text = result.content[0].text
    assert "quarterly numbers" in text and sts_dev.spiffe_id("agent") in text
