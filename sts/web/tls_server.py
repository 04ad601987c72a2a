"""The TLS listener (``listen.tls``): asyncio + h11, with a deadline on every read (issue 11).

Why not an off-the-shelf server: granian does not hand the client certificate to the application,
and gunicorn's gthread worker did the TLS handshake and read the request head in a worker thread
without a timeout, so one byte (``\\x16``) stalled the listener. Here every connection is a
coroutine: the handshake (``server.handshake_timeout``), the request head
(``server.header_timeout``), the body (``server.body_timeout``, with ``server.max_body_bytes``
enforced as chunks arrive) and each write have their own deadline, and a slow or idle connection
holds no thread. HTTP/1.1 framing is h11's (sans-IO, the parser uvicorn and hypercorn use);
requests are answered by the same :class:`~sts.web.app.StsHttp` as the plain listener.

Each connection gets the TLS context that is current when it arrives (``ServerTls``): the
server's own X.509-SVID and the X.509 authorities of every trust domain, so rotation needs no
restart. Client certificates are optional at the TLS layer; the exchange then verifies the leaf as
an X.509-SVID against its own trust domain. ``server.workers`` pre-forked processes share one listening
socket, or with ``server.reuse_port`` each listen on their own socket on the address
(``SO_REUSEPORT``, so the kernel spreads connections over them, :mod:`sts.web.listeners`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from types import FrameType
from urllib.parse import unquote

import h11
from cryptography import x509

from sts.config import Settings, load_settings
from sts.errors import InvalidRequest, RequestTimeout, RequestTooLarge, StsError, TemporarilyUnavailable
from sts.logsafe import configure_logging
from sts.metrics import worker_exited
from sts.web.app import StsHttp
from sts.web.http import (
    MAX_HEAD_BYTES,
    HeadTooLarge,
    HttpRequest,
    HttpResponse,
    MalformedHead,
    declared_length,
    joined_headers,
    status_line,
)
from sts.web.listeners import PortReservation, reserve, spreads_connections
from sts.web.tls import ServerTls

log = logging.getLogger(__name__)

MAX_HEADER_FIELDS = 100  # many tiny fields cost more to join than their bytes say; 431 past it
READ_CHUNK = 64 * 1024
EXIT_OK, EXIT_FAILED = 0, 1


class _Closed(Exception):
    """The client closed the connection (or broke the protocol past answering)."""


class TlsServer:
    """One worker's listener: serves ``sock`` until :meth:`stop`, then drains in-flight requests."""

    def __init__(self, http: StsHttp, tls: ServerTls, settings: Settings) -> None:
        self._http = http
        self._tls = tls
        server = settings.server
        self._limit = server.max_body_bytes
        self._header_timeout = float(server.header_timeout)
        self._body_timeout = float(server.body_timeout)
        self._handshake_timeout = float(server.handshake_timeout)
        self._max_connections = server.max_connections
        self._backlog = backlog(settings)
        self._server_address = (settings.listen.host, settings.listen.port)
        self._connections: set[asyncio.Task[None]] = set()
        self._busy = 0
        self._stopping = False

    async def serve(self, sock: socket.socket, stop: asyncio.Event, drain_seconds: float) -> None:
        server = await asyncio.start_server(self._accept, sock=sock, limit=READ_CHUNK, backlog=self._backlog)
        try:
            await stop.wait()
        finally:
            self._stopping = True
            server.close()
            deadline = time.monotonic() + drain_seconds
            while self._busy and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._connections) >= self._max_connections or self._stopping:
            writer.transport.abort()
            return
        self._connections.add(task)
        try:
            await self._connection(reader, writer)
        except (_Closed, ConnectionError, OSError, ssl.SSLError, TimeoutError, h11.LocalProtocolError):
            pass
        finally:
            self._connections.discard(task)
            writer.transport.abort()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            context = self._tls.context()
        except TemporarilyUnavailable as e:
            log.warning("TLS connection refused: %s", e.description)
            return
        await writer.start_tls(context, ssl_handshake_timeout=self._handshake_timeout)
        chain = _peer_chain(writer)
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        first = True
        while not self._stopping or first:
            first = False
            try:  # the head deadline also ends a keep-alive connection left idle (as on the plain listener)
                async with asyncio.timeout(self._header_timeout):
                    event = await _next_event(connection, reader)
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed
                headers = _parse_head(event)
            except TimeoutError:
                if connection.their_state is h11.SEND_BODY or _has_partial_head(connection):
                    late = RequestTimeout("the request head did not arrive in time")
                    await self._refuse(writer, source, late)
                return
            except h11.RemoteProtocolError as e:
                refusal = HeadTooLarge if e.error_status_hint == 431 else MalformedHead
                await self._refuse(writer, source, refusal(f"malformed request: {e}"))
                return
            except MalformedHead as e:
                assert isinstance(event, h11.Request)  # noqa: S101 (only _parse_head raises it)
                await self._refuse(writer, source, e, event.method, event.target)
                return
            self._busy += 1
            try:
                keep = await self._exchange(connection, reader, writer, event, headers, peer=(chain, source))
            finally:
                self._busy -= 1
            if not keep:
                return
            try:
                connection.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _exchange(
        self,
        connection: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        event: h11.Request,
        headers: dict[str, str],
        *,
        peer: tuple[tuple[x509.Certificate, ...], str],
    ) -> bool:
        """Read the body, answer, write; False when the connection must close afterwards."""
        chain, source = peer
        body, error = await self._body(connection, reader, headers)
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        request = HttpRequest(
            method=event.method.decode("ascii", "replace"),
            path=unquote(path, errors="surrogateescape"),
            query=query,
            headers=headers,
            body=body,
            source=source,
            scheme="https",
            server=self._server_address,
            client_certificates=chain,
            body_error=error,
        )
        answer = self._http.handle(request)
        closes = answer.closes or error is not None or self._stopping
        # RFC 9110 §9.3.2: HEAD gets the GET's head (its Content-Length too, §8.6), no content
        await self._send(connection, writer, answer, closes, head_only=event.method == b"HEAD")
        return not closes and connection.our_state is h11.DONE and connection.their_state is h11.DONE

    async def _body(
        self, connection: h11.Connection, reader: asyncio.StreamReader, headers: dict[str, str]
    ) -> tuple[bytes, StsError | None]:
        try:
            declared = declared_length(headers)
        except InvalidRequest as e:
            return b"", e
        if declared is not None and declared > self._limit:
            return b"", RequestTooLarge(f"request body is larger than {self._limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._body_timeout):
                while True:
                    event = await _next_event(connection, reader)
                    if isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > self._limit:
                            return b"", RequestTooLarge(f"request body is larger than {self._limit} bytes")
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        return b"".join(chunks), None
                    else:
                        raise _Closed
        except TimeoutError:
            return b"", RequestTimeout(f"the request body did not arrive within {int(self._body_timeout)} s")
        except h11.RemoteProtocolError as e:
            return b"", InvalidRequest(f"malformed request body: {e}")

    async def _send(
        self,
        connection: h11.Connection,
        writer: asyncio.StreamWriter,
        answer: HttpResponse,
        closes: bool,
        *,
        head_only: bool = False,
    ) -> None:
        headers = [
            (name, value)
            for name, value in answer.headers
            if name.lower() not in ("connection", "content-length", "transfer-encoding")
        ]
        headers.append(("Content-Length", str(len(answer.body))))
        if closes:
            headers.append(("Connection", "close"))
        data = connection.send(h11.Response(status_code=answer.status, headers=headers))
        if not head_only:  # h11 frames a HEAD answer as having no content
            data = (data or b"") + (connection.send(h11.Data(data=answer.body)) or b"")
        data += connection.send(h11.EndOfMessage()) or b""
        writer.write(data)
        async with asyncio.timeout(self._body_timeout):
            await writer.drain()

    async def _refuse(
        self,
        writer: asyncio.StreamWriter,
        source: str,
        error: StsError,
        method: bytes = b"-",
        target: bytes = b"-",
    ) -> None:
        """A request refused before it could be read (a head too slow, too large or malformed):
        audited and budgeted like every anonymous refusal, answered outside h11, then closed."""
        path = target.decode("latin-1").partition("?")[0]
        answer = self._http.refuse(method.decode("ascii", "replace"), path, source, error)
        head = [f"HTTP/1.1 {status_line(answer.status)}"]
        head += [f"{name}: {value}" for name, value in answer.headers if name.lower() != "connection"]
        head += [f"Content-Length: {len(answer.body)}", "Connection: close", "", ""]
        writer.write("\r\n".join(head).encode("latin-1") + answer.body)
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(1.0):
                await writer.drain()


async def _next_event(connection: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await reader.read(READ_CHUNK))


def _parse_head(event: h11.Request) -> dict[str, str]:
    """The header fields, refusing what h11 lets through: other HTTP versions, oversized or repeated
    fields. h11 bounds a head only while it is incomplete, so a large head that arrives in one read
    would pass; the size and count are checked on the parsed head too (RFC 6585 §5: 431)."""
    if event.http_version not in (b"1.1", b"1.0"):
        raise MalformedHead("only HTTP/1.1 is served here")
    size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
    if len(event.headers) > MAX_HEADER_FIELDS or size > MAX_HEAD_BYTES:
        raise HeadTooLarge("the request head is too large")
    return joined_headers((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers)


def _has_partial_head(connection: h11.Connection) -> bool:
    return bool(connection.trailing_data[0])


def _peer_chain(writer: asyncio.StreamWriter) -> tuple[x509.Certificate, ...]:
    """The certificate chain the client presented, leaf first, intermediates after (RFC 8446 §4.4.2).

    X.509-SVIDs issued under an UpstreamAuthority or a nested SPIRE carry intermediates, and the
    leaf must be verified through them against its own trust domain's bundle (X509-SVID §5), so the
    leaf alone is not enough. ``get_unverified_chain`` is public from Python 3.13; on 3.10-3.12 the
    same C method is reached through the SSL object's ``_sslobj``. Without either: the leaf only.
    """
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return ()
    presented = _presented_chain(ssl_object)
    if presented:
        return tuple(x509.load_der_x509_certificate(der) for der in presented)
    der = ssl_object.getpeercert(binary_form=True)
    return (x509.load_der_x509_certificate(der),) if der else ()


def _presented_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        return []
    chain = getter() or []
    return [c if isinstance(c, bytes) else c.public_bytes(_DER) for c in chain if c is not None]


_DER = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009 (the private module's constant, 3.10-3.12)


# ---- processes -----------------------------------------------------------------------------------


def backlog(settings: Settings) -> int:
    """The listen backlog: room for ``server.max_connections`` arriving at once (at least 1024)."""
    return min(max(1024, settings.server.max_connections), 65535)


def bind(settings: Settings) -> socket.socket:
    """The parent's socket: with ``server.reuse_port``, a :class:`~sts.web.listeners.PortReservation`
    each worker takes its own socket from; otherwise (or where the kernel would not spread
    connections) one listening socket for all, without SO_REUSEPORT. IPv6 addresses are IPv6-only
    either way. An address in use is an error (OSError)."""
    if spreads_connections(settings.server.reuse_port, settings.server.workers):
        return reserve(settings.listen.host, settings.listen.port, v6only=True)
    address = (settings.listen.host, settings.listen.port)
    family = socket.AF_INET6 if ":" in settings.listen.host else socket.AF_INET
    return socket.create_server(address, family=family, backlog=backlog(settings), reuse_port=False)


def _worker(config_path: Path, sock: socket.socket, drain_seconds: float) -> int:
    """One worker process: its own services (store connections, Workload API streams), one loop.

    The loop is asyncio's own: uvloop's ``start_tls`` on a server stream resets the connection
    (measured with uvloop 0.23), and this listener is not the hot path.
    """
    from sts.runtime import build_services

    settings = load_settings(config_path)
    configure_logging(settings.log_level, settings.log_format)
    services = build_services(settings)
    assert settings.listen.tls is not None  # noqa: S101 (serve_tls is only called with listen.tls)
    tls = ServerTls(settings.listen.tls, services.trust, services.watcher)
    server = TlsServer(StsHttp(services), tls, settings)

    if isinstance(sock, PortReservation):  # its own socket, listening once the worker is ready
        reservation, sock = sock, sock.worker_socket()
        reservation.close()  # this process's copy; the parent keeps the address

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await server.serve(sock, stop, drain_seconds)

    try:
        asyncio.run(main())
    finally:
        services.close()
    return EXIT_OK


class _Supervisor:
    """The parent of the TLS workers: forks them, respawns one that dies, stops them all on a signal."""

    def __init__(self, config_path: Path, settings: Settings, drain_seconds: float) -> None:
        self._config_path = config_path
        self._drain_seconds = drain_seconds
        self._workers = settings.server.workers
        self._sock = bind(settings)
        self._children: dict[int, float] = {}  # pid → when it was started
        self._stopping = False
        self._failed = False  # stopping because workers keep dying, not because we were told to

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for _ in range(self._workers):
            self._spawn()
        quick_deaths = 0
        deadline: float | None = None
        while self._children:
            if self._stopping and deadline is None:
                deadline = time.monotonic() + self._drain_seconds + 2
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                if deadline is not None and time.monotonic() > deadline:
                    self._signal_all(signal.SIGKILL)
                time.sleep(0.05)
                continue
            born = self._children.pop(pid, None)
            worker_exited(pid)
            if self._stopping or born is None:
                continue
            quick_deaths = quick_deaths + 1 if time.monotonic() - born < 5 else 0
            if quick_deaths >= 3:
                log.error("TLS workers keep failing at start; stopping (see the errors above)")
                self._failed = True
                self._stop(signal.SIGTERM, None)
                continue
            log.error("TLS worker %d exited; starting another", pid)
            self._spawn()
        self._sock.close()
        return EXIT_OK if self._stopping and not self._failed else EXIT_FAILED

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = EXIT_FAILED
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = _worker(self._config_path, self._sock, self._drain_seconds)
            except Exception:
                log.exception("TLS worker %d failed", os.getpid())
            finally:
                os._exit(code)
        self._children[pid] = time.monotonic()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def serve_tls(config_path: Path, settings: Settings) -> int:
    """``sts serve`` with ``listen.tls``: ``server.workers`` pre-forked workers on one socket; on a
    signal they drain for ``server.drain_timeout`` and whatever is still alive then is killed."""
    return _Supervisor(config_path, settings, settings.server.drain_timeout).run()
