"""The development certificate authority of one trust domain: its keys, X.509-SVIDs, JWT-SVIDs and bundles.

Owns :class:`DevCa` (an in-memory EC P-256 X.509 CA plus an ES256 JWT signing key, with rotation and
an overlap during which retired authorities stay in the bundles) and :class:`X509SvidMaterial` (one
issued X.509-SVID with its private key). SVIDs are shaped like SPIRE's (``pkg/server/credtemplate``):
X509-SVID.md §4 for certificates, JWT-SVID.md §2-3 for tokens. The private keys never leave this module
except the SVID key handed to its workload.

Development only: keys live in memory and are lost on restart. Imports ``sts.spiffeid`` and
``sts.trust`` of the project; must not import gRPC, the generated protobuf module or any other
``spire`` module.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import ECAlgorithm

from sts.spiffeid import SpiffeId, TrustDomain
from sts.trust import JwtAuthority, TrustBundle

DEFAULT_X509_SVID_TTL = 3600.0
"""Seconds an X.509-SVID lives unless asked otherwise (SPIRE's default: 1 h)."""
DEFAULT_JWT_SVID_TTL = 300.0
"""Seconds a JWT-SVID lives unless asked otherwise (SPIRE's default: 5 min)."""
DEFAULT_CA_TTL = 86400.0
"""Seconds a CA certificate lives (SPIRE's default ``ca_ttl``: 24 h); SVIDs never outlive their CA."""
BACKDATE_SECONDS = 10
"""Certificates start this far in the past so a verifier whose clock lags a little still accepts them."""
REFRESH_HINT_SECONDS = 60
"""``spiffe_refresh_hint`` of the exported SPIFFE bundle: dev rotations must show up quickly."""

_KEY_USAGE_NONE: Mapping[str, bool] = {
    "digital_signature": False,
    "content_commitment": False,
    "key_encipherment": False,
    "data_encipherment": False,
    "key_agreement": False,
    "key_cert_sign": False,
    "crl_sign": False,
    "encipher_only": False,
    "decipher_only": False,
}


@dataclass(frozen=True, slots=True)
class X509SvidMaterial:
    """One issued X.509-SVID: the chain (leaf first), its PKCS#8 DER private key, and its validity."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key_der: bytes
    issued_at: float
    expires_at: float

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def chain_der(self) -> bytes:
        """The chain as concatenated DER, leaf first (the Workload API's ``x509_svid`` field)."""
        return b"".join(certificate.public_bytes(Encoding.DER) for certificate in self.chain)

    def renewal_due(self) -> float:
        """When to re-issue: at half the lifetime, as SPIRE's agent does."""
        return self.issued_at + (self.expires_at - self.issued_at) / 2


@dataclass(slots=True)
class _X509Authority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    last_expiry: float  # the latest not-after of anything it signed, so we know when it may be dropped


@dataclass(slots=True)
class _JwtAuthority:
    kid: str
    key: ec.EllipticCurvePrivateKey
    last_expiry: float


class DevCa:
    """An in-memory CA and JWT signer for one trust domain; thread-safe.

    :meth:`rotate` makes a new CA key and certificate and a new JWT key, and signs with them from then
    on. The retired authorities stay in every bundle until all SVIDs they signed have expired, then
    :meth:`prune` drops them (bundle consumers must see a new key before it signs, and keep an old one
    while its SVIDs live: SPIFFE_Trust_Domain_and_Bundle.md §4.3). ``clock`` returns Unix seconds.
    """

    def __init__(
        self,
        trust_domain: TrustDomain,
        *,
        clock: Callable[[], float] = time.time,
        ca_ttl: float = DEFAULT_CA_TTL,
    ) -> None:
        if ca_ttl <= 2 * BACKDATE_SECONDS:
            raise ValueError(f"ca_ttl must be more than {2 * BACKDATE_SECONDS} seconds")
        self._trust_domain = trust_domain
        self._clock = clock
        self._ca_ttl = ca_ttl
        self._lock = threading.Lock()
        self._sequence = 1
        self._x509: list[_X509Authority] = [self._new_x509_authority()]  # current last
        self._jwt: list[_JwtAuthority] = [_new_jwt_authority()]

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def sequence(self) -> int:
        """Grows whenever the bundle content changes (rotation, pruning): ``spiffe_sequence``."""
        with self._lock:
            return self._sequence

    @property
    def ca_certificate(self) -> x509.Certificate:
        """The CA certificate that signs new X.509-SVIDs."""
        with self._lock:
            return self._x509[-1].certificate

    @property
    def jwt_kid(self) -> str:
        """The ``kid`` of the key that signs new JWT-SVIDs."""
        with self._lock:
            return self._jwt[-1].kid

    def ca_rotation_due(self) -> float:
        """When the current CA has lived half its lifetime and should be rotated (as SPIRE does)."""
        with self._lock:
            certificate = self._x509[-1].certificate
        start = certificate.not_valid_before_utc.timestamp() + BACKDATE_SECONDS
        return start + (certificate.not_valid_after_utc.timestamp() - start) / 2

    # Issuing.

    def issue_x509_svid(
        self, spiffe_id: SpiffeId, ttl: float = DEFAULT_X509_SVID_TTL, *, dns_names: Sequence[str] = ()
    ) -> X509SvidMaterial:
        """A fresh key and leaf certificate for ``spiffe_id`` (X509-SVID.md §4), capped at the CA's expiry.

        Leaf: exactly one URI SAN, BasicConstraints cA=false (critical), KeyUsage digitalSignature only
        (critical), EKU serverAuth+clientAuth, SKI and AKI.
        """
        self._check_member(spiffe_id)
        if ttl <= 0:
            raise ValueError("an X.509-SVID TTL must be positive")
        key = ec.generate_private_key(ec.SECP256R1())
        now = self._clock()
        with self._lock:
            authority = self._x509[-1]
            # Whole seconds: that is what the certificate can say, and expires_at must agree with it.
            not_after = float(int(min(now + ttl, authority.certificate.not_valid_after_utc.timestamp())))
            leaf = (
                x509.CertificateBuilder()
                .subject_name(
                    x509.Name(
                        [
                            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sts dev workload API"),
                            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self._trust_domain.name),
                        ]
                    )
                )
                .issuer_name(authority.certificate.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_utc(now - BACKDATE_SECONDS))
                .not_valid_after(_utc(not_after))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(**(dict(_KEY_USAGE_NONE) | {"digital_signature": True})), critical=True
                )
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False,
                )
                .add_extension(
                    x509.SubjectAlternativeName(
                        [x509.UniformResourceIdentifier(str(spiffe_id))]
                        + [x509.DNSName(n) for n in dns_names]
                    ),
                    critical=False,
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
                    critical=False,
                )
                .sign(authority.key, hashes.SHA256())
            )
            authority.last_expiry = max(authority.last_expiry, not_after)
        return X509SvidMaterial(
            spiffe_id=spiffe_id,
            chain=(leaf,),
            private_key_der=key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()),
            issued_at=now,
            expires_at=not_after,
        )

    def mint_jwt_svid(
        self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: float = DEFAULT_JWT_SVID_TTL
    ) -> str:
        """An ES256 JWT-SVID like SPIRE's: header ``alg, kid, typ``; claims ``sub, aud (list), exp, iat``."""
        self._check_member(spiffe_id)
        if not audience or not all(audience):
            raise ValueError("a JWT-SVID needs at least one non-empty audience")
        if ttl <= 0:
            raise ValueError("a JWT-SVID TTL must be positive")
        now = int(self._clock())
        expiry = now + max(1, int(ttl))
        with self._lock:
            authority = self._jwt[-1]
            authority.last_expiry = max(authority.last_expiry, expiry)
            kid, key = authority.kid, authority.key
        claims = {"sub": str(spiffe_id), "aud": list(audience), "exp": expiry, "iat": now}
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})

    # Rotation.

    def rotate(self) -> None:
        """Sign with a new CA key and certificate and a new JWT key from now on; keep the old ones trusted."""
        x509_authority = self._new_x509_authority()
        jwt_authority = _new_jwt_authority()
        with self._lock:
            self._x509.append(x509_authority)
            self._jwt.append(jwt_authority)
            self._sequence += 1

    def prune(self) -> bool:
        """Drop retired authorities whose SVIDs have all expired; True when the bundles changed."""
        now = self._clock()
        with self._lock:
            x509_kept = [a for a in self._x509[:-1] if a.last_expiry > now] + self._x509[-1:]
            jwt_kept = [a for a in self._jwt[:-1] if a.last_expiry > now] + self._jwt[-1:]
            changed = len(x509_kept) != len(self._x509) or len(jwt_kept) != len(self._jwt)
            if changed:
                self._x509, self._jwt = x509_kept, jwt_kept
                self._sequence += 1
            return changed

    def next_prune(self) -> float | None:
        """When the next retired authority may be dropped, or None when none is retired."""
        with self._lock:
            expiries = [a.last_expiry for a in self._x509[:-1]] + [a.last_expiry for a in self._jwt[:-1]]
        return min(expiries) if expiries else None

    # Bundles.

    def x509_authorities(self) -> tuple[x509.Certificate, ...]:
        """Every CA certificate a verifier must trust now: the current one and those still in overlap."""
        with self._lock:
            return tuple(authority.certificate for authority in self._x509)

    def x509_bundle_der(self) -> bytes:
        """The X.509 authorities as concatenated DER (the Workload API's ``bundle`` values)."""
        return b"".join(certificate.public_bytes(Encoding.DER) for certificate in self.x509_authorities())

    def jwt_authorities(self) -> dict[str, JwtAuthority]:
        """Every JWT public key a verifier must trust now, by ``kid``."""
        with self._lock:
            return {authority.kid: authority.key.public_key() for authority in self._jwt}

    def jwt_jwks(self) -> bytes:
        """The ``FetchJWTBundles`` value: a JWKS of the JWT keys only, with ``kid``, no ``use`` (as SPIRE)."""
        keys = [_public_jwk(key) | {"kid": kid} for kid, key in self.jwt_authorities().items()]
        return json.dumps({"keys": keys}, separators=(",", ":")).encode()

    def spiffe_bundle(self) -> bytes:
        """The bundle in the SPIFFE bundle format (SPIFFE_Trust_Domain_and_Bundle.md §4), for files.

        JWT keys carry ``use: jwt-svid`` and ``kid``; CA certificates ``use: x509-svid`` and one ``x5c``
        entry and no ``kid`` (X509-SVID.md §6); with ``spiffe_sequence`` and ``spiffe_refresh_hint``.
        """
        with self._lock:
            sequence = self._sequence
            jwt_keys = [(authority.kid, authority.key.public_key()) for authority in self._jwt]
            certificates = [authority.certificate for authority in self._x509]
        keys: list[dict[str, Any]] = [
            _public_jwk(key) | {"use": "jwt-svid", "kid": kid} for kid, key in jwt_keys
        ]
        for certificate in certificates:
            public_key = certificate.public_key()
            if not isinstance(
                public_key, ec.EllipticCurvePublicKey
            ):  # pragma: no cover - we only make EC CAs
                raise TypeError("dev CA certificates carry EC keys")
            x5c = base64.b64encode(certificate.public_bytes(Encoding.DER)).decode("ascii")
            keys.append(_public_jwk(public_key) | {"use": "x509-svid", "x5c": [x5c]})
        document = {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": REFRESH_HINT_SECONDS}
        return json.dumps(document, indent=2).encode()

    def trust_bundle(self) -> TrustBundle:
        """The same authorities as :class:`sts.trust.TrustBundle`, for verifying with ``sts.svid``."""
        with self._lock:
            jwt_authorities = {authority.kid: authority.key.public_key() for authority in self._jwt}
            certificates = tuple(authority.certificate for authority in self._x509)
            sequence = self._sequence
        return TrustBundle(self._trust_domain, jwt_authorities, certificates, sequence, REFRESH_HINT_SECONDS)

    # Internals.

    def _check_member(self, spiffe_id: SpiffeId) -> None:
        if not spiffe_id.member_of(self._trust_domain):
            raise ValueError(f"{spiffe_id} is not in trust domain {self._trust_domain}")
        if not spiffe_id.path:
            raise ValueError("an SVID names a workload: its SPIFFE ID needs a path")

    def _new_x509_authority(self) -> _X509Authority:
        """A self-signed CA (X509-SVID.md §4.1).

        BasicConstraints cA and KeyUsage keyCertSign+cRLSign, both critical; URI SAN ``spiffe://<td>``.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = self._clock()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sts dev workload API"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{self._trust_domain.name} dev CA"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8)),  # tells rotated CAs apart
            ]
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - BACKDATE_SECONDS))
            .not_valid_after(_utc(now + self._ca_ttl))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(**(dict(_KEY_USAGE_NONE) | {"key_cert_sign": True, "crl_sign": True})),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(self._trust_domain.id)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return _X509Authority(key, certificate, last_expiry=now)


def _new_jwt_authority() -> _JwtAuthority:
    return _JwtAuthority(
        kid=secrets.token_urlsafe(24), key=ec.generate_private_key(ec.SECP256R1()), last_expiry=0.0
    )


def _public_jwk(key: JwtAuthority) -> dict[str, Any]:
    """The public members of an EC key as a JWK (``kty, crv, x, y``)."""
    if not isinstance(key, ec.EllipticCurvePublicKey):  # pragma: no cover - we only make EC keys
        raise TypeError("dev CA keys are EC keys")
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key, as_dict=True)
    jwk.pop("key_ops", None)  # SPIFFE bundles carry no parameters beyond the key's (Bundle §4.2)
    return jwk


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)
