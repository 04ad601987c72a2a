"""JWT-SVID verification exactly per the SPIFFE JWT-SVID standard (JWT-SVID.md), with time as a parameter.

Owns :class:`JwtSvidVerifier` and its result :class:`VerifiedJwtSvid`. The rules run in the order of
:data:`RULES` and stop at the first failure, raised as :class:`sts.errors.InvalidToken` whose ``rule``
is that stable name and whose description says it in words, never naming a key id, key material or
bundle contents. The signing key is chosen only from the bundle of the ``sub`` claim's trust domain
(SPIFFE_Workload_API.md §4.6, §6.3); ``jku``, ``x5u``, ``jwk`` and ``x5c`` headers are never followed.
Signatures are checked with PyJWT's algorithm objects on keys parsed once by :mod:`sts.trust`.

Imports only ``sts.errors``, ``sts.spiffeid``, ``sts.strict_json`` and ``sts.trust`` of the project; must
not import web, policy, config or store modules. Does no I/O.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    SECP384R1,
    SECP521R1,
    EllipticCurve,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from jwt.algorithms import Algorithm, ECAlgorithm, RSAAlgorithm, RSAPSSAlgorithm

from sts.errors import InvalidToken
from sts.spiffeid import SpiffeId, SpiffeIdError
from sts.strict_json import JsonError, b64url_decode, loads_object, numeric_date
from sts.trust import JwtAuthority, TrustStore

_HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})

RULES: tuple[str, ...] = (
    "size",
    "malformed",
    "alg",
    "typ",
    "crit",
    "header",
    "kid",
    "sub",
    "trust_domain",
    "kid_unknown",
    "key_mismatch",
    "signature",
    "aud",
    "exp",
    "expired",
    "nbf",
    "iat",
)
"""Every ``InvalidToken.rule`` this module raises, in the order the rules are checked."""

DEFAULT_LEEWAY_SECONDS = 30
DEFAULT_MAX_TOKEN_BYTES = 8192
CACHE_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class _Algorithm:
    """A JWT-SVID ``alg``: PyJWT's verifier and the key it needs (RSA when ``curve`` is None)."""

    verifier: Algorithm
    curve: type[EllipticCurve] | None


# JWT-SVID.md §2.1: exactly these; "none", HS*, EdDSA and everything else are refused whatever the key.
ALGORITHMS: Mapping[str, _Algorithm] = MappingProxyType(
    {
        "RS256": _Algorithm(RSAAlgorithm(RSAAlgorithm.SHA256), None),
        "RS384": _Algorithm(RSAAlgorithm(RSAAlgorithm.SHA384), None),
        "RS512": _Algorithm(RSAAlgorithm(RSAAlgorithm.SHA512), None),
        "ES256": _Algorithm(ECAlgorithm(ECAlgorithm.SHA256, SECP256R1), SECP256R1),
        "ES384": _Algorithm(ECAlgorithm(ECAlgorithm.SHA384, SECP384R1), SECP384R1),
        "ES512": _Algorithm(ECAlgorithm(ECAlgorithm.SHA512, SECP521R1), SECP521R1),
        "PS256": _Algorithm(RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256), None),
        "PS384": _Algorithm(RSAPSSAlgorithm(RSAPSSAlgorithm.SHA384), None),
        "PS512": _Algorithm(RSAPSSAlgorithm(RSAPSSAlgorithm.SHA512), None),
    }
)

_TYPES = ("JWT", "JOSE")
# One public answer for every reason the signature cannot be checked (untrusted domain, unknown kid,
# key/alg mismatch, bad signature), so a caller cannot map our federation or bundles; the rule and
# its detail go to the log and audit only.
UNVERIFIABLE = "token signature could not be verified with a trusted key"
_MAX_DETAIL = 64
_NOT_A_NUMERIC_DATE = "is not a NumericDate (seconds since 1970, up to the year 9999)"
_TIME_CLAIMS = MappingProxyType(
    {"exp": "expiry (exp)", "nbf": "not-before time (nbf)", "iat": "issue time (iat)"}
)


@dataclass(frozen=True, slots=True)
class VerifiedJwtSvid:
    """A JWT-SVID that passed every rule; ``claims`` is a read-only view of the whole payload."""

    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expiry: int
    issued_at: int | None
    claims: Mapping[str, Any]
    token_hash: str


@dataclass(frozen=True, slots=True)
class _Verified:
    """A JWT-SVID that passed, the key object it was checked with, and when."""

    svid: VerifiedJwtSvid
    key: JwtAuthority
    kid: str
    verified_at: float


@dataclass(frozen=True, slots=True)
class _CompactJws:
    signing_input: bytes
    header: dict[str, Any]
    claims: dict[str, Any]
    signature: bytes


