"""The development SPIFFE Workload API server: one Unix socket per registered workload.

Owns :class:`DevWorkloadApi` (the lifecycle: sockets, gRPC servers, the maintenance thread that renews
SVIDs and rotates CAs, CA rotation on request) and :func:`serve` (run it until SIGINT/SIGTERM).
Whoever can open ``<socket_dir>/<name>.sock`` is workload ``name``: that socket is the stand-in for
SPIRE's workload attestation, so keep the directory private. SPIRE cannot run here; clients
(py-spiffe, go-spiffe, the STS) talk to this server exactly as to a SPIRE agent.

Development only: the CAs live in memory and are new on every start. Imports ``grpc`` and the other
``spire`` modules; must not import any ``sts`` web, policy, exchange or config module.
"""

from __future__ import annotations

import logging
import signal
import stat
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from types import FrameType, TracebackType

import grpc

from spire.ca import DEFAULT_CA_TTL
from spire.registry import Registry
from spire.service import WorkloadApiHandlers, create_server
from spire.state import IdentityState
from sts.spiffeid import TrustDomain

logger = logging.getLogger(__name__)

MAX_UDS_PATH_BYTES = 107
"""Linux ``sun_path`` holds 108 bytes including the terminating NUL."""
DEFAULT_MAX_STREAMS = 64
"""Open streams per socket; each holds one server thread (grpc's sync server)."""
UNARY_THREADS = 8
"""Threads per socket that streams can never take, so unary calls are never starved."""
_MAINTAIN_MAX_SLEEP = 1.0  # seconds; also bounds how late an injected clock's jump is noticed
_MAINTAIN_MIN_SLEEP = 0.05


