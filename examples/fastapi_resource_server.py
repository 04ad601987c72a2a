"""A FastAPI resource server that takes our tool tokens: ``GET /search?q=…`` needs scope ``invoke``.

    pip install 'spiffe-sts[asgi]' uvicorn
    export STS_ISSUER=http://127.0.0.1:8443                                         # the STS (make run)
    export SPIFFE_ENDPOINT_SOCKET=unix://$PWD/state/dev/sockets/tool.sock           # this service's identity
    python examples/fastapi_resource_server.py --port 8082

The same checks as the Flask example, through ``sts.asgi_verifier``: ``Depends(auth.require(…))``
hands the handler the verified token; ``auth.install(app)`` serves the RFC 9728 metadata and answers
refusals with RFC 6750 / RFC 9449 challenges. Key-set refreshes and introspection run in worker
threads, never on the event loop. docs/libraries.md explains each line.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI

from sts.asgi_verifier import TokenAuth
from sts.verify import TokenVerifier, VerifiedToken

AUDIENCE = os.environ.get("STS_AUDIENCE", "tool:web-search")  # this service's catalog id
RESOURCE = os.environ.get("STS_RESOURCE", "https://search.internal/")  # and its catalog URI


def create_app(verifier: TokenVerifier) -> FastAPI:
    auth = TokenAuth(verifier)
    app = FastAPI(title="search")
    auth.install(app)  # GET /.well-known/oauth-protected-resource, and RFC 6750 refusals
    invoke = auth.require("invoke")  # a dependency: the verified token, or 401/403 with a challenge

    @app.get("/search")
    async def search(q: str = "", token: VerifiedToken = Depends(invoke)) -> dict[str, Any]:
        return {"query": q, "caller": token.subject, "binding": token.binding, "task_id": token.task_id}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8082)
    args = parser.parse_args()
    verifier = TokenVerifier(  # the Workload API socket: SPIFFE_ENDPOINT_SOCKET
        issuer=os.environ["STS_ISSUER"],
        audience=AUDIENCE,
        token_class="tool",
        resource=RESOURCE,
        scopes=["invoke"],
    )
    uvicorn.run(create_app(verifier), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
