"""Real SPIRE (v1.13.3) on loopback: ``spire-server`` and ``spire-agent`` as child processes.

Used by ``sts dev --spire`` (:func:`start_dev_spire`) and by the real-SPIRE test harness
(``tests/spire_real/harness.py``), so that the development environment and the tests run SPIRE the
same way: SQLite datastore, memory key manager, ``join_token`` node attestation, agents with the
``unix`` workload attestor, 1 s entry-cache reload and agent sync (entries reach an agent in about
a second instead of ten). Every process runs in a process group of its own, writes its log into the
state directory, and is remembered in :data:`PROCESSES` so that whatever is still running when the
interpreter exits is killed (no stray SPIRE processes after an unexpected error). Every wait has a
deadline (:func:`wait_for`).

Nothing here builds SPIRE: the binaries come from ``STS_SPIRE_BIN`` or the cache ``make spire``
(``spire/real/build.sh``) fills, and :func:`spire_bin_dir` says how to get them when absent.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sts.errors import ConfigError

SPIRE_VERSION = "v1.13.3"  # the pin of spire/real/go.mod (tests/spire_real checks they agree)
BUILD_COMMAND = "make spire"
CLI_TIMEOUT_SECONDS = 30.0
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
SERVED_TIMEOUT_SECONDS = 30.0
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; SPIRE wants room for its own suffixes

T = TypeVar("T")


class SpireError(Exception):
    """SPIRE could not be brought up or driven; the message says why (and includes log tails)."""


# --- waiting ------------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], T | None], *, timeout: float, interval: float = 0.1) -> T:
    """The first truthy value of ``check()`` within ``timeout`` seconds, else :class:`SpireError`
    naming ``what`` and the last thing ``check`` answered or raised."""
    deadline = time.monotonic() + timeout
    last = "never checked"
    while True:
        try:
            value = check()
        except Exception as e:  # reported below, with the deadline
            last = f"{type(e).__name__}: {e}"
        else:
            if value:
                return value
            last = repr(value)
        if time.monotonic() >= deadline:
            raise SpireError(f"{what}: not within {timeout:.0f}s (last: {last[:2000]})")
        time.sleep(interval)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (SPIRE's server port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- binaries -----------------------------------------------------------------------------------


def default_bin_dir() -> Path:
    """Where ``spire/real/build.sh`` puts the binaries (same cache rules as the script)."""
    cache = os.environ.get("STS_TOOL_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sts-tools"
    )
    return Path(cache) / f"spire-{SPIRE_VERSION}" / "bin"


def spire_bin_dir() -> Path:
    """The directory of ``spire-server`` and ``spire-agent``: ``STS_SPIRE_BIN``, else the build cache.

    Raises :class:`ConfigError` (``sts`` exits 2) naming the build command when they are missing:
    building SPIRE takes minutes, so it is never done implicitly on start-up.
    """
    configured = os.environ.get("STS_SPIRE_BIN")
    directory = Path(configured) if configured else default_bin_dir()
    source = f"STS_SPIRE_BIN={configured}" if configured else "the build cache"
    missing = [b for b in ("spire-server", "spire-agent") if not os.access(directory / b, os.X_OK)]
    if missing:
        raise ConfigError(
            f"no executable {' and '.join(missing)} in {directory} ({source}); build SPIRE "
            f"{SPIRE_VERSION} with `{BUILD_COMMAND}` (or spire/real/build.sh, which prints its bin "
            "directory), or point STS_SPIRE_BIN at a directory holding both"
        )
    return directory


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Process:
    """One long-running child in a process group of its own, its output in ``log``."""

    name: str
    argv: list[str]
    log: Path
    env: Mapping[str, str] | None = None
    gid: int | None = None  # run with this primary gid and no supplementary groups
    popen: subprocess.Popen[Any] | None = None
    cwd: Path | None = None

    def start(self) -> None:
        if self.alive():
            raise SpireError(f"{self.name} is already running")
        with self.log.open("ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(  # noqa: S603 (our own binaries and interpreter)
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches our parent only: it stops us
                cwd=self.cwd,
                env=dict(self.env) if self.env is not None else None,
                group=self.gid,
                extra_groups=[] if self.gid is not None else None,
            )
        PROCESSES.append(self)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise SpireError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM to the group, SIGKILL after ``timeout``; always reaps."""
        self._signal_group(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL, STOP_TIMEOUT_SECONDS)

    def _signal_group(self, sig: signal.Signals, timeout: float) -> None:
        popen = self.popen
        if popen is None:
            return
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)  # whatever of the group is left (workers)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=timeout)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])


PROCESSES: list[Process] = []  # every process started: killed at exit, log tails for a failing test


