"""The two resource servers of ``sts demo``: a web-search tool and a CRM data service, on loopback.

Each is a small Flask app whose views are guarded by :meth:`sts.verify.TokenVerifier.require_token`,
verifying as its own workload (``tool`` or ``data`` in ``dev.json``: the JWT-SVID it introspects
with comes from its own Workload API socket). They run in a thread under werkzeug's development
server, which is fine for a demo and nothing else.

Imports only ``sts.verify`` of the project.
"""

from __future__ import annotations

import threading

from flask import Flask, Response, jsonify, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from sts.verify import TokenVerifier, current_token

SEARCH_RESULTS = [
    {"title": "Quarterly numbers, explained", "url": "https://search.internal/q3"},
    {"title": "How the CRM counts active customers", "url": "https://search.internal/crm"},
]
CUSTOMERS = [
    {"id": "c-1001", "name": "Acme Corp", "segment": "enterprise"},
    {"id": "c-1002", "name": "Globex", "segment": "mid-market"},
]


def tool_app(verifier: TokenVerifier) -> Flask:
    """``GET /search?q=`` for callers holding a tool token with scope ``invoke``."""
    app = Flask("demo-tool")

    @app.get("/search")
    @verifier.require_token(scope="invoke")
    def search() -> Response:
        token = current_token()
        return jsonify(query=request.args.get("q", ""), results=SEARCH_RESULTS, caller=token.subject)

    return app


def data_app(verifier: TokenVerifier) -> Flask:
    """``GET /customers`` for callers holding a data token with scope ``read``."""
    app = Flask("demo-data")

    @app.get("/customers")
    @verifier.require_token(scope="read")
    def customers() -> Response:
        token = current_token()
        return jsonify(
            customers=CUSTOMERS, caller=token.subject, task_id=token.task_id, binding=token.binding
        )

    return app


class _QuietHandler(WSGIRequestHandler):
    """The demo prints its own story; werkzeug's access log would interleave with it."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return


class LoopbackService:
    """One app served on ``127.0.0.1`` (a free port) in a daemon thread, until :meth:`stop`."""

    def __init__(self, app: Flask) -> None:
        self._server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler
        )
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._serve, name=app.name, daemon=True)

    def _serve(self) -> None:
        self._server.serve_forever(poll_interval=0.05)  # so that stop() returns at once

    def start(self) -> LoopbackService:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
