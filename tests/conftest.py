"""Shared fixtures: test authorities per trust domain, and the real server process over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.authority import TestAuthority

ISSUER_HOST = "127.0.0.1"

TEST_POLICIES = """
// Agents of example.org may invoke tools; their tokens live at most 200 s.
@id("agents-invoke-tools")
@ttl("200")
permit(principal, action == Action::"tool:invoke", resource is Tool)
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" };

// Agents may read data; data tokens are shorter lived.
@id("agents-read-data")
@ttl("60")
permit(principal, action == Action::"data:read", resource is Dataset)
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" };

// Restricted data is never handed out by token exchange.
@id("no-restricted-data")
forbid(principal, action, resource is Dataset)
when { resource.sensitivity_rank >= 3 };

// The orchestrator hands tasks to agents.
@id("orchestrator-assigns-tasks")
permit(principal == Workload::"spiffe://example.org/orchestrator", action == Action::"task:create", resource)
when { resource.path like "/agent/*" };

// Break-glass exceptions open what they name (forbids still apply).
@id("break-glass")
@ttl("30")
permit(principal, action in [Action::"tool", Action::"data"], resource) when { context.break_glass };

// Delegation: services may act for the orchestrator on tools; one actor is never trusted.
@id("delegated-tools")
permit(principal == Workload::"spiffe://example.org/orchestrator", action in Action::"tool", resource)
when { context has actor };

@id("never-through-evil")
forbid(principal, action in [Action::"tool", Action::"data"], resource)
when { context.actors.contains("spiffe://example.org/agent/evil") };

// The partner's agents may use the web search tool only.
@id("partner-web-search")
permit(principal, action == Action::"tool:invoke", resource == Tool::"tool:web-search")
when { principal.trust_domain == "partner.test" };
"""

TEST_CATALOG = """
catalog:
  - {id: tool:web-search, class: tool, resource: "https://search.internal/", scopes: [invoke], max_ttl: 300s,
     resource_servers: [spiffe://example.org/tool/web-search]}
  - {id: tool:calc, class: tool, scopes: [invoke], max_ttl: 300s, resource_servers: [spiffe://example.org/tool/calc]}
  - {id: data:crm, class: data, sensitivity: confidential, scopes: [read, write], max_ttl: 120s,
     resource_servers: [spiffe://example.org/data/crm]}
  - {id: data:vault, class: data, sensitivity: restricted, scopes: [read], max_ttl: 120s}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ISSUER_HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def example_org() -> TestAuthority:
    return TestAuthority("example.org")


@pytest.fixture(scope="session")
def partner_test() -> TestAuthority:
    return TestAuthority("partner.test")


ADMIN = "spiffe://example.org/ops/sts-admin"


def write_config(
    directory: Path,
    port: int,
    example: TestAuthority,
    partner: TestAuthority,
    *,
    store: str | None = None,
    issuer: str | None = None,
) -> Path:
    """A complete server configuration in ``directory`` (bundles, policies, catalog)."""
    (directory / "policies").mkdir(parents=True, exist_ok=True)
    (directory / "policies" / "test.cedar").write_text(TEST_POLICIES)
    example.write_bundle(directory / "example.org.json")
    partner.write_bundle(directory / "partner.test.json")
    config = directory / "sts.yaml"
    config.write_text(
        f"issuer: {issuer or f'http://{ISSUER_HOST}:{port}'}\n"
        f"listen: {{host: {ISSUER_HOST}, port: {port}}}\n"
        "trust_domains:\n"
        "  example.org: {bundle_file: example.org.json}\n"
        "  partner.test: {bundle_file: partner.test.json}\n"
        "keys: {dir: keys}\n"
        f"store: {{url: '{store or f'sqlite:///{directory}/sts.db'}'}}\n"
        f"admins: [{ADMIN}]\n"
        "limits: {per_workload_per_second: 1000, tokens_per_task: 3}\n"
        f"{TEST_CATALOG}"
        "policy: {dir: policies}\n"
        "audit: {path: audit.jsonl}\n"
        "server: {workers: 1}\n"
    )
    return config


@dataclass(frozen=True)
class RunningServer:
    url: str
    directory: Path
    process: subprocess.Popen[bytes]
    issuer: str

    def audit_lines(self) -> list[str]:
        return (self.directory / "audit.jsonl").read_text().splitlines()

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_lines()]


def wait_ready(
    url: str, process: subprocess.Popen[bytes], timeout: float = 30.0, ca: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if requests.get(f"{url}/readyz", timeout=1, verify=str(ca) if ca else True).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


@contextmanager
def running_server(
    config: Path, port: int, *, scheme: str = "http", ca: Path | None = None
) -> Iterator[RunningServer]:
    """``sts serve --config`` as a real process on loopback until the block ends."""
    directory = config.parent
    log = (directory / "server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "sts.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"{scheme}://{ISSUER_HOST if scheme == 'http' else 'localhost'}:{port}"
    try:
        wait_ready(url, process, ca=ca)
        issuer = next(
            line.split(": ", 1)[1] for line in config.read_text().splitlines() if line.startswith("issuer: ")
        )
        yield RunningServer(url, directory, process, issuer)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[RunningServer]:
    """The production server (``sts serve``: uvicorn) with its embedded SQLite store."""
    directory = tmp_path_factory.mktemp("server")
    port = free_port()
    with running_server(write_config(directory, port, example_org, partner_test), port) as running:
        yield running
