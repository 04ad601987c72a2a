"""Trust bundles per trust domain: which keys and CAs we accept for each trust domain, and from where.

Owns :class:`TrustBundle` (one trust domain's JWT and X.509 authorities, built by parsing the
SPIFFE bundle format, PEM, or a Workload API JWKS), the :class:`BundleSource` seam, the file-backed
:class:`FileBundleSource` (and :func:`load_bundle_file`, the one reader of bundle files, which the
bundle endpoint source uses for its bootstrap bundle too), and :class:`TrustStore`, which keeps the
<trust domain, bundle> binding
(SPIFFE_Workload_API.md §4.6: an SVID is checked only with the bundle of its own trust domain;
bundles of different trust domains are never merged).

Keys are parsed here once; verifiers use the key objects and never see JWK or PEM text.

Imports only ``sts.errors``, ``sts.spiffeid`` and ``sts.strict_json`` of the project; must not import
``sts.svid`` or any web, policy or config module. ``load_json_object`` is
:func:`sts.strict_json.loads_object`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias, runtime_checkable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from sts.errors import TemporarilyUnavailable
from sts.spiffeid import TrustDomain
from sts.strict_json import loads_object as load_json_object

logger = logging.getLogger(__name__)

JwtAuthority: TypeAlias = RSAPublicKey | EllipticCurvePublicKey
"""A public key that may sign JWT-SVIDs (JWT-SVID.md §2.1: RS*, PS* and ES* algorithms only)."""

USE_JWT_SVID = "jwt-svid"
USE_X509_SVID = "x509-svid"
MIN_RSA_BITS = 2048

# kty values we understand; any other kty is ignored (SPIFFE_Trust_Domain_and_Bundle.md §4.2.1).
_KNOWN_KTY = frozenset({"RSA", "EC"})
# JWK members that only private or symmetric keys carry (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# The PyJWT algorithm whose from_jwk builds a key for each supported (kty, crv).
_JWK_LOADER = MappingProxyType(
    {("RSA", None): "RS256", ("EC", "P-256"): "ES256", ("EC", "P-384"): "ES384", ("EC", "P-521"): "ES512"}
)
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


class BundleError(ValueError):
    """A trust bundle cannot be parsed or holds something a bundle must not; the message says what."""


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The JWT and X.509 authorities of one trust domain, parsed once.

    Build it with :meth:`from_spiffe_bundle`, :meth:`from_pem` or :meth:`from_jwt_jwks`. A bundle with
    no authorities means every SVID of that trust domain is untrusted (Bundle §4.1.3).
    """

    trust_domain: TrustDomain
    jwt_authorities: Mapping[str, JwtAuthority] = field(default_factory=dict)
    x509_authorities: tuple[x509.Certificate, ...] = ()
    sequence: int | None = None
    refresh_hint: int | None = None

    def __post_init__(self) -> None:
        # Copy into read-only containers so a caller's dict or list can never change a bundle in use.
        object.__setattr__(self, "jwt_authorities", MappingProxyType(dict(self.jwt_authorities)))
        object.__setattr__(self, "x509_authorities", tuple(self.x509_authorities))

    @classmethod
    def from_spiffe_bundle(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        """Parse the SPIFFE bundle format (SPIFFE_Trust_Domain_and_Bundle.md §4).

        A JWK Set whose entries are split by ``use`` into JWT authorities (``jwt-svid``, ``kid`` required)
        and X.509 authorities (``x509-svid``, one ``x5c`` certificate); entries of unknown ``kty`` or
        ``use`` are ignored; private or symmetric keys make the whole bundle an error.
        """
        where = f"SPIFFE bundle for {trust_domain}"
        document, entries = _load_jwk_set(data, where)
        jwt_authorities: dict[str, JwtAuthority] = {}
        x509_authorities: list[x509.Certificate] = []
        for index, entry in enumerate(entries):
            at = f"{where}: key {index}"
            kty = _checked_kty(entry, at)
            use = entry.get("use")
            if kty not in _KNOWN_KTY:
                logger.debug("%s: ignoring key of unknown kty %r", at, kty)
            elif use == USE_JWT_SVID:
                _add_jwt_authority(jwt_authorities, entry, kty, at)
            elif use == USE_X509_SVID:
                authority = _x509_authority(entry, kty, at)
                if authority is not None:
                    x509_authorities.append(authority)
            else:
                logger.debug("%s: ignoring key with missing or unknown use %r", at, use)
        if entries and not jwt_authorities and not x509_authorities:
            logger.warning(
                "%s has %d keys but none with use jwt-svid or x509-svid: every SVID of this trust domain "
                "will be refused (a plain JWKS needs the JWKS loader, not the SPIFFE bundle loader)",
                where,
                len(entries),
            )
        return cls(
            trust_domain,
            jwt_authorities,
            tuple(x509_authorities),
            _optional_count(document, "spiffe_sequence", where),
            _optional_count(document, "spiffe_refresh_hint", where),
        )

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        """Parse one or more PEM CA certificates into X.509 authorities only (no JWT authorities)."""
        where = f"PEM bundle for {trust_domain}"
        if b"PRIVATE KEY-----" in data:
            raise BundleError(f"{where} holds a private key; a trust bundle holds only certificates")
        if _PEM_CERTIFICATE not in data:
            raise BundleError(f"{where} holds no certificate")
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError as e:
            raise BundleError(f"{where} holds a certificate that cannot be parsed") from e
        return cls(trust_domain, x509_authorities=tuple(certificates))

    @classmethod
    def from_jwt_jwks(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        """Parse a Workload API ``FetchJWTBundles`` JWKS (SPIFFE_Workload_API.md §6.2).

        Every key is a JWT authority and needs a ``kid``; ``use`` may be absent (SPIRE omits it) but,
        if set, must be ``jwt-svid`` or ``sig``.
        """
        where = f"JWT bundle for {trust_domain}"
        document, entries = _load_jwk_set(data, where)
        jwt_authorities: dict[str, JwtAuthority] = {}
        for index, entry in enumerate(entries):
            at = f"{where}: key {index}"
            kty = _checked_kty(entry, at)
            if kty not in _KNOWN_KTY:
                logger.debug("%s: ignoring key of unknown kty %r", at, kty)
                continue
            if entry.get("use", USE_JWT_SVID) not in (USE_JWT_SVID, "sig"):
                raise BundleError(f"{at}: a JWT bundle may hold only JWT signing keys")
            _add_jwt_authority(jwt_authorities, entry, kty, at)
        return cls(
            trust_domain,
            jwt_authorities,
            (),
            _optional_count(document, "spiffe_sequence", where),
            _optional_count(document, "spiffe_refresh_hint", where),
        )


def _load_jwk_set(data: bytes, where: str) -> tuple[dict[str, Any], list[Any]]:
    """The JWK Set object and its ``keys`` list, which MUST be present (may be empty: all keys revoked)."""
    try:
        # Strict JSON (sts.strict_json): no NaN, no duplicate names, no integer beyond 64 bits (a
        # 400-digit spiffe_refresh_hint), no unpaired surrogate, bounded nesting.
        document = load_json_object(data)
    except ValueError as e:
        raise BundleError(f"{where} is not a JSON object ({e})") from e
    if "keys" not in document:
        raise BundleError(f"{where} has no 'keys' member")
    entries = document["keys"]
    if not isinstance(entries, list):
        raise BundleError(f"{where}: 'keys' is not a list")
    return document, entries


def _checked_kty(entry: Any, at: str) -> str:
    """The entry's ``kty`` after refusing non-objects, missing ``kty``, symmetric and private keys.

    A bundle that publishes secret key material is broken as a whole: it is refused, never used.
    """
    if not isinstance(entry, dict):
        raise BundleError(f"{at} is not a JSON object")
    kty = entry.get("kty")
    if not isinstance(kty, str) or not kty:
        raise BundleError(f"{at} has no 'kty'")
    if kty == "oct":
        raise BundleError(f"{at} is a symmetric (oct) key; a trust bundle holds only public keys")
    if _PRIVATE_MEMBERS.intersection(entry):
        raise BundleError(f"{at} carries private key material; a trust bundle holds only public keys")
    return kty


def _add_jwt_authority(
    authorities: dict[str, JwtAuthority], entry: dict[str, Any], kty: str, at: str
) -> None:
    """A JWT authority needs a ``kid`` unique in its bundle: the token's ``kid`` must name one key."""
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise BundleError(f"{at} has no 'kid'; a JWT authority needs one")
    if kid in authorities:
        raise BundleError(f"{at}: duplicate kid among JWT authorities")
    authorities[kid] = _public_key(entry, kty, at)


def _public_key(entry: dict[str, Any], kty: str, at: str) -> JwtAuthority:
    """Build the RSA (≥ 2048 bits) or EC P-256/P-384/P-521 public key a JWK describes, via PyJWT."""
    curve = entry.get("crv") if kty == "EC" else None
    loader = _JWK_LOADER.get((kty, curve if isinstance(curve, str) else None))
    if loader is None:
        raise BundleError(f"{at}: unsupported elliptic curve (P-256, P-384 and P-521 are accepted)")
    try:
        key = PyJWK(entry, algorithm=loader).key
    except PyJWTError as e:
        raise BundleError(f"{at}: invalid {kty} public key") from e
    if isinstance(key, RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise BundleError(f"{at}: RSA key is shorter than {MIN_RSA_BITS} bits")
        return key
    if isinstance(key, EllipticCurvePublicKey):
        return key
    raise BundleError(f"{at}: not an RSA or EC public key")


def _x509_authority(entry: dict[str, Any], kty: str, at: str) -> x509.Certificate | None:
    """The ``x5c`` certificate of an ``x509-svid`` entry (X509-SVID.md §6.2), None to ignore the entry.

    §6.2: an entry whose ``x5c`` is absent or empty MUST be ignored (the trust domain's other entries
    keep working), and of several values all but the first MUST be ignored. Key members
    (``n``/``e`` or ``x``/``y``) are optional; when present they must describe the certificate's key
    (RFC 7517 §4.7). A value that is not a certificate still refuses the bundle.
    """
    chain = entry.get("x5c")
    if chain is None or chain == []:
        logger.warning("%s: ignoring an x509-svid key without an 'x5c' certificate (X509-SVID.md §6.2)", at)
        return None
    if not isinstance(chain, list) or not isinstance(chain[0], str):
        raise BundleError(f"{at}: 'x5c' must be a list of base64 certificates")
    try:
        certificate = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
        # Load the key now: an authority whose key cannot be used must fail here, not at verification.
        actual = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (binascii.Error, ValueError, UnsupportedAlgorithm) as e:
        raise BundleError(f"{at}: the 'x5c' certificate cannot be parsed") from e
    if {"n", "e", "x", "y"}.intersection(entry):
        described = _public_key(entry, kty, at).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if described != actual:
            raise BundleError(f"{at}: the key members do not match the 'x5c' certificate's key")
    return certificate


def _optional_count(document: dict[str, Any], name: str, where: str) -> int | None:
    """``spiffe_sequence`` / ``spiffe_refresh_hint``: optional non-negative integers (Bundle §4.1)."""
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BundleError(f"{where}: '{name}' is not a non-negative integer")
    return value


class BundleSource(Protocol):
    """Where the current bundle of one trust domain comes from (file, Workload API, bundle endpoint)."""

    @property
    def trust_domain(self) -> TrustDomain: ...

    def current(self) -> TrustBundle:
        """The latest bundle; raises :class:`TemporarilyUnavailable` when there is none right now."""
        ...


@runtime_checkable
class DescribedSource(Protocol):
    """A source that can say where its bundle stands, for ``/readyz`` (optional for a source)."""

    def describe(self) -> dict[str, object]:
        """JSON-ready facts: ``source`` and, where known, ``sequence``, ``last_refresh`` (epoch
        seconds of the last good load or fetch), ``age_seconds`` and what went wrong last."""
        ...


@runtime_checkable
class StoppableSource(Protocol):
    """A source with a background thread of its own (the bundle endpoint), stopped by
    :meth:`TrustStore.close`."""

    def stop(self) -> None: ...


def load_bundle_file(trust_domain: TrustDomain, path: Path) -> TrustBundle:
    """Parse a bundle file; the format is chosen by content (JSON object → SPIFFE bundle, else PEM).

    The one reader of bundle files: :class:`FileBundleSource` and the bundle endpoint's
    ``bootstrap_bundle_file``. Raises :class:`BundleError` naming the file.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read bundle file {path}: {e.strerror}") from e
    try:
        if data.lstrip().startswith(b"{"):
            return TrustBundle.from_spiffe_bundle(trust_domain, data)
        if _PEM_CERTIFICATE in data:
            return TrustBundle.from_pem(trust_domain, data)
    except BundleError as e:
        raise BundleError(f"bundle file {path}: {e}") from e
    raise BundleError(f"bundle file {path} is neither a SPIFFE bundle (JSON object) nor PEM certificates")


class FileBundleSource:
    """A bundle read from a file (SPIFFE bundle JSON or PEM CA certificates), re-read when the file changes.

    Loaded at construction (a bad file raises :class:`BundleError`: start-up fails). Afterwards, at most
    every ``recheck_seconds``, the file is stat'ed and reloaded when it changed, so a rotated bundle is
    picked up without a restart; a failed reload keeps the last good bundle and logs an error.
    """

    def __init__(
        self,
        trust_domain: TrustDomain,
        path: Path,
        *,
        now: Callable[[], float] = time.monotonic,
        recheck_seconds: float = 5.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._trust_domain = trust_domain
        self._path = path
        self._now = now
        self._wall = wall
        self._recheck_seconds = recheck_seconds
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._bundle = self._load()
        self._checked_at = now()
        self._loaded_at = wall()

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def path(self) -> Path:
        return self._path

    def current(self) -> TrustBundle:
        """The last good bundle, after re-reading the file if it is due for a check and changed."""
        with self._lock:
            if self._now() - self._checked_at >= self._recheck_seconds:
                self._refresh()
            return self._bundle

    def describe(self) -> dict[str, object]:
        """``/readyz``: the file, the bundle's sequence, when it was last (re)loaded and how long ago."""
        with self._lock:
            loaded_at, sequence = self._loaded_at, self._bundle.sequence
        return {
            "source": "file",
            "path": str(self._path),
            "sequence": sequence,
            "last_refresh": round(loaded_at, 3),
            "age_seconds": round(max(0.0, self._wall() - loaded_at), 1),
        }

    def _refresh(self) -> None:
        self._checked_at = self._now()
        try:
            bundle = self._reload_if_changed()
        except BundleError as e:
            failure = str(e)
        else:
            if bundle is not None:
                logger.info(
                    "reloaded trust bundle for %s from %s (sequence %s)",
                    self._trust_domain,
                    self._path,
                    bundle.sequence,
                )
                self._bundle = bundle
                self._loaded_at = self._wall()
            return
        # Logged outside the handler: the message is the whole story, a traceback would only add noise.
        logger.error("keeping the last good trust bundle for %s: %s", self._trust_domain, failure)

    def _reload_if_changed(self) -> TrustBundle | None:
        """The file's new bundle, or None when the file is unchanged."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return None
        # Remember the stamp even if the load fails: one error per change, not one per check.
        self._stamp = stamp
        return self._load()

    def _file_stamp(self) -> tuple[int, int, int, int]:
        """What tells us the file changed: device, inode (an atomic rename), size and mtime."""
        try:
            st = os.stat(self._path)
        except OSError as e:
            raise BundleError(f"cannot read bundle file {self._path}: {e.strerror}") from e
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> TrustBundle:
        return load_bundle_file(self._trust_domain, self._path)


class TrustStore:
    """The trusted trust domains, each with exactly one bundle source; a domain not here is not trusted."""

    def __init__(self, sources: Iterable[BundleSource]) -> None:
        by_domain: dict[TrustDomain, BundleSource] = {}
        for source in sources:
            if source.trust_domain in by_domain:
                raise ValueError(f"more than one bundle source for trust domain {source.trust_domain}")
            by_domain[source.trust_domain] = source
        self._sources: Mapping[TrustDomain, BundleSource] = MappingProxyType(by_domain)

    @property
    def trust_domains(self) -> frozenset[TrustDomain]:
        return frozenset(self._sources)

    def bundle_for(self, trust_domain: TrustDomain) -> TrustBundle | None:
        """The current bundle of ``trust_domain``, or None if it is not trusted (Workload API §6.3).

        Raises :class:`TemporarilyUnavailable` when the source has no bundle right now.
        """
        source = self._sources.get(trust_domain)
        if source is None:
            return None
        bundle = source.current()
        if bundle.trust_domain != trust_domain:
            # The <trust domain, bundle> binding is the whole point (Workload API §4.6): never
            # verify with another domain's keys, whatever a faulty source hands back.
            raise TemporarilyUnavailable(
                "trust bundle unavailable",
                detail=f"source for {trust_domain} returned the bundle of {bundle.trust_domain}",
            )
        return bundle

    def describe(self, trust_domain: TrustDomain) -> dict[str, object]:
        """What the source of ``trust_domain`` says about itself (``{}`` when it says nothing)."""
        source = self._sources.get(trust_domain)
        if isinstance(source, DescribedSource):
            return source.describe()
        return {}

    def close(self) -> None:
        """Stop the sources that run a thread of their own (idempotent)."""
        for source in self._sources.values():
            if isinstance(source, StoppableSource):
                source.stop()

    def readiness(self) -> list[str]:
        """Problems that keep us from verifying SVIDs right now; an empty list means ready."""
        problems: list[str] = []
        for trust_domain, source in self._sources.items():
            try:
                source.current()
            except TemporarilyUnavailable as e:
                problem = f"trust bundle for {trust_domain} is unavailable: {e.description}"
                last_error = self.describe(trust_domain).get("last_error")
                if last_error:
                    problem += f" (last error: {last_error})"
                problems.append(problem)
        return problems
