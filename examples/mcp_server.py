"""An MCP tool server (the official MCP Python SDK, streamable HTTP) that takes our tool tokens.

    pip install 'spiffe-sts[mcp]'
    export STS_ISSUER=http://127.0.0.1:8443                                         # the STS (make run)
    export SPIFFE_ENDPOINT_SOCKET=unix://$PWD/state/dev/sockets/tool.sock           # this service's identity
    python examples/mcp_server.py --port 8083                                       # MCP at /mcp

Every MCP call needs a tool token of ``tool:web-search`` with scope ``invoke``. A client without one
gets ``401`` with ``WWW-Authenticate: Bearer …, resource_metadata="…"``; the RFC 9728 metadata
(``/.well-known/oauth-protected-resource``) names our STS as the authorization server and the
catalog URI as the resource, which is what the client exchanges its SPIFFE identity for.
docs/libraries.md explains each line.
"""

from __future__ import annotations

import argparse
import os

import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import MCPServer

from sts.mcp_verifier import McpTokenVerifier, auth_settings
from sts.verify import TokenVerifier

AUDIENCE = os.environ.get("STS_AUDIENCE", "tool:web-search")  # this server's catalog id
RESOURCE = os.environ.get("STS_RESOURCE", "https://search.internal/")  # and its catalog URI


def create_server(verifier: TokenVerifier) -> MCPServer:
    server = MCPServer("web-search", token_verifier=McpTokenVerifier(verifier), auth=auth_settings(verifier))

    @server.tool()
    def search(query: str) -> str:
        """Search the web (a stand-in that says who asked)."""
        token = get_access_token()
        return f"results for {query!r}, asked by {token.subject if token else 'nobody'}"

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8083)
    args = parser.parse_args()
    verifier = TokenVerifier(  # the Workload API socket: SPIFFE_ENDPOINT_SOCKET
        issuer=os.environ["STS_ISSUER"],
        audience=AUDIENCE,
        token_class="tool",
        resource=RESOURCE,
        scopes=["invoke"],
    )
    app = create_server(verifier).streamable_http_app(stateless_http=True, json_response=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
