"""An agent: exchanges its SPIFFE identity at the STS for tool tokens and calls three tool servers.

    pip install 'spiffe-sts[mcp]'        # the MCP client part; sts.client alone is the base install
    export STS_ISSUER=http://127.0.0.1:8443                                         # the STS (make run)
    export SPIFFE_ENDPOINT_SOCKET=unix://$PWD/state/dev/sockets/agent.sock          # this agent's identity
    python examples/agent.py --flask http://127.0.0.1:8081 --fastapi http://127.0.0.1:8082 \
        --mcp http://127.0.0.1:8083/mcp

1. ``TokenClient`` + ``RequestsTokenAuth``: a Bearer token on every ``requests`` call (cached, one
   exchange for many calls).
2. ``AsyncTokenClient`` + ``HttpxTokenAuth`` on ``httpx.AsyncClient``: a DPoP-bound token (a fresh
   proof per request), ten calls at once, one exchange.
3. The MCP server: its RFC 9728 metadata names our STS and the resource; the agent exchanges for a
   token of that resource and calls a tool with the MCP SDK's client.

Prints one JSON object with what each server answered. docs/libraries.md explains each line.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import requests

from sts.client import AsyncTokenClient, DpopKey, HttpxTokenAuth, RequestsTokenAuth, TokenClient

TOOL = os.environ.get("STS_AUDIENCE", "tool:web-search")  # the catalog id of the tool


def call_flask(issuer: str, url: str) -> dict[str, Any]:
    with TokenClient(issuer) as client:  # SPIFFE_ENDPOINT_SOCKET: the Workload API
        auth = RequestsTokenAuth(client, audience=TOOL, scope="invoke")
        answers = [requests.get(f"{url}/search", params={"q": q}, auth=auth, timeout=10) for q in ("a", "b")]
        for answer in answers:
            answer.raise_for_status()
        return dict(answers[-1].json())


async def call_fastapi(issuer: str, url: str) -> list[dict[str, Any]]:
    async with AsyncTokenClient(issuer) as client, httpx.AsyncClient(timeout=10) as http:
        auth = HttpxTokenAuth(client, audience=TOOL, scope="invoke", dpop=DpopKey.generate())
        answers: list[dict[str, Any]] = []

        async def one(q: str) -> None:
            answer = await http.get(f"{url}/search", params={"q": q}, auth=auth)
            answer.raise_for_status()
            answers.append(answer.json())

        async with anyio.create_task_group() as group:
            for n in range(10):
                group.start_soon(one, f"q{n}")
        return answers


async def call_mcp(issuer: str, url: str) -> str:
    import httpx2  # the MCP SDK's HTTP client
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    parts = urlsplit(url)
    async with AsyncTokenClient(issuer) as client, httpx2.AsyncClient(timeout=10) as http:
        # RFC 9728: the server says who issues its tokens and what resource to ask for.
        metadata = (await http.get(f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource")).json()
        if issuer not in metadata["authorization_servers"]:
            raise SystemExit(f"{url} does not take tokens of {issuer}; not sending our identity there")
        token = await client.token(resource=metadata["resource"], scope=metadata["scopes_supported"])
        http.headers["Authorization"] = f"Bearer {token.value}"
        async with Client(streamable_http_client(url, http_client=http)) as mcp:
            result = await mcp.call_tool("search", {"query": "quarterly numbers"})
        return str(result.content[0].text)  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flask", help="base URL of examples/flask_resource_server.py")
    parser.add_argument("--fastapi", help="base URL of examples/fastapi_resource_server.py")
    parser.add_argument("--mcp", help="URL of examples/mcp_server.py's MCP endpoint (…/mcp)")
    args = parser.parse_args()
    issuer = os.environ["STS_ISSUER"]
    report: dict[str, Any] = {}
    if args.flask:
        report["flask"] = call_flask(issuer, args.flask)
    if args.fastapi:
        report["fastapi"] = anyio.run(call_fastapi, issuer, args.fastapi)
    if args.mcp:
        report["mcp"] = anyio.run(call_mcp, issuer, args.mcp)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
