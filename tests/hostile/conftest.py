"""The servers under attack, started once per session as real processes through the CLI, and the tally.

``world`` is ``sts serve`` twice over one configuration (same issuer, keys and SQLite store): a plain
HTTP listener and a TLS listener with optional client certificates. Its trust bundles are files of
:class:`tests.authority.TestAuthority` instances, so the suite can mint any JWT-SVID it likes.
``raw_world`` is a second, throwaway pair for malformed HTTP (a stalled connection there cannot
starve the other categories), ``limited`` a server with a small anonymous-refusal limit, and ``dev``
is ``sts dev`` with its own CA, Workload API sockets and demo policies.

Every process is launched by the first fixture that needs any of them, all at once, so their start-ups
overlap; each fixture then waits for its own server. The autouse fixture and ``pytest_terminal_summary``
keep and print the tally (:mod:`tests.hostile.tally`).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from spiffe import WorkloadApiClient

from tests.authority import TestAuthority
from tests.hostile import tally
from tests.hostile.attacker import (
    ADMIN,
    AGENT,
    CALC,
    CRM,
    GRANT,
    JWT_TYPE,
    ORCHESTRATOR,
    SEARCH,
    Ca,
    issue,
    self_signed_ca,
    write_pair,
)

HOST = "127.0.0.1"
READY_SECONDS = 60.0

POLICIES = """
// Agents of example.org invoke any tool and read (not write) any data that is not restricted.
@id("agents-tools")
permit(principal, action in Action::"tool", resource)
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" };

@id("agents-read-data")
permit(principal, action == Action::"data:read", resource is Dataset)
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" };

@id("no-restricted-data")
forbid(principal, action, resource is Dataset) when { resource.sensitivity_rank >= 3 };

// The orchestrator hands tasks to agents, and services may act for it on tools.
@id("orchestrator-tasks")
permit(principal == Workload::"spiffe://example.org/orchestrator", action == Action::"task:create", resource)
when { resource.path like "/agent/*" };

@id("delegated-tools")
permit(principal == Workload::"spiffe://example.org/orchestrator", action in Action::"tool", resource)
when { context has actor };

