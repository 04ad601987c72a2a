"""The plain-HTTP listener's application object for uvicorn: the worker's lifespan, and its listener.

uvicorn loads this (``create_asgi_app_from_env``) in each worker process and drives its lifespan:
startup starts the sweeper of connection deadlines, shutdown writes the token index and flushes
the audit log and the store. HTTP itself never goes through ASGI: uvicorn's server makes
:class:`~sts.web.plain_server.PlainHttpProtocol` connections (``sts serve`` passes it as ``http``),
which answer complete requests through :attr:`LifespanApp.listener`.

Why uvicorn and not granian's RSGI (measured, bench/README.md): with granian's async interfaces the
request's Python work and granian's Rust I/O threads trade the GIL at every release point of the
exchange (SQLite, the audit write), which cost ~12 % more CPU per exchange than granian WSGI did;
uvicorn does all of a worker's work on one thread.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

from sts.web.app import StsHttp, services_from_env
from sts.web.plain_server import PlainListener

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class LifespanApp:
    """One per worker process: the ASGI lifespan of the worker and the listener its connections use."""

    def __init__(self, listener: PlainListener) -> None:
        self.listener = listener

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":  # uvicorn's own HTTP protocol would call this: not ours
            raise RuntimeError("HTTP is served by sts.web.plain_server.PlainHttpProtocol, not through ASGI")
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.listener.start(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.listener.stop()
                self.listener.http.services.close()  # the token index, the audit log and the store
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_asgi_app_from_env() -> LifespanApp:
    """uvicorn's factory, in each worker: the services from ``STS_CONFIG`` (set by ``sts serve``)."""
    services = services_from_env()
    # Everything built so far lives as long as the worker: keep it out of every collection, and
    # collect young objects less often (each request makes a few hundred). Measured in bench/README.md.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)
    return LifespanApp(PlainListener(StsHttp(services), services.settings.server))
