"""JWT and X.509 authority rotation with ``spire-server localauthority … prepare → activate → taint →
revoke``, the STS running throughout (issue 14, scenarios 4 and 5).

Own deployment: the authorities it revokes are gone for good. The STS's entry has a 30 s X.509-SVID
TTL, so that the agent renews its TLS certificate every ~15 s (half its life) and the certificate
follows an activated CA by itself, without tainting the old one first.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.spire_real.harness import (
    TRUST_DOMAIN,
    Deployment,
    HarnessError,
    Sts,
    deployment,
    tls_peer_chain,
    wait_for,
)

TOOL = "tool:web-search"
STS_X509_TTL = 30


@pytest.fixture(scope="module")
def rotation(spire_bin_dir: Path) -> Iterator[tuple[Deployment, Sts]]:
    try:
        with deployment(spire_bin_dir, sts_options={"x509_svid_ttl": STS_X509_TTL}) as spire:
            server = Sts(spire.directory / "sts", spire.socket, tls=True)
            try:
                server.start(server_ca=spire.server.bundle_show())
                yield spire, server
            finally:
                server.stop()
    except HarnessError as e:
        pytest.fail(f"SPIRE for the rotation tests did not come up: {e}")


def kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def authorities_seen(sts: Sts, kind: str) -> int:
    """How many JWT or X.509 authorities of example.org the STS holds now (``/readyz``)."""
    _, body = sts.readyz()
    return int(body["trust_domains"][TRUST_DOMAIN][f"{kind}_authorities"])


def wait_authorities(sts: Sts, kind: str, count: int, timeout: float = 20.0) -> None:
    wait_for(
        f"the STS holds {count} {kind} authorities of {TRUST_DOMAIN}",
        lambda: authorities_seen(sts, kind) == count,
        timeout=timeout,
        interval=0.3,
    )


def status_of(response: Any) -> tuple[int, str | None]:
    return response.status_code, response.json().get("error")


def test_jwt_authority_rotation_without_restarting_the_sts(rotation: tuple[Deployment, Sts]) -> None:
    spire, sts = rotation
    researcher = spire.workloads["researcher"]
    old = spire.server.authorities("jwt")["active"]
    [old_svid] = researcher.jwt(sts.issuer)
    assert kid(old_svid) == old
    assert status_of(sts.exchange(old_svid)) == (200, None)

    # prepare: the next key is published in the bundle at once; nothing is signed with it yet
    prepared = spire.server.localauthority("jwt", "prepare")["prepared_authority"]["authority_id"]
    wait_authorities(sts, "jwt", 2)
    assert researcher.jwt(sts.issuer) == [old_svid]  # the agent's cache is untouched

    # activate: new JWT-SVIDs are signed with it; the agent still hands out the cached old one
    spire.server.localauthority("jwt", "activate", prepared)
    [fresh] = researcher.jwt(sts.issuer, "spiffe://example.org/another-audience-set")
    assert kid(fresh) == prepared
    assert status_of(sts.exchange(fresh)) == (200, None), "an SVID signed by the new, published key"
    assert researcher.jwt(sts.issuer) == [old_svid]

    # taint: agents drop the SVIDs the old key signed; the key stays in the bundle
    spire.server.localauthority("jwt", "taint", old)
    renewed = wait_for(
        "the agent re-mints the SVID the tainted key signed",
        lambda: next((t for t in researcher.jwt(sts.issuer) if kid(t) == prepared), None),
        timeout=20,
        interval=0.5,
    )
    assert status_of(sts.exchange(renewed)) == (200, None)
    assert status_of(sts.exchange(old_svid)) == (200, None), "tainted, not revoked: still in the bundle"

    # revoke: the old key leaves the bundle, and with it every token it signed
    spire.server.localauthority("jwt", "revoke", old)
    wait_authorities(sts, "jwt", 1)
    refused = sts.exchange(old_svid)
    assert status_of(refused) == (400, "invalid_request"), refused.text
    assert status_of(sts.exchange(renewed)) == (200, None)
    assert spire.server.authorities("jwt")["active"] == prepared


def authority_certificate(spire: Deployment, authority_id: str) -> x509.Certificate:
    """The CA certificate of one X.509 local authority (its ID is the subject key identifier)."""
    for certificate in x509.load_pem_x509_certificates(spire.server.bundle_show().encode()):
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        if ski.hex() == authority_id:
            return certificate
    raise AssertionError(f"no authority {authority_id} in the bundle")


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def sts_leaf(sts: Sts, ca: x509.Certificate) -> x509.Certificate:
    """The STS's TLS leaf, verified by a client that trusts ``ca`` only."""
    assert sts.tls_port is not None
    chain = tls_peer_chain("localhost", sts.tls_port, pem(ca))
    return x509.load_der_x509_certificate(chain[0])