// The federated partner and the RSA-signing domain may use tools (their SVIDs are real).
@id("partner-tools")
permit(principal, action in Action::"tool", resource)
when { principal.trust_domain == "partner.test" || principal.trust_domain == "rsa.test" };
"""

CATALOG = f"""
catalog:
  - {{id: tool:web-search, class: tool, resource: "https://search.internal/", scopes: [invoke], max_ttl: 300s,
     resource_servers: [{SEARCH}]}}
  - {{id: tool:calc, class: tool, scopes: [invoke], max_ttl: 300s, resource_servers: [{CALC}]}}
  - {{id: data:crm, class: data, sensitivity: confidential, scopes: [read, write], max_ttl: 120s,
     resource_servers: [{CRM}]}}
  - {{id: data:vault, class: data, sensitivity: restricted, scopes: [read], max_ttl: 120s}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A port P with P + 1 free too (``sts dev`` listens on both)."""
    for _ in range(100):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def sts_command(*args: str) -> list[str]:
    """``.venv/bin/sts`` next to this interpreter (as operators run it), else ``python -m sts.cli``."""
    installed = Path(sys.executable).parent / "sts"
    return [str(installed), *args] if installed.exists() else [sys.executable, "-m", "sts.cli", *args]


@dataclass
class Authorities:
    """Every JWT and X.509 authority in play: three trusted domains, and two the server never trusts."""

    example: TestAuthority = field(default_factory=lambda: TestAuthority("example.org"))
    partner: TestAuthority = field(default_factory=lambda: TestAuthority("partner.test"))
    rsa: TestAuthority = field(default_factory=lambda: TestAuthority("rsa.test", alg="RS256"))
    stranger: TestAuthority = field(default_factory=lambda: TestAuthority("stranger.test"))
    # Same trust domain name as the real one, other keys: what an attacker can mint on its own.
    impostor: TestAuthority = field(default_factory=lambda: TestAuthority("example.org"))

    @property
    def example_ca(self) -> Ca:
        return Ca(self.example.ca_key, self.example.ca_cert)

    @property
    def partner_ca(self) -> Ca:
        return Ca(self.partner.ca_key, self.partner.ca_cert)


@dataclass
class Launch:
    """One server process and what it takes to know it is ready."""

    process: subprocess.Popen[bytes]
    ready_url: str
    verify: str | bool = True
    log: Path | None = None

    def wait(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                detail = self.log.read_text()[-3000:] if self.log and self.log.exists() else ""
                raise RuntimeError(f"server exited with {self.process.returncode}: {detail}")
            try:
                if requests.get(self.ready_url, timeout=1, verify=self.verify).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server at {self.ready_url} did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class World:
    """A ``sts serve`` deployment: plain listener ``url`` (also the issuer) and TLS listener ``tls_url``."""

    url: str
    issuer: str
    tls_url: str
    tls_port: int
    port: int
    directory: Path
    ca_file: Path
    auth: Authorities
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def example(self) -> TestAuthority:
        return self.auth.example

    def svid(self, sub: str = AGENT, aud: str | list[str] | None = None, **kwargs: Any) -> str:
        """A genuine JWT-SVID of the trust domain of ``sub`` (example.org, partner.test or rsa.test)."""
        authority = {"partner.test": self.auth.partner, "rsa.test": self.auth.rsa}.get(
            sub.split("/")[2], self.auth.example
        )
        return authority.mint(sub, self.issuer if aud is None else aud, **kwargs)

    def bearer(self, sub: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.svid(sub)}"}

    def exchange(
        self, sub: str = AGENT, *, audience: str = "tool:calc", scope: str = "invoke", **extra: str
    ) -> requests.Response:
        body = {
            "grant_type": GRANT,
            "subject_token_type": JWT_TYPE,
            "subject_token": self.svid(sub),
            "audience": audience,
            "scope": scope,
        } | extra
        return self.session.post(f"{self.url}/token", data=body, timeout=10)

    def task(
        self, assignee: str = AGENT, targets: dict[str, list[str]] | None = None, *, ttl: int = 300
    ) -> str:
        """A task the orchestrator hands to ``assignee`` (its id)."""
        wanted = targets or {"tool:calc": ["invoke"]}
        body = {
            "assignee": assignee,
            "targets": [{"target": t, "scopes": s} for t, s in wanted.items()],
            "purpose": "hostile suite",
            "ttl_seconds": ttl,
        }
        response = self.session.post(f"{self.url}/tasks", json=body, headers=self.bearer(ORCHESTRATOR), timeout=10)
        assert response.status_code == 201, response.text
        return str(response.json()["task_id"])

    def issued(self, sub: str = AGENT, **kwargs: Any) -> str:
        """An access token of this server (the exchange must succeed)."""
        response = self.exchange(sub, **kwargs)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


def _write_config(
    directory: Path,
    name: str,
    port: int,
    issuer: str,
    auth: Authorities,
    *,
    tls: tuple[Path, Path] | None = None,
    limits: str,
    workers: int,
) -> Path:
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "hostile.cedar").write_text(POLICIES)
    for authority in (auth.example, auth.partner, auth.rsa):
        authority.write_bundle(directory / f"{authority.trust_domain}.json")
    listen = f"{{host: {HOST}, port: {port}}}"
    if tls is not None:
        listen = (
            f"{{host: {HOST}, port: {port}, tls: {{cert: {tls[0]}, key: {tls[1]}, "
            f"public_url: 'https://localhost:{port}'}}}}"
        )
    config = directory / name
    config.write_text(
        f"issuer: {issuer}\n"
        f"listen: {listen}\n"
        "trust_domains:\n"
        "  example.org: {bundle_file: example.org.json}\n"
        "  partner.test: {bundle_file: partner.test.json}\n"
        "  rsa.test: {bundle_file: rsa.test.json}\n"
        "keys: {dir: keys}\n"
        f"store: {{url: 'sqlite:///{directory}/sts.db'}}\n"
        f"admins: [{ADMIN}]\n"
        f"limits: {limits}\n"
        f"{CATALOG}"
        "policy: {dir: policies}\n"
        "audit: {path: audit.jsonl}\n"
        f"server: {{workers: {workers}, header_timeout: 2, body_timeout: 2}}\n"
    )
    return config


@dataclass
class Fleet:
    launches: dict[str, Launch] = field(default_factory=dict)
    worlds: dict[str, World] = field(default_factory=dict)
    dev_dir: Path | None = None
    ready: set[str] = field(default_factory=set)

    def wait(self, *names: str) -> None:
        for name in names:
            if name not in self.ready:
                self.launches[name].wait()
                self.ready.add(name)


GENEROUS = "{anonymous_refusals_per_minute: 1000000, per_workload_per_second: 100000, tokens_per_task: 1000}"


def _start(command: list[str], log: Path, ready_url: str, verify: str | bool = True) -> Launch:
    handle = log.open("ab")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent)
    handle.close()
    return Launch(process, ready_url, verify, log)


def _deployment(
    fleet: Fleet, name: str, directory: Path, auth: Authorities, *, limits: str, workers: int, tls: bool
) -> None:
    """``sts serve`` on a plain port (and, with ``tls``, a second process on a TLS port, same state)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    issuer = f"http://{HOST}:{port}"
    plain = _write_config(directory, "sts.yaml", port, issuer, auth, limits=limits, workers=workers)
    fleet.launches[name] = _start(
        sts_command("serve", "--config", str(plain)), directory / "server.log", f"{issuer}/readyz"
    )
    tls_port = free_port() if tls else 0
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(auth.example.ca_pem())
    if tls:
        cert, key, _ = issue(
            auth.example_ca, directory, "server", uris=("spiffe://example.org/sts",), dns=("localhost",)
        )
        tls_config = _write_config(
            directory, "sts-tls.yaml", tls_port, issuer, auth, tls=(cert, key), limits=limits, workers=workers
        )
        fleet.launches[f"{name}-tls"] = _start(
            sts_command("serve", "--config", str(tls_config)),
            directory / "server-tls.log",
            f"https://localhost:{tls_port}/readyz",
            str(ca_file),
        )
    fleet.worlds[name] = World(
        url=issuer,
        issuer=issuer,
        tls_url=f"https://localhost:{tls_port}",
        tls_port=tls_port,
        port=port,
        directory=directory,
        ca_file=ca_file,
        auth=auth,
    )


@pytest.fixture(scope="session")
def authorities() -> Authorities:
    return Authorities()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, authorities: Authorities) -> Iterator[Fleet]:
    """Launch every server at once; the fixtures below wait for theirs."""
    base = tmp_path_factory.mktemp("hostile")
    fleet = Fleet()
    try:
        _deployment(fleet, "world", base / "world", authorities, limits=GENEROUS, workers=2, tls=True)
        _deployment(fleet, "raw", base / "raw", authorities, limits=GENEROUS, workers=1, tls=True)
        _deployment(
            fleet,
            "limited",
            base / "limited",
            authorities,
            limits="{anonymous_refusals_per_minute: 20, per_workload_per_second: 100000}",
            workers=1,
            tls=False,
        )
        dev_dir = base / "dev"
        dev_dir.mkdir()
        dev_port = free_port_pair()
        fleet.dev_dir = dev_dir
        fleet.launches["dev"] = _start(
            sts_command("dev", "--state-dir", str(dev_dir), "--port", str(dev_port)),
            base / "dev.log",
            f"http://{HOST}:{dev_port}/readyz",
        )
        yield fleet
    finally:
        for name, launch in fleet.launches.items():
            if name == "dev" and launch.process.poll() is None:
                launch.process.send_signal(signal.SIGINT)
                try:
                    launch.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    launch.process.kill()
            launch.stop()


