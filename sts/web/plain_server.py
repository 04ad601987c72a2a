"""The plain-HTTP listener's connections: httptools parses, each complete request is answered in place.

uvicorn runs the sockets, the worker processes, signals, lifespan and graceful shutdown; the
connection protocol is ours. uvicorn's own turns every request into an ASGI task (a scope dict, a
request-response cycle object, an asyncio task, ``receive``/``send`` coroutines and message dicts);
our application is synchronous and only ever answers a complete request, so here the request is
answered from the parser's last callback, on the loop, with no task and no await (what that saves
is measured in bench/README.md). The answer's head and body leave in one write.

Slow clients hold no thread and no timer. Each connection has one deadline, for the phase it is in,
checked by one sweeper per worker every :data:`SWEEP_SECONDS`:

- a request head (from the connection, or from the first byte of a keep-alive request):
  ``server.header_timeout``, then 408 and closed;
- idle between keep-alive requests: ``server.header_timeout``, then closed;
- the body: ``server.body_timeout``, then the request is answered 408 (an audited refusal), closed;
- answers the client does not read (writes paused): ``server.body_timeout``, then aborted.

Sizes: the head (request line and fields) ≤ ``MAX_HEAD_BYTES`` and ``MAX_HEADER_FIELDS`` fields (RFC
6585 §5: 431), the body ≤ ``server.max_body_bytes`` whether declared or chunked, counted as it
arrives (413), earlier answers still unread ≤ :data:`MAX_UNREAD_ANSWER_BYTES` when the next
request is to be answered (a client pipelining without reading is cut off, before its request
does anything; one large answer is always sent). Every refusal of a head is audited and
budgeted like any anonymous refusal (:meth:`StsHttp.refuse`), as on the TLS listener.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, cast
from urllib.parse import unquote

import httptools

from sts.config import ServerSettings
from sts.errors import InvalidRequest, RequestTimeout, RequestTooLarge, StsError, TemporarilyUnavailable
from sts.web.app import StsHttp
from sts.web.http import (
    MAX_HEAD_BYTES,
    HeadTooLarge,
    HttpRequest,
    MalformedHead,
    declared_length,
    error_answer,
    joined_headers,
    status_line,
)

log = logging.getLogger(__name__)

SWEEP_SECONDS = 0.25  # deadlines are kept to within this; they are several seconds long
MAX_HEADER_FIELDS = 100  # as on the TLS listener: many tiny fields cost more than their bytes say
MAX_UNREAD_ANSWER_BYTES = 256 * 1024  # answers queued for a client that sends and never reads

# The phase a connection is in, which says what its deadline means.
_HEAD, _BODY, _IDLE, _PAUSED, _CLOSED = range(5)

_STATUS_LINES = {status: f"HTTP/1.1 {status_line(status)}\r\n".encode() for status in range(100, 600)}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Stop(Exception):
    """Raised from a parser callback once the connection has been answered for good: parse no more."""


class PlainListener:
    """One worker's plain listener: the application, the limits, and the deadlines of its connections."""

    def __init__(self, http: StsHttp, server: ServerSettings) -> None:
        self.http = http
        self.max_body = server.max_body_bytes
        self.header_timeout = float(server.header_timeout)
        self.body_timeout = float(server.body_timeout)
        self.max_connections = server.max_connections
        self.connections: set[PlainHttpProtocol] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep(loop))

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def sweep(self, now: float) -> None:
        """Act on every connection whose deadline has passed (the sweeper's tick; tests call it too)."""
        for connection in [c for c in self.connections if c.due <= now]:
            connection.expire()

    async def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                self.sweep(loop.time())
            except Exception:  # a bug in one expiry must not end every later deadline
                log.exception("sweeping connection deadlines failed")


class PlainHttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection (RFC 9112), made by uvicorn's server with its usual arguments.

    uvicorn's application object must carry the worker's :class:`PlainListener` as ``listener``
    (:class:`sts.web.asgi.LifespanApp`). Requests are answered in order as they complete, so
    pipelined requests get their answers in order (RFC 9112 §9.3.2).
    """

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        listener = getattr(config.loaded_app, "listener", None)
        if not isinstance(listener, PlainListener):
            raise TypeError("the plain listener's application must carry a PlainListener")
        self._listener = listener
        self._http = listener.http
        self._loop = _loop or asyncio.get_event_loop()
        self._state = server_state
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._source = ""
        self._server = ("127.0.0.1", 0)
        self._over_limit = False
        self._shutting_down = False
        self.due = math.inf  # loop time at which the current phase's deadline passes
        self._phase = _HEAD
        self._resume_phase = _HEAD  # the phase to go back to when writes resume
        self._begun = False  # a byte of the current request has arrived
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._fields: list[tuple[str, str]] = []
        self._head_size = 0
        self._headers: dict[str, str] = {}
        self._method = "-"
        self._body: list[bytes] = []
        self._body_size = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a stream server's (uvloop's is no subclass)
        self._transport = transport
        self._state.connections.add(self)
        self._listener.connections.add(self)
        self._over_limit = len(self._listener.connections) > self._listener.max_connections
        peer = transport.get_extra_info("peername")
        self._source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple) and len(local) >= 2:
            self._server = (str(local[0]), int(local[1]))
        self.due = self._loop.time() + self._listener.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = _CLOSED
        self.due = math.inf
        self._state.connections.discard(self)
        self._listener.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self._phase == _CLOSED:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # RFC 9110 §7.8: the Upgrade is ignored; the request was answered, nothing follows it.
            self._close()
        except httptools.HttpParserError as e:
            if self._phase == _CLOSED:
                return  # _Stop, raised after the connection's last answer
            cause = e.__context__ if isinstance(e, httptools.HttpParserCallbackError) else None
            if cause is not None:  # a bug in a callback of ours: answered generically, never the detail
                log.exception("unexpected error reading a request from %s", self._source, exc_info=cause)
                self._write_raw(
                    500, [("Content-Type", "application/json")], error_answer(StsError()).body, close=True
                )
                return
            self._refuse_head(MalformedHead(f"malformed request: {_parser_reason(e)}"))

    def eof_received(self) -> bool | None:
        return None  # the transport closes; an answer already written is still sent

    def pause_writing(self) -> None:
        """The client is not reading our answers: read no more from it until it does, within a deadline."""
        if self._phase == _CLOSED or self._transport is None:
            return
        self._resume_phase = self._phase
        self._phase = _PAUSED
        self.due = self._loop.time() + self._listener.body_timeout
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._phase != _PAUSED or self._transport is None:
            return
        self._phase = self._resume_phase
        timeout = self._listener.body_timeout if self._phase == _BODY else self._listener.header_timeout
        self.due = self._loop.time() + timeout
        self._transport.resume_reading()

    # uvicorn's server

    def shutdown(self) -> None:
        """Graceful shutdown: an idle connection closes now, one mid-request after its answer."""
        self._shutting_down = True
        if self._phase == _IDLE or (self._phase == _HEAD and not self._begun):
            self._close()

    def expire(self) -> None:
        """The current phase's deadline has passed (called by the listener's sweeper)."""
        phase = self._phase
        if phase == _HEAD:
            body = error_answer(RequestTimeout("the request head did not arrive in time")).body
            self._write_raw(408, [("Content-Type", "application/json")], body, close=True)
        elif phase == _BODY:
            seconds = int(self._listener.body_timeout)
            self._answer(RequestTimeout(f"the request body did not arrive within {seconds} s"))
        elif phase in (_IDLE, _PAUSED):
            if self._transport is not None:
                self._transport.abort() if phase == _PAUSED else self._transport.close()
            self._phase = _CLOSED
            self.due = math.inf

    # httptools callbacks (RFC 9112 §2-§7)

    def on_message_begin(self) -> None:
        if self._phase == _IDLE:
            self._phase = _HEAD
            self.due = self._loop.time() + self._listener.header_timeout
        self._begun = True
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if len(self._fields) >= MAX_HEADER_FIELDS:
            self._refuse_head(HeadTooLarge("the request head has too many header fields"))
            raise _Stop
        self._fields.append((name.decode("latin-1"), value.rstrip(b" \t").decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._method = parser.get_method().decode("ascii", "replace")
        if parser.get_http_version() not in ("1.1", "1.0"):  # llhttp reads "GET /" as HTTP/0.9
            self._refuse_head(MalformedHead("only HTTP/1.1 is served here"))
            raise _Stop
        try:
            self._headers = joined_headers(self._fields)
            declared = declared_length(self._headers)
        except MalformedHead as e:
            self._refuse_head(e)
            raise _Stop from None
        except InvalidRequest as e:
            self._refuse_head(MalformedHead(e.description))
            raise _Stop from None
        if self._over_limit:
            self._answer(TemporarilyUnavailable("this server holds too many connections; try again"))
            raise _Stop
        if declared is not None and declared > self._listener.max_body:
            self._answer(RequestTooLarge(f"request body is larger than {self._listener.max_body} bytes"))
            raise _Stop
        if declared == 0 or (declared is None and "transfer-encoding" not in self._headers):
            return  # RFC 9112 §6.3: no body; on_message_complete follows at once
        self._phase = _BODY
        self.due = self._loop.time() + self._listener.body_timeout
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport is not None:
            self._transport.write(_CONTINUE)  # RFC 9110 §10.1.1

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._listener.max_body:  # counted as chunks arrive: a chunked body too
            self._answer(RequestTooLarge(f"request body is larger than {self._listener.max_body} bytes"))
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._answer(None)
        if self._phase == _CLOSED:
            raise _Stop

    # Answers

    def _count(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES:
            self._refuse_head(HeadTooLarge("the request head is too large"))
            raise _Stop

    def _request(self, body_error: StsError | None) -> HttpRequest:
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise MalformedHead("the request target is not a URL") from None
        path = url.path.decode("latin-1") if url.path else "/"
        return HttpRequest(
            method=self._method,
            path=unquote(path, errors="surrogateescape") if "%" in path else path,
            query=url.query.decode("latin-1") if url.query else "",
            headers=self._headers,
            body=self._body[0] if len(self._body) == 1 else b"".join(self._body),
            source=self._source,
            server=self._server,
            body_error=body_error,
        )

    def _answer(self, body_error: StsError | None) -> None:
        """Answer the request read so far (or refused while reading, ``body_error``) and go on or close."""
        transport = self._transport
        if transport is not None and transport.get_write_buffer_size() > MAX_UNREAD_ANSWER_BYTES:
            # Earlier answers still unread, checked before this request does anything (one large
            # answer alone is always sent): a client that pipelines and never reads is cut off.
            log.warning(
                "closing a connection from %s that sends requests and does not read the answers", self._source
            )
            transport.abort()
            self._phase = _CLOSED
            self.due = math.inf
            return
        try:
            request = self._request(body_error)
        except MalformedHead as e:
            self._refuse_head(e)
            return
        try:
            answer = self._http.handle(request)
        except Exception:  # StsHttp answers every request itself; this is a bug, answered generically
            log.exception("unexpected error serving %s", self._method)
            answer = error_answer(StsError())
        self._state.total_requests += 1
        keep_alive = (
            body_error is None
            and not answer.closes
            and not self._shutting_down
            and self._parser.get_http_version() == "1.1"  # an HTTP/1.0 connection carries one request
            and self._parser.should_keep_alive()
        )
        head_only = self._method == "HEAD"  # RFC 9110 §9.3.2: the same head, no content
        self._write_raw(answer.status, answer.headers, answer.body, close=not keep_alive, head_only=head_only)
        if self._phase == _CLOSED:
            return
        if self._phase != _PAUSED:
            self._phase = _IDLE
            self.due = self._loop.time() + self._listener.header_timeout
        else:
            self._resume_phase = _IDLE
        self._begun = False

    def _refuse_head(self, error: StsError) -> None:
        """A request whose head cannot be used: audited and budgeted like every anonymous refusal, closed."""
        path = self._url.decode("latin-1").partition("?")[0] or "-"
        answer = self._http.refuse(self._method, path, self._source, error)
        self._write_raw(answer.status, answer.headers, answer.body, close=True)

    def _write_raw(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        close: bool,
        head_only: bool = False,
    ) -> None:
        """One write: status line, uvicorn's default fields (``Date``), ours, the framing, the body."""
        transport = self._transport
        if transport is None or self._phase == _CLOSED:
            return
        lines = []
        for name, value in headers:
            if name.lower() in ("connection", "content-length", "transfer-encoding"):
                continue  # the framing is ours to write
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                log.error("an answer header carried a line break; answering 500 instead")
                self._write_raw(
                    500, [("Content-Type", "application/json")], error_answer(StsError()).body, close=True
                )
                return
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"content-length: {len(body)}\r\n")
        if close:
            lines.append("connection: close\r\n")
        lines.append("\r\n")
        parts = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status_line(status)}\r\n".encode()]
        for name_bytes, value_bytes in self._state.default_headers:
            parts += (name_bytes, b": ", value_bytes, b"\r\n")
        parts.append("".join(lines).encode("latin-1"))
        if not head_only:
            parts.append(body)
        transport.write(b"".join(parts))
        if close:
            self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()  # after what was written has been sent
        self._phase = _CLOSED
        self.due = math.inf


def _parser_reason(error: httptools.HttpParserError) -> str:
    """llhttp's reason for a malformed request, without the bytes the client sent."""
    text = str(error.args[0]) if error.args else type(error).__name__
    return text.split(":", 1)[0][:80] if text else "unparseable"
