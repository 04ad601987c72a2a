"""Sender-constrained tokens: DPoP proofs (RFC 9449) and certificate thumbprints (RFC 8705).

A bound token carries ``cnf``: ``jkt`` (the RFC 7638 thumbprint of the client's DPoP key) or
``x5t#S256`` (the SHA-256 of its TLS client certificate). Whoever presents it must prove possession
of that key with every request, so a stolen copy is useless. This module checks DPoP proofs (for
``/token`` and for resource servers, which also check ``ath``) and makes them (for clients). Replay of
a proof's ``jti`` is refused through the shared store, so it holds across replicas.

Must not import Flask or the exchange; it is handed the header value, method and URL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from sts.errors import StsError

DPOP_TYPE = "dpop+jwt"
DPOP_ALGORITHMS = ("ES256", "EdDSA")
DEFAULT_WINDOW_SECONDS = 60
MAX_PROOF_CHARS = 4096
MAX_JTI_CHARS = 256
_PUBLIC_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})


class InvalidDpopProof(StsError):
    """RFC 9449 §5.2 / §7.1: the DPoP proof is missing, malformed, replayed or does not fit the request."""

    error = "invalid_dpop_proof"
    status = 400


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def certificate_thumbprint(certificate: x509.Certificate) -> str:
    """RFC 8705 §3.1 ``x5t#S256``: base64url SHA-256 of the certificate's DER encoding."""
    return b64url(hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest())


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required public members in lexicographic order, base64url."""
    members = _PUBLIC_MEMBERS.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError("unsupported key type")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def access_token_hash(access_token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url SHA-256 of the ASCII access token."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def normalize_htu(url: str) -> str:
    """RFC 9449 §4.3 item 9: compare ``htu`` without query and fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", "", ""))


@dataclass(frozen=True, slots=True)
class DpopProof:
    """A checked proof: the key's thumbprint (``cnf.jkt``) and the proof's ``jti``."""

    jkt: str
    jti: str


class DpopVerifier:
    """Checks DPoP proofs in RFC 9449 §4.3 order; ``use_once`` is the store's single-use check."""

    def __init__(
        self,
        *,
        use_once: Callable[[str, int], bool],
        window_seconds: int = DEFAULT_WINDOW_SECONDS,
    ) -> None:
        self._use_once = use_once
        self._window = window_seconds

    def verify(
        self,
        proof: str | None,
        *,
        method: str,
        urls: tuple[str, ...],
        access_token: str | None = None,
        now: float | None = None,
    ) -> DpopProof:
        """``urls``: every URL this endpoint is known by (its ``htu`` must be one of them)."""
        current = time.time() if now is None else now
        if not proof or len(proof) > MAX_PROOF_CHARS:
            raise InvalidDpopProof("send exactly one DPoP proof of reasonable size")
        try:
            header = jwt.get_unverified_header(proof)
        except jwt.PyJWTError as e:
            raise InvalidDpopProof("the DPoP proof is not a JWT") from e
        if header.get("typ") != DPOP_TYPE:
            raise InvalidDpopProof(f"the DPoP proof's typ must be {DPOP_TYPE}")
        alg = header.get("alg")
        if alg not in DPOP_ALGORITHMS:
            raise InvalidDpopProof(f"the DPoP proof's alg must be one of {', '.join(DPOP_ALGORITHMS)}")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict) or _PRIVATE_MEMBERS & set(jwk):
            raise InvalidDpopProof("the DPoP proof's jwk header must be a public key")
        key, jkt = _public_key(jwk, alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                proof,
                key,
                algorithms=[alg],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False, "verify_aud": False},
            )
        except jwt.PyJWTError as e:
            raise InvalidDpopProof("the DPoP proof's signature does not verify with its jwk") from e
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_CHARS:
            raise InvalidDpopProof("the DPoP proof needs a jti")
        if claims.get("htm") != method:
            raise InvalidDpopProof("the DPoP proof's htm does not match the request method")
        htu = claims.get("htu")
        if not isinstance(htu, str) or normalize_htu(htu) not in {normalize_htu(u) for u in urls}:
            raise InvalidDpopProof("the DPoP proof's htu does not match this endpoint")
        iat = claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, int | float) or abs(current - iat) > self._window:
            raise InvalidDpopProof(f"the DPoP proof's iat must be within {self._window} s of now")
        if access_token is not None and claims.get("ath") != access_token_hash(access_token):
            raise InvalidDpopProof("the DPoP proof's ath does not match the access token")
        if not self._use_once(f"dpop:{jkt}:{jti}", int(iat) + 2 * self._window):
            raise InvalidDpopProof("the DPoP proof was used before (replayed jti)")
        return DpopProof(jkt=jkt, jti=jti)


def _public_key(jwk: dict[str, Any], alg: str) -> tuple[Any, str]:
    """The key a proof's ``jwk`` names, refusing anything but P-256 for ES256 and Ed25519 for EdDSA."""
    expected = {"ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519")}[alg]
    if (jwk.get("kty"), jwk.get("crv")) != expected:
        raise InvalidDpopProof("the DPoP proof's jwk does not fit its alg")
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
        return key, jwk_thumbprint(jwk)
    except (jwt.PyJWTError, KeyError, ValueError) as e:
        raise InvalidDpopProof("the DPoP proof's jwk is not a valid public key") from e


class DpopKey:
    """A client's DPoP key pair (ES256 by default): proofs for the token endpoint and resource servers."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> None:
        self._private_key = private_key
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            self.alg = "ES256"
            self.public_jwk: dict[str, Any] = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        else:
            self.alg = "EdDSA"
            self.public_jwk = OKPAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        self.jkt = jwk_thumbprint(self.public_jwk)

    @classmethod
    def generate(cls, alg: str = "ES256") -> DpopKey:
        if alg == "EdDSA":
            return cls(ed25519.Ed25519PrivateKey.generate())
        return cls(ec.generate_private_key(ec.SECP256R1()))

    def proof(
        self, method: str, url: str, *, access_token: str | None = None, now: float | None = None
    ) -> str:
        """RFC 9449 §4.2: a fresh proof for one request (new ``jti`` each time)."""
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": normalize_htu(url),
            "iat": int(time.time() if now is None else now),
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        headers = {"typ": DPOP_TYPE, "jwk": self.public_jwk}
        return jwt.encode(claims, self._private_key, algorithm=self.alg, headers=headers)