@pytest.fixture(scope="session")
def world(fleet: Fleet) -> World:
    fleet.wait("world", "world-tls")
    return fleet.worlds["world"]


@pytest.fixture(scope="session")
def raw_world(fleet: Fleet) -> World:
    fleet.wait("raw", "raw-tls")
    return fleet.worlds["raw"]


@pytest.fixture(scope="session")
def limited(fleet: Fleet) -> World:
    fleet.wait("limited")
    return fleet.worlds["limited"]


@dataclass
class Dev:
    """``sts dev`` as described by its ``dev.json``; SVIDs come from each workload's own socket."""

    directory: Path
    description: dict[str, Any]
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def issuer(self) -> str:
        return str(self.description["issuer"])

    @property
    def token_endpoint(self) -> str:
        return str(self.description["token_endpoint"])

    def socket(self, workload: str) -> str:
        return str(self.description["workloads"][workload]["socket"])

    def spiffe_id(self, workload: str) -> str:
        return str(self.description["workloads"][workload]["spiffe_id"])

    def svid(self, workload: str, audience: str | None = None) -> str:
        with WorkloadApiClient(socket_path=self.socket(workload)) as client:
            return str(client.fetch_jwt_svid(audience={audience or self.issuer}, timeout=5).token)

    def jwt_keys(self, workload: str = "agent") -> dict[str, Any]:
        """The JWT authorities (kid → public key) the workload's socket hands out, per trust domain."""
        with WorkloadApiClient(socket_path=self.socket(workload)) as client:
            bundles = client.fetch_jwt_bundles()
        return {
            str(bundle.trust_domain): dict(bundle.jwt_authorities) for bundle in bundles.bundles
        }

    def x509_pair(self, workload: str) -> tuple[Path, Path]:
        """The workload's X.509-SVID (chain and key) as PEM files, for requests' ``cert=``."""
        with WorkloadApiClient(socket_path=self.socket(workload)) as client:
            svid = client.fetch_x509_svid()
        cert_path, key_path = write_pair(self.directory, f"x509-{workload}", svid.leaf, svid.private_key)
        return cert_path, key_path

    def server_ca(self) -> Path:
        path = self.directory / "server-ca.pem"
        path.write_text(str(self.description["server_ca"]))
        return path


@pytest.fixture(scope="session")
def dev(fleet: Fleet) -> Dev:
    assert fleet.dev_dir is not None
    launch = fleet.launches["dev"]
    deadline = time.monotonic() + READY_SECONDS
    description_path = fleet.dev_dir / "dev.json"
    while not description_path.exists():
        assert launch.process.poll() is None, (fleet.dev_dir.parent / "dev.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "sts dev did not write dev.json"
        time.sleep(0.1)
    return Dev(fleet.dev_dir, json.loads(description_path.read_text()))


@pytest.fixture(autouse=True)
def _hostile_case(request: pytest.FixtureRequest) -> Iterator[None]:
    tally.begin(request.node.nodeid)
    yield
    tally.end()


@pytest.fixture(scope="session")
def attacker_ca() -> Ca:
    return self_signed_ca("attacker.test")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if tally.TALLY.tried:
        terminalreporter.write_line(tally.summary())