class JwtSvidVerifier:
    """Verifies JWT-SVIDs presented to this server (whose audience is ``audience``) against a trust store."""

    def __init__(
        self,
        trust: TrustStore,
        audience: str,
        *,
        leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
    ) -> None:
        if not audience:
            raise ValueError("the audience JWT-SVIDs must carry may not be empty")
        if leeway_seconds < 0:
            raise ValueError("leeway_seconds may not be negative")
        if max_token_bytes < 1:
            raise ValueError("max_token_bytes must be positive")
        self._trust = trust
        self._cache: dict[str, _Verified] = {}
        self._cache_lock = threading.Lock()
        self._audience = audience
        self._leeway = leeway_seconds
        self._max_token_bytes = max_token_bytes

    @property
    def audience(self) -> str:
        return self._audience

    def verify(self, token: str, *, now: float | None = None) -> VerifiedJwtSvid:
        """Check ``token`` against every rule of :data:`RULES` in order; ``now`` defaults to the clock.

        Agents reuse one JWT-SVID for many exchanges, so a token that passed is remembered by its hash
        until it expires: a repeat skips parsing and the signature, but its key must still be the same
        key object in the *current* bundle of its trust domain (a rotated-out key, a redacted or stale
        bundle all fail exactly as without the cache), and its expiry is checked against ``now``.
        """
        when = time.time() if now is None else now
        # size: before any parsing. Characters never outnumber bytes; non-ASCII is refused just below.
        if len(token) > self._max_token_bytes:
            raise InvalidToken("size", "token is larger than this server accepts")
        token_hash = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        cached = self._cache.get(token_hash)
        if cached is not None and self._still_valid(cached, when):
            return cached.svid
        verified, key, kid = self._verify_uncached(token, token_hash, when)
        self._remember(_Verified(verified, key, kid, when))
        return verified

    def _still_valid(self, cached: _Verified, when: float) -> bool:
        """The cached result holds at ``when``: same key still trusted, unexpired, not before its check."""
        if when < cached.verified_at or when >= cached.svid.expiry + self._leeway:
            return False
        bundle = self._trust.bundle_for(cached.svid.spiffe_id.trust_domain)
        return bundle is not None and bundle.jwt_authorities.get(cached.kid) is cached.key

    def _remember(self, entry: _Verified) -> None:
        with self._cache_lock:
            if len(self._cache) >= CACHE_ENTRIES:
                # Drop the oldest half; cheaper than LRU bookkeeping on every hit, and bounded.
                for stale in list(self._cache)[: CACHE_ENTRIES // 2]:
                    del self._cache[stale]
            self._cache[entry.svid.token_hash] = entry

    def _verify_uncached(
        self, token: str, token_hash: str, when: float
    ) -> tuple[VerifiedJwtSvid, JwtAuthority, str]:
        jws = _parse_compact(token)
        header, claims = jws.header, jws.claims

        # JWT-SVID.md §2.1, §4: the algorithm must be allowed before anything else is processed.
        alg = header.get("alg")
        algorithm = ALGORITHMS.get(alg) if isinstance(alg, str) else None
        if algorithm is None:
            raise InvalidToken("alg", "token signing algorithm is not allowed for JWT-SVIDs")
        # JWT-SVID.md §2.3.
        if "typ" in header and header["typ"] not in _TYPES:
            raise InvalidToken("typ", "token type (typ) must be absent, JWT or JOSE")
        # RFC 7515 §4.1.11: we understand no extension, so a critical one must be refused.
        if "crit" in header:
            raise InvalidToken("crit", "token carries critical header extensions, which are not supported")
        # JWT-SVID.md §2: the header holds alg, kid and typ only. A key or key location in the token
        # (jwk, jku, x5c, x5u) is never used, and its presence marks a token no SPIRE minted.
        extra = set(header) - _HEADER_MEMBERS
        if extra:
            raise InvalidToken("header", f"token header members {', '.join(sorted(extra))} are not allowed")
        # JWT-SVID.md §2.2 makes kid optional, but it is the only way to pick the key from the bundle.
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("kid", "token header has no key id (kid)")

        spiffe_id = _subject(claims)
        key = self._signing_key(spiffe_id, kid)
        if not _key_fits(key, algorithm):
            raise InvalidToken("key_mismatch", UNVERIFIABLE, detail=f"key type does not fit alg {alg}")
        # RFC 7515 §5.2: the signature over the exact bytes received.
        if not algorithm.verifier.verify(jws.signing_input, key, jws.signature):
            raise InvalidToken("signature", UNVERIFIABLE, detail="signature does not verify")

        audience = self._check_audience(claims)
        expiry = self._check_times(claims, when)
        issued_at = claims.get("iat")
        verified = VerifiedJwtSvid(
            spiffe_id=spiffe_id,
            audience=audience,
            expiry=expiry,
            issued_at=None if issued_at is None else int(issued_at),
            claims=MappingProxyType(claims),
            token_hash=token_hash,
        )
        return verified, key, kid

    def _signing_key(self, spiffe_id: SpiffeId, kid: str) -> JwtAuthority:
        """The key ``kid``, looked up only in the bundle of the subject's trust domain (Workload API §6.3)."""
        trust_domain = spiffe_id.trust_domain
        bundle = self._trust.bundle_for(trust_domain)
        if bundle is None:
            raise InvalidToken(
                "trust_domain",
                UNVERIFIABLE,
                detail=f"no bundle for trust domain {trust_domain}",
            )
        key = bundle.jwt_authorities.get(kid)
        if key is None:
            raise InvalidToken(
                "kid_unknown",
                UNVERIFIABLE,
                detail=f"kid {kid[:_MAX_DETAIL]!r} is not in the bundle of {trust_domain}",
            )
        return key

    def _check_audience(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        """JWT-SVID.md §3.2: ``aud`` present with one or more values, ours among them (RFC 7519 §4.1.3)."""
        if "aud" not in claims:
            raise InvalidToken("aud", "token has no audience (aud)")
        aud = claims["aud"]
        if isinstance(aud, str):
            audience: tuple[str, ...] = (aud,)
        elif isinstance(aud, list) and aud and all(isinstance(value, str) for value in aud):
            audience = tuple(aud)
        else:
            raise InvalidToken("aud", "token audience (aud) must be a string or a non-empty list of strings")
        if self._audience not in audience:
            raise InvalidToken("aud", "audience does not include this server")
        return audience

    def _check_times(self, claims: Mapping[str, Any], when: float) -> int:
        """JWT-SVID.md §3.3 (``exp`` required) and RFC 7519 §4.1.4 to §4.1.6, each with the leeway.

        Each must be a NumericDate (RFC 7519 §2) as :func:`sts.strict_json.numeric_date` bounds it, so
        that adding the leeway can neither overflow nor compare false against NaN.
        """
        if "exp" not in claims:
            raise InvalidToken("exp", "token has no expiry (exp)")
        exp = numeric_date(claims["exp"])
        if exp is None:
            raise InvalidToken("exp", f"token {_TIME_CLAIMS['exp']} {_NOT_A_NUMERIC_DATE}")
        if when >= exp + self._leeway:
            raise InvalidToken("expired", "token is expired")
        if "nbf" in claims:
            nbf = numeric_date(claims["nbf"])
            if nbf is None:
                raise InvalidToken("nbf", f"token {_TIME_CLAIMS['nbf']} {_NOT_A_NUMERIC_DATE}")
            if nbf > when + self._leeway:
                raise InvalidToken("nbf", "token is not valid yet")
        if "iat" in claims:
            iat = numeric_date(claims["iat"])
            if iat is None:
                raise InvalidToken("iat", f"token {_TIME_CLAIMS['iat']} {_NOT_A_NUMERIC_DATE}")
            if iat > when + self._leeway:
                raise InvalidToken("iat", "token was issued in the future")
        return int(exp)


def _parse_compact(token: str) -> _CompactJws:
    """JWT-SVID.md §5.1: JWS Compact Serialization only (RFC 7515 §7.1); no JWE, no JSON serialization."""
    if not token.isascii():
        raise InvalidToken("malformed", "token holds characters that are not ASCII")
    if token.lstrip().startswith("{"):
        raise InvalidToken("malformed", "JWS JSON serialization is not accepted; a JWT-SVID is compact")
    parts = token.split(".")
    if len(parts) == 5:
        raise InvalidToken("malformed", "encrypted tokens (JWE) are not accepted; a JWT-SVID is a signed JWS")
    if len(parts) != 3:
        raise InvalidToken("malformed", "token is not a compact JWS of three base64url parts")
    header_part, payload_part, signature_part = parts
    return _CompactJws(
        signing_input=f"{header_part}.{payload_part}".encode("ascii"),
        header=_json_part(header_part, "header"),
        claims=_json_part(payload_part, "payload"),
        signature=_base64url(signature_part, "signature"),
    )


def _base64url(part: str, name: str) -> bytes:
    """RFC 7515 §2: base64url without padding, strict alphabet, canonical (no stray trailing bits)."""
    try:
        return b64url_decode(part)
    except ValueError as e:
        raise InvalidToken("malformed", f"token {name} is {e}") from e


def _json_part(part: str, name: str) -> dict[str, Any]:
    """A header or payload part: strict JSON (:mod:`sts.strict_json`), an object with unique member names
    (RFC 7515 §4, RFC 7519 §4), no NaN/Infinity, no integer beyond 64 bits, no unpaired surrogate.

    Such a value is refused here as ``malformed``, except a number too large for a time claim: that is
    valid JSON grammar, so it is refused under the claim's own rule, as ``1e400`` always was.
    """
    raw = _base64url(part, name)
    try:
        return loads_object(raw)
    except JsonError as e:
        if name == "payload" and e.out_of_range and e.member is not None and e.member in _TIME_CLAIMS:
            raise InvalidToken(e.member, f"token {_TIME_CLAIMS[e.member]} {_NOT_A_NUMERIC_DATE}") from e
        raise InvalidToken("malformed", f"token {name} is not a JSON object we accept: {e}") from e


def _subject(claims: Mapping[str, Any]) -> SpiffeId:
    """JWT-SVID.md §3.1: ``sub`` is the SPIFFE ID of a workload (so it has a path)."""
    if "sub" not in claims:
        raise InvalidToken("sub", "token has no subject (sub)")
    sub = claims["sub"]
    if not isinstance(sub, str):
        raise InvalidToken("sub", "token subject (sub) is not a string")
    try:
        spiffe_id = SpiffeId.parse(sub)
    except SpiffeIdError as e:
        raise InvalidToken("sub", f"token subject (sub) is not a valid SPIFFE ID: {e}") from e
    if not spiffe_id.path:
        raise InvalidToken("sub", "token subject (sub) names a trust domain, not a workload")
    return spiffe_id


def _key_fits(key: JwtAuthority, algorithm: _Algorithm) -> bool:
    """RS*/PS* need an RSA key; ES256/ES384/ES512 need an EC key on P-256/P-384/P-521 (RFC 7518 §3.4)."""
    if algorithm.curve is None:
        return isinstance(key, RSAPublicKey)
    return isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, algorithm.curve)


X509_RULES: tuple[str, ...] = ("x509_san", "x509_leaf", "trust_domain", "x509_chain")
"""Every rule :class:`X509SvidVerifier` refuses by, in order."""


@dataclass(frozen=True, slots=True)
class VerifiedX509Svid:
    """A client certificate that is a valid X.509-SVID of a trusted trust domain."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate


class X509SvidVerifier:
    """X509-SVID.md §5: SPIFFE leaf rules, then RFC 5280 path validation against the bundle of the leaf's
    own trust domain only (never a merged store of every domain's CAs)."""

    def __init__(self, trust: TrustStore) -> None:
        self._trust = trust

    def verify(self, chain: Sequence[x509.Certificate], *, now: float | None = None) -> VerifiedX509Svid:
        """``chain``: leaf first, then the intermediates the client sent; InvalidToken names the rule."""
        if not chain:
            raise InvalidToken("x509_chain", "no client certificate")
        leaf = chain[0]
        spiffe_id = _x509_spiffe_id(leaf)
        _check_x509_leaf(leaf)
        bundle = self._trust.bundle_for(spiffe_id.trust_domain)
        if bundle is None or not bundle.x509_authorities:
            raise InvalidToken("trust_domain", "the certificate's trust domain is not trusted by this server")
        when = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
        verifier = (
            PolicyBuilder().store(Store(list(bundle.x509_authorities))).time(when).build_client_verifier()
        )
        try:
            verifier.verify(leaf, list(chain[1:]))
        except VerificationError as e:
            reason = "the certificate does not chain to its trust domain's authorities"
            raise InvalidToken("x509_chain", reason, detail=str(e)) from e
        return VerifiedX509Svid(spiffe_id, leaf)


def _x509_spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    """X509-SVID.md §2: exactly one URI SAN, a SPIFFE ID with a path."""
    try:
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise InvalidToken("x509_san", "an X.509-SVID has exactly one URI SAN")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as e:
        raise InvalidToken("x509_san", f"the URI SAN is not a SPIFFE ID: {e}") from e
    if not spiffe_id.path:
        raise InvalidToken("x509_san", "a leaf SVID's SPIFFE ID must name a workload (have a path)")
    return spiffe_id


def _check_x509_leaf(leaf: x509.Certificate) -> None:
    """X509-SVID.md §4.1, §4.3: not a CA; key usage present with digitalSignature, no certificate signing."""
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as e:
        raise InvalidToken("x509_leaf", "a leaf SVID needs basic constraints and key usage") from e
    if constraints.ca:
        raise InvalidToken("x509_leaf", "a CA certificate cannot be a client SVID")
    if not usage.digital_signature or usage.key_cert_sign or usage.crl_sign:
        raise InvalidToken("x509_leaf", "a leaf SVID's key usage is digitalSignature, never cert signing")
