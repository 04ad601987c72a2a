"""Slow and stalled clients on both listeners never starve valid requests (issue 11).

Real servers (``sts serve``) on loopback, real sockets. Each test holds its slow connections for a
bounded time and closes them itself. Under the old server model (granian WSGI, gunicorn gthread)
one connection per worker thread stopped every endpoint; these would hang or fail there.
"""

from __future__ import annotations

import socket
import ssl
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import requests

from tests.authority import TestAuthority
from tests.conftest import RunningServer, free_port, running_server, write_config
from tests.test_mtls_http import with_tls_listener

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
AGENT = "spiffe://example.org/agent/researcher"
SLOW_CONNECTIONS = 1000


def _config(directory: Path, port: int, example: TestAuthority, partner: TestAuthority, server: str) -> Path:
    config = write_config(directory, port, example, partner)
    text = config.read_text().replace("server: {workers: 1}\n", f"server: {server}\n")
    text = text.replace("per_workload_per_second: 1000", "per_workload_per_second: 100000")
    config.write_text(text)
    return config


def _running(
    factory: pytest.TempPathFactory,
    example: TestAuthority,
    partner: TestAuthority,
    server: str,
    *,
    tls: bool = False,
) -> Iterator[tuple[RunningServer, Path | None]]:
    directory = factory.mktemp("slow")
    port = free_port()
    config = _config(directory, port, example, partner, server)
    ca = with_tls_listener(config, port, example) if tls else None
    with running_server(config, port, scheme="https" if tls else "http", ca=ca) as running:
        yield running, ca


