"""Connections spread over the workers: one listening socket per worker (``sts.web.listeners``),
with ``server.reuse_port``; and without it (the default), one shared socket no other process joins.

Real ``sts serve`` processes (plain and TLS, 2 workers) and real connections opened all at once, as a
client pool or a load balancer opens them. Which worker holds each connection is read from the
kernel (``/proc/net/tcp``: the server side's socket inode, then which process has that inode open),
not from anything the server says. With one shared socket the first worker to wake took them all
(measured: 3 of 12 starts of 64 connections), which these tests refuse.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from sts.web.listeners import SPREADS_CONNECTIONS, reserve, spreads_connections
from tests.authority import TestAuthority
from tests.conftest import ISSUER_HOST, RunningServer, free_port, running_server, write_config
from tests.test_mtls_http import with_tls_listener

pytestmark = pytest.mark.skipif(not SPREADS_CONNECTIONS, reason="the kernel spreads connections on Linux only")

CONNECTIONS = 64
ROUNDS = 3
AT_LEAST = 10  # of 64 per worker: a fair hash goes below it with probability ~1e-8


def two_workers(
    directory: Path, example: TestAuthority, partner: TestAuthority, *, tls: bool, reuse_port: bool = True
) -> Iterator[tuple[RunningServer, ssl.SSLContext | None]]:
    port = free_port()
    config = write_config(directory, port, example, partner)
    section = f"server: {{workers: 2, reuse_port: {'true' if reuse_port else 'false'}}}"
    config.write_text(config.read_text().replace("server: {workers: 1}", section))
    if not tls:
        with running_server(config, port) as server:
            yield server, None
        return
    ca = with_tls_listener(config, port, example)
    with running_server(config, port, scheme="https", ca=ca) as server:
        yield server, ssl.create_default_context(cafile=str(ca))


def _two_workers_for(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    example: TestAuthority,
    partner: TestAuthority,
    *,
    reuse_port: bool,
) -> Iterator[tuple[RunningServer, ssl.SSLContext | None]]:
    """The module's servers: ``request.param`` is the listener (plain or tls)."""
    name = f"listeners-{request.param}-{'reuse' if reuse_port else 'shared'}"
    yield from two_workers(
        tmp_path_factory.mktemp(name), example, partner, tls=request.param == "tls", reuse_port=reuse_port
    )


@pytest.fixture(scope="module", params=["plain", "tls"])
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    example_org: TestAuthority,
    partner_test: TestAuthority,
) -> Iterator[tuple[RunningServer, ssl.SSLContext | None]]:
    """Two workers with ``server.reuse_port``: a socket each."""
    yield from _two_workers_for(request, tmp_path_factory, example_org, partner_test, reuse_port=True)


@pytest.fixture(scope="module", params=["plain", "tls"])
def served_by_default(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    example_org: TestAuthority,
    partner_test: TestAuthority,
) -> Iterator[tuple[RunningServer, ssl.SSLContext | None]]:
    """Two workers with the default settings: one shared socket."""
    yield from _two_workers_for(request, tmp_path_factory, example_org, partner_test, reuse_port=False)


TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