class DevWorkloadApi:
    """The Workload API for every workload of ``registry``, on ``socket_dir/<name>.sock``.

    Use :meth:`start` and :meth:`stop`, or ``with DevWorkloadApi(...) as api:``. ``clock`` (Unix
    seconds) drives certificate and token times and renewals. All public methods are thread-safe;
    :meth:`rotate_ca` may be called from any thread (e.g. on SIGUSR1).
    """

    def __init__(
        self,
        registry: Registry,
        socket_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        max_streams_per_socket: int = DEFAULT_MAX_STREAMS,
        ca_ttl: float = DEFAULT_CA_TTL,
    ) -> None:
        self._registry = registry
        self._socket_dir = socket_dir.absolute()
        self._clock = clock
        self._max_streams = max_streams_per_socket
        self._state = IdentityState(registry, clock=clock, ca_ttl=ca_ttl)
        self._lock = threading.Lock()
        self._servers: dict[str, tuple[grpc.Server, futures.ThreadPoolExecutor]] = {}
        self._stopping = threading.Event()
        self._maintainer: threading.Thread | None = None
        for name in registry.workloads:
            self._check_socket_path(self._socket_path(name))

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def state(self) -> IdentityState:
        """The identity state served (CAs, SVIDs, version): for tests and the ``sts dev`` wiring."""
        return self._state

    def socket_for(self, name: str) -> str:
        """The socket address of workload ``name`` as clients take it: ``unix:///abs/path/name.sock``."""
        if name not in self._registry.workloads:
            raise KeyError(f"no workload named {name!r} is registered")
        return f"unix://{self._socket_path(name)}"

    def spiffe_bundle(self, trust_domain: TrustDomain | None = None) -> bytes:
        """The current bundle of ``trust_domain`` (default: the main one) in the SPIFFE bundle format."""
        return self._state.ca(trust_domain or self._registry.trust_domain).spiffe_bundle()

    def start(self) -> None:
        """Bind every socket (replacing stale ones) and start serving; returns once all accept calls."""
        with self._lock:
            if self._servers:
                raise RuntimeError("the Workload API server is already started")
            if self._state.closed:
                raise RuntimeError("a stopped Workload API server cannot be started again")
            self._socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            bound = False
            try:
                for name in self._registry.workloads:
                    self._servers[name] = self._serve_socket(name)
                bound = True
            finally:
                if not bound:  # undo a partial start: no half-served registry, no orphan sockets
                    self._stop_servers(grace=None)
            self._maintainer = threading.Thread(
                target=self._maintain, name="workload-api-maintenance", daemon=True
            )
            self._maintainer.start()
        logger.info(
            "development Workload API serving %d workloads under %s", len(self._servers), self._socket_dir
        )

    def rotate_ca(self, trust_domain: TrustDomain | None = None) -> None:
        """New CA and JWT key for ``trust_domain`` (default: the main one); every open stream gets the update.

        The old authorities stay in the bundles until every SVID they signed has expired.
        """
        self._state.rotate_ca(trust_domain or self._registry.trust_domain)

    def deregister(self, name: str) -> None:
        """Remove workload ``name``'s registration; its socket stays, answering PERMISSION_DENIED."""
        self._state.deregister(name)

    def stop(self, grace: float = 1.0) -> None:
        """End every stream (UNAVAILABLE), stop the servers within ``grace`` seconds, remove the sockets."""
        self._state.close()
        self._stopping.set()
        with self._lock:
            self._stop_servers(grace)
            maintainer, self._maintainer = self._maintainer, None
        if maintainer is not None:
            maintainer.join()

    def __enter__(self) -> DevWorkloadApi:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # Internals.

    def _socket_path(self, name: str) -> Path:
        return self._socket_dir / f"{name}.sock"

    @staticmethod
    def _check_socket_path(path: Path) -> None:
        if len(str(path).encode()) > MAX_UDS_PATH_BYTES:
            raise ValueError(
                f"socket path {path} is longer than the {MAX_UDS_PATH_BYTES} bytes a Unix socket "
                "address holds; use a shorter socket directory"
            )

    def _serve_socket(self, name: str) -> tuple[grpc.Server, futures.ThreadPoolExecutor]:
        path = self._socket_path(name)
        _remove_stale_socket(path)
        executor = futures.ThreadPoolExecutor(
            max_workers=self._max_streams + UNARY_THREADS, thread_name_prefix=f"workload-api-{name}"
        )
        handlers = WorkloadApiHandlers(self._state, name, max_streams=self._max_streams)
        server = create_server(handlers, executor)
        started = False
        try:
            server.add_insecure_port(f"unix:{path}")
            server.start()
            started = True
        finally:
            if not started:
                server.stop(None)
                executor.shutdown(wait=False)
        logger.info("workload %s (%s) on unix://%s", name, self._registry.workloads[name].spiffe_id, path)
        return server, executor

    def _stop_servers(self, grace: float | None) -> None:
        """Stop all servers together (so the grace periods overlap), then free their threads and sockets."""
        servers, self._servers = self._servers, {}
        done = [server.stop(grace) for server, _ in servers.values()]
        for event in done:
            event.wait()
        for name, (_, executor) in servers.items():
            executor.shutdown(wait=True)
            self._socket_path(name).unlink(missing_ok=True)

    def _maintain(self) -> None:
        """Renew SVIDs and rotate CAs when due, until stopped; a failure is logged and retried."""
        while not self._stopping.is_set():
            try:
                due = self._state.maintain()
            except Exception:  # top of a thread: log it and keep the server alive
                logger.exception("Workload API maintenance failed; retrying")
                due = self._clock() + _MAINTAIN_MAX_SLEEP
            sleep = min(max(due - self._clock(), _MAINTAIN_MIN_SLEEP), _MAINTAIN_MAX_SLEEP)
            self._stopping.wait(sleep)


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket left by an earlier run; refuse to touch anything that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
    path.unlink()
    logger.info("removed stale socket %s", path)


def serve(config_path: Path, state_dir: Path) -> None:
    """Run the server for the registration in ``config_path`` until SIGINT or SIGTERM; SIGUSR1 rotates the CA.

    Sockets go to ``state_dir/sockets/<name>.sock``. Installs signal handlers, so call it from the main
    thread; the previous handlers are restored on return.
    """
    registry = Registry.load(config_path)
    api = DevWorkloadApi(registry, state_dir / "sockets")
    wake = threading.Event()
    requests: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        requests.append(signum)
        wake.set()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    previous = {signum: signal.signal(signum, on_signal) for signum in handled}
    try:
        api.start()
        while True:
            wake.wait(1.0)  # a timeout keeps the main thread responsive to signals on every platform
            wake.clear()
            while requests:
                signum = requests.pop(0)
                if signum == signal.SIGUSR1:
                    api.rotate_ca()
                else:
                    logger.info("received %s: stopping", signal.Signals(signum).name)
                    return
    finally:
        api.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
