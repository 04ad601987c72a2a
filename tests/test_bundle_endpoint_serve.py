"""Federation over the bundle endpoint end to end (issue 15): a real ``sts serve`` trusts
``partner.test`` through the partner's bundle endpoint (a local HTTPS server of the test's own),
exchanges partner JWT-SVIDs (TEST_POLICIES let partner agents invoke ``tool:web-search``), follows the
partner's key rotation without a restart, survives a restart while the partner is down from the
persisted bundle, and refuses (503, ``/readyz`` saying why) once nothing fresh is left.

The server polls at most every 5 s (``MIN_REFRESH_SECONDS``), so following a rotation takes up to
that long; the rotation test waits one such interval after the first worker follows, because which
worker answers a connection is the kernel's choice and only the interval says every worker has polled.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.authority import TestAuthority
from tests.conftest import ISSUER_HOST, RunningServer, free_port, write_config
from tests.test_bundle_endpoint import (
    ENDPOINT_ID,
    PartnerEndpoint,
    bundle_document,
    spiffe_endpoint_certificate,
    web_certificate,
)

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
PARTNER_AGENT = "spiffe://partner.test/agent/scout"
AGENT = "spiffe://example.org/agent/researcher"
FOLLOW_TIMEOUT = 20.0  # one poll interval (5 s at the shortest) plus start-up and fetch, generously


def endpoint_config(
    directory: Path,
    port: int,
    example: TestAuthority,
    partner: TestAuthority,
    entry: str,
    *,
    workers: int = 1,
) -> Path:
    """conftest's server configuration, with partner.test from its bundle endpoint (``entry``); the
    partner.test.json it writes is the bootstrap bundle."""
    config = write_config(directory, port, example, partner)
    text = config.read_text()
    text = text.replace("  partner.test: {bundle_file: partner.test.json}\n", f"  partner.test: {entry}\n")
    text = text.replace("server: {workers: 1}", f"server: {{workers: {workers}}}")
    config.write_text(text)
    return config


@contextmanager
def serving(config: Path, port: int, *, ready: bool = True) -> Iterator[RunningServer]:
    """``sts serve``; waits for ``/healthz`` (and ``/readyz`` 200 when ``ready``)."""
    directory = config.parent
    log = (directory / "server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "sts.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{ISSUER_HOST}:{port}"
    try:
        _until(lambda: _status(url, "/healthz", process) == 200, 30, f"healthz of {url}")
        if ready:
            _until(lambda: _status(url, "/readyz", process) == 200, 30, f"readyz of {url}")
        yield RunningServer(url, directory, process, url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _status(url: str, path: str, process: subprocess.Popen[bytes]) -> int | None:
    if process.poll() is not None:
        raise RuntimeError(f"sts serve exited with {process.returncode}")
    try:
        return requests.get(f"{url}{path}", timeout=2).status_code
    except requests.ConnectionError:
        return None


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(0.1)


def exchange(server: RunningServer, svid: str, audience: str = "tool:web-search") -> requests.Response:
    body = {
        "grant_type": GRANT,
        "subject_token": svid,
        "subject_token_type": JWT_TYPE,
        "audience": audience,
        "scope": "invoke",
    }
    return requests.post(f"{server.url}/token", data=body, timeout=10)


def readyz(server: RunningServer) -> tuple[int, dict[str, Any]]:
    response = requests.get(f"{server.url}/readyz", timeout=5)
    return response.status_code, response.json()


@pytest.fixture
def partner() -> TestAuthority:
    return TestAuthority("partner.test")


def spiffe_entry(endpoint: PartnerEndpoint, extra: str = "") -> str:
    return (
        f"{{bundle_endpoint: '{endpoint.url()}', endpoint_profile: https_spiffe, "
        f"endpoint_spiffe_id: '{ENDPOINT_ID}', bootstrap_bundle_file: partner.test.json{extra}}}"
    )


def test_serve_trusts_the_partner_through_https_spiffe_and_follows_its_rotation(
    tmp_path: Path, example_org: TestAuthority, partner: TestAuthority
) -> None:
    endpoint = PartnerEndpoint(*spiffe_endpoint_certificate(partner, tmp_path))
    endpoint.serve(bundle_document(partner, hint=1))
    port = free_port()
    config = endpoint_config(tmp_path, port, example_org, partner, spiffe_entry(endpoint), workers=2)
    try:
        with serving(config, port) as server:
            status, body = readyz(server)
            assert status == 200, body
            detail = body["trust_domains"]["partner.test"]
            assert detail["source"] == "bundle_endpoint" and detail["endpoint_profile"] == "https_spiffe"
            assert detail["sequence"] == partner.sequence and detail["jwt_authorities"] == 1
            assert time.time() - 30 < detail["last_refresh"] <= time.time()
            assert 0 <= detail["age_seconds"] < 30 and detail["refresh_seconds"] == 5.0
            assert body["trust_domains"]["example.org"]["source"] == "file"

            response = exchange(server, partner.mint(PARTNER_AGENT, server.issuer))
            assert response.status_code == 200, response.text
            refused = exchange(server, partner.mint(PARTNER_AGENT, server.issuer), audience="tool:calc")
            assert refused.status_code == 400  # policy: the partner's agents get the web search only

            # The partner rotates: a new signing key, published with a higher sequence. Both workers
            # pick it up within a poll interval, without a restart.
            partner.rotate()
            endpoint.serve(bundle_document(partner, hint=1))
            new_svid = partner.mint(PARTNER_AGENT, server.issuer)
            assert exchange(server, new_svid).status_code == 400, "not published to us yet"
            # Which worker answers a connection is the kernel's choice, so a streak of successes alone
            # may all come from the worker that polled first. Every worker polls at least once per
            # refresh interval: once that long has passed since the first success, a worker still on
            # the old bundle is a defect, and each round asks both the token endpoint and /readyz.
            first_success: list[float] = []
            streak: list[bool] = []  # rounds begun a full refresh interval after the first success

            def both_workers_follow() -> bool:
                begun = time.monotonic()
                followed = exchange(server, new_svid).status_code == 200
                if followed and not first_success:
                    first_success.append(begun)
                _, body = readyz(server)
                followed = followed and body["trust_domains"]["partner.test"]["sequence"] == partner.sequence
                if first_success and begun - first_success[0] > detail["refresh_seconds"]:
                    streak.append(followed)
                return streak[-8:] == [True] * 8

            _until(both_workers_follow, FOLLOW_TIMEOUT, "the rotated key in every worker")
        cache = tmp_path / "bundles" / "partner.test.json"  # the default: next to keys.dir
        assert cache.stat().st_mode & 0o777 == 0o600
        assert json.loads(cache.read_text())["trust_domain"] == "partner.test"
        assert endpoint.requests and set(endpoint.requests) == {"/bundle.json"}
    finally:
        endpoint.close()


def test_serve_trusts_the_partner_through_https_web(
    tmp_path: Path, example_org: TestAuthority, partner: TestAuthority
) -> None:
    web_ca = TestAuthority("webpki.test")
    (tmp_path / "web-ca.pem").write_bytes(web_ca.ca_pem())
    endpoint = PartnerEndpoint(*web_certificate(web_ca, tmp_path))
    endpoint.serve(bundle_document(partner))
    port = free_port()
    entry = (
        f"{{bundle_endpoint: '{endpoint.url('localhost')}', endpoint_profile: https_web, "
        "endpoint_ca_file: web-ca.pem}"
    )
    try:
        with serving(endpoint_config(tmp_path, port, example_org, partner, entry), port) as server:
            assert exchange(server, partner.mint(PARTNER_AGENT, server.issuer)).status_code == 200
            _, body = readyz(server)
            assert body["trust_domains"]["partner.test"]["endpoint_profile"] == "https_web"
    finally:
        endpoint.close()


def test_a_restart_while_the_partner_is_down_serves_the_persisted_bundle_until_max_staleness(
    tmp_path: Path, example_org: TestAuthority, partner: TestAuthority
) -> None:
    endpoint = PartnerEndpoint(*spiffe_endpoint_certificate(partner, tmp_path))
    endpoint.serve(bundle_document(partner))
    port = free_port()
    cache = tmp_path / "state" / "partner.test.json"
    entry = spiffe_entry(endpoint, f", max_staleness: 15s, cache_file: {cache}")
    config = endpoint_config(tmp_path, port, example_org, partner, entry)
    with serving(config, port) as server:
        assert exchange(server, partner.mint(PARTNER_AGENT, server.issuer)).status_code == 200
    endpoint.close()  # the partner goes down while we are stopped
    # Pretend the last good fetch was 9 s ago: 6 s of max_staleness are left after the restart.
    document = json.loads(cache.read_text())
    document["fetched_at"] = time.time() - 9
    cache.write_text(json.dumps(document))
    with serving(config, port) as server:
        status, body = readyz(server)
        assert status == 200, body
        assert body["trust_domains"]["partner.test"]["from_cache"] is True
        assert exchange(server, partner.mint(PARTNER_AGENT, server.issuer)).status_code == 200
        _until(
            lambda: exchange(server, partner.mint(PARTNER_AGENT, server.issuer)).status_code == 503,
            FOLLOW_TIMEOUT,
            "the persisted bundle going stale",
        )
        refused = exchange(server, partner.mint(PARTNER_AGENT, server.issuer)).json()
        assert refused["error"] == "temporarily_unavailable"
        status, body = readyz(server)
        assert status == 503
        (problem,) = body["problems"]
        assert problem.startswith(
            "trust bundle for partner.test is unavailable: the trust bundle of partner.test"
        )
        assert "stale" in problem and "cannot connect" in problem, problem
        assert body["trust_domains"]["partner.test"]["available"] is False
        # The other trust domain is not affected.
        assert exchange(server, example_org.mint(AGENT, server.issuer)).status_code == 200


def test_a_partner_down_from_the_start_is_503_and_readyz_says_why(
    tmp_path: Path, example_org: TestAuthority, partner: TestAuthority
) -> None:
    endpoint = PartnerEndpoint(*spiffe_endpoint_certificate(partner, tmp_path))
    endpoint.close()  # its port is closed: nothing answers there
    port = free_port()
    config = endpoint_config(tmp_path, port, example_org, partner, spiffe_entry(endpoint))
    with serving(config, port, ready=False) as server:
        status, body = readyz(server)
        assert status == 503
        (problem,) = body["problems"]
        assert "no trust bundle for partner.test from its bundle endpoint yet" in problem
        assert "cannot connect" in problem
        detail = body["trust_domains"]["partner.test"]
        assert detail["available"] is False and detail["sequence"] is None and detail["last_refresh"] is None
        refused = exchange(server, partner.mint(PARTNER_AGENT, server.issuer))
        assert refused.status_code == 503 and refused.json()["error"] == "temporarily_unavailable"
        assert exchange(server, example_org.mint(AGENT, server.issuer)).status_code == 200
