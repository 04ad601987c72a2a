"""The plain-HTTP listener: granian's RSGI interface, the body read asynchronously under a deadline.

Under WSGI a worker thread blocks in ``wsgi.input.read()`` for as long as the client likes, so a few
slow clients stopped every endpoint (issue 11). Here granian (Rust) reads request heads under its
``header_read_timeout``; this adapter awaits the body on the worker's event loop with a deadline
(``server.body_timeout``) and the size limit enforced as chunks arrive, so a slow or idle
connection holds no thread and costs a few KiB. Only a complete request reaches the (synchronous)
application, which then runs to completion without waiting on the client.

The application is run on the event loop thread itself: its work is CPU and short store calls,
exactly what one WSGI thread per worker did before (bench/ measured that as the fastest), and it
saves a thread hand-off per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from granian._granian import RSGIHTTPProtocol as HTTPProtocol
from granian._granian import RSGIProtocolClosed as ProtocolClosed
from granian._granian import RSGIProtocolError as ProtocolError
from granian.rsgi import Scope

from sts.errors import InvalidRequest, RequestTimeout, RequestTooLarge, StsError
from sts.web.app import StsHttp, services_from_env
from sts.web.deadlines import Deadlines
from sts.web.http import HttpRequest, declared_length, joined_headers

log = logging.getLogger(__name__)


def _host(address: str) -> str:
    """``1.2.3.4:5678`` / ``[::1]:5678`` → the host part (the source of a request)."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]")


def _server(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


class RsgiApp:
    """One per worker process (granian's factory calls :func:`create_rsgi_app_from_env`)."""

    def __init__(self, http: StsHttp) -> None:
        self._http = http
        server = http.services.settings.server
        self._limit = server.max_body_bytes
        self._body_timeout = float(server.body_timeout)
        self._deadlines = Deadlines()

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._deadlines.start(loop)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._deadlines.stop()
        self._http.services.close()  # flushes the audit log and the store

    async def __rsgi__(self, scope: Scope, protocol: Any) -> None:
        if scope.proto != "http":
            protocol.close(1008)  # websockets: nothing here speaks them
            return
        fields = scope.headers.items()  # names are lower-case (hyper)
        headers = dict(fields)
        try:
            if len(headers) != len(fields):  # a repeated field: join, or refuse (RFC 9112 §3.2)
                headers = joined_headers(fields)
        except InvalidRequest as e:
            self._refuse_head(protocol, e)
            return
        read = await self._body(headers, protocol)
        if read is None:
            return  # the client went away
        body, error = read
        request = HttpRequest(
            method=scope.method,
            path=scope.path,
            query=scope.query_string,
            headers=headers,
            body=body,
            source=_host(scope.client),
            scheme=scope.scheme,
            server=_server(scope.server),
            body_error=error,
        )
        answer = self._http.handle(request)
        protocol.response_bytes(answer.status, answer.headers, answer.body)  # granian frames it

    @staticmethod
    def _refuse_head(protocol: HTTPProtocol, error: InvalidRequest) -> None:
        """A head we cannot trust (two Host fields, …): 400 and close, before any body is read."""
        body = json.dumps(error.to_json(), separators=(",", ":")).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
        protocol.response_bytes(error.status, headers, body)

    async def _body(
        self, headers: dict[str, str], protocol: HTTPProtocol
    ) -> tuple[bytes, StsError | None] | None:
        """The whole body, or the refusal met reading it; None when the client disconnected."""
        try:
            declared = declared_length(headers)
        except InvalidRequest as e:
            return b"", _closing(e)
        if declared is not None and declared > self._limit:
            return b"", RequestTooLarge(f"request body is larger than {self._limit} bytes")
        if declared == 0 or (declared is None and "transfer-encoding" not in headers):
            return b"", None  # RFC 9112 §6.3: no body
        if declared is None:
            return await self._chunked(protocol)
        # granian's stub says coroutine; it is a future (``PyFutureAwaitable``) with ``cancel()``.
        pending: Any = protocol()
        self._deadlines.arm(pending, self._body_timeout)
        try:
            return await pending, None
        except asyncio.CancelledError:
            if self._deadlines.disarm(pending):
                return b"", self._late()
            raise
        except (ProtocolClosed, ProtocolError):
            return None
        finally:
            self._deadlines.disarm(pending)

    async def _chunked(self, protocol: HTTPProtocol) -> tuple[bytes, StsError | None] | None:
        """A chunked body (RFC 9112 §7.1), counted as it arrives: 413 the moment it passes the limit.

        Read in a task of its own under ``asyncio.wait_for``, so that on a timeout or an early 413 the
        body stream is released before the answer is written; granian closes the connection after
        the answer only then (measured: with the stream still referenced, the connection stayed open).
        Chunked requests are rare here (OAuth clients send Content-Length), so the timer's cost is.
        """

        async def read() -> bytes | None:
            chunks, size = [], 0
            async for chunk in protocol:
                size += len(chunk)
                if size > self._limit:
                    return None
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), self._body_timeout)
        except TimeoutError:
            return b"", self._late()
        except (ProtocolClosed, ProtocolError):
            return None
        if body is None:
            return b"", RequestTooLarge(f"request body is larger than {self._limit} bytes")
        return body, None

    def _late(self) -> StsError:
        return RequestTimeout(f"the request body did not arrive within {int(self._body_timeout)} s")


class _ClosingInvalidRequest(InvalidRequest):
    """A malformed framing header: the rest of the connection cannot be trusted (RFC 9112 §6.3)."""

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


def _closing(error: InvalidRequest) -> StsError:
    return _ClosingInvalidRequest(error.description)


def create_rsgi_app_from_env() -> RsgiApp:
    """granian's factory, in each worker: the services from ``STS_CONFIG`` (set by ``sts serve``)."""
    return RsgiApp(StsHttp(services_from_env()))
