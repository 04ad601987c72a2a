"""The plain-HTTP listener: uvicorn (httptools, uvloop), the body read asynchronously under a deadline.

Under WSGI a worker thread blocks in ``wsgi.input.read()`` for as long as the client likes, so a few
slow clients stopped every endpoint (issue 11). Here each worker is one event loop: request heads
are parsed by httptools under ``server.header_timeout`` and ``MAX_HEAD_BYTES``
(:class:`DeadlineHttpToolsProtocol`), bodies are awaited under ``server.body_timeout`` with
``server.max_body_bytes`` enforced as chunks arrive, so a slow or idle connection holds no thread
and costs a few KiB. Only a complete request reaches the (synchronous) application, which then runs
to completion on the loop without waiting on the client.

Why uvicorn and not granian's RSGI (measured, bench/README.md): with granian's async interfaces the
request's Python work and granian's Rust I/O threads trade the GIL at every release point of the
exchange (SQLite, the audit write), which cost ~12 % more CPU per exchange than granian WSGI did;
uvicorn does all of a worker's work on one thread and measured at least as fast as granian WSGI.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sts.errors import InvalidRequest, RequestTimeout, RequestTooLarge, StsError
from sts.web.app import StsHttp, services_from_env
from sts.web.deadlines import Deadlines
from sts.web.http import (
    MAX_HEAD_BYTES,
    HttpRequest,
    HttpResponse,
    MalformedHead,
    declared_length,
    error_answer,
    joined_headers,
)

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HeadTooLarge(httptools.HttpParserError):
    """Raised from a parser callback; uvicorn answers any parser error 400 and closes."""


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with what it lacks: a deadline and a size bound on request heads.

    The deadline runs from the connection (first request) or from the first byte of a request
    (keep-alive) until its head is complete; past it the connection gets 408 and is closed. uvicorn's
    own ``timeout_keep_alive`` closes connections idle between requests.
    """

    header_timeout = 5.0  # server.header_timeout, set in each worker by create_asgi_app_from_env

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]
        self._head_size = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES:
            raise HeadTooLarge("the request head is too large")

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            body = error_answer(RequestTimeout("the request head did not arrive in time")).body
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
            )
            self.transport.close()


class CorkedTransport:
    """The connection's transport, with the writes of one turn of the event loop sent as one.

    uvicorn writes a response's head and its body separately; on a loopback or LAN connection each
    write is a ``send()`` and a segment of its own. Here they are joined and written once, by a
    callback that runs before the loop next polls for I/O (``call_soon``), or at once when the
    connection is closed (so a 408 or 400 written just before ``close`` still leaves first).
    Everything else is the transport's own.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class AsgiApp:
    """One per worker process (uvicorn's factory calls :func:`create_asgi_app_from_env`)."""

    def __init__(self, http: StsHttp) -> None:
        self._http = http
        server = http.services.settings.server
        self._limit = server.max_body_bytes
        self._body_timeout = float(server.body_timeout)
        self._deadlines = Deadlines()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: nothing here speaks them (uvicorn runs with ws="none")
        client = scope.get("client")
        source = str(client[0]) if client else ""
        try:
            headers = _head(scope)
        except MalformedHead as e:  # audited and budgeted like every anonymous refusal
            refused = self._http.refuse(scope.get("method", "?"), scope["path"], source, e)
            await _send(send, refused, close=True)
            return
        read = await self._body(headers, receive)
        if read is None:
            return  # the client went away
        body, error = read
        server = scope.get("server") or ("127.0.0.1", 0)
        request = HttpRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode("latin-1"),
            headers=headers,
            body=body,
            source=source,
            scheme=scope["scheme"],
            server=(str(server[0]), int(server[1] or 0)),
            body_error=error,
        )
        # A body that was not read whole leaves the connection unusable, whatever the answer became
        # (a 429 in place of a 408 carries no "Connection: close" of its own).
        await _send(send, self._http.handle(request), close=error is not None)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._deadlines.start(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._deadlines.stop()
                self._http.services.close()  # writes the token index, flushes the audit log and the store
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _body(self, headers: dict[str, str], receive: Receive) -> tuple[bytes, StsError | None] | None:
        """The whole body, or the refusal met reading it; None when the client disconnected."""
        try:
            declared = declared_length(headers)
        except InvalidRequest as e:
            return b"", MalformedHead(e.description)
        if declared is not None and declared > self._limit:
            return b"", RequestTooLarge(f"request body is larger than {self._limit} bytes")
        if declared == 0 or (declared is None and "transfer-encoding" not in headers):
            return b"", None  # RFC 9112 §6.3: no body
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 (uvicorn runs every request in a task)
        self._deadlines.arm(task, self._body_timeout)
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self._limit:  # counted as chunks arrive: a chunked body too
                    return b"", RequestTooLarge(f"request body is larger than {self._limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks), None
        except asyncio.CancelledError:
            if self._deadlines.disarm(task):
                seconds = int(self._body_timeout)
                return b"", RequestTimeout(f"the request body did not arrive within {seconds} s")
            raise
        finally:
            self._deadlines.disarm(task)


def _head(scope: dict[str, Any]) -> dict[str, str]:
    """The header fields, refusing what httptools lets through (RFC 9112 §2.3, §3.2, §6.3)."""
    if scope.get("http_version") not in ("1.1", "1.0"):  # llhttp reads "GET /" as HTTP/0.9
        raise MalformedHead("only HTTP/1.1 is served here")
    return joined_headers((n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"])


async def _send(send: Send, answer: HttpResponse, *, close: bool = False) -> None:
    """The answer, framed by us: Content-Length always, ``Connection: close`` when asked."""
    headers = [
        (n.encode("latin-1"), v.encode("latin-1")) for n, v in answer.headers if n.lower() != "connection"
    ]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    if close or answer.closes:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


def create_asgi_app_from_env() -> AsgiApp:
    """uvicorn's factory, in each worker: the services from ``STS_CONFIG`` (set by ``sts serve``).

    It also sets the head deadline on the protocol class: uvicorn loads the app before it accepts
    a connection, and its worker processes get the class by reference (so no per-deployment class).
    """
    services = services_from_env()
    # Everything built so far lives as long as the worker: keep it out of every collection, and
    # collect young objects less often (each request makes a few hundred). Measured in bench/README.md.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)
    DeadlineHttpToolsProtocol.header_timeout = float(services.settings.server.header_timeout)
    return AsgiApp(StsHttp(services))