def mtls_exchange(spire: Deployment, sts: Sts) -> dict[str, Any]:
    assert sts.tls_url is not None
    return spire.workloads["researcher"].token(
        sts.issuer, audience=TOOL, scope="invoke", mtls_endpoint=f"{sts.tls_url}/token"
    )


def agent_svid_serials(spire: Deployment) -> dict[str, str]:
    """Each attested agent's X.509-SVID serial number (``spire-server agent list``)."""
    listed = spire.server.cli_json("agent", "list")
    return {
        f"spiffe://{a['id']['trust_domain']}{a['id']['path']}": str(a["x509svid_serial_number"])
        for a in listed.get("agents") or []
    }


def spire_server_leaf(spire: Deployment) -> x509.Certificate:
    """The SPIRE server's own X.509-SVID, as its TLS listener presents it."""
    chain = tls_peer_chain("127.0.0.1", spire.server.port, alpn=("h2",))
    return x509.load_der_x509_certificate(chain[0])


def wait_spire_reissued(spire: Deployment, new_ca: x509.Certificate, agent_serials: dict[str, str]) -> None:
    """After ``localauthority x509 taint``: until SPIRE's own SVIDs left the tainted CA too, not only
    the workloads'. Revoking earlier strands the agent: the server re-issues its own SVID on its next
    5 s tick (``pkg/server/svid/rotator.go``), while the agent rotates its SVID at once and reconnects;
    a server certificate from a CA already gone from the agent's bundle is, with rebootstrap
    ``never``, a non-recoverable sync error (``pkg/agent/manager/manager.go``), and the agent exits
    with its Workload API. Seen under load in CI: revoke at +1 s, agent reconnect +3 s, server SVID
    +4 s."""
    assert agent_serials, "no attested agent listed before the taint"
    wait_for(
        "the SPIRE server's own X.509-SVID re-issued by the new CA",
        lambda: spire_server_leaf(spire).issuer == new_ca.subject,
        timeout=20,
        interval=0.5,
    )
    wait_for(
        "the agent's own X.509-SVID re-issued",
        lambda: all(agent_svid_serials(spire).get(a) not in (None, s) for a, s in agent_serials.items()),
        timeout=20,
        interval=0.5,
    )


