"""Signing keys per token class, their rotation and the public JWKS: the only code touching private keys.

Tool and data tokens are signed by different key sets so that a verifier trusting one class can never
accept the other. Each key's ``kid`` is ``<class>-<RFC 7638 thumbprint>``: the class is readable in
the ``kid`` (DESIGN.md) and the rest is the key's own SHA-256 JWK thumbprint.

Keys live in ``<dir>/<class>/<created>-<thumbprint>.pem`` (PKCS#8, mode 0600, directory 0700).
A key the server had to generate for itself at start is named ``dev-…`` and logged loudly every
time it is loaded: production keys are provisioned with ``sts keys create`` (or a Kubernetes Secret).
Rotation: when the newest key of a class is older than ``rotate_after``, a new one is made; keys stay
published in the JWKS for another ``rotate_after`` so tokens signed before rotation still verify.

Imports ``sts.catalog`` (for TokenClass), ``sts.config`` (for KeySettings), ``sts.binding`` (thumbprints)
and ``sts.strict_json`` (parsing our own tokens back) only.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm

from sts.binding import b64url, jwk_thumbprint
from sts.catalog import TokenClass
from sts.config import KeySettings
from sts.errors import ConfigError
from sts.strict_json import b64url_decode, loads_object, numeric_date

log = logging.getLogger(__name__)

ACCESS_TOKEN_TYPE = "at+jwt"
_ES256 = ec.ECDSA(hashes.SHA256())
_ES256_JWS = ECAlgorithm(ECAlgorithm.SHA256)  # RFC 7518 §3.4: verifies the R||S form of a JWS signature
# Built once (``json.dumps`` with options builds one per call). allow_nan=False: NaN and Infinity
# are not JSON (RFC 8259 §6); no token of ours carries one.
_CLAIMS_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
MAX_ISSUED_TOKEN_CHARS = 8192
REFRESH_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One ES256 key of one token class; the private half never leaves this module's methods."""

    token_class: TokenClass
    kid: str
    created_at: int
    generated_for_development: bool
    _private_key: ec.EllipticCurvePrivateKey
    header_b64: str = field(init=False)
    """The base64url JOSE header of every token this key signs (RFC 9068 ``typ: at+jwt``), encoded once."""

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._private_key.public_key()

    def __post_init__(self) -> None:
        header = {"alg": "ES256", "kid": self.kid, "typ": ACCESS_TOKEN_TYPE}
        object.__setattr__(self, "header_b64", b64url(json.dumps(header, separators=(",", ":")).encode()))

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.public_key, as_dict=True)
        jwk.update({"kid": self.kid, "use": "sig", "alg": "ES256"})
        return jwk


def thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint: SHA-256 over the required members in lexicographic order, base64url."""
    return jwk_thumbprint(ECAlgorithm.to_jwk(public_key, as_dict=True))


class KeyRing:
    """All keys of all classes: the active signing key per class, and every still-published public key."""

    def __init__(
        self, keys: Mapping[TokenClass, list[SigningKey]], settings: KeySettings | None = None
    ) -> None:
        self._settings = settings
        self._refresh_lock = threading.Lock()
        self._listing = _listing(settings.dir) if settings else ()
        self._next_check = 0.0
        self._install(keys)

    def _install(self, keys: Mapping[TokenClass, list[SigningKey]]) -> None:
        for token_class in TokenClass:
            if not keys.get(token_class):
                raise ConfigError(f"keys: no signing key for token class '{token_class}'")
        self._keys = {c: sorted(keys[c], key=lambda k: k.created_at) for c in TokenClass}
        self._active = {c: self._keys[c][-1] for c in TokenClass}
        self._jwks = {c: {"keys": [k.public_jwk() for k in reversed(self._keys[c])]} for c in TokenClass}
        self._all_jwks = {"keys": [jwk for c in TokenClass for jwk in self._jwks[c]["keys"]]}
        self._by_kid = {k.kid: k for c in TokenClass for k in self._keys[c]}

    @classmethod
    def load_or_create(cls, settings: KeySettings, *, now: float | None = None) -> KeyRing:
        """Load the key directory, creating or rotating keys as needed (under a lock: workers share it)."""
        current = int(time.time() if now is None else now)
        if not _writable(settings.dir):
            return cls._load_read_only(settings, current)
        keys: dict[TokenClass, list[SigningKey]] = {}
        with _locked(settings.dir):
            for token_class in TokenClass:
                class_dir = settings.dir / token_class.value
                class_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                loaded = [read_key(path, token_class) for path in sorted(class_dir.glob("*.pem"))]
                newest = max((k.created_at for k in loaded), default=None)
                check_may_serve(settings, token_class, loaded)
                if newest is None:
                    loaded.append(_create_key(class_dir, token_class, current, development=True))
                elif current - newest >= settings.rotate_after:
                    development = all(k.generated_for_development for k in loaded)
                    loaded.append(_create_key(class_dir, token_class, current, development=development))
                    log.info(
                        "rotated the %s signing key (older than %ss)", token_class, settings.rotate_after
                    )
                keys[token_class] = _retire(loaded, current, settings.rotate_after)
        ring = cls(keys, settings)
        for token_class, key in ring._active.items():
            if key.generated_for_development:
                log.warning(
                    "USING A GENERATED DEVELOPMENT SIGNING KEY for %s tokens (%s in %s). Provision keys "
                    "with 'sts keys create --config FILE' or a Kubernetes Secret before production use.",
                    token_class,
                    key.kid,
                    settings.dir,
                )
        return ring

    @classmethod
    def _load_read_only(cls, settings: KeySettings, now: int) -> KeyRing:
        """Provisioned keys (e.g. a mounted Secret): load what is there; never create, never lock."""
        keys: dict[TokenClass, list[SigningKey]] = {}
        for token_class in TokenClass:
            paths = sorted((settings.dir / token_class.value).glob("*.pem"))
            if not paths:
                raise ConfigError(f"keys.dir: {settings.dir} is read-only and holds no {token_class} key")
            loaded = [read_key(p, token_class) for p in paths]
            check_may_serve(settings, token_class, loaded)
            keys[token_class] = _retire(loaded, now, settings.rotate_after)
            newest = max(k.created_at for k in keys[token_class])
            if now - newest >= settings.rotate_after:
                log.warning("the %s signing key is older than rotate_after; provision a new one", token_class)
        return cls(keys, settings)

    def refresh(self, *, force: bool = False, now: float | None = None) -> None:
        """Pick up keys another process added or retired (rotation), so every worker and replica signs
        with and publishes the same set. Checks the directory at most every REFRESH_SECONDS (forced, at
        most once a second: an unknown ``kid`` may be a sibling's new key)."""
        if self._settings is None:
            return
        current = time.monotonic() if now is None else now
        if current < self._next_check - (REFRESH_SECONDS - 1 if force else 0):
            return
        with self._refresh_lock:
            self._next_check = current + REFRESH_SECONDS
            listing = _listing(self._settings.dir)
            if listing == self._listing:
                return
            keys = {
                c: _retire(
                    [read_key(p, c) for p in sorted((self._settings.dir / c.value).glob("*.pem"))],
                    int(time.time()),
                    self._settings.rotate_after,
                )
                for c in TokenClass
            }
            self._install(keys)
            self._listing = listing
            log.info("signing keys reloaded: %s", ", ".join(k.kid for k in self._active.values()))

    def active(self, token_class: TokenClass) -> SigningKey:
        return self._active[token_class]

    def sign(self, token_class: TokenClass, claims: Mapping[str, Any]) -> str:
        """A compact JWS of ``claims`` as an RFC 9068 ``at+jwt``, signed with the class's active key."""
        self.refresh()
        key = self._active[token_class]
        # RFC 7515 §7.1 by hand on the hot path: the header is the same for every token of this key, so it
        # is encoded once; the signature is cryptography's ECDSA, turned into the JWS R||S form (§A.3).
        payload = b64url(_CLAIMS_JSON.encode(dict(claims)).encode())
        signing_input = f"{key.header_b64}.{payload}"
        r, s = decode_dss_signature(key._private_key.sign(signing_input.encode("ascii"), _ES256))
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def jwks(self, token_class: TokenClass | None = None) -> Mapping[str, Any]:
        """The public keys of one class, or of all classes; ``kid`` names the class, ``use`` is ``sig``."""
        self.refresh()
        return self._all_jwks if token_class is None else self._jwks[token_class]

    def verify_issued(self, token: str, *, issuer: str, now: float) -> dict[str, Any] | None:
        """The claims of a token we issued and that is within its lifetime; None for anything else.

        For introspection and revocation (RFC 7662, RFC 7009): a token that is not ours, not an
        ``at+jwt``, tampered with or expired is simply not active; callers learn nothing more.

        Parsed here rather than by PyJWT, whose ``json`` accepts NaN, raises ``RecursionError`` on a
        deeply nested header and lets a ``kid`` list reach a dict lookup (``TypeError``): both parts go
        through :mod:`sts.strict_json` and every claim a caller reads is type-checked (:func:`_issued`),
        so any string at all is claims or None, never an exception.
        """
        parts = token.split(".")
        if len(token) > MAX_ISSUED_TOKEN_CHARS or not token.isascii() or len(parts) != 3:
            return None
        try:
            header = loads_object(b64url_decode(parts[0]))
            signature = b64url_decode(parts[2])
        except ValueError:
            return None
        kid = header.get("kid")
        if not isinstance(kid, str) or header.get("typ") != ACCESS_TOKEN_TYPE or header.get("alg") != "ES256":
            return None
        if kid not in self._by_kid:
            self.refresh(force=True)
        key = self._by_kid.get(kid)
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        if key is None or not _ES256_JWS.verify(signing_input, key.public_key, signature):
            return None
        try:
            claims = loads_object(b64url_decode(parts[1]))
        except ValueError:
            return None
        return claims if _issued(claims, key.token_class, issuer, now) else None

    def public_keys(self, token_class: TokenClass) -> dict[str, ec.EllipticCurvePublicKey]:
        return {k.kid: k.public_key for k in self._keys[token_class]}

    def key_class(self, kid: str) -> TokenClass | None:
        key = self._by_kid.get(kid)
        return key.token_class if key else None


def _issued(claims: Mapping[str, Any], token_class: TokenClass, issuer: str, now: float) -> bool:
    """The claims of our own RFC 9068 token, each of the type its readers rely on, live at ``now``.

    ``exp``, ``iat`` and ``nbf`` are NumericDates (RFC 7519 §2, bounded by
    :func:`sts.strict_json.numeric_date`); ``jti``, ``sub``, ``aud`` and ``token_class`` strings
    (``aud`` is one catalog id: introspection looks it up); ``client_id`` and ``task_id`` strings
    when present.
    """
    exp, iat, nbf = (numeric_date(claims.get(name)) for name in ("exp", "iat", "nbf"))
    if exp is None or iat is None or nbf is None or not nbf <= now < exp:
        return False
    if claims.get("iss") != issuer or claims.get("token_class") != token_class.value:
        return False
    if not all(isinstance(claims.get(name), str) for name in ("jti", "sub", "aud")):
        return False
    return all(isinstance(claims.get(name, ""), str) for name in ("client_id", "task_id", "scope"))


def check_may_serve(settings: KeySettings, token_class: TokenClass, loaded: list[SigningKey]) -> None:
    """``keys.generate: false``: a production configuration never signs with a development key."""
    if settings.generate:
        return
    if not loaded:
        raise ConfigError(
            f"keys.dir: {settings.dir} holds no {token_class} signing key and keys.generate is false: "
            "provision keys with 'sts keys create --config FILE' (or a Kubernetes Secret)"
        )
    if all(k.generated_for_development for k in loaded):
        raise ConfigError(
            f"keys.dir: {settings.dir} holds only generated development {token_class} keys and "
            "keys.generate is false: provision keys with 'sts keys create --config FILE'"
        )


def create_provisioned_keys(settings: KeySettings, *, now: float | None = None) -> list[str]:
    """``sts keys create``: a new production (non-development) key per class; returns the new kids."""
    current = int(time.time() if now is None else now)
    kids = []
    with _locked(settings.dir):
        for token_class in TokenClass:
            class_dir = settings.dir / token_class.value
            class_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            kids.append(_create_key(class_dir, token_class, current, development=False).kid)
    return kids


def _retire(keys: list[SigningKey], now: int, rotate_after: int) -> list[SigningKey]:
    """Keep the newest key and every key replaced less than ``rotate_after`` ago (still verifying)."""
    ordered = sorted(keys, key=lambda k: k.created_at)
    kept = [ordered[-1]]
    for older, newer in itertools.pairwise(ordered):
        if now - newer.created_at < rotate_after:
            kept.append(older)
    return sorted(kept, key=lambda k: k.created_at)


def _listing(directory: Path) -> tuple[str, ...]:
    """The key files of every class, as names: a change means a sibling rotated or retired a key."""
    return tuple(sorted(str(p.relative_to(directory)) for p in directory.glob("*/*.pem")))


def _writable(directory: Path) -> bool:
    """Whether we may create the lock file; a read-only mount (a Kubernetes Secret) is not an error."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(directory / ".lock", os.O_CREAT | os.O_RDWR, 0o600))
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return False
        raise
    return True


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _create_key(class_dir: Path, token_class: TokenClass, now: int, *, development: bool) -> SigningKey:
    private_key = ec.generate_private_key(ec.SECP256R1())
    kid = f"{token_class.value}-{thumbprint(private_key.public_key())}"
    name = f"{'dev-' if development else ''}{now}-{kid}.pem"
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = class_dir / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    if development:
        log.warning("generated a development signing key for %s tokens at %s", token_class, path)
    return SigningKey(token_class, kid, now, development, private_key)


def read_key(path: Path, token_class: TokenClass) -> SigningKey:
    mode = path.stat().st_mode & 0o077
    if mode:
        raise ConfigError(f"keys: {path} is readable by group or others (mode {oct(mode)}); chmod 600 it")
    try:
        private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"keys: {path} is not an unencrypted PKCS#8 PEM private key") from e
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
        private_key.curve, ec.SECP256R1
    ):
        raise ConfigError(f"keys: {path} is not a P-256 (ES256) key")
    stem = path.stem.removeprefix("dev-")
    created, _, kid_in_name = stem.partition("-")
    kid = f"{token_class.value}-{thumbprint(private_key.public_key())}"
    if not created.isdigit() or kid_in_name != kid:
        raise ConfigError(f"keys: {path} does not match its name <created>-{kid}.pem")
    return SigningKey(token_class, kid, int(created), path.name.startswith("dev-"), private_key)
