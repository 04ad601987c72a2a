"""Trust bundles streamed from the Workload API: live rotation, staleness, reconnection, federation.

The development Workload API server and the unmodified py-spiffe client on both sides: the workload
fetches its JWT-SVID through py-spiffe, the STS's watcher streams bundles through py-spiffe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from spiffe import WorkloadApiClient

from spire.registry import Registry
from spire.server import DevWorkloadApi
from sts.errors import InvalidToken, TemporarilyUnavailable
from sts.spiffeid import TrustDomain
from sts.svid import JwtSvidVerifier
from sts.trust import TrustStore
from sts.workload_api import WorkloadApiBundleSource, WorkloadApiWatcher

AUDIENCE = "https://sts.test"
EXAMPLE, PARTNER = TrustDomain("example.org"), TrustDomain("partner.test")
REGISTRATION = """
trust_domain: example.org
federated_trust_domains: [partner.test]
workloads:
  agent:   {spiffe_id: spiffe://example.org/agent/researcher}
  partner: {spiffe_id: spiffe://partner.test/agent/summarizer}
  sts:     {spiffe_id: spiffe://example.org/sts}
"""


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[DevWorkloadApi]:
    server = DevWorkloadApi(Registry.parse(REGISTRATION), tmp_path / "s")
    server.start()
    yield server
    server.stop(grace=0)


class FakeClock:
    """Monotonic time the test moves: staleness is minutes long in real life."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def watcher(api: DevWorkloadApi, clock: FakeClock) -> Iterator[WorkloadApiWatcher]:
    w = WorkloadApiWatcher(api.socket_for("sts"), max_staleness=60, clock=clock)
    w.start()
    assert w.wait_first_update(10)
    yield w
    w.stop()


def verifier(watcher: WorkloadApiWatcher, *domains: TrustDomain) -> JwtSvidVerifier:
    return JwtSvidVerifier(TrustStore(WorkloadApiBundleSource(td, watcher) for td in domains), AUDIENCE)


def fetch_svid(api: DevWorkloadApi, name: str) -> str:
    with WorkloadApiClient(socket_path=api.socket_for(name)) as client:
        return client.fetch_jwt_svid(audience={AUDIENCE}, timeout=5).token


def test_svid_from_the_workload_api_verifies(api: DevWorkloadApi, watcher: WorkloadApiWatcher) -> None:
    verified = verifier(watcher, EXAMPLE).verify(fetch_svid(api, "agent"))
    assert str(verified.spiffe_id) == "spiffe://example.org/agent/researcher"
    # X.509 bundles arrive on their own stream (FetchX509SVID), joined into the same TrustBundle.
    eventually(lambda: bool(watcher.bundle(EXAMPLE).x509_authorities))  # type: ignore[union-attr]


def test_rotation_is_used_without_restart(api: DevWorkloadApi, watcher: WorkloadApiWatcher) -> None:
    before = fetch_svid(api, "agent")
    check = verifier(watcher, EXAMPLE)
    api.rotate_ca()
    after = fetch_svid(api, "agent")
    eventually(lambda: len(watcher.bundle(EXAMPLE).jwt_authorities) == 2)  # type: ignore[union-attr]
    assert check.verify(after).spiffe_id == check.verify(before).spiffe_id  # old and new during the overlap


def test_federated_domain_only_when_configured(api: DevWorkloadApi, watcher: WorkloadApiWatcher) -> None:
    partner_svid = fetch_svid(api, "partner")
    assert str(verifier(watcher, EXAMPLE, PARTNER).verify(partner_svid).spiffe_id).startswith(
        "spiffe://partner.test"
    )
    with pytest.raises(InvalidToken) as refused:
        verifier(watcher, EXAMPLE).verify(partner_svid)
    assert refused.value.rule == "trust_domain"


def test_outage_keeps_last_bundles_until_stale_then_refuses_then_recovers(
    tmp_path: Path, api: DevWorkloadApi, watcher: WorkloadApiWatcher, clock: FakeClock
) -> None:
    svid = fetch_svid(api, "agent")
    check = verifier(watcher, EXAMPLE)
    api.stop(grace=0)
    eventually(lambda: watcher._health["jwt"].broken_since is not None)
    clock.now += 59
    assert check.verify(svid)  # within max_staleness: the last bundles still serve
    clock.now += 2
    with pytest.raises(TemporarilyUnavailable, match="stale"):
        check.verify(svid)
    assert TrustStore([WorkloadApiBundleSource(EXAMPLE, watcher)]).readiness()

    restarted = DevWorkloadApi(Registry.parse(REGISTRATION), tmp_path / "s")
    restarted.start()
    try:
        fresh = fetch_svid(restarted, "agent")  # a new CA: only the reconnected stream knows its key
        eventually(lambda: _verifies(check, fresh), timeout=15)
    finally:
        restarted.stop(grace=0)


def _verifies(check: JwtSvidVerifier, token: str) -> bool:
    try:
        check.verify(token)
    except (InvalidToken, TemporarilyUnavailable):
        return False
    return True


def test_not_ready_before_the_first_update(tmp_path: Path) -> None:
    watcher = WorkloadApiWatcher(f"unix://{tmp_path}/absent.sock", max_staleness=60)
    watcher.start()
    try:
        assert not watcher.wait_first_update(0.3)
        with pytest.raises(TemporarilyUnavailable, match="not available yet"):
            watcher.bundle(EXAMPLE)
    finally:
        watcher.stop()


def test_readyz_lists_what_the_workload_api_serves_and_warns_about_the_rest(
    api: DevWorkloadApi, tmp_path: Path
) -> None:
    """Issue 13 item 13: /readyz names the trust domains the Workload API serves; a configured one it
    does not serve is a warning (its SVIDs are refused), not a reason to stop serving the others."""
    import requests

    from tests.conftest import free_port, running_server

    port = free_port()
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "agents.cedar").write_text(
        '@id("agents") permit(principal, action, resource) when { principal.path like "/agent/*" };\n'
    )
    config = tmp_path / "sts.yaml"
    config.write_text(
        f"issuer: http://127.0.0.1:{port}\n"
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        "trust_domains:\n"
        "  example.org: {bundle: workload-api}\n"
        "  partner.test: {bundle: workload-api}\n"
        "  unfederated.test: {bundle: workload-api}\n"
        f"workload_api: {{socket: '{api.socket_for('sts')}'}}\n"
        f"keys: {{dir: {tmp_path / 'keys'}}}\n"
        f"store: {{url: 'sqlite:///{tmp_path}/sts.db'}}\n"
        "policy: {dir: policies}\n"
        "catalog:\n  - {id: tool:calc, class: tool, scopes: [invoke]}\n"
        "server: {workers: 1}\n"
    )
    with running_server(config, port) as server:
        response = requests.get(f"{server.url}/readyz", timeout=5)
    body = response.json()
    assert response.status_code == 200, body
    assert body["workload_api_serves"] == ["example.org", "partner.test"]
    assert body["trust_domains"]["example.org"]["jwt_authorities"] >= 1
    assert body["trust_domains"]["unfederated.test"] == {
        "source": "workload-api",
        "available": True,
        "jwt_authorities": 0,
        "x509_authorities": 0,
    }
    assert len(body["warnings"]) == 1 and "unfederated.test" in body["warnings"][0]
    assert body["problems"] == []


def test_an_empty_federated_x509_bundle_is_an_empty_authority_set(api: DevWorkloadApi) -> None:
    """Issue 14 item 2: SPIRE sends empty bytes for a federated trust domain that has only JWT keys.
    py-spiffe cannot parse them (the whole X.509 stream fails on every update); we read an empty set."""
    from cryptography.hazmat.primitives.serialization import Encoding
    from spiffe import TrustDomain as PySpiffeTrustDomain
    from spiffe.errors import PySpiffeError
    from spiffe.workloadapi.workload_api_client import WorkloadApiClient as PySpiffeClient

    from sts.workload_api import _TolerantClient

    example_der = b"".join(c.public_bytes(Encoding.DER) for c in api.state.ca(EXAMPLE).x509_authorities())
    update = {"spiffe://partner.test": b"", "spiffe://example.org": example_der}
    with pytest.raises(PySpiffeError):
        PySpiffeClient._create_x509_bundle_set(update)  # the upstream limitation this works around
    bundles = _TolerantClient._create_x509_bundle_set(update)
    partner = bundles.get_bundle_for_trust_domain(PySpiffeTrustDomain("partner.test"))
    assert partner is not None and partner.x509_authorities == set()
    example = bundles.get_bundle_for_trust_domain(PySpiffeTrustDomain("example.org"))
    assert example is not None and len(example.x509_authorities) >= 1


def test_readiness_covers_the_x509_stream_too(
    api: DevWorkloadApi, watcher: WorkloadApiWatcher, clock: FakeClock
) -> None:
    """Both streams count: a broken X.509 stream (our TLS certificate, mTLS authorities) is not ready
    once stale, even while the JWT stream would still be within its staleness."""
    eventually(lambda: watcher.stream_problems() == [])  # the X.509 stream's first update too
    api.stop(grace=0)
    eventually(lambda: all(h.broken_since is not None for h in watcher._health.values()))
    watcher._health["jwt"].broken_since = None  # the JWT stream is (say) fine: only X.509 is broken
    watcher._health["jwt"].updated_at = clock.now
    clock.now += 61
    problems = watcher.stream_problems()
    assert len(problems) == 1 and "X.509 bundles" in problems[0], problems
