"""SPIFFE IDs and trust domains as immutable values, built only by a strict parser.

Implements SPIFFE-ID.md §2: scheme ``spiffe`` (lowercase only), a trust domain of ``[a-z0-9._-]``
(no userinfo, port, percent-encoding or uppercase), an optional path of non-empty segments of
``[a-zA-Z0-9._-]`` that are neither ``.`` nor ``..``, no trailing slash, no query or fragment;
trust domain ≤ 255 bytes and the whole ID ≤ 2048 bytes (§2.3). Non-canonical input is refused
rather than normalised (py-spiffe normalises and lets a trailing newline through).

Imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
MAX_TRUST_DOMAIN_BYTES = 255
MAX_ID_BYTES = 2048

_TRUST_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


class SpiffeIdError(ValueError):
    """The text is not a SPIFFE ID (or trust domain) in canonical form; the message names the rule."""


def _check_trust_domain(name: str) -> None:
    if not isinstance(name, str):  # values from JSON or YAML may be anything; refuse, never TypeError
        raise SpiffeIdError("trust domain must be a string")
    if not name:
        raise SpiffeIdError("trust domain is empty")
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _TRUST_DOMAIN_CHARS.issuperset(name):
        raise SpiffeIdError(
            "trust domain may hold only lowercase letters, digits, '.', '-' and '_' "
            "(no port, userinfo, uppercase or percent-encoding)"
        )


def _check_path(path: str) -> None:
    """``path`` is empty or starts with '/'; each segment must be non-empty, not '.'/'..', charset-valid."""
    if not path:
        return
    for segment in path[1:].split("/"):
        if not segment:
            raise SpiffeIdError("path has an empty segment or a trailing '/'")
        if segment in (".", ".."):
            raise SpiffeIdError("path segments '.' and '..' are not allowed")
        if not _PATH_CHARS.issuperset(segment):
            raise SpiffeIdError(
                "path segments may hold only letters, digits, '.', '-' and '_' "
                "(no query, fragment or percent-encoding)"
            )


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A trust domain name such as ``example.org``; build it with :meth:`parse`."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept a bare name (``example.org``) or a trust-domain-only ID (``spiffe://example.org``)."""
        if not isinstance(text, str):
            raise SpiffeIdError("trust domain must be a string")
        if text.startswith(SCHEME_PREFIX):
            spiffe_id = SpiffeId.parse(text)
            if spiffe_id.path:
                raise SpiffeIdError("a trust domain ID must not have a path")
            return spiffe_id.trust_domain
        return cls(text)

    @property
    def id(self) -> str:
        """The trust domain's own SPIFFE ID, as used for bundle map keys (``spiffe://example.org``)."""
        return SCHEME_PREFIX + self.name

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID; compare and hash as values. Build it with :meth:`parse`."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain) or not isinstance(self.path, str):
            raise SpiffeIdError("a SPIFFE ID is a trust domain and a path string")
        if self.path and not self.path.startswith("/"):
            raise SpiffeIdError("path must start with '/'")
        _check_path(self.path)
        if len(SCHEME_PREFIX) + len(self.trust_domain.name) + len(self.path) > MAX_ID_BYTES:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse the canonical form ``spiffe://<trust domain>[/<segment>…]``; anything else is refused."""
        if not isinstance(text, str):
            raise SpiffeIdError("SPIFFE ID must be a string")
        if len(text) > MAX_ID_BYTES:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
        if not text.startswith(SCHEME_PREFIX):
            raise SpiffeIdError("SPIFFE ID must start with 'spiffe://' (lowercase scheme)")
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        return cls(TrustDomain(name), path)

    @property
    def segments(self) -> tuple[str, ...]:
        """The path segments in order (empty for a trust-domain-only ID)."""
        return tuple(self.path[1:].split("/")) if self.path else ()

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + self.path
