"""Malformed HTTP over raw sockets, on both listeners (plain HTTP, and TLS after a proper handshake).

The answer must be a 4xx (400, 405, 413, 414, 431…) or a closed connection; never a 5xx, never
success, never a hang (each case waits a few seconds at most). Slow clients are another suite's
business: every case here sends its bytes at once. These run against their own ``sts serve`` pair
(``raw_world``), so a connection the server mishandles cannot starve the other categories.
"""

from __future__ import annotations

import ssl

import pytest

from tests.hostile.attacker import RAW_TIMEOUT, raw, raw_refused
from tests.hostile.conftest import World

HOST = b"Host: localhost\r\n"
FORM = b"Content-Type: application/x-www-form-urlencoded\r\n"


def post(headers: bytes, body: bytes = b"") -> bytes:
    return b"POST /token HTTP/1.1\r\n" + HOST + FORM + headers + b"\r\n" + body


REQUESTS: list[tuple[str, bytes]] = [
    # --- request line ---
    ("garbage-line", b"GARBAGE\r\n\r\n"),
    ("method-only", b"GET\r\n\r\n"),
    ("no-version", b"GET /healthz\r\n" + HOST + b"\r\n"),
    ("unknown-version", b"GET /healthz HTTP/9.9\r\n" + HOST + b"\r\n"),
    ("bad-version-text", b"GET /healthz HTTX/1.1\r\n" + HOST + b"\r\n"),
    ("nul-in-target", b"GET /heal\x00thz HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("space-in-target", b"GET /heal thz HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("control-in-method", b"G\x01T /healthz HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("huge-target", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("huge-method", b"A" * 20_000 + b" / HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("bare-tls-byte", b"\x16"),
    ("tls-record-on-plain", b"\x16\x03\x01\x00\x05hello"),
    ("binary-garbage", bytes(range(256)) * 4),
    # --- headers ---
    ("huge-header", b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Big: " + b"b" * 200_000 + b"\r\n\r\n"),
    ("many-headers", b"GET /healthz HTTP/1.1\r\n" + HOST + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n"),
    ("header-without-colon", b"GET /healthz HTTP/1.1\r\n" + HOST + b"NoColonHere\r\n\r\n"),
    ("space-before-colon", b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Bad : v\r\n\r\n"),
    ("bad-header-name", b"GET /healthz HTTP/1.1\r\n" + HOST + b"X(y): v\r\n\r\n"),
    ("nul-in-header-value", b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Nul: a\x00b\r\n\r\n"),
    ("two-hosts-http11-none", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    # --- Content-Length ---
    ("content-length-negative", post(b"Content-Length: -1\r\n")),
    ("content-length-not-numeric", post(b"Content-Length: abc\r\n", b"abc")),
    ("content-length-two-values-one-header", post(b"Content-Length: 3, 5\r\n", b"abc")),
    ("content-length-two-headers", post(b"Content-Length: 3\r\nContent-Length: 5\r\n", b"abc")),
    ("content-length-plus-sign", post(b"Content-Length: +3\r\n", b"abc")),
    ("content-length-hex", post(b"Content-Length: 0x3\r\n", b"abc")),
    ("content-length-float", post(b"Content-Length: 3.0\r\n", b"abc")),
    ("content-length-inner-space", post(b"Content-Length: 1 0\r\n", b"abcdefghij")),
    ("content-length-huge", post(b"Content-Length: 99999999999999999999999999\r\n")),
    ("content-length-over-limit", post(b"Content-Length: 1000000\r\n")),
    ("expect-continue-over-limit", post(b"Content-Length: 1000000\r\nExpect: 100-continue\r\n")),
    # --- Transfer-Encoding ---
    ("chunked-and-content-length", post(b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"3\r\nabc\r\n0\r\n\r\n")),
    ("chunk-size-ffffffffffffffff", post(b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffff\r\nabc")),
    ("chunk-size-huge-hex", post(b"Transfer-Encoding: chunked\r\n", b"fffffffffffffffffffffffff\r\nabc")),
    ("chunk-size-over-limit", post(b"Transfer-Encoding: chunked\r\n", b"100000\r\nabc")),
    ("chunk-size-not-hex", post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n")),
    ("chunk-size-negative", post(b"Transfer-Encoding: chunked\r\n", b"-1\r\nabc\r\n0\r\n\r\n")),
    ("chunk-longer-than-size", post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabcdefghij\r\n0\r\n\r\n")),
    ("chunk-missing-crlf", post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabcX0\r\n\r\n")),
]

TLS_ONLY: list[tuple[str, bytes]] = [
    ("http-on-tls-port", b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("garbage-before-client-hello", b"hello there\r\n" + bytes.fromhex("160301002f0100002b0303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"),
    ("short-tls-record", b"\x16\x03\x01\x00\x05hello"),
    ("sslv2-hello", bytes.fromhex("802b0103010012000000100000030000060000390000380000350000330000320000040000050000") + bytes(16)),
    ("alert-instead-of-hello", b"\x15\x03\x03\x00\x02\x02\x28"),
    ("binary-garbage", bytes(range(256)) * 4),
]


def _tls_context(world: World) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(world.ca_file))


@pytest.mark.parametrize(("data"), [pytest.param(d, id=f"plain-{name}") for name, d in REQUESTS])
def test_malformed_http_on_the_plain_listener(raw_world: World, data: bytes) -> None:
    raw_refused(raw(raw_world.port, [data]))


@pytest.mark.parametrize(
    ("data"), [pytest.param(d, id=f"tls-{name}") for name, d in REQUESTS if name not in ("bare-tls-byte", "tls-record-on-plain")]
)
def test_malformed_http_on_the_tls_listener(raw_world: World, data: bytes) -> None:
    raw_refused(raw(raw_world.tls_port, [data], context=_tls_context(raw_world)))


@pytest.mark.parametrize(("data"), [pytest.param(d, id=f"tls-port-{name}") for name, d in TLS_ONLY])
def test_garbage_instead_of_a_tls_handshake(raw_world: World, data: bytes) -> None:
    raw_refused(raw(raw_world.tls_port, [data]))


def test_a_tls_client_hello_on_the_plain_port(raw_world: World) -> None:
    """A TLS handshake against the plain listener fails (a 400 or a close), it does not hang."""
    answer = raw(raw_world.port, [b""], context=ssl.create_default_context(cafile=str(raw_world.ca_file)), timeout=RAW_TIMEOUT)
    raw_refused(answer)


def test_both_listeners_still_answer(raw_world: World) -> None:
    """After every malformed request above, a well-formed one is served on each listener."""
    plain = raw(raw_world.port, [b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"])
    tls = raw(raw_world.tls_port, [b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"], context=_tls_context(raw_world))
    assert (plain.kind, plain.status, tls.kind, tls.status) == ("status", 200, "status", 200), (plain, tls)
