"""The plain listener's connection protocol with a recording transport: what real sockets cannot force.

A kernel's socket buffers decide when a real client's answers stay unread; here the transport says
so, to check that a request arriving behind unread answers does nothing at all (no token issued,
no budget spent) and that one large answer alone is always sent whole. The deadlines are driven by
calling the sweeper's tick with a chosen time. Real-socket behaviour is in tests/test_plain_http.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from sts.config import ServerSettings
from sts.errors import StsError
from sts.web.http import HttpRequest, HttpResponse
from sts.web.plain_server import MAX_UNREAD_ANSWER_BYTES, PlainHttpProtocol, PlainListener


@dataclass
class RecordingHttp:
    """Stands in for StsHttp: records what it was asked, answers ``body`` to every request."""

    body: bytes = b'{"status":"ok"}'
    handled: list[HttpRequest] = field(default_factory=list)

    def handle(self, request: HttpRequest) -> HttpResponse:
        self.handled.append(request)
        if request.body_error is not None:
            return HttpResponse(request.body_error.status, [("Content-Type", "application/json")], b"{}")
        return HttpResponse(200, [("Content-Type", "application/json")], self.body)

    def refuse(self, method: str, path: str, source: str, error: StsError) -> HttpResponse:
        return HttpResponse(error.status, [], b"{}")


@dataclass
class RecordingTransport:
    """An asyncio transport that keeps what is written; ``unread`` is what the kernel did not take."""

    unread: int = 0
    written: list[bytes] = field(default_factory=list)
    closed: bool = False
    aborted: bool = False

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 5555) if name in ("peername", "sockname") else None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return self.unread

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _connection(
    http: RecordingHttp, loop: asyncio.AbstractEventLoop
) -> tuple[PlainHttpProtocol, RecordingTransport, PlainListener]:
    settings = ServerSettings(header_timeout=5, body_timeout=5, max_body_bytes=1024)
    listener = PlainListener(http, settings)  # type: ignore[arg-type]
    config = SimpleNamespace(loaded=True, loaded_app=SimpleNamespace(listener=listener))
    state = SimpleNamespace(connections=set(), total_requests=0, default_headers=[(b"date", b"now")])
    protocol = PlainHttpProtocol(config, state, {}, loop)
    transport = RecordingTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport, listener


@pytest.fixture
def loop() -> Any:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def test_one_large_answer_is_sent_whole(loop: asyncio.AbstractEventLoop) -> None:
    http = RecordingHttp(body=b"x" * (4 * MAX_UNREAD_ANSWER_BYTES))
    protocol, transport, _ = _connection(http, loop)
    protocol.data_received(GET)
    assert len(http.handled) == 1 and not transport.aborted
    assert transport.written[0].endswith(http.body)
    assert b"content-length: %d\r\n" % len(http.body) in transport.written[0]


def test_a_request_behind_unread_answers_does_nothing(loop: asyncio.AbstractEventLoop) -> None:
    http = RecordingHttp()
    protocol, transport, _ = _connection(http, loop)
    protocol.data_received(GET)
    transport.unread = MAX_UNREAD_ANSWER_BYTES + 1  # the client has not read what it was sent
    protocol.data_received(GET + GET)
    assert len(http.handled) == 1, "a request behind unread answers reached the application"
    assert transport.aborted and len(transport.written) == 1


def test_a_client_reading_its_answers_may_pipeline(loop: asyncio.AbstractEventLoop) -> None:
    http = RecordingHttp()
    protocol, transport, _ = _connection(http, loop)
    transport.unread = MAX_UNREAD_ANSWER_BYTES  # at the limit, not past it
    protocol.data_received(GET * 5)
    assert len(http.handled) == 5 and not transport.aborted and not transport.closed


def test_deadlines_by_phase(loop: asyncio.AbstractEventLoop) -> None:
    http = RecordingHttp()
    idle, idle_transport, listener = _connection(http, loop)
    idle.data_received(GET)
    body, body_transport, _ = _connection(http, loop)
    body.data_received(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    listener.connections = {idle, body}
    now = loop.time()
    listener.sweep(now + 1)  # before every deadline: nothing happens
    assert not idle_transport.closed and not body_transport.closed
    listener.sweep(now + 10)
    assert idle_transport.closed and idle_transport.written[-1].startswith(b"HTTP/1.1 200")
    assert body_transport.closed and body_transport.written[-1].startswith(b"HTTP/1.1 408")
    assert http.handled[-1].body_error is not None and http.handled[-1].body_error.status == 408


def test_writes_paused_past_the_deadline_abort(loop: asyncio.AbstractEventLoop) -> None:
    http = RecordingHttp()
    protocol, transport, listener = _connection(http, loop)
    protocol.data_received(GET)
    protocol.pause_writing()
    listener.sweep(loop.time() + 10)
    assert transport.aborted


def test_writes_that_resume_get_a_fresh_deadline(loop: asyncio.AbstractEventLoop) -> None:
    http = RecordingHttp()
    protocol, transport, listener = _connection(http, loop)
    protocol.data_received(GET)
    protocol.pause_writing()
    protocol.resume_writing()
    listener.sweep(loop.time() + 1)
    assert not transport.aborted and not transport.closed
