"""The plain listener's own HTTP/1.1 connection protocol (RFC 9112), against a real ``sts serve``.

Raw sockets on loopback, so each test sees the bytes a client gets: framing, pipelining order,
``Expect: 100-continue``, HEAD, HTTP/1.0, the size limits of a head (RFC 6585 §5), the connection
limit, the deadlines of idle keep-alive connections and of clients that never read, and graceful
shutdown with a request in flight.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
import requests

from tests.authority import TestAuthority
from tests.conftest import RunningServer, free_port, running_server, write_config

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
AGENT = "spiffe://example.org/agent/researcher"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
MAX_CONNECTIONS = 8


def _serve(directory: Path, example: TestAuthority, partner: TestAuthority, server: str) -> tuple[Path, int]:
    port = free_port()
    config = write_config(directory, port, example, partner)
    text = config.read_text().replace("server: {workers: 1}\n", f"server: {server}\n")
    config.write_text(text.replace("per_workload_per_second: 1000", "per_workload_per_second: 100000"))
    return config, port


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[RunningServer]:
    """One worker with short deadlines and a small connection limit, to see both enforced."""
    settings = f"{{workers: 1, header_timeout: 1, body_timeout: 1, max_connections: {MAX_CONNECTIONS}}}"
    config, port = _serve(tmp_path_factory.mktemp("plain"), example_org, partner_test, settings)
    with running_server(config, port) as running:
        yield running


def _connect(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10)


def _read_until_closed(connection: socket.socket, timeout: float = 5.0) -> bytes:
    connection.settimeout(timeout)
    data = b""
    try:
        while chunk := connection.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def _read_answers(
    connection: socket.socket, count: int, timeout: float = 5.0
) -> list[tuple[bytes, dict[str, str], bytes]]:
    """``count`` answers framed by their Content-Length: (status line, fields, body)."""
    connection.settimeout(timeout)
    buffer = b""
    answers: list[tuple[bytes, dict[str, str], bytes]] = []
    while len(answers) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            status, *lines = buffer[:head_end].decode("latin-1").split("\r\n")
            fields = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
            length = int(fields["content-length"])
            if len(buffer) >= head_end + 4 + length:
                body = buffer[head_end + 4 : head_end + 4 + length]
                answers.append((status.encode(), fields, body))
                buffer = buffer[head_end + 4 + length :]
                continue
        chunk = connection.recv(65536)
        if not chunk:
            raise AssertionError(f"closed after {len(answers)} of {count} answers: {buffer!r}")
        buffer += chunk
    return answers


def _token_form(example: TestAuthority, issuer: str) -> bytes:
    form = {
        "grant_type": GRANT,
        "subject_token_type": JWT_TYPE,
        "subject_token": example.mint(AGENT, issuer),
        "audience": "tool:calc",
        "scope": "invoke",
    }
    return "&".join(f"{name}={value}" for name, value in form.items()).encode()


def _post_token(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def test_pipelined_requests_are_answered_in_order(server: RunningServer, example_org: TestAuthority) -> None:
    """RFC 9112 §9.3.2: answers in the order of the requests, all on one connection, in one send."""
    token = _post_token(_token_form(example_org, server.issuer))
    pipeline = (
        HEALTHZ
        + token
        + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"GET /jwks.json HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    with _connect(server) as connection:
        connection.sendall(pipeline)
        answers = _read_answers(connection, 4)
    assert [status for status, _, _ in answers] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 200 OK",
    ]
    assert json.loads(answers[0][2]) == {"status": "ok"}
    assert json.loads(answers[1][2])["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert "keys" in json.loads(answers[3][2])
    assert all("connection" not in fields for _, fields, _ in answers), "keep-alive is HTTP/1.1's default"


def test_answers_carry_a_date_and_exact_framing(server: RunningServer) -> None:
    """RFC 9110 §6.6.1: an origin server with a clock sends Date; Content-Length frames the body."""
    with _connect(server) as connection:
        connection.sendall(HEALTHZ)
        [(status, fields, body)] = _read_answers(connection, 1)
    assert status == b"HTTP/1.1 200 OK"
    assert abs(parsedate_to_datetime(fields["date"]).timestamp() - time.time()) < 5
    assert int(fields["content-length"]) == len(body)
    assert "transfer-encoding" not in fields and "server" not in fields


def test_expect_100_continue_is_answered_before_the_body(
    server: RunningServer, example_org: TestAuthority
) -> None:
    """RFC 9110 §10.1.1: the client waits for 100 Continue before it sends the body."""
    body = _token_form(example_org, server.issuer)
    request = _post_token(body, extra=b"Expect: 100-continue\r\n")
    head = request[: -len(body)]
    with _connect(server) as connection:
        connection.sendall(head)
        connection.settimeout(5)
        interim = connection.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        connection.sendall(body)
        [(status, _, answer)] = _read_answers(connection, 1)
    assert status == b"HTTP/1.1 200 OK", answer
    assert "access_token" in json.loads(answer)


def test_head_gets_the_head_alone_and_the_connection_goes_on(server: RunningServer) -> None:
    """RFC 9110 §9.3.2: HEAD gets the same fields as GET (Content-Length included) and no content."""
    with _connect(server) as connection:
        connection.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + HEALTHZ)
        connection.settimeout(5)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}\n"):
            chunk = connection.recv(65536)
            assert chunk, data
            data += chunk
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert b"content-length: 16" in first.lower()  # the GET's body: {"status":"ok"} and a newline
    assert rest.startswith(b"HTTP/1.1 200"), "the HEAD answer carried a body"


def test_http_1_0_gets_one_answer_and_the_connection_closes(server: RunningServer) -> None:
    with _connect(server) as connection:
        connection.sendall(b"GET /healthz HTTP/1.0\r\n\r\n" + HEALTHZ)
        data = _read_until_closed(connection)
    assert data.count(b"HTTP/1.1 200") == 1, data
    assert b"connection: close" in data.lower()


def test_connection_close_from_the_client_is_honoured(server: RunningServer) -> None:
    with _connect(server) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + HEALTHZ)
        data = _read_until_closed(connection)
    assert data.count(b"HTTP/1.1 200") == 1, data


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-F%d: v\r\n" % i for i in range(101)) + b"\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["101-fields", "one-huge-field", "huge-target"],
)
def test_a_head_over_the_limits_is_431_and_audited(server: RunningServer, head: bytes) -> None:
    """RFC 6585 §5: 431 Request Header Fields Too Large, closed, with an audit record of the refusal."""
    before = len(server.audit_lines())
    with _connect(server) as connection:
        with suppress(BrokenPipeError, ConnectionResetError):  # it may answer before all is sent
            connection.sendall(head)
        data = _read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert b'"error":"invalid_request"' in data and b"connection: close" in data.lower()
    deadline = time.monotonic() + 5
    while len(server.audit_lines()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    refusals = [r for r in server.audit_records()[before:] if r["event"] == "api_refusal"]
    assert refusals and refusals[-1]["error_description"].startswith("the request head ")
    assert len(refusals[-1]["path"]) <= 260, "a 64 KiB target is not copied whole into the audit log"


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz\r\n\r\n",  # HTTP/0.9
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
        b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n",
    ],
    ids=["http-0.9", "two-lengths", "space-in-name", "length-and-chunked", "http-2-on-1"],
)
def test_a_malformed_head_is_400_and_closed(server: RunningServer, head: bytes) -> None:
    with _connect(server) as connection:
        connection.sendall(head)
        data = _read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b'"error":"invalid_request"' in data and b"connection: close" in data.lower()


def test_an_idle_keep_alive_connection_is_closed_after_the_header_deadline(server: RunningServer) -> None:
    with _connect(server) as connection:
        connection.sendall(HEALTHZ)
        _read_answers(connection, 1)
        started = time.monotonic()
        rest = _read_until_closed(connection, timeout=8)
    waited = time.monotonic() - started
    assert rest == b"", "an idle connection is closed without an answer"
    assert 0.7 < waited < 6, f"closed after {waited:.1f} s; the deadline is 1 s"


def test_a_client_that_never_reads_its_answers_is_cut_off(server: RunningServer) -> None:
    """Pipelined requests whose answers pile up unread: reading stops, then the connection is aborted."""
    with socket.socket() as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        connection.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        connection.settimeout(0.5)
        pipeline = (b"GET /jwks.json HTTP/1.1\r\nHost: x\r\n\r\n") * 2000
        sent = 0
        started = time.monotonic()
        while time.monotonic() - started < 8:
            try:
                connection.sendall(pipeline)
                sent += 1
            except TimeoutError:
                time.sleep(0.2)  # the server stopped reading: our send buffer is full
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail(f"the server kept reading ({sent} sends) from a client that reads nothing")
    assert requests.get(f"{server.url}/healthz", timeout=2).status_code == 200


def test_past_max_connections_a_request_is_503_at_once(server: RunningServer) -> None:
    with ExitStack() as stack:
        held = [stack.enter_context(_connect(server)) for _ in range(MAX_CONNECTIONS)]
        for connection in held:  # each is accepted and counted before the next test connection
            connection.sendall(HEALTHZ)
            _read_answers(connection, 1)
        with _connect(server) as extra:
            extra.sendall(HEALTHZ)
            data = _read_until_closed(extra)
        assert data.startswith(b"HTTP/1.1 503"), data[:200]
        assert b'"error":"temporarily_unavailable"' in data
        held[0].sendall(HEALTHZ)  # the held ones are still served
        assert _read_answers(held[0], 1)[0][0] == b"HTTP/1.1 200 OK"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # once they are gone, new connections are served again
        with _connect(server) as connection:
            connection.sendall(HEALTHZ)
            if _read_until_closed(connection, timeout=0.5).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    pytest.fail("connections were still refused after the held ones closed")


def test_graceful_shutdown_answers_the_request_in_flight_and_closes_idle_ones(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    config, port = _serve(
        tmp_path, example_org, partner_test, "{workers: 1, body_timeout: 30, drain_timeout: 10}"
    )
    with running_server(config, port) as running, ExitStack() as stack:
        idle = stack.enter_context(_connect(running))
        idle.sendall(HEALTHZ)
        _read_answers(idle, 1)
        busy = stack.enter_context(_connect(running))
        body = _token_form(example_org, running.issuer)
        request = _post_token(body)
        busy.sendall(request[:-10])  # the head and most of the body
        time.sleep(0.3)
        running.process.send_signal(signal.SIGTERM)
        assert _read_until_closed(idle, timeout=5) == b"", "the idle connection is closed at once"
        busy.sendall(request[-10:])
        data = _read_until_closed(busy, timeout=10)
        assert data.startswith(b"HTTP/1.1 200"), data[:300]
        assert b"connection: close" in data.lower() and b"access_token" in data
        # uvicorn re-raises the signal it caught once shutdown is complete
        assert running.process.wait(timeout=15) in (0, -signal.SIGTERM)
    assert "Finished server process" in (tmp_path / "server.log").read_text()
