"""The server under other conditions than the main sweep: the Redis store, slow clients, a long soak.

Each scenario starts its own ``sts serve`` (same keys directory shape, policies, catalog and SVID pool as
the main run: the config names the main run's issuer, so the pool's SVIDs are valid here too) and
reports figures of the same kind as the sweep, each answer checked by ``bench/load.lua``.

- ``redis``: the store is a real ``redis-server`` (Debian's package, AOF on, on loopback), as the
  replica setup runs it; N = 64.
- ``slow_clients``: 1,000 connections held open by an attacker that sends a request's first bytes and
  then one byte every few seconds (slowloris), re-opened whenever the server closes them, while the
  ordinary load runs at N = 64; the figure is the valid exchanges' p99.
- ``soak``: N = 64 for a long time (10 minutes by default): RSS of each worker sampled every 30 s,
  store size, every answer audited, errors.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load, ours
from tests.authority import TestAuthority
from tests.redis_server import RedisServer

SLOW_CONNECTIONS = 1000
SLOW_BYTE_EVERY_S = 2.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """What every scenario needs from the main run."""

    scratch: Path
    authority: TestAuthority
    issuer: str
    requests_file: Path
    seconds: float
    repeats: int
    log: Callable[[str], None]


@dataclass(frozen=True, slots=True)
class _Running:
    url: str  # the token endpoint
    port: int
    pid: int
    directory: Path
    warm_up_answers: int


@contextmanager
def _server(s: Scenario, name: str, *, store: str | None = None) -> Iterator[_Running]:
    """``sts serve`` on a port of its own, warmed up for 2 s at N = 16."""
    directory = s.scratch / name
    directory.mkdir()
    port = ours.free_port()
    config = ours.write_config(directory, port, s.authority, issuer=s.issuer, store=store)
    url = f"http://{ours.HOST}:{port}"
    with ours.running(
        ours.serve_command(config), ready_url=f"{url}/readyz", log=directory / "server.log"
    ) as p:
        warm = load.run_wrk(f"{url}/token", s.requests_file, connections=16, seconds=2, server_pid=p.pid)
        yield _Running(f"{url}/token", port, p.pid, directory, warm.requests)


def _sweep_64(s: Scenario, server: _Running, label: str, *, pause_s: float = 1.0) -> load.Summary:
    """The main run's runs and seconds, at N = 64 only, against this scenario's server."""
    return load.sweep(
        server.url,
        s.requests_file,
        connections=[64],
        seconds=s.seconds,
        repeats=s.repeats,
        server_pid=server.pid,
        log=s.log,
        label=label,
        pause_s=pause_s,
    )[64]


def redis_store(s: Scenario) -> dict[str, Any]:
    """N = 64 with the store in a real redis-server (AOF, everysec): what the replica setup runs."""
    with RedisServer(s.scratch / "redis-data") as redis:
        s.log(f"scenario redis: sts serve with store {redis.url} (redis-server, AOF)")
        with _server(s, "redis", store=redis.url) as server:
            summary = _sweep_64(s, server, "redis ")
    return {"store": "redis-server (Debian), appendonly yes", **summary.to_json()}


@dataclass
class _Slowloris:
    """Holds ``target`` connections open to ``port``, each dribbling an unfinished request."""

    port: int
    target: int
    selector: selectors.DefaultSelector = field(default_factory=selectors.DefaultSelector)
    stop: threading.Event = field(default_factory=threading.Event)
    opened: int = 0
    closed_by_server: int = 0
    held_samples: list[int] = field(default_factory=list)

    def _open(self) -> None:
        sock = socket.create_connection((ours.HOST, self.port), timeout=5)
        sock.setblocking(False)
        sock.send(
            b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        )
        self.selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def run(self) -> None:
        next_dribble = time.monotonic() + SLOW_BYTE_EVERY_S
        while not self.stop.is_set():
            while len(self.selector.get_map()) < self.target and not self.stop.is_set():
                try:
                    self._open()
                except OSError:
                    time.sleep(0.05)
                    break
            for key, _ in self.selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:  # the server gave up on it: an attacker opens another
                    self.selector.unregister(sock)
                    sock.close()
                    self.closed_by_server += 1
            if time.monotonic() >= next_dribble:
                next_dribble = time.monotonic() + SLOW_BYTE_EVERY_S
                self.held_samples.append(len(self.selector.get_map()))
                for key in list(self.selector.get_map().values()):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    with suppress(OSError):
                        sock.send(b"X")
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


def slow_clients(s: Scenario) -> dict[str, Any]:
    """The ordinary load at N = 64 while 1,000 slow connections are held open against the same server."""
    with _server(s, "slow") as server:
        attacker = _Slowloris(server.port, SLOW_CONNECTIONS)
        thread = threading.Thread(target=attacker.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while len(attacker.selector.get_map()) < SLOW_CONNECTIONS and time.monotonic() < deadline:
                time.sleep(0.1)
            open_now = len(attacker.selector.get_map())
            s.log(f"scenario slow clients: {open_now} slow connections open, load at N=64")
            summary = _sweep_64(s, server, "slow  ", pause_s=0.2)
        finally:
            attacker.stop.set()
            thread.join(timeout=30)
    held = attacker.held_samples
    return {
        "slow_connections": SLOW_CONNECTIONS,
        "slow_byte_every_s": SLOW_BYTE_EVERY_S,
        "held_min": min(held) if held else 0,
        "held_median": sorted(held)[len(held) // 2] if held else 0,
        "opened": attacker.opened,
        "closed_by_server": attacker.closed_by_server,
        **summary.to_json(),
    }


def soak(s: Scenario, *, minutes: float) -> dict[str, Any]:
    """N = 64 for ``minutes``: worker RSS every 30 s, store size, audit lines against answers, errors."""
    with _server(s, "soak") as server:
        url, pid, directory = server.url, server.pid, server.directory
        s.log(f"scenario soak: N=64 for {minutes:g} minutes, RSS sampled every 30 s")
        runs: list[load.LoadResult] = []
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        while time.monotonic() - started < minutes * 60:
            run = load.run_wrk(url, s.requests_file, connections=64, seconds=30, server_pid=pid)
            runs.append(run)
            samples.append(
                {
                    "t_s": round(time.monotonic() - started),
                    "rss_mb_per_worker": [round(x, 1) for x in ours.worker_rss_mb(pid)],
                    "store_bytes": sum(f.stat().st_size for f in directory.glob("sts.db*")),
                    "exchanges_per_s": round(run.exchanges_per_s, 1),
                    "p99_ms": run.p99_ms,
                    "errors": run.errors,
                }
            )
            s.log(
                f"  soak t={samples[-1]['t_s']:>4} s: {run.exchanges_per_s:6.0f}/s p99 {run.p99_ms:6.2f} ms"
                f" errors {run.errors} RSS {samples[-1]['rss_mb_per_worker']} MB"
                f" store {samples[-1]['store_bytes'] / 1e6:.1f} MB"
            )
        served = sum(r.requests for r in runs) + server.warm_up_answers
    audit_lines = _lines(directory / "sts-audit.jsonl")
    warm = samples[len(samples) // 5] if samples else None  # after the first fifth: warmed up
    drift = None
    if warm is not None and samples:
        drift = max(
            abs(last - first) / first
            for first, last in zip(warm["rss_mb_per_worker"], samples[-1]["rss_mb_per_worker"], strict=False)
            if first
        )
    # Answers after wrk stopped counting (at most N per run) are audited too.
    in_flight = 16 + 64 * len(runs)
    return {
        "minutes": minutes,
        "samples": samples,
        "requests": served,
        "errors": sum(r.errors for r in runs),
        "rss_drift_after_warm_up": None if drift is None else round(drift, 4),
        "audit_lines": audit_lines,
        "audit_lines_minus_answers": audit_lines - served,
        "audit_complete": 0 <= audit_lines - served <= in_flight,
        "store_bytes_max": max((x["store_bytes"] for x in samples), default=0),
    }


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0
