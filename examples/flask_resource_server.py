"""A Flask resource server that takes our tool tokens: ``GET /search?q=…`` needs scope ``invoke``.

    pip install 'spiffe-sts[flask]'
    export STS_ISSUER=http://127.0.0.1:8443                                         # the STS (make run)
    export SPIFFE_ENDPOINT_SOCKET=unix://$PWD/state/dev/sockets/tool.sock           # this service's identity
    python examples/flask_resource_server.py --port 8081

It verifies as the ``tool:web-search`` service of ``sts dev``'s catalog (class ``tool``, catalog URI
``https://search.internal/``): signature by the STS's tool keys, ``aud``, lifetime, binding (Bearer,
DPoP, mTLS), revocation through introspection as this workload, and the route's scope. It serves its
RFC 9728 metadata at ``/.well-known/oauth-protected-resource``; every refusal is a 401/403 with an RFC
6750 challenge naming it. ``app.run`` is Flask's development server: behind gunicorn, serve
``create_app(...)``. docs/libraries.md explains each line.
"""

from __future__ import annotations

import argparse
import os

from flask import Flask, Response, jsonify, request

from sts.verify import TokenVerifier, current_token

AUDIENCE = os.environ.get("STS_AUDIENCE", "tool:web-search")  # this service's catalog id
RESOURCE = os.environ.get("STS_RESOURCE", "https://search.internal/")  # and its catalog URI


def create_app(verifier: TokenVerifier) -> Flask:
    app = Flask("search")
    verifier.init_app(app)  # GET /.well-known/oauth-protected-resource (RFC 9728)

    @app.get("/search")
    @verifier.require_token("invoke")
    def search() -> Response:
        token = current_token()
        return jsonify(query=request.args.get("q", ""), caller=token.subject, binding=token.binding)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    verifier = TokenVerifier(  # the Workload API socket: SPIFFE_ENDPOINT_SOCKET
        issuer=os.environ["STS_ISSUER"],
        audience=AUDIENCE,
        token_class="tool",
        resource=RESOURCE,
        scopes=["invoke"],
    )
    create_app(verifier).run(host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
