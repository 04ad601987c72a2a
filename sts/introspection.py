"""Is this token active, and may its holder end it: RFC 7662 introspection and RFC 7009 revocation.

A token is active when we issued it (signature by the class key, ``at+jwt``, our ``iss``), it is
within its lifetime, its ``jti`` is not revoked, its task (if any) is still active, and its subject
has not been cut off since it was issued. A resource server may introspect only tokens whose
audience is a target it serves (``resource_servers`` in the catalog); for anything else the answer
is ``{"active": false}``, which says nothing more. When the store cannot answer, nothing is active:
``temporarily_unavailable`` (503), never a guess.

Must not import Flask.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from sts.audit import AuditLog
from sts.callers import Caller
from sts.catalog import Catalog
from sts.exchange import actor_chain
from sts.keys import KeyRing
from sts.store import Store, SubjectRevocation

INACTIVE: Mapping[str, Any] = MappingProxyType({"active": False})
# Revocation records outlive the token a little: replicas' and Redis's clocks may disagree.
REVOCATION_MARGIN_SECONDS = 60
# Claims an active introspection response repeats from the token (RFC 7662 §2.2 and ours).
_REPEATED = (
    "iss",
    "sub",
    "aud",
    "client_id",
    "scope",
    "exp",
    "iat",
    "nbf",
    "jti",
    "token_class",
    "task_id",
    "act",
    "cnf",
)


def _kills(revocation: SubjectRevocation | None, issued_at: int, now: float) -> bool:
    """A kill switch ends tokens issued before it, and every token while it is in force."""
    return revocation is not None and (issued_at <= revocation.revoked_at or revocation.blocks_issuance(now))


class Introspection:
    """Answers ``/introspect`` and ``/revoke`` for tokens this server issued."""

    def __init__(
        self, *, issuer: str, keys: KeyRing, store: Store, catalog: Catalog, audit: AuditLog
    ) -> None:
        self._issuer = issuer
        self._keys = keys
        self._store = store
        self._catalog = catalog
        self._audit = audit

    def active_claims(self, token: str, now: float) -> dict[str, Any] | None:
        """The token's claims if it is active right now (signature, lifetime, and every revocation)."""
        claims = self._keys.verify_issued(token, issuer=self._issuer, now=now)
        if claims is None:
            return None
        state = self._store.token_state(claims["jti"], claims.get("task_id"), claims["sub"])
        if state.jti_revoked:
            return None
        if "task_id" in claims and (state.task is None or state.task.status(now) != "active"):
            return None
        if _kills(state.subject_revocation, claims["iat"], now):
            return None
        # The kill switch reaches every party of the token: the actors of a delegation and the client.
        others = {*actor_chain(claims.get("act")), claims.get("client_id")} - {claims["sub"], None}
        for spiffe_id in sorted(o for o in others if isinstance(o, str)):
            if _kills(self._store.subject_revocation(spiffe_id), claims["iat"], now):
                return None
        return claims

    def introspect(
        self, caller: Caller, token: str, *, request_id: str, now: float | None = None
    ) -> dict[str, Any]:
        """RFC 7662 §2.2; the caller must serve the token's audience."""
        current = time.time() if now is None else now
        claims = self.active_claims(token, current)
        if claims is None:
            return dict(INACTIVE)
        entry = self._catalog.get(claims["aud"])
        if entry is None or caller.spiffe_id not in entry.resource_servers:
            self._audit.record(
                {
                    "event": "introspect",
                    "decision": "deny",
                    "request_id": request_id,
                    "caller": str(caller.spiffe_id),
                    "reason": "caller does not serve the token's audience",
                    "jti": claims["jti"],
                },
                now=current,
            )
            return dict(INACTIVE)
        bound_to_dpop = isinstance(claims.get("cnf"), dict) and "jkt" in claims["cnf"]
        response = {"active": True, "token_type": "DPoP" if bound_to_dpop else "Bearer"}
        response.update({name: claims[name] for name in _REPEATED if name in claims})
        return response

    def revoke(self, caller: Caller, token: str, *, request_id: str, now: float | None = None) -> None:
        """RFC 7009 §2.1: the holder (the token's subject or client) revokes its own token.

        Unknown, expired or someone else's tokens are answered the same way (200, §2.2) and nothing
        changes; the attempt is audited.
        """
        current = time.time() if now is None else now
        claims = self._keys.verify_issued(token, issuer=self._issuer, now=current)
        who = str(caller.spiffe_id)
        holder = claims is not None and who in (claims["sub"], claims.get("client_id"))
        if claims is not None and holder:
            self._store.revoke_jti(claims["jti"], expires_at=int(claims["exp"]) + REVOCATION_MARGIN_SECONDS)
        self._audit.record(
            {
                "event": "revoke",
                "decision": "allow" if holder else "ignored",
                "request_id": request_id,
                "caller": who,
                "jti": claims["jti"] if claims else None,
                "reason": "holder revoked its token" if holder else "not an active token of this caller",
            },
            now=current,
        )
