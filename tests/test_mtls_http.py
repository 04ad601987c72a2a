"""mTLS end to end: real TLS on loopback, X.509-SVID client authentication, certificate-bound tokens (RFC 8705)."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from sts.binding import certificate_thumbprint
from tests.authority import TestAuthority
from tests.conftest import RunningServer, free_port, running_server, write_config

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
AGENT = "spiffe://example.org/agent/researcher"


def issue(
    authority: TestAuthority,
    directory: Path,
    name: str,
    *,
    uris: tuple[str, ...] = (AGENT,),
    dns: tuple[str, ...] = (),
    ca: bool = False,
    lifetime: tuple[int, int] = (-60, 3600),
) -> tuple[Path, Path, x509.Certificate]:
    """A certificate signed by the authority's X.509 CA, written as PEM files; shaped as asked."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris] + [
        x509.DNSName(d) for d in dns
    ]
    usage = dict.fromkeys(
        (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(seconds=lifetime[0]))
        .not_valid_after(now + datetime.timedelta(seconds=lifetime[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, **usage), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.ca_key.public_key()), critical=False
        )
        .sign(authority.ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path, certificate


def ca_files(authority: TestAuthority, directory: Path, name: str) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(authority.ca_pem())
    key_path.write_bytes(
        authority.ca_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def with_tls_listener(config: Path, port: int, authority: TestAuthority) -> Path:
    """Turn ``config`` (from ``write_config``) into a TLS listener on ``port`` with a server certificate
    from ``authority``; returns the CA file clients trust."""
    directory = config.parent
    cert, key, _ = issue(
        authority, directory, "server", uris=("spiffe://example.org/sts",), dns=("localhost",)
    )
    config.write_text(
        config.read_text().replace(
            f"listen: {{host: 127.0.0.1, port: {port}}}",
            f"listen: {{host: 127.0.0.1, port: {port}, tls: {{cert: {cert}, key: {key}, public_url: 'https://localhost:{port}'}}}}",
        )
    )
    ca = directory / "ca.pem"
    ca.write_bytes(authority.ca_pem())
    return ca


@pytest.fixture(scope="module")
def tls(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> Iterator[tuple[RunningServer, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    port = free_port()
    config = write_config(directory, port, example_org, partner_test)
    ca = with_tls_listener(config, port, example_org)
    with running_server(config, port, scheme="https", ca=ca) as server:
        yield server, directory


def post(
    server: RunningServer, directory: Path, cert: tuple[Path, Path] | None, **extra: str
) -> requests.Response:
    body = {
        "grant_type": GRANT,
        "subject_token_type": JWT_TYPE,
        "audience": "tool:calc",
        "scope": "invoke",
    } | extra
    return requests.post(
        f"{server.url.replace('127.0.0.1', 'localhost')}/token",
        data=body,
        cert=cert,
        verify=str(directory / "ca.pem"),
        timeout=10,
    )


def test_mtls_exchange_binds_the_token_to_the_certificate(
    tls: tuple[RunningServer, Path], example_org: TestAuthority
) -> None:
    server, directory = tls
    cert, key, certificate = issue(example_org, directory, "agent")
    response = post(
        server, directory, (cert, key), subject_token=example_org.mint(AGENT, server.issuer), client_id=AGENT
    )
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "Bearer"
    claims: dict[str, Any] = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"x5t#S256": certificate_thumbprint(certificate)}
    assert claims["client_id"] == AGENT
    metadata = requests.get(
        f"{server.url.replace('127.0.0.1', 'localhost')}/.well-known/oauth-authorization-server",
        verify=str(directory / "ca.pem"),
        timeout=5,
    ).json()
    assert "spiffe_x509" in metadata["token_endpoint_auth_methods_supported"]
    assert metadata["tls_client_certificate_bound_access_tokens"] is True


def test_without_a_client_certificate_the_token_is_not_bound(
    tls: tuple[RunningServer, Path], example_org: TestAuthority
) -> None:
    server, directory = tls
    response = post(server, directory, None, subject_token=example_org.mint(AGENT, server.issuer))
    assert response.status_code == 200, response.text
    assert "cnf" not in jwt.decode(response.json()["access_token"], options={"verify_signature": False})


def test_client_id_must_be_the_certificates_spiffe_id(
    tls: tuple[RunningServer, Path], example_org: TestAuthority
) -> None:
    server, directory = tls
    cert, key, _ = issue(example_org, directory, "agent2")
    response = post(
        server,
        directory,
        (cert, key),
        subject_token=example_org.mint(AGENT, server.issuer),
        client_id="spiffe://example.org/other",
    )
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")


@pytest.mark.parametrize(
    ("shape", "text"),
    [
        ({"uris": (AGENT, "spiffe://example.org/agent/twin")}, "exactly one URI SAN"),
        ({"uris": ("spiffe://example.org",)}, "name a workload"),
    ],
    ids=["two-uri-sans", "trust-domain-only-id"],
)
def test_certificates_that_are_not_svids_are_refused(
    tls: tuple[RunningServer, Path], example_org: TestAuthority, shape: dict[str, Any], text: str
) -> None:
    server, directory = tls
    cert, key, _ = issue(example_org, directory, f"bad-{len(shape['uris'])}", **shape)
    response = post(server, directory, (cert, key), subject_token=example_org.mint(AGENT, server.issuer))
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")
    assert text in response.json()["error_description"]


def test_a_ca_certificate_as_client_is_refused(
    tls: tuple[RunningServer, Path], example_org: TestAuthority
) -> None:
    """OpenSSL already refuses a CA certificate for client authentication; were it let through, the SVID
    check (``x509_leaf``) would answer invalid_client. Either way, no token."""
    server, directory = tls
    client = ca_files(example_org, directory, "ca-as-client")
    try:
        response = post(server, directory, client, subject_token=example_org.mint(AGENT, server.issuer))
    except (requests.exceptions.SSLError, requests.exceptions.ConnectionError):
        return  # refused in the handshake (an alert, or the connection closed after it)
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")


@pytest.mark.parametrize("case", ["expired", "unconfigured-trust-domain"])
def test_certificates_refused_in_the_handshake(
    tls: tuple[RunningServer, Path], example_org: TestAuthority, case: str
) -> None:
    server, directory = tls
    if case == "expired":
        cert, key, _ = issue(example_org, directory, "expired", lifetime=(-7200, -3600))
    else:
        cert, key, _ = issue(
            TestAuthority("stranger.test"), directory, "stranger", uris=("spiffe://stranger.test/agent",)
        )
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        post(server, directory, (cert, key), subject_token=example_org.mint(AGENT, server.issuer))


def test_the_server_presents_its_certificate(tls: tuple[RunningServer, Path]) -> None:
    server, directory = tls
    context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    host, port = "localhost", int(server.url.rsplit(":", 1)[1])
    import socket

    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls_socket,
    ):
        peer = x509.load_der_x509_certificate(tls_socket.getpeercert(binary_form=True) or b"")
    uris = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == ["spiffe://example.org/sts"]


def test_json_endpoints_accept_the_client_certificate(
    tls: tuple[RunningServer, Path], example_org: TestAuthority
) -> None:
    """mTLS instead of a bearer JWT-SVID: the caller is the certificate's SPIFFE ID."""
    server, directory = tls
    cert, key, _ = issue(example_org, directory, "calc-server", uris=("spiffe://example.org/tool/calc",))
    token = post(server, directory, None, subject_token=example_org.mint(AGENT, server.issuer)).json()[
        "access_token"
    ]
    base = server.url.replace("127.0.0.1", "localhost")
    answer = requests.post(
        f"{base}/introspect",
        data={"token": token},
        cert=(cert, key),
        verify=str(directory / "ca.pem"),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["active"] is True
    anonymous = requests.post(
        f"{base}/introspect", data={"token": token}, verify=str(directory / "ca.pem"), timeout=10
    )
    assert anonymous.status_code == 401


def _signed(
    subject_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    uri: str,
    *,
    ca: bool,
) -> x509.Certificate:
    """A certificate for ``subject_key`` signed by ``issuer``: a SPIFFE intermediate CA or leaf."""
    now = datetime.datetime.now(datetime.UTC)
    usage = dict.fromkeys(
        (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "intermediate" if ca else "leaf")])
        )
        .issuer_name(issuer.subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, **usage),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def write_chain(
    directory: Path,
    name: str,
    leaf: x509.Certificate,
    leaf_key: ec.EllipticCurvePrivateKey,
    intermediate: x509.Certificate,
) -> tuple[Path, Path]:
    """The client's chain (leaf, then intermediate) and its key, as PEM files for ``requests``."""
    chain_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    chain_path.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM) + intermediate.public_bytes(serialization.Encoding.PEM)
    )
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return chain_path, key_path


def test_an_svid_issued_through_an_intermediate_authenticates(
    tls: tuple[RunningServer, Path], example_org: TestAuthority
) -> None:
    """Issue 14 item 3: an UpstreamAuthority or nested SPIRE puts an intermediate between the trust
    domain's root and the leaf. The client presents leaf + intermediate; the STS verifies both against
    the leaf's own trust domain bundle and binds the token to the leaf."""
    server, directory = tls
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = _signed(
        intermediate_key, example_org.ca_cert, example_org.ca_key, "spiffe://example.org", ca=True
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _signed(leaf_key, intermediate, intermediate_key, AGENT, ca=False)
    chain_path, key_path = write_chain(directory, "chained", leaf, leaf_key, intermediate)
    response = post(
        server,
        directory,
        (chain_path, key_path),
        subject_token=example_org.mint(AGENT, server.issuer),
        client_id=AGENT,
    )
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"x5t#S256": certificate_thumbprint(leaf)}


def test_an_intermediate_of_another_trust_domain_is_refused(
    tls: tuple[RunningServer, Path], example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    """The chain must lead to the leaf's own trust domain: an example.org leaf under a partner.test
    intermediate (both trusted by the STS) is not an X.509-SVID of example.org."""
    server, directory = tls
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = _signed(
        intermediate_key, partner_test.ca_cert, partner_test.ca_key, "spiffe://partner.test", ca=True
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _signed(leaf_key, intermediate, intermediate_key, AGENT, ca=False)
    chain_path, key_path = write_chain(directory, "crossed", leaf, leaf_key, intermediate)
    try:
        response = post(
            server,
            directory,
            (chain_path, key_path),
            subject_token=example_org.mint(AGENT, server.issuer),
            client_id=AGENT,
        )
    except requests.exceptions.SSLError:
        return  # refused in the handshake: also closed
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client"), response.text