def kill_all() -> None:
    """SIGKILL every process group still running (an exit that skipped the orderly stop)."""
    for process in PROCESSES:
        if process.alive() and process.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGKILL)


atexit.register(kill_all)


def run_cli(argv: Sequence[str], *, timeout: float = CLI_TIMEOUT_SECONDS, check: bool = True) -> str:
    """A short-lived command; its stdout. Non-zero exit (with ``check``) or overtime: SpireError."""
    try:
        done = subprocess.run(  # noqa: S603 (our own binaries)
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        raise SpireError(f"{' '.join(argv)}: no answer within {timeout:.0f}s") from e
    if check and done.returncode != 0:
        raise SpireError(
            f"{' '.join(argv)} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return done.stdout


def _check_socket_path(path: Path) -> None:
    if len(str(path)) >= MAX_SOCKET_PATH:
        raise ConfigError(f"socket path too long for a Unix socket ({len(str(path))} bytes): {path}")


# --- SPIRE server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    entry_id: str
    spiffe_id: str
    gid: int | None


class SpireServer:
    """``spire-server run``: SQLite datastore, memory key manager, join_token node attestor."""

    def __init__(
        self,
        bin_dir: Path,
        directory: Path,
        trust_domain: str = "example.org",
        *,
        upstream: tuple[Path, Path] | None = None,
        default_x509_svid_ttl: str = "1h",
        default_jwt_svid_ttl: str = "5m",
        ca_ttl: str = "24h",
        jwt_issuer: str | None = None,
        log_level: str = "DEBUG",
    ) -> None:
        self.bin = bin_dir / "spire-server"
        self.directory = directory
        self.trust_domain = trust_domain
        self.port = free_port()
        self.socket = directory / "server.sock"
        _check_socket_path(self.socket)
        self.data_dir = directory / "server"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = directory / "server.conf"
        self._upstream = upstream
        self._settings = {
            "default_x509_svid_ttl": default_x509_svid_ttl,
            "default_jwt_svid_ttl": default_jwt_svid_ttl,
            "ca_ttl": ca_ttl,
        }
        self._jwt_issuer = jwt_issuer
        self._log_level = log_level
        self.process = Process(
            f"spire-server {trust_domain}",
            [str(self.bin), "run", "-config", str(self.config)],
            directory / "server.log",
        )

    def write_config(self) -> None:
        issuer = f'  jwt_issuer = "{self._jwt_issuer}"\n' if self._jwt_issuer else ""
        upstream = ""
        if self._upstream is not None:
            cert, key = self._upstream
            upstream = (
                '  UpstreamAuthority "disk" {\n    plugin_data {\n'
                f'      cert_file_path = "{cert}"\n      key_file_path = "{key}"\n    }}\n  }}\n'
            )
        settings = "".join(f'  {k} = "{v}"\n' for k, v in self._settings.items())
        self.config.write_text(
            "server {\n"
            '  bind_address = "127.0.0.1"\n'
            f'  bind_port = "{self.port}"\n'
            f'  socket_path = "{self.socket}"\n'
            f'  trust_domain = "{self.trust_domain}"\n'
            f'  data_dir = "{self.data_dir}"\n'
            f'  log_level = "{self._log_level}"\n'
            f"{settings}{issuer}"
            '  experimental {\n    cache_reload_interval = "1s"\n  }\n'
            "}\n"
            "plugins {\n"
            '  DataStore "sql" {\n    plugin_data {\n      database_type = "sqlite3"\n'
            f'      connection_string = "{self.data_dir / "datastore.sqlite3"}"\n    }}\n  }}\n'
            '  KeyManager "memory" {\n    plugin_data {}\n  }\n'
            '  NodeAttestor "join_token" {\n    plugin_data {}\n  }\n'
            f"{upstream}"
            "}\n"
        )

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        self.write_config()
        self.process.start()

        def healthy() -> bool:
            self.process.check_alive()
            run_cli([str(self.bin), "healthcheck", "-socketPath", str(self.socket)], timeout=5)
            return True

        wait_for(f"{self.process.name} healthy", healthy, timeout=timeout, interval=0.2)

    def stop(self) -> None:
        self.process.stop()

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_SECONDS) -> str:
        return run_cli([str(self.bin), *args, "-socketPath", str(self.socket)], timeout=timeout)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-output", "json"))

    # bundles

    def bundle_show(self, fmt: str = "pem") -> str:
        return self.cli("bundle", "show", "-format", fmt)

    def bundle_set(self, trust_domain: str, content: str, fmt: str = "spiffe") -> None:
        path = self.directory / f"bundle-set-{trust_domain}-{time.monotonic_ns()}.json"
        path.write_text(content)
        self.cli("bundle", "set", "-format", fmt, "-id", f"spiffe://{trust_domain}", "-path", str(path))

    # attestation and entries

    def token_generate(self, alias: str, ttl: int = 600) -> str:
        answer = self.cli_json("token", "generate", "-spiffeID", alias, "-ttl", str(ttl))
        return str(answer["value"])

    def entry_create(
        self,
        spiffe_id: str,
        parent_id: str,
        selectors: Iterable[str],
        *,
        dns: Iterable[str] = (),
        federates_with: Iterable[str] = (),
        x509_svid_ttl: int | None = None,
        jwt_svid_ttl: int | None = None,
        entry_id: str | None = None,
    ) -> str:
        """``entry create``; the new entry's ID."""
        args = ["entry", "create", "-spiffeID", spiffe_id, "-parentID", parent_id]
        for selector in selectors:
            args += ["-selector", selector]
        for name in dns:
            args += ["-dns", name]
        for domain in federates_with:
            args += ["-federatesWith", domain]
        if x509_svid_ttl is not None:
            args += ["-x509SVIDTTL", str(x509_svid_ttl)]
        if jwt_svid_ttl is not None:
            args += ["-jwtSVIDTTL", str(jwt_svid_ttl)]
        if entry_id is not None:
            args += ["-entryID", entry_id]
        answer = self.cli_json(*args)
        result = answer["results"][0]
        if result["status"]["code"] != 0:
            raise SpireError(f"entry create {spiffe_id}: {result['status']}")
        return str(result["entry"]["id"])

    def entry_delete(self, entry_id: str) -> None:
        self.cli("entry", "delete", "-entryID", entry_id)

    def entry_ids(self) -> list[str]:
        """The SPIFFE IDs of every registration entry (``entry show``), node aliases included."""
        shown = self.cli_json("entry", "show")
        return [
            f"spiffe://{e['spiffe_id']['trust_domain']}{e['spiffe_id']['path']}"
            for e in shown.get("entries") or []
        ]

    def jwt_mint(self, spiffe_id: str, audience: str, ttl: str = "120s") -> str:
        return self.cli("jwt", "mint", "-spiffeID", spiffe_id, "-audience", audience, "-ttl", ttl).strip()

    # local authorities (`localauthority jwt|x509 show|prepare|activate|taint|revoke`)

    def authorities(self, kind: str) -> dict[str, str]:
        """``{"active": id, "prepared": id, "old": id}`` (those present) for ``jwt`` or ``x509``."""
        shown = self.cli_json("localauthority", kind, "show")
        return {slot: str(value["authority_id"]) for slot, value in shown.items() if value}

    def localauthority(self, kind: str, action: str, authority_id: str | None = None) -> dict[str, Any]:
        args = ["localauthority", kind, action]
        if authority_id is not None:
            args += ["-authorityID", authority_id]
        answer: dict[str, Any] = self.cli_json(*args)
        return answer


# --- SPIRE agent --------------------------------------------------------------------------------


class SpireAgent:
    """``spire-agent run -joinToken``: unix workload attestor, 1 s sync; socket ``<dir>/<name>.sock``."""

    def __init__(
        self,
        bin_dir: Path,
        directory: Path,
        server: SpireServer,
        name: str = "agent",
        *,
        log_level: str = "DEBUG",
    ) -> None:
        self.bin = bin_dir / "spire-agent"
        self.directory = directory
        self.server = server
        self.name = name
        self.socket = directory / f"{name}.sock"
        _check_socket_path(self.socket)
        self.data_dir = directory / name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = directory / f"{name}.conf"
        self.bootstrap = directory / f"{name}-bootstrap.crt"
        self.process: Process | None = None
        self._log_level = log_level

    @property
    def workload_api(self) -> str:
        return f"unix://{self.socket}"

    def write_config(self) -> None:
        self.config.write_text(
            "agent {\n"
            f'  data_dir = "{self.data_dir}"\n'
            f'  log_level = "{self._log_level}"\n'
            '  server_address = "127.0.0.1"\n'
            f'  server_port = "{self.server.port}"\n'
            f'  socket_path = "{self.socket}"\n'
            f'  trust_bundle_path = "{self.bootstrap}"\n'
            f'  trust_domain = "{self.server.trust_domain}"\n'
            '  experimental {\n    sync_interval = "1s"\n  }\n'
            "}\n"
            "plugins {\n"
            '  NodeAttestor "join_token" {\n    plugin_data {}\n  }\n'
            '  KeyManager "memory" {\n    plugin_data {}\n  }\n'
            '  WorkloadAttestor "unix" {\n'
            "    plugin_data {\n      discover_workload_path = false\n    }\n"
            "  }\n"
            "}\n"
        )

    def launch(self, join_token: str) -> None:
        """Start the agent with a fresh one-time ``join_token`` without waiting (see :meth:`start`)."""
        self.write_config()
        self.bootstrap.write_text(self.server.bundle_show())
        self.process = Process(
            f"spire-agent {self.name}",
            [str(self.bin), "run", "-config", str(self.config), "-joinToken", join_token],
            self.directory / f"{self.name}.log",
        )
        self.process.start()

    def wait_healthy(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        process = self.process
        if process is None:
            raise SpireError(f"spire-agent {self.name} was never started")

        def healthy() -> bool:
            process.check_alive()
            run_cli([str(self.bin), "healthcheck", "-socketPath", str(self.socket)], timeout=5)
            return True

        wait_for(f"{process.name} healthy", healthy, timeout=timeout, interval=0.2)

    def start(self, join_token: str, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Attest with a fresh one-time ``join_token`` (the memory key manager forgets the agent's key
        when it stops, so a restart needs a new token) and wait until the Workload API answers."""
        self.launch(join_token)
        self.wait_healthy(timeout)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


# --- the development deployment of `sts dev --spire` ---------------------------------------------


def _served_ids(socket_uri: str) -> list[str]:
    """The SPIFFE IDs the agent at ``socket_uri`` gives this very process (its X.509-SVIDs)."""
    from spiffe import WorkloadApiClient

    with WorkloadApiClient(socket_path=socket_uri) as client:
        return [str(svid.spiffe_id) for svid in client.fetch_x509_svids(timeout=5)]


@dataclass
class DevSpire:
    """One SPIRE server and one agent per identity (``sts dev --spire``), all under ``directory``.

    ``sts demo`` plays several parties in one process, and a SPIRE agent gives one process the
    entries its attributes match, whichever socket it comes through. So every identity gets an agent
    of its own (node ``spiffe://TD/node/NAME``) with exactly one entry parented to that node, selected
    by the uid of this user (``unix:uid:N``): *which socket* a process of that user opens decides who
    it is, as with the development server, but the SVIDs, bundles, caching and rotation are SPIRE's.
    Another user's processes match no entry and get ``PermissionDenied``.
    """

    server: SpireServer
    agents: dict[str, SpireAgent] = field(default_factory=dict)
    identities: dict[str, str] = field(default_factory=dict)  # name -> SPIFFE ID

    def socket(self, name: str) -> str:
        return self.agents[name].workload_api

    def server_ca(self) -> str:
        """PEM of the trust domain's X.509 authorities (``spire-server bundle show``)."""
        return self.server.bundle_show()

    def check_alive(self) -> None:
        self.server.process.check_alive()
        for agent in self.agents.values():
            if agent.process is not None:
                agent.process.check_alive()

    def stop(self) -> None:
        """Agents first (they would only retry a stopped server), each SIGTERM then SIGKILL."""
        for agent in self.agents.values():
            agent.stop()
        self.server.stop()


def start_dev_spire(
    bin_dir: Path,
    directory: Path,
    identities: Mapping[str, tuple[str, Sequence[str]]],
    *,
    trust_domain: str = "example.org",
    timeout: float = SERVED_TIMEOUT_SECONDS,
) -> DevSpire:
    """A fresh SPIRE in ``directory`` (wiped first) serving each of ``identities`` (``name ->
    (SPIFFE ID, DNS names)``) on an agent of its own, to processes of this user's uid.

    Returns once every agent serves its identity to this process; on any failure everything already
    started is stopped and :class:`SpireError` says what did not come up (with the log's tail).
    The directory is recreated because the memory key managers make every start a new CA and new
    agent keys: nothing of a previous run's SPIRE state would be usable, and its entries would double.
    """
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    uid = os.getuid()
    server = SpireServer(bin_dir, directory, trust_domain, log_level="INFO")
    spire = DevSpire(server)
    try:
        server.start()
        for name, (spiffe_id, dns) in identities.items():
            node = f"spiffe://{trust_domain}/node/{name}"
            server.entry_create(spiffe_id, node, [f"unix:uid:{uid}"], dns=dns)
            spire.identities[name] = spiffe_id
            spire.agents[name] = SpireAgent(bin_dir, directory, server, name, log_level="INFO")
        # Entries first, then the agents, all at once: their first sync already brings the SVIDs.
        for name in identities:
            spire.agents[name].launch(server.token_generate(f"spiffe://{trust_domain}/node/{name}"))
        for name, agent in spire.agents.items():
            agent.wait_healthy()
            want = [spire.identities[name]]

            def served(socket_uri: str = agent.workload_api, want: list[str] = want) -> bool:
                spire.check_alive()
                return _served_ids(socket_uri) == want

            wait_for(f"{want[0]} served by spire-agent {name}", served, timeout=timeout, interval=0.3)
    except BaseException:
        spire.stop()
        raise
    return spire