def issued(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer of a workload's exchange that issued a token, else HarnessError (retried by wait_for)."""
    if "access_token" not in answer:
        raise HarnessError(f"refused: {answer}")
    return answer


def issued_by(answer: dict[str, Any], ca: x509.Certificate) -> dict[str, Any] | None:
    """The answer, if its client certificate was issued by ``ca``."""
    leaf = x509.load_pem_x509_certificates(answer["client_certificate"].encode())[0]
    return answer if leaf.issuer == ca.subject else None


def test_x509_authority_rotation_the_tls_certificate_follows(rotation: tuple[Deployment, Sts]) -> None:
    spire, sts = rotation
    old_id = spire.server.authorities("x509")["active"]
    old_ca = authority_certificate(spire, old_id)
    assert sts_leaf(sts, old_ca).issuer == old_ca.subject

    prepared = spire.server.localauthority("x509", "prepare")["prepared_authority"]["authority_id"]
    new_ca = authority_certificate(spire, prepared)
    wait_authorities(sts, "x509", 2)

    # activate: the STS's next SVID (renewed at half of its 30 s) comes from the new CA, and the TLS
    # listener serves it without a restart: a client that trusts the new CA only connects
    spire.server.localauthority("x509", "activate", prepared)
    leaf = wait_for(
        "the STS's TLS certificate issued by the new CA",
        lambda: sts_leaf(sts, new_ca),
        timeout=STS_X509_TTL + 15,
        interval=1.0,
    )
    assert leaf.issuer == new_ca.subject
    answer = mtls_exchange(spire, sts)
    assert "access_token" in answer, answer  # the researcher's SVID is still from the old CA

    # taint: the agent re-issues every SVID the old CA signed. Only then revoke (it leaves the
    # bundle): an SVID the agent has not re-issued yet would be stranded, untrusted until its renewal.
    agents = agent_svid_serials(spire)
    spire.server.localauthority("x509", "taint", old_id)
    client = wait_for(
        "an mTLS exchange with the researcher's X.509-SVID re-issued by the new CA",
        lambda: issued_by(issued(mtls_exchange(spire, sts)), new_ca),
        timeout=30,
        interval=1.0,
    )
    assert "access_token" in client
    wait_spire_reissued(spire, new_ca, agents)
    spire.server.localauthority("x509", "revoke", old_id)
    wait_authorities(sts, "x509", 1)
    assert "access_token" in mtls_exchange(spire, sts)
    with pytest.raises(ssl.SSLCertVerificationError):
        sts_leaf(sts, old_ca)
    assert sts.wait_ready()["problems"] == []


# --- long-lived clients: a rotation must not need a workload restart either ---------------------


def test_a_long_lived_resource_server_follows_a_jwt_rotation(rotation: tuple[Deployment, Sts]) -> None:
    """A resource server (``TokenVerifier``, introspecting with its own JWT-SVID) runs across a JWT
    rotation done by the book: taint, wait until the agents re-minted, revoke. Its introspection
    must go on with the re-minted JWT-SVID the agent hands out."""
    spire, sts = rotation
    researcher, tool = spire.workloads["researcher"], spire.workloads["web-search"]
    verifier = tool.session(
        "--issuer", sts.issuer, "--verify-audience", TOOL, log=spire.directory / "verifier-session.log"
    )
    try:
        token = issued(researcher.token(sts.issuer, audience=TOOL, scope="invoke"))["access_token"]
        assert verifier.request(op="verify", token=token) == {"sub": researcher.spiffe_id}

        old = spire.server.authorities("jwt")["active"]
        prepared = spire.server.localauthority("jwt", "prepare")["prepared_authority"]["authority_id"]
        wait_authorities(sts, "jwt", 2)
        spire.server.localauthority("jwt", "activate", prepared)
        spire.server.localauthority("jwt", "taint", old)
        wait_for(
            "the agent re-mints the tool's JWT-SVID",
            lambda: kid(tool.jwt(sts.issuer)[0]) == prepared,
            timeout=20,
            interval=0.5,
        )
        spire.server.localauthority("jwt", "revoke", old)
        wait_authorities(sts, "jwt", 1)

        fresh = issued(researcher.token(sts.issuer, audience=TOOL, scope="invoke"))["access_token"]
        answer = verifier.request(op="verify", token=fresh)
        assert answer == {"sub": researcher.spiffe_id}, (
            f"the resource server still introspects with the JWT-SVID the revoked key signed: {answer}"
        )
    finally:
        verifier.close()


def test_a_long_lived_token_client_follows_an_x509_rotation(rotation: tuple[Deployment, Sts]) -> None:
    """One ``TokenClient`` (mTLS) runs across an X.509 rotation done by the book: prepare, activate,
    taint, wait until the agent re-issued the SVIDs, revoke. It must present its re-issued SVID and
    trust the STS's new certificate, within ``SERVER_CA_RECHECK_SECONDS`` of the CA change."""
    from sts.client import SERVER_CA_RECHECK_SECONDS

    spire, sts = rotation
    assert sts.tls_url is not None
    researcher = spire.workloads["researcher"]
    client = researcher.session(
        "--issuer", sts.issuer, "--mtls-endpoint", f"{sts.tls_url}/token", log=spire.directory / "client.log"
    )
    try:
        assert "access_token" in client.request(op="token", audience=TOOL, scope="invoke", mtls=True)

        old_id = spire.server.authorities("x509")["active"]
        prepared = spire.server.localauthority("x509", "prepare")["prepared_authority"]["authority_id"]
        new_ca = authority_certificate(spire, prepared)
        wait_authorities(sts, "x509", 2)
        spire.server.localauthority("x509", "activate", prepared)
        wait_for(
            "the STS's TLS certificate issued by the new CA",
            lambda: sts_leaf(sts, new_ca),
            timeout=STS_X509_TTL + 15,
            interval=1.0,
        )
        agents = agent_svid_serials(spire)
        spire.server.localauthority("x509", "taint", old_id)
        tmp = spire.directory / "x509-check"
        tmp.mkdir(exist_ok=True)
        wait_for(
            "the agent re-issues the researcher's X.509-SVID",
            lambda: researcher.run("x509", "--out", str(tmp))["issuers"] == [new_ca.subject.rfc4514_string()],
            timeout=20,
            interval=0.5,
        )
        wait_spire_reissued(spire, new_ca, agents)
        spire.server.localauthority("x509", "revoke", old_id)
        wait_authorities(sts, "x509", 1)

        answer = wait_for(
            "the long-lived client's mTLS exchange after the rotation",
            lambda: issued(client.request(op="token", audience=TOOL, scope="invoke", mtls=True)),
            timeout=SERVER_CA_RECHECK_SECONDS + 15,
            interval=2.0,
        )
        assert issued_by(answer, new_ca) is not None
    finally:
        client.close()
