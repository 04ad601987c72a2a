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
import functools
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlunsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import Algorithm, ECAlgorithm, OKPAlgorithm

from sts.errors import StsError
from sts.strict_json import b64url_decode, loads_object, numeric_date, split_uri

DPOP_TYPE = "dpop+jwt"
# RFC 9864 §2.2: "Ed25519" is the fully-specified name of EdDSA over Ed25519 (panva's libraries
# write it); "EdDSA" is the polymorphic name older clients send. Both are accepted and advertised.
DPOP_ALGORITHMS = ("ES256", "EdDSA", "Ed25519")
DEFAULT_WINDOW_SECONDS = 60
MAX_PROOF_CHARS = 4096
MAX_JTI_CHARS = 256
MAX_HTU_CHARS = 2048
_PUBLIC_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})
_VERIFIERS: Mapping[str, Algorithm] = {
    "ES256": ECAlgorithm(ECAlgorithm.SHA256),
    "EdDSA": OKPAlgorithm(),
    "Ed25519": OKPAlgorithm(),
}


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
    """RFC 9449 §4.3 item 9: compare ``htu`` without query and fragment.

    Raises ValueError when ``url`` is not a URI :func:`sts.strict_json.split_uri` accepts (a bad IPv6
    literal or port, white space, non-ASCII): the verifier refuses such an ``htu``.
    """
    parts = split_uri(url)
    if parts is None:
        raise ValueError("not a URI")
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
        """``urls``: every URL this endpoint is known by (its ``htu`` must be one of them).

        The proof is parsed here, not by PyJWT: both parts go through :func:`sts.strict_json.loads`
        (PyJWT's ``json`` takes ``NaN`` and raises ``RecursionError`` on deep nesting), and every claim
        is type-checked before it meets arithmetic, so any proof at all is a proof or an
        :class:`InvalidDpopProof`, never another exception.
        """
        current = time.time() if now is None else now
        if not proof or len(proof) > MAX_PROOF_CHARS:
            raise InvalidDpopProof("send exactly one DPoP proof of reasonable size")
        header, payload, signing_input, signature = _compact_parts(proof)
        if header.get("typ") != DPOP_TYPE:
            raise InvalidDpopProof(f"the DPoP proof's typ must be {DPOP_TYPE}")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in DPOP_ALGORITHMS:
            raise InvalidDpopProof(f"the DPoP proof's alg must be one of {', '.join(DPOP_ALGORITHMS)}")
        if "crit" in header:  # RFC 7515 §4.1.11: no extension is understood here
            raise InvalidDpopProof(
                "the DPoP proof carries critical header extensions, which are not supported"
            )
        jwk = header.get("jwk")
        if not isinstance(jwk, dict) or _PRIVATE_MEMBERS & set(jwk):
            raise InvalidDpopProof("the DPoP proof's jwk header must be a public key")
        key, jkt = _public_key(jwk, alg)
        if not _VERIFIERS[alg].verify(signing_input, key, signature):
            raise InvalidDpopProof("the DPoP proof's signature does not verify with its jwk")
        claims = _json_object(payload, "claims set")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_CHARS:
            raise InvalidDpopProof("the DPoP proof needs a jti")
        htm = claims.get("htm")
        if not isinstance(htm, str) or htm != method:
            raise InvalidDpopProof("the DPoP proof's htm does not match the request method")
        htu = claims.get("htu")
        expected = _expected_htus(urls)
        if not isinstance(htu, str) or len(htu) > MAX_HTU_CHARS or _checked_htu(htu) not in expected:
            raise InvalidDpopProof("the DPoP proof's htu does not match this endpoint")
        iat = numeric_date(claims.get("iat"))
        if iat is None or abs(current - iat) > self._window:
            raise InvalidDpopProof(f"the DPoP proof's iat must be within {self._window} s of now")
        if access_token is not None:
            ath = claims.get("ath")
            if (
                not access_token.isascii()
                or not isinstance(ath, str)
                or ath != access_token_hash(access_token)
            ):
                raise InvalidDpopProof("the DPoP proof's ath does not match the access token")
        if not self._use_once(f"dpop:{jkt}:{jti}", int(iat) + 2 * self._window):
            raise InvalidDpopProof("the DPoP proof was used before (replayed jti)")
        return DpopProof(jkt=jkt, jti=jti)


def _compact_parts(proof: str) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """RFC 7515 §7.1 compact serialization: the header (parsed), payload and signature (decoded)."""
    parts = proof.split(".")
    if len(parts) != 3 or not proof.isascii():
        raise InvalidDpopProof("the DPoP proof is not a JWT")
    try:
        raw = [b64url_decode(part) for part in parts]
    except ValueError as e:
        raise InvalidDpopProof("the DPoP proof is not a JWT") from e
    header = _json_object(raw[0], "header")
    return header, raw[1], f"{parts[0]}.{parts[1]}".encode("ascii"), raw[2]


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        return loads_object(data)
    except ValueError as e:
        raise InvalidDpopProof(f"the DPoP proof's {name} is not a JSON object we accept ({e})") from e


def _checked_htu(htu: str) -> str | None:
    """The normalised ``htu``, or None when it is not a URI (never equal to an endpoint's URL)."""
    try:
        return normalize_htu(htu)
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)
def _expected_htus(urls: tuple[str, ...]) -> frozenset[str]:
    """The normalized forms of an endpoint's URLs; the token endpoint's are the same on every request."""
    return frozenset(normalize_htu(u) for u in urls)


def _public_key(jwk: dict[str, Any], alg: str) -> tuple[Any, str]:
    """The key a proof's ``jwk`` names, refusing anything but P-256 for ES256 and Ed25519 for EdDSA."""
    expected = {"ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519"), "Ed25519": ("OKP", "Ed25519")}[alg]
    if (jwk.get("kty"), jwk.get("crv")) != expected:
        raise InvalidDpopProof("the DPoP proof's jwk does not fit its alg")
    try:
        key = jwt.PyJWK(jwk, algorithm="EdDSA" if alg == "Ed25519" else alg).key
        return key, jwk_thumbprint(jwk)
    except (jwt.PyJWTError, KeyError, ValueError) as e:
        raise InvalidDpopProof("the DPoP proof's jwk is not a valid public key") from e


class DpopKey:
    """A client's DPoP key pair (ES256 by default): proofs for the token endpoint and resource servers."""

    def __init__(
        self, private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, *, alg: str | None = None
    ) -> None:
        self._private_key = private_key
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            self.alg = "ES256"
            self.public_jwk: dict[str, Any] = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        else:
            self.alg = alg if alg in ("EdDSA", "Ed25519") else "EdDSA"  # RFC 9864 name on request
            self.public_jwk = OKPAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        self.jkt = jwk_thumbprint(self.public_jwk)

    @classmethod
    def generate(cls, alg: str = "ES256") -> DpopKey:
        if alg in ("EdDSA", "Ed25519"):
            return cls(ed25519.Ed25519PrivateKey.generate(), alg=alg)
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
        if self.alg == "Ed25519" and isinstance(self._private_key, ed25519.Ed25519PrivateKey):
            # PyJWT knows only the polymorphic "EdDSA"; the JWS is the same but for its alg (RFC 9864).
            def part(value: Mapping[str, Any]) -> str:
                return b64url(json.dumps(value, separators=(",", ":")).encode())

            signing_input = f"{part({'alg': 'Ed25519', **headers})}.{part(claims)}"
            return f"{signing_input}.{b64url(self._private_key.sign(signing_input.encode('ascii')))}"
        return jwt.encode(claims, self._private_key, algorithm=self.alg, headers=headers)
