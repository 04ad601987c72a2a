"""``CorkedTransport``: a response's head and body leave in one write, and nothing is held back.

uvicorn writes the head and the body of an answer separately; the listener joins the writes of one
turn of the event loop into one ``send()``. A close must still send what was written before it (a
408 written just before closing), and nothing may be written to a transport already closing.
"""

from __future__ import annotations

import asyncio

from sts.web.asgi import CorkedTransport


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 4242) if name == "peername" else default


def test_writes_of_one_turn_leave_as_one() -> None:
    async def scenario() -> list[bytes]:
        raw = RecordingTransport()
        corked = CorkedTransport(raw, asyncio.get_running_loop())
        corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        corked.write(b"{}")
        assert raw.writes == []  # nothing yet: the loop has not turned
        await asyncio.sleep(0)
        corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")  # the next answer, on its own
        await asyncio.sleep(0)
        return raw.writes

    assert asyncio.run(scenario()) == [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    ]


def test_close_sends_what_was_written_first() -> None:
    async def scenario() -> RecordingTransport:
        raw = RecordingTransport()
        corked = CorkedTransport(raw, asyncio.get_running_loop())
        corked.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        corked.close()
        assert raw.writes == [b"HTTP/1.1 408 Request Timeout\r\n\r\n"] and raw.closed
        await asyncio.sleep(0)  # the scheduled flush finds nothing left and writes nothing
        return raw

    assert asyncio.run(scenario()).writes == [b"HTTP/1.1 408 Request Timeout\r\n\r\n"]


def test_nothing_is_written_once_the_peer_has_gone() -> None:
    async def scenario() -> RecordingTransport:
        raw = RecordingTransport()
        corked = CorkedTransport(raw, asyncio.get_running_loop())
        corked.write(b"late answer")
        raw.closed = True  # connection_lost before the loop turned
        await asyncio.sleep(0)
        return raw

    raw = asyncio.run(scenario())
    assert raw.writes == []


def test_everything_else_is_the_transports_own() -> None:
    async def scenario() -> object:
        corked = CorkedTransport(RecordingTransport(), asyncio.get_running_loop())
        return corked.get_extra_info("peername")

    assert asyncio.run(scenario()) == ("127.0.0.1", 4242)
