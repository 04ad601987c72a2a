"""The listening sockets of a server with several workers: one per worker on the same address, when
``server.reuse_port`` asks for it (see below why it is off by default).

Why not one socket shared by every worker: whichever worker wakes first accepts every connection
waiting (libuv, under uvloop, accepts until ``EAGAIN``; asyncio's own loop up to the backlog), and a
keep-alive connection stays where it was accepted. A client pool that opens its connections at once
(wrk, an HTTP client's pool, a load balancer's upstream connections) then lands on one worker, which
serves alone on one core while the others idle: measured, 3 of 12 starts of 64 connections against
two workers put all 64 on one, and 5 more split them 52/12 or worse.

With ``SO_REUSEPORT`` (Linux 3.9+, ``socket(7)``) each worker binds its own socket to the address and
the kernel hands each new connection to one of the *listening* sockets of the group by a hash of its
addresses and ports, whatever worker happens to be awake. A worker joins the group when it calls
``listen``, which uvicorn and asyncio do only once the application has started, so a worker still
starting (or restarting) is given no connection. The parent keeps :class:`PortReservation`: bound
with ``SO_REUSEPORT``, never listening, so it holds the address for the life of ``sts serve``
(another program binding it without ``SO_REUSEPORT`` is refused) and is never given a connection.

What does not change: :func:`sts.netcheck.check_port_free` first binds without ``SO_REUSEPORT``,
so a second ``sts serve`` on a port in use still refuses to start rather than sharing it; and
``socket(7)`` admits a socket to the group only when its process has the group's effective user, so
another user cannot take a share of the connections. What does:

- **A process of the same user, in the same network namespace, can join the group** and, with a
  ``SO_ATTACH_REUSEPORT_CBPF`` program of its own, take every new connection (measured: 50 of 50),
  with the JWT-SVIDs they carry. Filesystem isolation does not stop it: a Kubernetes sidecar shares
  the pod's network namespace and often its user (0, or an image's default such as 65532). Nothing
  closes a group once it exists. So this is **opt-in** (``server.reuse_port``, off by default):
  turn it on only where the server's user is its own in its network namespace (the Helm chart's
  pod, with its dedicated ``runAsUser``, when no other container of the pod runs as that user).
  Off, the workers share one listening socket and a same-user bind is refused (``EADDRINUSE``).
- A worker that dies with connections still in its own accept queue resets them (in a shared queue
  another worker would have taken them), unless ``net.ipv4.tcp_migrate_req`` is 1 (Linux 5.14+),
  which hands them to another listener of the group.

An IPv6 address keeps each listener's earlier behaviour: the TLS listener is IPv6-only (as
``socket.create_server`` binds it), the plain one dual-stack (as uvicorn binds it).

Other systems: BSD and macOS accept ``SO_REUSEPORT`` but do not spread connections over the
sockets, so there the workers share one listening socket as before.
"""

from __future__ import annotations

import socket
import sys
from typing import Any, SupportsIndex

SPREADS_CONNECTIONS = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


class PortReservation(socket.socket):
    """The parent's hold on ``host:port``: bound with ``SO_REUSEPORT``, never listening.

    Each worker gets its own socket on the same address from :meth:`worker_socket`, or by receiving
    the reservation in a spawned process (uvicorn's supervisor pickles the sockets it hands to its
    workers): unpickled, it *is* that worker's own socket, bound and not yet listening.
    """

    v6only = False  # set by reserve: every socket of the group binds IPv6 the same way

    def worker_socket(self) -> socket.socket:
        """A new socket bound to the reserved address with ``SO_REUSEPORT``; the caller listens on it."""
        return bound_socket(self.family, self.getsockname(), self.v6only)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return (bound_socket, (self.family, self.getsockname(), self.v6only))


def spreads_connections(reuse_port: bool, workers: int) -> bool:
    """Whether the workers get one socket each: asked for (``server.reuse_port``), more than one
    worker, and a system whose kernel spreads connections over the sockets of a group."""
    return reuse_port and workers > 1 and SPREADS_CONNECTIONS


def reserve(host: str, port: int, *, v6only: bool = False) -> PortReservation:
    """Bind ``host:port`` (port 0: one the kernel picks, then the same for every worker) for the workers.

    ``v6only``: an IPv6 address accepts IPv6 only (``IPV6_V6ONLY``); otherwise the system's default.
    Raises OSError when the address cannot be bound (in use by a socket without ``SO_REUSEPORT``,
    or by another user's).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reservation = PortReservation(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    reservation.v6only = v6only
    try:
        _reuse(reservation, v6only=v6only)
        reservation.bind((host, port))
    except BaseException:
        reservation.close()
        raise
    return reservation


def bound_socket(family: int, address: tuple[Any, ...], v6only: bool = False) -> socket.socket:
    """One worker's socket: bound to ``address`` in the reservation's group, not listening yet."""
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        _reuse(sock, v6only=v6only)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _reuse(sock: socket.socket, *, v6only: bool) -> None:
    """``SO_REUSEPORT`` only. Connections in TIME_WAIT do not hold the address against it, and
    without ``SO_REUSEADDR`` on every socket of the group, another user's socket with both options
    cannot bind the address while no worker listens (measured: with it, one could)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if v6only and sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