@pytest.fixture(scope="module")
def patient(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[RunningServer]:
    """One worker whose deadlines outlast the test, so the slow connections are really held."""
    server = "{workers: 1, header_timeout: 60, body_timeout: 60}"
    for running, _ in _running(tmp_path_factory, example_org, partner_test, server):
        yield running


@pytest.fixture(scope="module")
def strict(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[RunningServer]:
    """Short deadlines, to see them enforced."""
    server = "{workers: 1, header_timeout: 1, body_timeout: 1, max_body_bytes: 1024}"
    for running, _ in _running(tmp_path_factory, example_org, partner_test, server):
        yield running


@pytest.fixture(scope="module")
def tls(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[tuple[RunningServer, Path]]:
    server = "{workers: 1, header_timeout: 60, body_timeout: 60, handshake_timeout: 60}"
    for running, ca in _running(tmp_path_factory, example_org, partner_test, server, tls=True):
        assert ca is not None
        yield running, ca


def _port(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _exchange_body(authority: TestAuthority, issuer: str) -> dict[str, str]:
    return {
        "grant_type": GRANT,
        "subject_token_type": JWT_TYPE,
        "subject_token": authority.mint(AGENT, issuer),
        "audience": "tool:calc",
        "scope": "invoke",
    }


@contextmanager
def held(count: int, port: int, payloads: list[bytes]) -> Iterator[list[socket.socket]]:
    """``count`` connections, each sent one of ``payloads`` (round robin) and then left waiting."""
    with ExitStack() as stack:
        sockets = []
        for i in range(count):
            connection = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            payload = payloads[i % len(payloads)]
            if payload:
                connection.sendall(payload)
            sockets.append(connection)
        yield sockets


SLOW_PLAIN = [
    b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 1000\r\n\r\ngrant_type=",  # a body that never finishes
    b"POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab",
    b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow:",  # a head that never finishes
    b"",  # connected, silent
]


def _latencies(url: str, body_for: object, count: int, verify: str | bool = True) -> list[float]:
    latencies = []
    with requests.Session() as session:
        for _ in range(count):
            body = body_for() if callable(body_for) else body_for
            started = time.perf_counter()
            response = session.post(f"{url}/token", data=body, timeout=10, verify=verify)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return latencies


def _p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


def test_a_thousand_slow_connections_do_not_starve_valid_exchanges(
    patient: RunningServer, example_org: TestAuthority
) -> None:
    port = _port(patient)
    with held(SLOW_CONNECTIONS, port, SLOW_PLAIN):
        time.sleep(0.5)  # every slow request has reached the server
        latencies = _latencies(patient.url, lambda: _exchange_body(example_org, patient.issuer), 200)
        assert requests.get(f"{patient.url}/healthz", timeout=2).status_code == 200
    assert _p99(latencies) <= 0.25, (
        f"p99 {_p99(latencies) * 1000:.1f} ms with {SLOW_CONNECTIONS} slow clients"
    )


def test_a_thousand_stalled_tls_connections_do_not_starve_the_tls_listener(
    tls: tuple[RunningServer, Path], example_org: TestAuthority
) -> None:
    server, ca = tls
    port = _port(server)
    url = server.url.replace("127.0.0.1", "localhost")
    stalls = [b"\x16", b"\x16\x03\x01\x00\xff\x01", b""]  # one byte; half a ClientHello; nothing
    with held(SLOW_CONNECTIONS - 50, port, stalls), ExitStack() as stack:
        context = ssl.create_default_context(cafile=str(ca))
        for _ in range(50):  # after the handshake, a head that never finishes
            raw = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            tls_socket = stack.enter_context(context.wrap_socket(raw, server_hostname="localhost"))
            tls_socket.sendall(b"POST /token HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10")
        time.sleep(0.5)
        latencies = _latencies(url, lambda: _exchange_body(example_org, server.issuer), 100, verify=str(ca))
        assert requests.get(f"{url}/healthz", timeout=2, verify=str(ca)).status_code == 200
    assert _p99(latencies) <= 0.25, f"p99 {_p99(latencies) * 1000:.1f} ms with stalled TLS clients"


def _answer(connection: socket.socket, timeout: float = 5.0) -> bytes:
    connection.settimeout(timeout)
    data = b""
    try:
        while chunk := connection.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant", b"408"),
        (b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab", b"408"),
    ],
    ids=["partial-body", "huge-chunk-announced-then-silence"],
)
def test_a_body_that_does_not_arrive_in_time_is_408(
    strict: RunningServer, payload: bytes, status: bytes
) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", _port(strict)), timeout=10) as connection:
        connection.sendall(b"POST /token HTTP/1.1\r\nHost: x\r\n" + payload)
        answer = _answer(connection, timeout=10)
    assert answer.startswith(b"HTTP/1.1 " + status), answer
    assert b'"error":"invalid_request"' in answer
    assert time.monotonic() - started < 8, "the 1 s body deadline was not kept (even allowing for load)"


def test_a_chunked_body_over_the_limit_is_413_as_it_arrives(strict: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", _port(strict)), timeout=10) as connection:
        connection.sendall(
            b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n" + b"a" * 4096
        )
        answer = _answer(connection)
    assert answer.startswith(b"HTTP/1.1 413"), answer


def test_a_head_that_does_not_arrive_in_time_is_closed(strict: RunningServer) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", _port(strict)), timeout=10) as connection:
        connection.sendall(b"POST /token HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answer = _answer(connection, timeout=8)
    assert time.monotonic() - started < 6, "the connection was held past the header deadline"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer


def test_a_declared_body_over_the_limit_is_413_without_reading_it(strict: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", _port(strict)), timeout=10) as connection:
        connection.sendall(
            b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 999999999\r\n\r\n"
        )
        answer = _answer(connection)
    assert answer.startswith(b"HTTP/1.1 413"), answer


def test_head_on_the_tls_listener_is_answered_without_a_body(tls: tuple[RunningServer, Path]) -> None:
    """h11 refuses to send a body for HEAD: the listener must send the head alone, not fail."""
    server, ca = tls
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", _port(server)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        connection.sendall(
            b"HEAD /token HTTP/1.1\r\nHost: localhost\r\n\r\nGET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        answer = _answer(connection, timeout=3)
    assert answer.startswith(b"HTTP/1.1 405"), answer
    head, _, rest = answer.partition(b"\r\n\r\n")
    length = int(
        next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))[15:]
    )
    assert length > 0, "RFC 9110 §8.6: a HEAD answer's Content-Length is the GET's, not 0"
    assert rest.startswith(b"HTTP/1.1 200"), "the HEAD answer carried no body"
    assert b"HTTP/1.1 200" in answer and b'{"status":"ok"}' in answer, "the connection goes on after HEAD"
