"""``sts dev`` end to end: the development environment as a user runs it, in a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from spiffe import WorkloadApiClient

from sts.dev.story import free_port_pair

DEMO_WORKLOADS = {"agent", "orchestrator", "tool", "data", "admin", "partner"}


@dataclass(frozen=True)
class DevEnvironment:
    process: subprocess.Popen[bytes]
    state_dir: Path
    description: dict[str, Any]

    def svid(self, workload: str) -> str:
        socket = self.description["workloads"][workload]["socket"]
        with WorkloadApiClient(socket_path=socket) as client:
            return client.fetch_jwt_svid(audience={self.description["issuer"]}, timeout=5).token

    def exchange(self, svid: str, audience: str, scope: str) -> requests.Response:
        body = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "subject_token": svid,
            "audience": audience,
            "scope": scope,
        }
        return requests.post(self.description["token_endpoint"], data=body, timeout=10)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevEnvironment]:
    state_dir = tmp_path_factory.mktemp("dev")
    log = (state_dir / "dev.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sts.cli",
            "dev",
            "--state-dir",
            str(state_dir),
            "--port",
            str(free_port_pair()),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (state_dir / "dev.json").exists():
            assert process.poll() is None, (state_dir / "dev.log").read_text()
            assert time.monotonic() < deadline, "sts dev did not write dev.json"
            time.sleep(0.1)
        description = json.loads((state_dir / "dev.json").read_text())
        yield DevEnvironment(process, state_dir, description)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=20)
        log.close()


def test_dev_json_describes_the_environment(dev: DevEnvironment) -> None:
    description = dev.description
    assert description["token_endpoint"] == description["issuer"] + "/token"
    assert description["trust_domain"] == "example.org"
    assert set(description["workloads"]) == DEMO_WORKLOADS
    assert description["workloads"]["agent"]["spiffe_id"] == "spiffe://example.org/agent/researcher"
    assert description["workloads"]["partner"]["spiffe_id"].startswith("spiffe://partner.test/")
    for workload in description["workloads"].values():
        assert workload["socket"].startswith(f"unix://{dev.state_dir}/")


def test_both_listeners_serve_the_issuers_one_metadata_document(dev: DevEnvironment) -> None:
    """RFC 8414 §3 and RFC 8705 §5: the TLS listener is named by the aliases, and serves the same bytes."""
    mtls_token_endpoint = dev.description["mtls_token_endpoint"]
    tls_base = mtls_token_endpoint.removesuffix("/token")
    well_known = "/.well-known/oauth-authorization-server"
    plain = requests.get(dev.description["issuer"] + well_known, timeout=5)
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as ca:
        ca.write(dev.description["server_ca"])
        ca.flush()
        tls = requests.get(tls_base + well_known, verify=ca.name, timeout=5)
    assert plain.content == tls.content
    assert plain.json()["mtls_endpoint_aliases"]["token_endpoint"] == mtls_token_endpoint


def issued_claims(dev: DevEnvironment, response: requests.Response, audience: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    jwks = jwt.PyJWKSet.from_dict(requests.get(dev.description["issuer"] + "/jwks.json", timeout=5).json())
    key = next(k for k in jwks.keys if k.key_id == jwt.get_unverified_header(token)["kid"])
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["ES256"], audience=audience, issuer=dev.description["issuer"]
    )
    return claims


def test_agent_exchanges_its_workload_api_svid(dev: DevEnvironment) -> None:
    response = dev.exchange(dev.svid("agent"), "tool:web-search", "invoke")
    claims = issued_claims(dev, response, "tool:web-search")
    assert claims["sub"] == "spiffe://example.org/agent/researcher"
    assert claims["token_class"] == "tool"


def test_federated_partner_is_trusted(dev: DevEnvironment) -> None:
    response = dev.exchange(dev.svid("partner"), "tool:web-search", "invoke")
    assert issued_claims(dev, response, "tool:web-search")["sub"].startswith("spiffe://partner.test/")


def test_ca_rotation_needs_no_restart(dev: DevEnvironment) -> None:
    kid_before = jwt.get_unverified_header(dev.svid("agent"))["kid"]
    dev.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 15
    while jwt.get_unverified_header(svid := dev.svid("agent"))["kid"] == kid_before:
        assert time.monotonic() < deadline, "the CA did not rotate"
        time.sleep(0.1)
    while (response := dev.exchange(svid, "tool:web-search", "invoke")).status_code != 200:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)
    assert issued_claims(dev, response, "tool:web-search")["sub"] == "spiffe://example.org/agent/researcher"
    assert dev.process.poll() is None


def test_ca_rotation_rewrites_dev_json_for_tls_clients(dev: DevEnvironment) -> None:
    """SIGUSR1: dev.json's server_ca gains the new CA (written atomically), so TLS clients keep working."""
    before = json.loads((dev.state_dir / "dev.json").read_text())["server_ca"]
    dev.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 15
    while (after := json.loads((dev.state_dir / "dev.json").read_text())["server_ca"]) == before:
        assert time.monotonic() < deadline, "dev.json was not rewritten after the CA rotation"
        time.sleep(0.05)
    assert after.count("BEGIN CERTIFICATE") > before.count("BEGIN CERTIFICATE")
    tls_base = dev.description["mtls_token_endpoint"].removesuffix("/token")
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as ca:
        ca.write(after)
        ca.flush()
        assert requests.get(tls_base + "/healthz", verify=ca.name, timeout=5).status_code == 200


