"""``sts.mcp_verifier.McpTokenVerifier`` inside the official MCP SDK: a real MCPServer over HTTP (uvicorn).

The server requires the ``invoke`` scope through the SDK's own ``AuthSettings``
(``sts.mcp_verifier.auth_settings``: our issuer, the catalog URI of ``tool:web-search``); tokens come
from the agent's ``TokenClient`` against a real ``sts dev``, and a tool is called with the SDK's own
client. The server is reached as ``https://search.internal/mcp``, its catalog URI, through a
transport that sends that host to the loopback server (the tool's deployment, as DNS would), so
that the RFC 9728 discovery an MCP client does is the real one: an unauthenticated SDK client gets
the 401 challenge, follows ``resource_metadata`` to the protected resource metadata, and from there
to our issuer's metadata.
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
from mcp.client.auth import OAuthClientProvider
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from sts.binding import DpopKey
from sts.client import TokenClient
from sts.dev.story import free_port_pair
from sts.mcp_verifier import McpTokenVerifier, auth_settings
from tests.asgi_server import parameters
from tests.test_client import DATA, TOOL, Dev, running_dev

RESOURCE = "https://search.internal/"  # tool:web-search's catalog URI in sts dev
PUBLIC_MCP_URL = "https://search.internal/mcp"
METADATA_URL = "https://search.internal/.well-known/oauth-protected-resource"

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
def mcp_server(sts_dev: Dev) -> Iterator[int]:
    """A web-search MCP server requiring our tool tokens, verifying as the ``tool`` workload; its port."""
    port = free_port_pair()
    verifier = sts_dev.verifier(TOOL, "tool", introspection_cache_seconds=0, resource=RESOURCE, scopes=["invoke"])
    server = MCPServer("web-search", token_verifier=McpTokenVerifier(verifier), auth=auth_settings(verifier))

    @server.tool()
    def search(query: str) -> str:
        """Search the web (a stand-in); says who asked."""
        token = get_access_token()
        return f"results for {query!r}, asked by {token.subject if token else None}"

    # Its public name (the catalog URI's host) and loopback are the Host values it answers to.
    security = TransportSecuritySettings(allowed_hosts=["search.internal", "127.0.0.1:*"])
    app = server.streamable_http_app(stateless_http=True, json_response=True, transport_security=security)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not runner.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        runner.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def mcp_url(mcp_server: int) -> str:
    return f"http://127.0.0.1:{mcp_server}/mcp"


class Deployment(httpx2.AsyncBaseTransport):
    """Sends ``https://search.internal`` to the loopback MCP server (as DNS and a TLS proxy would) and
    everything else (the STS) where it names; records every request and its status."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._inner = httpx2.AsyncHTTPTransport()
        self.seen: list[tuple[str, str, int, httpx2.Headers]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        public = str(request.url)
        if request.url.host == "search.internal":
            request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self._port)
        response = await self._inner.handle_async_request(request)
        self.seen.append((request.method, public.split("?", maxsplit=1)[0], response.status_code, response.headers))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class NoStorage:
    """The SDK client's token storage, empty: this client has never authorized."""

    async def get_tokens(self) -> OAuthToken | None:
        return None

    async def set_tokens(self, tokens: OAuthToken) -> None:
        return None

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return None

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        return None


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


def test_an_unauthenticated_sdk_client_is_led_to_our_issuer(sts_dev: Dev, mcp_server: int) -> None:
    """The SDK's own OAuth client, knowing only the server's URL: 401 with ``resource_metadata``, the
    protected resource metadata (RFC 9728) naming our issuer, then our issuer's RFC 8414 metadata.

    It can go no further by itself: the STS has no authorization endpoint and no client registration
    (workloads authenticate with their SPIFFE identity, RFC 8693). The next test does that part."""
    deployment = Deployment(mcp_server)

    async def redirect(url: str) -> None:
        raise AssertionError(f"no browser redirect to {url}")

    async def connect() -> None:
        oauth = OAuthClientProvider(
            server_url=PUBLIC_MCP_URL,
            client_metadata=OAuthClientMetadata(redirect_uris=["http://127.0.0.1:1/callback"], client_name="agent"),
            storage=NoStorage(),
            redirect_handler=redirect,
        )
        async with (
            httpx2.AsyncClient(transport=deployment, auth=oauth, timeout=10) as http,
            Client(streamable_http_client(PUBLIC_MCP_URL, http_client=http)) as client,
        ):
            await client.list_tools()

    with pytest.raises(Exception) as failed:  # noqa: PT011 - the SDK wraps its OAuth error in groups
        anyio.run(connect)
    assert "regist" in repr(failed.value).lower() or "oauth" in repr(failed.value).lower(), failed.value

    first = deployment.seen[0]
    assert (first[0], first[1], first[2]) == ("POST", PUBLIC_MCP_URL, 401)
    challenge = parameters(first[3]["www-authenticate"])
    assert challenge["resource_metadata"] == METADATA_URL and challenge["error"] == "invalid_token"
    fetched = [(method, url, status) for method, url, status, _ in deployment.seen[1:3]]
    assert fetched == [
        ("GET", METADATA_URL, 200),
        ("GET", f"{sts_dev.issuer}/.well-known/oauth-authorization-server", 200),
    ]
    document = requests.get(f"http://127.0.0.1:{mcp_server}/.well-known/oauth-protected-resource", timeout=10).json()
    assert document["resource"] == RESOURCE
    assert document["authorization_servers"] == [sts_dev.issuer]
    assert document["scopes_supported"] == ["invoke"]


def test_the_sdk_client_follows_the_challenge_and_calls_with_a_tool_token(
    sts_dev: Dev, agent: TokenClient, mcp_server: int
) -> None:
    """The agent's way: the challenge's ``resource_metadata`` names the issuer and the resource; the
    agent exchanges its SPIFFE identity there for a token of that resource, and the SDK client calls."""
    deployment = Deployment(mcp_server)

    async def call() -> Any:
        async with httpx2.AsyncClient(transport=deployment, timeout=10) as http:
            refused = await http.post(PUBLIC_MCP_URL, json=INITIALIZE, headers={"Accept": "application/json, text/event-stream"})
            assert refused.status_code == 401
            metadata_url = parameters(refused.headers["www-authenticate"])["resource_metadata"]
            document = (await http.get(metadata_url)).json()
            assert document["authorization_servers"] == [agent.issuer]  # only our own STS gets our identity
            token = agent.token(resource=document["resource"], scope=document["scopes_supported"])
            http.headers["Authorization"] = f"Bearer {token.value}"
            async with Client(streamable_http_client(PUBLIC_MCP_URL, http_client=http)) as client:
                return await client.call_tool("search", {"query": "quarterly numbers"})

    result = anyio.run(call)
    assert not result.is_error, result
    assert sts_dev.spiffe_id("agent") in result.content[0].text
