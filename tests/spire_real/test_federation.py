"""Federation with a second SPIRE server for ``partner.test`` (issue 14, scenario 6).

The partner's SPIFFE bundle is set on the first server with ``spire-server bundle set -format spiffe``
and reaches the STS only through its entry's ``-federatesWith spiffe://partner.test``; partner JWT-SVIDs
(``spire-server jwt mint`` on the partner) are exchanged per policy. Then the partner's bundle is
replaced by a JWT-only one (no ``x509-svid`` keys): the agent sends it as *empty bytes* in the X.509
stream, and the STS's X.509 stream must survive it (its TLS certificate keeps renewing: the STS's
entry has a 30 s X.509-SVID TTL, renewed every ~15 s) with ``/readyz`` telling the truth.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509

from tests.spire_real.harness import (
    PARTNER,
    TRUST_DOMAIN,
    Deployment,
    HarnessError,
    SpireServer,
    Sts,
    deployment,
    raw_x509_svid_response,
    short_tempdir,
    tls_peer_chain,
    wait_for,
)

PARTNER_AGENT = f"spiffe://{PARTNER}/agent/summarizer"
PARTNER_ISSUER = "https://oidc.partner.test"  # jwt_issuer: the partner's JWT-SVIDs carry `iss`
STS_X509_TTL = 30


@pytest.fixture(scope="module")
def federation(spire_bin_dir: Path) -> Iterator[tuple[Deployment, SpireServer, Sts]]:
    partner = SpireServer(spire_bin_dir, short_tempdir("spp-"), PARTNER, jwt_issuer=PARTNER_ISSUER)
    try:
        partner.start()

        def federate(main: SpireServer) -> None:
            # the bundle must exist before an entry may federate with its trust domain
            main.bundle_set(PARTNER, partner.bundle_show("spiffe"))

        with deployment(
            spire_bin_dir,
            before_entries=federate,
            sts_options={"federates_with": [f"spiffe://{PARTNER}"], "x509_svid_ttl": STS_X509_TTL},
        ) as spire:
            server = Sts(
                spire.directory / "sts", spire.socket, trust_domains=(TRUST_DOMAIN, PARTNER), tls=True
            )
            try:
                server.start(server_ca=spire.server.bundle_show())
                yield spire, partner, server
            finally:
                server.stop()
    except HarnessError as e:
        pytest.fail(f"the federated SPIRE servers did not come up: {e}")
    finally:
        partner.process.kill()


def readiness(sts: Sts) -> dict[str, Any]:
    status, body = sts.readyz()
    assert status == 200, body
    return body


def test_the_partner_bundle_reaches_the_sts_through_federates_with(
    federation: tuple[Deployment, SpireServer, Sts],
) -> None:
    _, _, sts = federation
    body = readiness(sts)
    assert body["workload_api_serves"] == [TRUST_DOMAIN, PARTNER]
    assert body["trust_domains"][PARTNER] == {
        "source": "workload-api",
        "available": True,
        "jwt_authorities": 1,
        "x509_authorities": 1,
    }
    assert body["warnings"] == []


def test_partner_jwt_svids_are_exchanged_per_policy(federation: tuple[Deployment, SpireServer, Sts]) -> None:
    _, partner, sts = federation
    svid = partner.jwt_mint(PARTNER_AGENT, sts.issuer)
    allowed = sts.exchange(svid, audience="tool:web-search", scope="invoke")
    assert allowed.status_code == 200, allowed.text
    claims = jwt.decode(allowed.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == PARTNER_AGENT
    assert jwt.decode(svid, options={"verify_signature": False})["iss"] == PARTNER_ISSUER  # ignored
    refused = sts.exchange(svid, audience="tool:calc", scope="invoke")  # policy: web search only
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_target"), refused.text
    data = sts.exchange(svid, audience="data:crm", scope="read")
    assert (data.status_code, data.json()["error"]) == (400, "invalid_target"), data.text


def test_an_svid_of_an_unfederated_trust_domain_is_refused(
    federation: tuple[Deployment, SpireServer, Sts], spire_bin_dir: Path
) -> None:
    """Another SPIRE server that names itself partner.test, but whose bundle was never set."""
    _, _, sts = federation
    impostor = SpireServer(spire_bin_dir, short_tempdir("spi-"), PARTNER)
    try:
        impostor.start()
        svid = impostor.jwt_mint(PARTNER_AGENT, sts.issuer)
    finally:
        impostor.process.kill()
    response = sts.exchange(svid, audience="tool:web-search", scope="invoke")
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request"), response.text


def sts_leaf(spire: Deployment, sts: Sts) -> x509.Certificate:
    assert sts.tls_port is not None
    chain = tls_peer_chain("localhost", sts.tls_port, spire.server.bundle_show())
    return x509.load_der_x509_certificate(chain[0])


def test_a_jwt_only_partner_bundle_does_not_break_the_x509_stream(
    federation: tuple[Deployment, SpireServer, Sts],
) -> None:
    spire, partner, sts = federation
    bundle = json.loads(partner.bundle_show("spiffe"))
    bundle["keys"] = [k for k in bundle["keys"] if k.get("use") == "jwt-svid"]
    assert bundle["keys"], "the partner has a JWT authority"
    spire.server.bundle_set(PARTNER, json.dumps(bundle))
    changed_at = time.time()

    def jwt_only() -> bool:
        partner_state = readiness(sts)["trust_domains"][PARTNER]
        return bool(partner_state["x509_authorities"] == 0 and partner_state["jwt_authorities"] == 1)

    wait_for("the STS sees the JWT-only partner bundle", jwt_only, timeout=20, interval=0.3)
    # What made py-spiffe 0.3.2 fail: SPIRE sends the JWT-only trust domain as empty X.509 bytes.
    raw = raw_x509_svid_response(spire.socket)
    assert raw.federated_bundles[f"spiffe://{PARTNER}"] == b""

    # The X.509 stream goes on: the STS's TLS certificate is renewed after the change (twice, to be
    # sure the stream did not deliver one last message and die).
    renewals: list[int] = []

    def renewed_twice() -> bool:
        leaf = sts_leaf(spire, sts)
        if leaf.not_valid_before_utc.timestamp() + 10 > changed_at and leaf.serial_number not in renewals:
            renewals.append(leaf.serial_number)  # SPIRE back-dates NotBefore by 10 s
        return len(renewals) >= 2

    wait_for(
        "two renewals of the STS's TLS certificate", renewed_twice, timeout=3 * STS_X509_TTL, interval=1.0
    )
    body = readiness(sts)
    assert body["problems"] == [], body
    assert body["trust_domains"][PARTNER]["x509_authorities"] == 0
    assert body["trust_domains"][TRUST_DOMAIN]["x509_authorities"] == 1
    assert body["workload_api_serves"] == [TRUST_DOMAIN, PARTNER]

    # JWT trust in the partner is untouched, and so is mTLS for example.org workloads.
    svid = partner.jwt_mint(PARTNER_AGENT, sts.issuer)
    response = sts.exchange(svid, audience="tool:web-search", scope="invoke")
    assert response.status_code == 200, response.text
    assert sts.tls_url is not None
    mtls = spire.workloads["researcher"].token(
        sts.issuer, audience="tool:web-search", scope="invoke", mtls_endpoint=f"{sts.tls_url}/token"
    )
    assert "access_token" in mtls, mtls