def test_a_second_instance_on_the_same_state_dir_is_refused(dev: DevEnvironment) -> None:
    """Item 3 of issue 13: the lock file names the live instance; nothing of it is touched."""
    sockets_before = sorted((dev.state_dir / "sockets").glob("*.sock"))
    description_before = (dev.state_dir / "dev.json").read_text()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sts.cli",
            "dev",
            "--state-dir",
            str(dev.state_dir),
            "--port",
            str(free_port_pair()),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert f"is in use by a running sts dev (pid {dev.process.pid})" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted((dev.state_dir / "sockets").glob("*.sock")) == sockets_before
    assert (dev.state_dir / "dev.json").read_text() == description_before
    assert dev.exchange(dev.svid("agent"), "tool:web-search", "invoke").status_code == 200


def test_a_busy_port_is_refused_before_anything_starts(dev: DevEnvironment, tmp_path: Path) -> None:
    port = int(dev.description["issuer"].rsplit(":", 1)[1])
    for taken in (port, port - 1):  # the plain port itself, and a TLS port (port + 1) in use
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "sts.cli",
                "dev",
                "--state-dir",
                str(tmp_path / str(taken)),
                "--port",
                str(taken),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert "cannot listen on 127.0.0.1:" in result.stderr and "--port" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / str(taken) / "sockets").exists()


def _describes_a_live_instance(path: Path) -> bool:
    try:
        return "issuer" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    """A lock file whose owner died (no flock held) is provably stale: a new sts dev starts."""
    state_dir = tmp_path / "dev"
    state_dir.mkdir()
    (state_dir / "dev.lock").write_text("999999\n")
    (state_dir / "dev.json").write_text("{}")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sts.cli",
            "dev",
            "--state-dir",
            str(state_dir),
            "--port",
            str(free_port_pair()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not _describes_a_live_instance(state_dir / "dev.json"):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert (state_dir / "dev.lock").read_text().strip() == str(process.pid)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    assert not (state_dir / "dev.lock").exists()


def _admin_command(dev: DevEnvironment, workload: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    tls_base = dev.description["mtls_token_endpoint"].removesuffix("/token")
    socket = dev.description["workloads"][workload]["socket"]
    command = [sys.executable, "-m", "sts.cli", "admin", *arguments, "--issuer", tls_base, "--socket", socket]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)


def test_admin_commands_authenticate_with_the_admins_x509_svid(dev: DevEnvironment) -> None:
    """``--mtls``: the admin's X.509-SVID from its Workload API socket is the client certificate on the
    TLS listener (RFC 8705 §2.2), the server verified with the trust bundle the same socket gives."""
    listed = _admin_command(dev, "admin", "revocations", "--mtls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), dict)
    revoked = _admin_command(
        dev, "admin", "revoke", "--mtls", "--jti", "jti-from-test-dev", "--reason", "mTLS admin test"
    )
    assert revoked.returncode == 0, revoked.stderr
    records = [json.loads(line) for line in (dev.state_dir / "audit.jsonl").read_text().splitlines()]
    assert any(
        record.get("event") == "admin_revocation" and record.get("jti") == "jti-from-test-dev"
        for record in records
    ), records[-3:]


def test_an_x509_svid_that_is_not_an_admins_is_refused(dev: DevEnvironment) -> None:
    refused = _admin_command(dev, "agent", "revocations", "--mtls")
    assert refused.returncode == 1, refused.stderr
    assert "403" in refused.stderr and "access_denied" in refused.stderr
    unusable = _admin_command(dev, "admin", "revocations", "--mtls", "--svid-file", "/dev/null")
    assert unusable.returncode == 2 and "--mtls" in unusable.stderr


def test_ctrl_c_stops_everything_and_removes_the_sockets(dev: DevEnvironment) -> None:
    dev.process.send_signal(signal.SIGINT)
    assert dev.process.wait(timeout=20) == 0
    assert not list((dev.state_dir / "sockets").glob("*.sock"))
    assert not (dev.state_dir / "dev.json").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(dev.description["issuer"] + "/healthz", timeout=2)