def socket_inodes(port: int, state: str = TCP_ESTABLISHED) -> set[str]:
    """The sockets on local ``port`` in ``state``, as ``/proc/<pid>/fd`` links name them (kernel tables)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local_port, socket_state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
                if local_port == port and socket_state == state:
                    inodes.add(f"socket:[{inode}]")
    return inodes


def server_side_holders(port: int, state: str = TCP_ESTABLISHED) -> Counter[int]:
    """How many sockets on local ``port`` in ``state`` each process holds (from the kernel's tables)."""
    inodes = socket_inodes(port, state)
    holders: Counter[int] = Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    holders[int(pid)] += 1
            except OSError:
                continue
    return holders


def both_workers_listening(port: int) -> None:
    """Wait until two processes listen on ``port``: the server is ready once one worker is, and under
    load the second may still be building its services (it listens only when ready)."""
    deadline = time.monotonic() + 60
    while len(server_side_holders(port, TCP_LISTEN)) < 2:
        assert time.monotonic() < deadline, f"one worker never listened: {server_side_holders(port, TCP_LISTEN)}"
        time.sleep(0.05)


def open_at_once(port: int, context: ssl.SSLContext | None, stack: ExitStack) -> None:
    """``CONNECTIONS`` connections opened back to back, then one keep-alive request answered on each."""
    raw = [stack.enter_context(socket.create_connection((ISSUER_HOST, port), timeout=10)) for _ in range(CONNECTIONS)]
    for connection in raw:
        stream = context.wrap_socket(connection, server_hostname="localhost") if context else connection
        stream.sendall(b"GET /healthz HTTP/1.1\r\nHost: sts\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = stream.recv(4096)
            assert chunk, "the server closed a connection it had accepted"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        if stream is not connection:
            stack.callback(stream.close)


def test_connections_opened_at_once_are_spread_over_the_workers(
    served: tuple[RunningServer, ssl.SSLContext | None],
) -> None:
    server, context = served
    port = int(server.url.rsplit(":", 1)[1])
    both_workers_listening(port)
    for _ in range(ROUNDS):
        with ExitStack() as stack:
            open_at_once(port, context, stack)
            holders = server_side_holders(port)
            assert sum(holders.values()) == CONNECTIONS, holders
            assert len(holders) == 2, f"one worker holds every connection: {holders}"
            assert min(holders.values()) >= AT_LEAST, holders
            assert server.process.pid not in holders, "the supervisor's reservation never takes a connection"


def test_a_second_server_on_the_port_is_refused(served: tuple[RunningServer, ssl.SSLContext | None]) -> None:
    """The workers' sockets carry SO_REUSEPORT: the start-up probe, which does not, still finds the port taken."""
    server, _ = served
    result = subprocess.run(
        [sys.executable, "-m", "sts.cli", "serve", "--config", str(server.directory / "sts.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"listen.port: cannot listen on 127.0.0.1:{server.url.rsplit(':', 1)[1]}" in result.stderr


def test_by_default_a_process_of_the_same_user_cannot_join_the_port(
    served_by_default: tuple[RunningServer, ssl.SSLContext | None],
) -> None:
    """Without ``server.reuse_port`` the workers share one socket: a process of the server's own user
    (this test's) binding the address with SO_REUSEPORT, which with a group would join it and could
    steer every connection to itself, is refused, with or without SO_REUSEADDR."""
    server, context = served_by_default
    port = int(server.url.rsplit(":", 1)[1])
    both_workers_listening(port)
    with ExitStack() as stack:
        open_at_once(port, context, stack)  # the workers serve
    holders = server_side_holders(port, TCP_LISTEN)
    assert server.process.pid in holders and len(holders) == 3, holders  # the parent and two workers
    assert len(socket_inodes(port, TCP_LISTEN)) == 1  # ... all holding one socket
    for options in ((socket.SO_REUSEPORT,), (socket.SO_REUSEADDR, socket.SO_REUSEPORT)):
        with socket.socket() as joiner:
            for option in options:
                joiner.setsockopt(socket.SOL_SOCKET, option, 1)
            with pytest.raises(OSError, match="in use") as refused:
                joiner.bind((ISSUER_HOST, port))
            assert refused.value.errno == errno.EADDRINUSE


def test_with_reuse_port_only_two_workers_or_more_get_sockets_of_their_own() -> None:
    assert spreads_connections(True, 2)
    assert not spreads_connections(True, 1)  # one worker: nothing to spread, no group to join
    assert not spreads_connections(False, 4)  # the default


def test_an_ipv6_reservation_is_ipv6_only_when_asked() -> None:
    """The TLS listener binds ``::`` IPv6-only, as before it had a socket per worker; the plain one
    dual-stack, as uvicorn binds it. Every socket of the group, pickled ones too, binds alike."""
    for v6only in (True, False):
        with reserve("::", 0, v6only=v6only) as reservation:
            port = reservation.getsockname()[1]
            worker = pickle.loads(pickle.dumps(reservation))  # noqa: S301 (our own object, this process)
            with worker:
                assert worker.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == int(v6only)
                worker.listen(8)
                with socket.create_connection(("::1", port), timeout=5):
                    pass
                if v6only:
                    with pytest.raises(ConnectionRefusedError):
                        socket.create_connection(("127.0.0.1", port), timeout=5).close()
                else:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()


# The reservation and the workers' sockets, without a server


def test_the_reservation_holds_the_port_and_never_takes_a_connection() -> None:
    with reserve(ISSUER_HOST, 0) as reservation:
        port = reservation.getsockname()[1]
        # No SO_REUSEADDR anywhere in the group: with it, another user's socket with both options could
        # bind the address while no worker listens (the root-only test below shows the refusal).
        with reservation.worker_socket() as worker:
            for sock in (reservation, worker):
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        with pytest.raises(OSError, match="in use") as taken, socket.socket() as plain:
            plain.bind((ISSUER_HOST, port))
        assert taken.value.errno == errno.EADDRINUSE
        with pytest.raises(ConnectionRefusedError):  # bound, never listening: no connection reaches it
            socket.create_connection((ISSUER_HOST, port), timeout=5).close()


def test_a_pickled_reservation_becomes_a_workers_own_socket_in_the_group() -> None:
    """What uvicorn's supervisor hands a spawned worker: unpickled, a new socket on the same address."""
    with reserve(ISSUER_HOST, 0) as reservation:
        address = reservation.getsockname()
        first = pickle.loads(pickle.dumps(reservation))  # noqa: S301 (our own object, this process)
        second = reservation.worker_socket()
        with first, second:
            assert type(first) is socket.socket
            assert first.getsockname() == second.getsockname() == address
            assert first.fileno() != reservation.fileno()
            first.listen(CONNECTIONS)
            second.listen(CONNECTIONS)
            clients = [socket.create_connection(address, timeout=5) for _ in range(CONNECTIONS)]
            try:
                accepted = [drain(first), drain(second)]
            finally:
                for client in clients:
                    client.close()
        assert sum(accepted) == CONNECTIONS
        assert min(accepted) >= AT_LEAST, accepted


def drain(listener: socket.socket) -> int:
    """Accept everything waiting on ``listener``; how many."""
    listener.setblocking(False)
    count = 0
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return count
        connection.close()
        count += 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_user_cannot_join_the_group() -> None:
    """``socket(7)``: a socket joins a SO_REUSEPORT group only with the group's effective user; and
    with no SO_REUSEADDR in the group, not by that option either while no worker listens yet."""
    with reserve(ISSUER_HOST, 0) as reservation:
        address = reservation.getsockname()
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover (the child reports through the pipe)
            outcome = b"?"
            try:
                os.setgid(65534)
                os.setuid(65534)
                outcomes = []
                for options in ((), (socket.SO_REUSEPORT,), (socket.SO_REUSEADDR, socket.SO_REUSEPORT)):
                    try:
                        with socket.socket(reservation.family) as attacker:
                            for option in options:
                                attacker.setsockopt(socket.SOL_SOCKET, option, 1)
                            attacker.bind(address)
                            attacker.listen()
                        outcomes.append("joined")
                    except OSError as e:
                        outcomes.append(str(e.errno))
                outcome = ",".join(outcomes).encode()
            finally:
                os.write(write, outcome)
                os._exit(0)
        os.close(write)
        outcome = os.read(read, 64)
        os.close(read)
        os.waitpid(child, 0)
    assert outcome == ",".join([str(errno.EADDRINUSE)] * 3).encode(), outcome
