"""An in-memory SPIFFE test authority: signing keys, a CA certificate, SPIFFE bundles and real JWT-SVIDs.

Made per test (in the spirit of go-spiffe's ``internal/test/ca.go``) so no test depends on files or
shared keys. ``forge`` and ``hmac_token`` build tokens no honest issuer would: unsigned, wrongly
signed, or HMAC-signed with a public key (the algorithm-confusion attack).

Imports ``sts.trust`` and ``sts.spiffeid`` only; used by the tests of several modules.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import Algorithm, ECAlgorithm, RSAAlgorithm, RSAPSSAlgorithm

from sts.spiffeid import TrustDomain
from sts.trust import JwtAuthority, TrustBundle, TrustStore

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# PyJWT's signer for each alg the test authority can issue with.
_SIGNERS: dict[str, Algorithm] = {
    "ES256": ECAlgorithm(ECAlgorithm.SHA256),
    "ES384": ECAlgorithm(ECAlgorithm.SHA384),
    "ES512": ECAlgorithm(ECAlgorithm.SHA512),
    "RS256": RSAAlgorithm(RSAAlgorithm.SHA256),
    "RS384": RSAAlgorithm(RSAAlgorithm.SHA384),
    "RS512": RSAAlgorithm(RSAAlgorithm.SHA512),
    "PS256": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256),
    "PS384": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA384),
    "PS512": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA512),
}
_CURVES: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
}


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_part(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def generate_key(alg: str) -> PrivateKey:
    """A fresh private key for ``alg`` (EC on the curve ES* names, else RSA 2048)."""
    if alg in _CURVES:
        return ec.generate_private_key(_CURVES[alg])
    if alg in _SIGNERS:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"the test authority cannot sign {alg}")


def public_jwk(key: JwtAuthority) -> dict[str, Any]:
    """The public JWK members of ``key`` (kty plus n/e or crv/x/y), via PyJWT."""
    if isinstance(key, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    jwk.pop("key_ops", None)  # SPIFFE bundles carry no parameters beyond the key's (Bundle §4.2)
    return jwk


def forge(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    """A compact JWS with exactly this header, these claims and this signature (no signing at all)."""
    return f"{_json_part(header)}.{_json_part(claims)}.{b64url(signature)}"


def hmac_token(header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes) -> str:
    """A token MAC'ed with HMAC-SHA256 over ``secret`` (e.g. a public key's PEM: the alg-confusion attack)."""
    signing_input = f"{_json_part(header)}.{_json_part(claims)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


class TestAuthority:
    """One trust domain's JWT signing keys and X.509 CA, issuing real JWT-SVIDs like SPIRE does."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, trust_domain: str = "example.org", alg: str = "ES256") -> None:
        self.trust_domain = TrustDomain(trust_domain)
        self.alg = alg
        self.sequence = 0
        self._keys: dict[str, PrivateKey] = {}
        self.kid = ""
        self.rotate()
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_cert = spiffe_ca_certificate(self.trust_domain, self.ca_key)

    @property
    def private_key(self) -> PrivateKey:
        return self._keys[self.kid]

    @property
    def public_key(self) -> JwtAuthority:
        return self.private_key.public_key()

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def rotate(self) -> str:
        """Add a new signing key and sign with it from now on; older keys stay in the bundle."""
        self.kid = secrets.token_urlsafe(16)
        self._keys[self.kid] = generate_key(self.alg)
        self.sequence += 1
        return self.kid

    def spiffe_bundle(self) -> bytes:
        """The SPIFFE bundle (Trust Domain and Bundle §4) with every JWT key and the X.509 CA."""
        keys: list[dict[str, Any]] = [
            public_jwk(key.public_key()) | {"use": "jwt-svid", "kid": kid} for kid, key in self._keys.items()
        ]
        ca_der = self.ca_cert.public_bytes(serialization.Encoding.DER)
        keys.append(
            public_jwk(self.ca_key.public_key())
            | {"use": "x509-svid", "x5c": [base64.b64encode(ca_der).decode("ascii")]}
        )
        document = {"keys": keys, "spiffe_sequence": self.sequence, "spiffe_refresh_hint": 300}
        return json.dumps(document, indent=2).encode()

    def jwt_jwks(self) -> bytes:
        """The Workload API ``FetchJWTBundles`` form: a plain JWKS of the JWT keys without ``use``."""
        keys = [public_jwk(key.public_key()) | {"kid": kid} for kid, key in self._keys.items()]
        return json.dumps({"keys": keys}).encode()

    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def write_bundle(self, path: Path) -> Path:
        path.write_bytes(self.spiffe_bundle())
        return path

    def bundle(self) -> TrustBundle:
        return TrustBundle.from_spiffe_bundle(self.trust_domain, self.spiffe_bundle())

    def source(self) -> AuthoritySource:
        """A bundle source that always serves this authority's current bundle (rotation included)."""
        return AuthoritySource(self)

    def mint(
        self,
        sub: str,
        aud: str | list[str],
        *,
        ttl: int = 300,
        now: float | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        header: Mapping[str, Any] | None = None,
        omit: tuple[str, ...] = (),
    ) -> str:
        """A JWT-SVID signed with the current key like SPIRE's: header ``alg, kid, typ``; claims ``sub, aud,
        exp, iat``. ``header``/``extra_claims`` override or add members (a ``None`` header value removes
        the member); ``omit`` drops header members or claims by name. The signature always uses this
        authority's own algorithm, whatever ``alg`` the header then claims."""
        issued = int(time.time() if now is None else now)
        full_header = {"alg": self.alg, "kid": self.kid, "typ": "JWT"} | dict(header or {})
        claims = {"sub": sub, "aud": aud, "exp": issued + ttl, "iat": issued} | dict(extra_claims or {})
        full_header = {k: v for k, v in full_header.items() if v is not None and k not in omit}
        claims = {k: v for k, v in claims.items() if k not in omit}
        signing_input = f"{_json_part(full_header)}.{_json_part(claims)}"
        signature = _SIGNERS[self.alg].sign(signing_input.encode("ascii"), self.private_key)
        return f"{signing_input}.{b64url(signature)}"


class AuthoritySource:
    """A :class:`sts.trust.BundleSource` over a test authority; re-parses only after a rotation."""

    def __init__(self, authority: TestAuthority) -> None:
        self._authority = authority
        self._cached: tuple[int, TrustBundle] | None = None

    @property
    def trust_domain(self) -> TrustDomain:
        return self._authority.trust_domain

    def current(self) -> TrustBundle:
        sequence = self._authority.sequence
        if self._cached is None or self._cached[0] != sequence:
            self._cached = (sequence, self._authority.bundle())
        return self._cached[1]


def trust_store(*authorities: TestAuthority) -> TrustStore:
    """A trust store trusting exactly these authorities' trust domains."""
    return TrustStore(authority.source() for authority in authorities)


def spiffe_ca_certificate(trust_domain: TrustDomain, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A self-signed SPIFFE CA (X509-SVID.md §4): cA true, keyCertSign and cRLSign, URI SAN of the domain."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain.name)])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain.id)]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
