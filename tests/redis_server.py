"""Real ``redis-server`` and ``redis-sentinel`` processes for tests: loopback, free ports, temp dirs.

``RedisServer`` is one Redis. By default it runs with ``appendonly yes`` (so the STS's start-up check of
its durability passes) but every ``start()`` begins with an empty data directory: a Redis pod whose
volume did not survive. ``keep_data=True`` restarts it from its AOF, as a Redis with a persistent
volume; ``appendonly=False`` runs it without any persistence. It can be stopped (SIGKILL: a crash, as
far as clients can tell) and started again on the same port, which is how tests take Redis away from a
live store and give it back. ``replica_of`` makes it a replica; ``extra`` adds arguments (TLS, ACL).

``Sentinels`` is three ``redis-sentinel`` processes (Debian's ``redis-sentinel`` package) watching one
primary, with a quick failure detection (1 s) so a failover takes a few seconds. ``SentinelTopology``
is the recommended production shape in small: primary + replica (both AOF) + three Sentinels.

Nothing is read from or written to the system Redis.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis

HOST = "127.0.0.1"
MASTER = "mymaster"


def redis_server_binary() -> str:
    """``redis-server`` from PATH (Debian puts it in /usr/bin); .ci/run installs it when missing."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError("redis-server is not installed: apt-get install -y redis-server (see .ci/run)")
    return found


def redis_sentinel_binary() -> str:
    """``redis-sentinel`` (Debian's redis-sentinel package; ``make system-deps`` installs it)."""
    found = shutil.which("redis-sentinel") or shutil.which("redis-sentinel", path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(
            "redis-sentinel is not installed: apt-get install -y --no-install-recommends redis-sentinel "
            "(make system-deps)"
        )
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _answers_ping(port: int, *, password: str | None = None) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as conn:
            if password is not None:
                conn.sendall(f"AUTH {password}\r\n".encode())
                conn.recv(64)
            conn.sendall(b"PING\r\n")
            answer = conn.recv(64)
            return answer.startswith((b"+PONG", b"-NOAUTH", b"-NOPERM"))
    except OSError:
        return False


class _Process:
    """One server process with a log file in its directory."""

    def __init__(self, directory: Path, port: int | None) -> None:
        self.directory = directory
        self.port = port or _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self.ping_password: str | None = None
        self.tls = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Before each start."""

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and return once it answers PING."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._prepare()
        log = (self.directory / "server.log").open("ab")
        self._process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = (self.directory / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self._command()[0]} exited with {self._process.returncode}:\n{tail}")
            if self._ready():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self._command()[0]} on port {self.port} did not answer within {timeout} s")

    def _ready(self) -> bool:
        if self.tls:  # a TLS port does not answer plain PING: a completed TCP connect is enough
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
            except OSError:
                return False
            return True
        return _answers_ping(self.port, password=self.ping_password)

    def stop(self) -> None:
        """Kill the process at once (a crash, as far as clients can tell) and wait for it to be gone."""
        if self._process is None:
            return
        self._process.kill()
        self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisServer(_Process):
    """One ``redis-server`` process; ``url`` stays the same across stop() and start()."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        appendonly: bool = True,
        keep_data: bool = False,
        replica_of: RedisServer | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        super().__init__(directory, port)
        self.appendonly = appendonly
        self.keep_data = keep_data
        self.replica_of = replica_of
        self.extra = list(extra)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain client of this server (tests poke at it directly)."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    def _prepare(self) -> None:
        if not self.keep_data:
            for name in ("appendonlydir", "dump.rdb"):
                path = self.directory / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()

    def _command(self) -> list[str]:
        command = [
            redis_server_binary(),
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--repl-diskless-sync-delay", "0",  # a replica syncs at once (the default waits 5 s)
        ]  # fmt: skip
        if self.replica_of is not None:
            command += ["--replicaof", HOST, str(self.replica_of.port)]
        return command + self.extra

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Return once this replica has synced, its primary lists it (``ROLE``) and it confirms a WAIT."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = self.client().info("replication")
                listed = self.replica_of is not None and any(
                    int(port) == self.port for _, port, _ in self.replica_of.client().role()[2]
                )
                synced = info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")
                # The first WAIT after a sync can take about a second: return once one is confirmed.
                if listed and synced and self.replica_of is not None and self.replica_of.client().wait(1, 200):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"replica on port {self.port} did not sync within {timeout} s")

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SentinelServer(_Process):
    """One ``redis-sentinel`` watching ``primary`` (its configuration file is rewritten by Sentinel)."""

    def __init__(self, directory: Path, primary: RedisServer, *, quorum: int = 2) -> None:
        super().__init__(directory, None)
        self.primary, self.quorum = primary, quorum

    def _prepare(self) -> None:
        if not (self.directory / "sentinel.conf").exists():
            (self.directory / "sentinel.conf").write_text(
                f"port {self.port}\n"
                f"bind {HOST}\n"
                "protected-mode no\n"
                f"dir {self.directory}\n"
                f"sentinel monitor {MASTER} {HOST} {self.primary.port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )

    def _command(self) -> list[str]:
        return [redis_sentinel_binary(), str(self.directory / "sentinel.conf"), "--loglevel", "warning"]

    def master(self) -> tuple[str, int] | None:
        """What this Sentinel names as the primary now."""
        try:
            answer = redis.Redis(host=HOST, port=self.port, socket_timeout=2).execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "get-master-addr-by-name", MASTER
            )
        except redis.RedisError:
            return None
        if not answer:
            return None
        host, port = answer
        return (host.decode() if isinstance(host, bytes) else str(host), int(port))


class SentinelTopology:
    """Primary + replica (both ``appendonly yes``, data kept across restarts) + three Sentinels."""

    def __init__(self, directory: Path) -> None:
        self.primary = RedisServer(directory / "primary", keep_data=True)
        self.replica = RedisServer(directory / "replica", keep_data=True, replica_of=self.primary)
        self.sentinels = [SentinelServer(directory / f"sentinel-{i}", self.primary) for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        self.replica.wait_replicated()
        for sentinel in self.sentinels:
            sentinel.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # every Sentinel knows the replica and the other Sentinels
            try:
                ready = True
                for sentinel in self.sentinels:
                    state = redis.Redis(host=HOST, port=sentinel.port, socket_timeout=2).sentinel_master(MASTER)
                    ready &= int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= 2
                if ready:
                    return
            except (redis.RedisError, KeyError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError("the Sentinels did not discover the replica and each other within 15 s")

    def current_primary(self) -> RedisServer:
        named = {s.master() for s in self.sentinels if s.running} - {None}
        ports = {address[1] for address in named if address is not None}
        for server in (self.primary, self.replica):
            if server.port in ports:
                return server
        raise RuntimeError(f"the Sentinels name no known primary: {named}")

    def wait_failover(self, away_from: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Return the new primary once a majority of the Sentinels names another server than ``away_from``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            named = [s.master() for s in self.sentinels if s.running]
            moved = [a for a in named if a is not None and a[1] != away_from.port]
            if len(moved) >= 2:
                promoted = self.replica if moved[0][1] == self.replica.port else self.primary
                try:
                    if promoted.client().role()[0] in (b"master", "master"):
                        return promoted
                except redis.RedisError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"no failover away from port {away_from.port} within {timeout} s")

    def stop(self) -> None:
        for process in (*self.sentinels, self.replica, self.primary):
            process.stop()

    def __enter__(self) -> SentinelTopology:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
