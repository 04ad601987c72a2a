"""The resource catalog: every target a token can be issued for, its class, scopes and limits.

A target is named on ``/token`` either by ``audience`` (the catalog id, e.g. ``tool:web-search``) or
by ``resource`` (an absolute URI listed in the catalog, RFC 8707). The entry decides the token class
(which signing key), the scopes that may be asked for, the data sensitivity Cedar sees, and the
longest lifetime a token for it may have, and which workloads serve it (only they may introspect
its tokens).

Imports only ``sts.errors``, ``sts.spiffeid`` and ``sts.strict_json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from sts.errors import InvalidRequest, InvalidScope, InvalidTarget
from sts.spiffeid import SpiffeId
from sts.strict_json import absolute_uri

DEFAULT_MAX_TTL_SECONDS = 300
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F) if c not in (0x22, 0x5C))


def is_scope_token(text: str) -> bool:
    """RFC 6749 §3.3 scope token: printable ASCII without space, '"' or '\\'."""
    return bool(text) and _SCOPE_TOKEN_CHARS.issuperset(text)


class TokenClass(StrEnum):
    """Tool and data tokens are signed with separate keys so one can never stand in for the other."""

    TOOL = "tool"
    DATA = "data"


class Sensitivity(IntEnum):
    """Data sensitivity, ordered so policies can compare levels (``>= confidential``)."""

    PUBLIC = 0
    INTERNAL = 1
    CONFIDENTIAL = 2
    RESTRICTED = 3

    @classmethod
    def parse(cls, text: str) -> Sensitivity:
        try:
            return cls[text.upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f"unknown sensitivity {text!r} (one of {names})") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One target. Checked on construction so a bad catalog never reaches a request."""

    id: str
    token_class: TokenClass
    scopes: frozenset[str]
    sensitivity: Sensitivity = Sensitivity.INTERNAL
    resource: str | None = None
    max_ttl: int = DEFAULT_MAX_TTL_SECONDS
    resource_servers: frozenset[SpiffeId] = frozenset()

    def __post_init__(self) -> None:
        if not self.id or any(c.isspace() for c in self.id):
            raise ValueError("id must be non-empty without white space")
        if not self.scopes:
            raise ValueError("scopes must list at least one scope")
        for scope in self.scopes:
            if not is_scope_token(scope):
                raise ValueError(f"scope {scope!r} is not a valid RFC 6749 scope token")
        if self.resource is not None and not absolute_uri(self.resource):
            raise ValueError("resource must be an absolute URI without a fragment (RFC 8707 §2)")
        if self.max_ttl <= 0:
            raise ValueError("max_ttl must be positive")

    @property
    def action_prefix(self) -> str:
        """Cedar actions for this entry are ``<class>:<scope>`` (``tool:invoke``, ``data:read``)."""
        return self.token_class.value


class Catalog:
    """All targets, looked up by id or by resource URI; immutable once built."""

    def __init__(self, entries: Iterable[CatalogEntry]) -> None:
        by_id: dict[str, CatalogEntry] = {}
        by_resource: dict[str, CatalogEntry] = {}
        for entry in entries:
            if entry.id in by_id:
                raise ValueError(f"catalog id {entry.id!r} appears twice")
            by_id[entry.id] = entry
            if entry.resource is not None:
                if entry.resource in by_resource:
                    raise ValueError(f"catalog resource {entry.resource!r} appears twice")
                by_resource[entry.resource] = entry
        self._by_id = by_id
        self._by_resource = by_resource

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, target_id: str) -> CatalogEntry | None:
        return self._by_id.get(target_id)

    def resolve(self, audiences: Sequence[str], resources: Sequence[str]) -> CatalogEntry:
        """The single target a request names (RFC 8693 §2.1 ``audience``/``resource``).

        We issue tokens for exactly one audience, so more than one target, even two names of the
        same entry, is refused rather than silently narrowed.
        """
        named = len(audiences) + len(resources)
        if named == 0:
            raise InvalidRequest("name the target with one 'audience' (catalog id) or one 'resource' (URI)")
        if named > 1:
            raise InvalidTarget(
                "exactly one target per request: tokens are restricted to a single audience; "
                "send one 'audience' or one 'resource'"
            )
        if audiences:
            entry = self._by_id.get(audiences[0])
            if entry is None:
                raise InvalidTarget("the audience is not a known target")
            return entry
        resource = resources[0]
        # strict_json.absolute_uri, not urlsplit: "http://[::1" must be invalid_target, never a ValueError.
        if not absolute_uri(resource):
            raise InvalidTarget("resource must be an absolute URI without a fragment (RFC 8707 §2)")
        entry = self._by_resource.get(resource)
        if entry is None:
            raise InvalidTarget("the resource is not a known target")
        return entry

    def check_scopes(self, entry: CatalogEntry, requested: frozenset[str]) -> frozenset[str]:
        """Requested scopes must be a non-empty subset of the target's (RFC 6749 §3.3).

        An omitted scope is refused rather than defaulted to everything: least privilege is asked for.
        """
        if not requested:
            raise InvalidScope(
                f"scope is required; target {entry.id} offers: {' '.join(sorted(entry.scopes))}"
            )
        unknown = requested - entry.scopes
        if unknown:
            raise InvalidScope(
                f"scope not offered by target {entry.id}: {' '.join(sorted(unknown))}; "
                f"allowed: {' '.join(sorted(entry.scopes))}"
            )
        return requested
