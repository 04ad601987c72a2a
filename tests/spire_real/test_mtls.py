"""mTLS client authentication and certificate-bound tokens (RFC 8705) with agent-issued X.509-SVIDs on
the TLS listener, whose own certificate is the STS's X.509-SVID from the agent: with SPIRE's own CA,
and under ``UpstreamAuthority "disk"`` so that every SVID carries an intermediate (issue 14, scenario 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509

from sts.binding import certificate_thumbprint
from tests.spire_real.harness import (
    STS_ID,
    Deployment,
    HarnessError,
    Sts,
    deployment,
    spire_module_dir,
    tls_peer_chain,
)

TOOL = "tool:web-search"


@pytest.fixture(scope="module")
def upstream(spire_bin_dir: Path) -> Iterator[tuple[Deployment, Sts]]:
    """A SPIRE server under ``UpstreamAuthority "disk"`` (SPIRE's dummy upstream CA), its agent, and an
    STS with both listeners on it."""
    try:
        conf = spire_module_dir() / "conf" / "server"
        with deployment(
            spire_bin_dir, upstream=(conf / "dummy_upstream_ca.crt", conf / "dummy_upstream_ca.key")
        ) as spire:
            server = Sts(spire.directory / "sts", spire.socket, tls=True)
            try:
                server.start(server_ca=spire.server.bundle_show())
                yield spire, server
            finally:
                server.stop()
    except HarnessError as e:
        pytest.fail(f"SPIRE with an UpstreamAuthority did not come up: {e}")


def mtls_exchange(spire: Deployment, sts: Sts, **options: str | bool) -> dict[str, Any]:
    """``TokenClient(mtls=True)`` as the researcher: its X.509-SVID over TLS, the STS's certificate
    verified with the researcher's own bundle from the agent."""
    assert sts.tls_url is not None
    answer = spire.workloads["researcher"].token(
        sts.issuer, audience=TOOL, scope="invoke", mtls_endpoint=f"{sts.tls_url}/token", **options
    )
    assert "access_token" in answer, answer
    return answer


def leaf_of(pem_chain: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem_chain.encode())[0]


def check_bound_token(spire: Deployment, sts: Sts, answer: dict[str, Any]) -> dict[str, Any]:
    researcher = spire.workloads["researcher"]
    claims: dict[str, Any] = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"x5t#S256": certificate_thumbprint(leaf_of(answer["client_certificate"]))}
    assert claims["client_id"] == researcher.spiffe_id
    assert claims["sub"] == researcher.spiffe_id
    return claims


def server_certificates(spire: Deployment, sts: Sts) -> list[x509.Certificate]:
    """The leaf and intermediates the TLS listener presents, verified with SPIRE's bundle (the trust
    roots; OpenSSL adds the root itself when the server has no intermediates, it is left out here)."""
    assert sts.tls_port is not None
    roots = x509.load_pem_x509_certificates(spire.server.bundle_show().encode())
    chain = tls_peer_chain("localhost", sts.tls_port, spire.server.bundle_show())
    return [c for c in (x509.load_der_x509_certificate(der) for der in chain) if c not in roots]


def spiffe_ids(certificate: x509.Certificate) -> list[str]:
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]


def test_the_tls_listener_presents_the_sts_x509_svid_from_the_agent(spire: Deployment, sts: Sts) -> None:
    [leaf] = server_certificates(spire, sts)
    assert spiffe_ids(leaf) == [STS_ID]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]


def test_mtls_client_authentication_binds_the_token_to_the_agents_x509_svid(
    spire: Deployment, sts: Sts
) -> None:
    answer = mtls_exchange(spire, sts)
    check_bound_token(spire, sts, answer)
    assert len(x509.load_pem_x509_certificates(answer["client_certificate"].encode())) == 1


def test_mtls_with_a_dpop_proof_binds_to_the_dpop_key(spire: Deployment, sts: Sts) -> None:
    answer = mtls_exchange(spire, sts, dpop=True)
    claims: dict[str, Any] = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"jkt": answer["jkt"]}
    assert claims["client_id"] == spire.workloads["researcher"].spiffe_id
    assert answer["token_type"] == "DPoP"


def test_under_an_upstream_authority_the_sts_presents_its_chain(upstream: tuple[Deployment, Sts]) -> None:
    spire, sts = upstream
    leaf, intermediate = server_certificates(spire, sts)
    assert spiffe_ids(leaf) == [STS_ID]
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    root = x509.load_pem_x509_certificates(spire.server.bundle_show().encode())
    assert [r.subject for r in root] == [intermediate.issuer]  # the bundle holds the upstream root only


def test_under_an_upstream_authority_mtls_client_authentication_works(
    upstream: tuple[Deployment, Sts], tmp_path: Path
) -> None:
    spire, sts = upstream
    researcher = spire.workloads["researcher"]
    tmp_path.chmod(0o755)
    svid = researcher.run("x509", "--out", str(tmp_path))
    assert svid["chain_length"] == 2, svid  # leaf + SPIRE's CA under the upstream root
    answer = mtls_exchange(spire, sts)
    assert len(x509.load_pem_x509_certificates(answer["client_certificate"].encode())) == 2
    check_bound_token(spire, sts, answer)
