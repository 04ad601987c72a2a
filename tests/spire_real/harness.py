"""Real SPIRE (v1.13.3) for the end-to-end tests: ``spire-server``, ``spire-agent`` and ``sts serve`` as
real processes on loopback TCP and Unix sockets, each in a process group of its own.

The SPIRE server and agent, the process runner and the deadlines are the product's own
(:mod:`sts.dev.spire_real`, which ``sts dev --spire`` runs on), so the tests and the development
environment run SPIRE the same way; this module adds what only tests need: building the binaries,
workloads attested by gid, deployments of several shapes and the STS under test.

Everything waits with a deadline (:func:`wait_for`); every process writes its log into its
deployment's short temporary directory (Unix socket paths must stay under 107 bytes), and
:data:`PROCESSES` remembers them so that a failing test can print their tails (``conftest.py``).

Workload identities come from attestation: the tests run as root, ``/root`` is mode 0700 (no other uid
could run the venv's interpreter nor the SPIRE binaries), so every workload is a child process of
uid 0 with a primary gid of its own and no supplementary groups (:func:`run_as`), registered with
``unix:uid:0`` + ``unix:gid:N``; the STS itself is uid 0, gid 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from sts.dev import spire_real
from sts.dev.spire_real import (
    CLI_TIMEOUT_SECONDS,
    PROCESSES,
    START_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    Entry,
    Process,
    SpireServer,
    kill_all,
    run_cli,
    wait_for,
)
from tests.conftest import TEST_CATALOG, TEST_POLICIES, free_port

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "spire" / "real" / "build.sh"
BUILD_TIMEOUT_SECONDS = 45 * 60.0  # a cold build is minutes on 2 cores (spire/real/build.sh)
WORKLOAD_TIMEOUT_SECONDS = 60.0
GO_MOD = REPO / "spire" / "real" / "go.mod"  # pins the SPIRE version build.sh builds
TRUST_DOMAIN = "example.org"
PARTNER = "partner.test"
ADMIN = "spiffe://example.org/ops/sts-admin"

HarnessError = spire_real.SpireError  # what every wait, CLI call and start of the harness raises


# --- binaries -----------------------------------------------------------------------------------


def spire_bin() -> Path:
    """The directory of ``spire-server`` and ``spire-agent``: ``STS_SPIRE_BIN``, else what
    ``spire/real/build.sh`` prints last (it builds them when absent)."""
    configured = os.environ.get("STS_SPIRE_BIN")
    if configured:
        directory = Path(configured)
        source = f"STS_SPIRE_BIN={configured}"
    else:
        try:
            built = subprocess.run(
                [str(BUILD_SCRIPT)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise HarnessError(f"{BUILD_SCRIPT} failed: {e}") from e
        lines = built.stdout.strip().splitlines()
        if built.returncode != 0 or not lines:
            raise HarnessError(
                f"{BUILD_SCRIPT} exited {built.returncode} without a bin directory:\n{built.stderr[-3000:]}"
            )
        directory = Path(lines[-1])
        source = str(BUILD_SCRIPT)
    for binary in ("spire-server", "spire-agent"):
        if not os.access(directory / binary, os.X_OK):
            raise HarnessError(f"no executable {binary} in {directory} (from {source})")
    return directory


def spire_version() -> str:
    """The SPIRE version ``spire/real/go.mod`` pins (``v1.13.3``)."""
    for line in GO_MOD.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "github.com/spiffe/spire":
            return fields[1]
    raise HarnessError(f"{GO_MOD} pins no github.com/spiffe/spire version")


def spire_module_dir() -> Path:
    """SPIRE's module source in the Go module cache (its ``conf/server/dummy_upstream_ca.*``)."""
    try:
        cache = subprocess.run(
            ["go", "env", "GOMODCACHE"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise HarnessError(f"go env GOMODCACHE failed: {e}") from e
    module = Path(cache) / "github.com" / "spiffe" / f"spire@{spire_version()}"
    if not (module / "conf" / "server" / "dummy_upstream_ca.crt").is_file():
        raise HarnessError(f"no conf/server/dummy_upstream_ca.crt under {module} (run spire/real/build.sh)")
    return module


# --- processes ----------------------------------------------------------------------------------

DIRECTORIES: list[Path] = []  # removed at the end of a session without failures (conftest.py)


def short_tempdir(prefix: str = "sp-") -> Path:
    """A directory under /tmp with a short path (Unix socket paths must stay under 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    directory.chmod(0o755)
    DIRECTORIES.append(directory)
    return directory


# --- SPIRE agent --------------------------------------------------------------------------------


class SpireAgent(spire_real.SpireAgent):
    """The product's agent (:class:`sts.dev.spire_real.SpireAgent`), plus what it serves a given gid."""

    def served_ids(self, gid: int = 0) -> list[str]:
        """The SPIFFE IDs (X.509-SVIDs) this agent serves a process of uid 0 and ``gid``."""
        answer = run_as(gid, "ids", "--socket", self.workload_api)
        return [str(i) for i in answer.get("ids", [])]


# --- workloads (child processes as uid 0 + their own gid) ----------------------------------------


def run_as(gid: int, *args: str, timeout: float = WORKLOAD_TIMEOUT_SECONDS) -> dict[str, Any]:
    """``python -m tests.spire_real.workload ARGS`` as uid 0, primary gid ``gid``, no supplementary
    groups; its JSON answer (``{"error": …}`` when the command failed in a way it reports)."""
    argv = [sys.executable, "-m", "tests.spire_real.workload", *args]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
            group=gid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"workload (gid {gid}) {' '.join(args)}: no answer within {timeout:.0f}s") from e
    if done.returncode != 0:
        raise HarnessError(
            f"workload (gid {gid}) {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
        )
    try:
        answer: dict[str, Any] = json.loads(done.stdout)
    except ValueError as e:
        raise HarnessError(f"workload (gid {gid}) {' '.join(args)} answered {done.stdout[:500]!r}") from e
    return answer


class WorkloadSession:
    """``workload.py session`` as a long-lived child (uid 0, ``gid``): one request per call, each
    answered within ``timeout`` seconds or HarnessError."""

    def __init__(self, gid: int, *args: str, log: Path, timeout: float = WORKLOAD_TIMEOUT_SECONDS) -> None:
        self.timeout = timeout
        self.log = log
        self._stderr = log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.spire_real.workload", "session", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=REPO,
            group=gid,
            extra_groups=[],
            text=True,
            start_new_session=True,
        )
        PROCESSES.append(Process(f"workload session (gid {gid})", [], log, popen=self.popen))
        self._read()  # {"ready": true}

    def request(self, **request: Any) -> dict[str, Any]:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(request) + "\n")
        self.popen.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], self.timeout)
        if not ready:
            raise HarnessError(f"workload session: no answer within {self.timeout:.0f}s")
        line = self.popen.stdout.readline()
        if not line:
            raise HarnessError(f"workload session exited {self.popen.poll()}: see {self.log}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
        self._stderr.close()


@dataclass(frozen=True)
class Workload:
    """A registered workload: its SPIFFE ID, the gid that attests as it, and its agent's socket."""

    name: str
    spiffe_id: str
    gid: int
    socket: str

    def run(self, *args: str, timeout: float = WORKLOAD_TIMEOUT_SECONDS) -> dict[str, Any]:
        return run_as(self.gid, *args, "--socket", self.socket, timeout=timeout)

    def session(self, *args: str, log: Path) -> WorkloadSession:
        return WorkloadSession(self.gid, *args, "--socket", self.socket, log=log)

    def jwt(self, *audiences: str, count: int = 1) -> list[str]:
        """JWT-SVIDs from the agent for this audience set, ``count`` fetches in one process."""
        args = ["jwt", "--count", str(count)]
        for audience in audiences:
            args += ["--audience", audience]
        answer = self.run(*args)
        if "error" in answer:
            raise HarnessError(f"{self.name}: no JWT-SVID: {answer}")
        return [str(t) for t in answer["tokens"]]

    def token(self, issuer: str, **options: str | bool) -> dict[str, Any]:
        """``TokenClient(issuer).token(...)`` in the workload's process (see ``workload.py token``)."""
        args = ["token", "--issuer", issuer]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is not False:
                args += [flag, str(value)]
        return self.run(*args)


# --- a deployment: one SPIRE server + agent, and the workloads registered on them -----------------

STS_ID = f"spiffe://{TRUST_DOMAIN}/sts"
HOST_ID = f"spiffe://{TRUST_DOMAIN}/host"
WORKLOADS: dict[str, tuple[str, int]] = {
    "researcher": (f"spiffe://{TRUST_DOMAIN}/agent/researcher", 1001),
    "orchestrator": (f"spiffe://{TRUST_DOMAIN}/orchestrator", 1002),
    "web-search": (f"spiffe://{TRUST_DOMAIN}/tool/web-search", 1003),
}


@dataclass
class Deployment:
    """A SPIRE server, one agent (node alias ``spiffe://example.org/host``), and registered entries."""

    bin_dir: Path
    directory: Path
    server: SpireServer
    agent: SpireAgent
    entries: dict[str, Entry] = field(default_factory=dict)
    workloads: dict[str, Workload] = field(default_factory=dict)

    @property
    def socket(self) -> str:
        return self.agent.workload_api

    def register(
        self,
        name: str,
        spiffe_id: str,
        gid: int,
        *,
        parent_id: str = HOST_ID,
        **options: Any,
    ) -> Workload:
        entry_id = self.server.entry_create(
            spiffe_id, parent_id, ["unix:uid:0", f"unix:gid:{gid}"], **options
        )
        self.entries[name] = Entry(entry_id, spiffe_id, gid)
        workload = Workload(name, spiffe_id, gid, self.socket)
        self.workloads[name] = workload
        return workload

    def start_agent(self) -> None:
        """(Re)start the agent with a new join token (its node alias stays ``HOST_ID``)."""
        self.agent.start(self.server.token_generate(HOST_ID))

    def wait_served(self, workload: Workload, timeout: float = 30.0) -> None:
        """Until the agent gives ``workload``'s gid exactly its own SPIFFE ID."""

        def served() -> bool:
            answer = workload.run("ids")
            if answer.get("ids") == [workload.spiffe_id]:
                return True
            raise HarnessError(f"served {answer}")

        wait_for(f"{workload.spiffe_id} served to gid {workload.gid}", served, timeout=timeout, interval=0.3)

    def wait_sts_served(self, timeout: float = 30.0) -> None:
        def served() -> bool:
            return self.agent.served_ids(0) == [STS_ID]

        wait_for(f"{STS_ID} served to gid 0", served, timeout=timeout, interval=0.3)

    def close(self) -> None:
        self.agent.kill()
        self.server.process.kill()


@contextlib.contextmanager
def deployment(
    bin_dir: Path,
    *,
    sts_options: Mapping[str, Any] | None = None,
    workloads: Iterable[str] = tuple(WORKLOADS),
    before_entries: Callable[[SpireServer], None] | None = None,
    **server_options: Any,
) -> Iterator[Deployment]:
    """Server up, entries for the STS (uid 0 gid 0, DNS ``localhost``) and ``workloads`` created, then
    the agent (so their SVIDs are there at its first sync); both killed when the block ends."""
    directory = short_tempdir()
    server = SpireServer(bin_dir, directory, **server_options)
    agent = SpireAgent(bin_dir, directory, server)
    spire = Deployment(bin_dir, directory, server, agent)
    try:
        server.start()
        if before_entries is not None:
            before_entries(server)
        sts_entry = server.entry_create(
            STS_ID, HOST_ID, ["unix:uid:0", "unix:gid:0"], dns=["localhost"], **dict(sts_options or {})
        )
        spire.entries["sts"] = Entry(sts_entry, STS_ID, 0)
        for name in workloads:
            spiffe_id, gid = WORKLOADS[name]
            spire.register(name, spiffe_id, gid)
        spire.start_agent()
        spire.wait_sts_served()
        yield spire
    finally:
        spire.close()


def remove_directories() -> None:
    for directory in DIRECTORIES:
        shutil.rmtree(directory, ignore_errors=True)
    DIRECTORIES.clear()


# --- the STS under test --------------------------------------------------------------------------


class Sts:
    """``python -m sts.cli serve --config FILE`` (uid 0, gid 0: the STS's SPIRE entry, unless ``gid``
    says otherwise; no supplementary groups) on loopback.

    The plain listener on ``port`` (issuer ``http://127.0.0.1:port``); with ``tls`` the same STS (same
    issuer, keys, store) also serves a TLS listener on ``tls_port`` whose certificate is its
    X.509-SVID from the agent, as ``sts dev`` runs it: two processes.
    """

    def __init__(
        self,
        directory: Path,
        socket: str,
        *,
        trust_domains: Iterable[str] = (TRUST_DOMAIN,),
        tls: bool = False,
        max_staleness: str = "5m",
        policies: str = TEST_POLICIES,
        catalog: str = TEST_CATALOG,
        policy_dir: Path | None = None,
        gid: int = 0,
        start_timeout: str = "10s",
    ) -> None:
        self.directory = directory
        self.gid = gid
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.url = self.issuer
        self.tls_port = free_port() if tls else None
        self.tls_url = f"https://localhost:{self.tls_port}" if tls else None
        policy = policy_dir
        if policy is None:
            policy = directory / "policies"
            policy.mkdir(exist_ok=True)
            (policy / "test.cedar").write_text(policies)
        common: dict[str, Any] = {
            "issuer": self.issuer,
            "trust_domains": {td: {"bundle": "workload-api"} for td in trust_domains},
            "workload_api": {
                "socket": socket,
                "max_staleness": max_staleness,
                "start_timeout": start_timeout,
            },
            "keys": {"dir": str(directory / "keys")},
            "store": {"url": f"sqlite:///{directory / 'sts.db'}"},
            "admins": [ADMIN],
            "limits": {"per_workload_per_second": 1000, "tokens_per_task": 10},
            "policy": {"dir": str(policy)},
            "audit": {"path": str(directory / "audit.jsonl")},
            "server": {"workers": 1},
        }
        common |= yaml.safe_load(catalog)
        plain = common | {"listen": {"host": "127.0.0.1", "port": self.port}}
        if self.tls_url is not None:
            plain["mtls_url"] = self.tls_url
        self.config = directory / "sts.yaml"
        self.config.write_text(yaml.safe_dump(plain, sort_keys=False))
        self.processes = [self._process("sts", self.config)]
        if self.tls_url is not None:
            tls_config = common | {
                "listen": {
                    "host": "127.0.0.1",
                    "port": self.tls_port,
                    "tls": {"certificate": "workload-api", "public_url": self.tls_url},
                }
            }
            self.tls_config = directory / "sts-tls.yaml"
            self.tls_config.write_text(yaml.safe_dump(tls_config, sort_keys=False))
            self.processes.append(self._process("sts-tls", self.tls_config))

    def _process(self, name: str, config: Path) -> Process:
        env = {k: v for k, v in os.environ.items() if k != "SPIFFE_ENDPOINT_SOCKET"}
        return Process(
            name,
            [sys.executable, "-m", "sts.cli", "serve", "--config", str(config)],
            self.directory / f"{name}.log",
            env=env,
            gid=self.gid,
            cwd=REPO,
        )

    def start(self, server_ca: str | None = None, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start both processes; wait until the plain listener is ready, and the TLS one answers
        ``/readyz`` 200 with a certificate that ``server_ca`` (PEM) verifies."""
        # One after the other: the first generates the development signing keys both use.
        self.processes[0].start()
        self.wait_ready(timeout=timeout)
        for process in self.processes[1:]:
            process.start()
        if self.tls_url is not None:
            if server_ca is None:
                raise HarnessError("a TLS listener needs server_ca to be checked")
            ca = server_ca

            def tls_ready() -> bool:
                self.processes[1].check_alive()
                return self.tls_get("/readyz", ca).status_code == 200

            wait_for("the STS TLS listener ready", tls_ready, timeout=timeout, interval=0.2)

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            self.processes[0].check_alive()
            status, body = self.readyz()
            return body if status == 200 else None

        return wait_for("the STS ready (/readyz 200)", ready, timeout=timeout, interval=0.2)

    def readyz(self) -> tuple[int, dict[str, Any]]:
        response = requests.get(f"{self.url}/readyz", timeout=5)
        body: dict[str, Any] = response.json()
        return response.status_code, body

    def exchange(self, subject_token: str, *, url: str | None = None, **form: str) -> requests.Response:
        body = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "subject_token": subject_token,
            "audience": "tool:web-search",
            "scope": "invoke",
        } | form
        return requests.post(f"{url or self.url}/token", data=body, timeout=10)

    def tls_get(self, path: str, ca_pem: str) -> requests.Response:
        ca = self.directory / f"ca-{time.monotonic_ns()}.pem"
        ca.write_text(ca_pem)
        try:
            return requests.get(f"{self.tls_url}{path}", verify=str(ca), timeout=5)
        finally:
            ca.unlink()

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def logs(self) -> str:
        return "\n".join(p.tail(200) for p in self.processes)


def tls_peer_chain(host: str, port: int, ca_pem: str | None = None, *, alpn: tuple[str, ...] = ()) -> list[bytes]:
    """The certificate chain (DER, leaf first) a TLS server presents; verified against ``ca_pem`` when
    given (a failed verification raises ``ssl.SSLCertVerificationError``), else not verified. ``alpn``:
    the protocols offered (a gRPC server such as SPIRE's refuses a handshake without ``h2``)."""
    if ca_pem is not None:
        context = ssl.create_default_context(cadata=ca_pem)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        getter = getattr(tls, "get_unverified_chain", None) or getattr(
            getattr(tls, "_sslobj", None), "get_unverified_chain", None
        )
        if getter is not None:
            der = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]  # the 3.11 private C method's constant
            return [c if isinstance(c, bytes) else c.public_bytes(der) for c in getter() or []]
        leaf = tls.getpeercert(binary_form=True)
        return [leaf] if leaf else []


def raw_x509_svid_response(socket_uri: str, timeout: float = 10.0) -> Any:
    """The first ``X509SVIDResponse`` of ``FetchX509SVID`` for this (uid 0, gid 0) process, straight off
    the wire (py-spiffe's generated stubs, no parsing): what the agent really sends."""
    import grpc
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    with grpc.insecure_channel(socket_uri) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
        stream = stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")], timeout=timeout
        )
        try:
            return next(iter(stream))
        finally:
            stream.cancel()


# The tests import everything SPIRE from here, the product's pieces (sts.dev.spire_real) included.
__all__ = [
    "ADMIN",
    "BUILD_SCRIPT",
    "BUILD_TIMEOUT_SECONDS",
    "CLI_TIMEOUT_SECONDS",
    "DIRECTORIES",
    "GO_MOD",
    "HOST_ID",
    "PARTNER",
    "PROCESSES",
    "REPO",
    "START_TIMEOUT_SECONDS",
    "STOP_TIMEOUT_SECONDS",
    "STS_ID",
    "TRUST_DOMAIN",
    "WORKLOADS",
    "WORKLOAD_TIMEOUT_SECONDS",
    "Deployment",
    "Entry",
    "HarnessError",
    "Process",
    "SpireAgent",
    "SpireServer",
    "Sts",
    "Workload",
    "WorkloadSession",
    "deployment",
    "kill_all",
    "raw_x509_svid_response",
    "remove_directories",
    "run_as",
    "run_cli",
    "short_tempdir",
    "spire_bin",
    "spire_module_dir",
    "spire_version",
    "tls_peer_chain",
    "wait_for",
]
