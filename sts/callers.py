"""Who is calling a JSON endpoint (tasks, introspection, revocation, admin): authenticated callers.

A caller proves its identity one of three ways, verified like subject tokens: its JWT-SVID as a bearer
token (RFC 6750 §2.1 ``Authorization: Bearer``, audience = our issuer); on the form endpoints
(introspection, revocation) its JWT-SVID as a ``jwt-spiffe`` client assertion
(draft-ietf-oauth-spiffe-client-auth, :mod:`sts.client_auth`); or, on the TLS listener, its X.509-SVID
as TLS client certificate. Sending an Authorization header and a client assertion is two methods in
one request, refused (RFC 6749 §2.3, §5.2 ``invalid_request``), as is a client assertion on a
connection that presented a client certificate. Admin endpoints additionally require the caller's
SPIFFE ID in ``admins``.

Knows nothing of HTTP beyond the header value it is handed; must not import Flask.
"""

from __future__ import annotations

import time
from collections.abc import Sequence, Set
from dataclasses import dataclass

from cryptography import x509

from sts.client_auth import has_client_assertion, verify_client_assertion
from sts.errors import AccessDenied, InvalidCallerToken, InvalidRequest, InvalidToken
from sts.spiffeid import SpiffeId
from sts.store import Store
from sts.svid import JwtSvidVerifier, X509SvidVerifier

BEARER_PREFIX = "bearer "


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller and how it authenticated (``spiffe_jwt`` or ``spiffe_x509``)."""

    spiffe_id: SpiffeId
    method: str


class CallerAuthenticator:
    """Turns an ``Authorization`` header into a :class:`Caller`, or refuses (RFC 6750 ``invalid_token``)."""

    def __init__(
        self, verifier: JwtSvidVerifier, admins: Set[SpiffeId], store: Store, x509: X509SvidVerifier
    ) -> None:
        self._verifier = verifier
        self._x509 = x509
        self._admins = frozenset(admins)
        self._store = store

    def authenticate(
        self,
        authorization: str | None,
        *,
        client_certificates: Sequence[x509.Certificate] = (),
        client_assertion: str | None = None,
        client_assertion_type: str | None = None,
        now: float | None = None,
    ) -> Caller:
        """RFC 6750 §2.1 ``Bearer <JWT-SVID>`` whose audience is this issuer, or a ``jwt-spiffe`` client
        assertion (raising :class:`~sts.errors.InvalidClient` when it fails), or else the TLS
        client's X.509-SVID (on the TLS listener)."""
        if has_client_assertion(client_assertion, client_assertion_type):
            if authorization:
                raise InvalidRequest(
                    "authenticate one way: an Authorization header or a client_assertion, not both"
                )
            if client_certificates:
                raise InvalidRequest("authenticate one way: TLS certificate or client assertion, not both")
            svid = verify_client_assertion(
                (self._verifier,), client_assertion, client_assertion_type, now=now
            )
            return self._not_cut_off(Caller(svid.spiffe_id, "spiffe_jwt"), now)
        if not authorization and client_certificates:
            try:
                certificate = self._x509.verify(client_certificates, now=now)
            except InvalidToken as e:
                raise InvalidCallerToken(f"client certificate: {e.description}", detail=e.detail) from e
            return self._not_cut_off(Caller(certificate.spiffe_id, "spiffe_x509"), now)
        if not authorization:
            raise InvalidCallerToken(
                "authenticate with your JWT-SVID: Authorization: Bearer <token>", missing=True
            )
        if not authorization[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
            raise InvalidCallerToken("the Authorization scheme must be Bearer")
        token = authorization[len(BEARER_PREFIX) :].strip()
        try:
            svid = self._verifier.verify(token, now=now)
        except InvalidToken as e:
            raise InvalidCallerToken(f"bearer JWT-SVID: {e.description}", detail=e.detail) from e
        return self._not_cut_off(Caller(svid.spiffe_id, "spiffe_jwt"), now)

    def _not_cut_off(self, caller: Caller, now: float | None) -> Caller:
        """The admin kill switch also closes every JSON endpoint to the workload (admins included:
        recovering a killed admin means waiting for ``until`` or another admin; plan two)."""
        revocation = self._store.subject_revocation(str(caller.spiffe_id))
        if revocation is not None and revocation.blocks_issuance(time.time() if now is None else now):
            raise InvalidCallerToken("access of this workload has been revoked by an administrator")
        return caller

    def is_admin(self, caller: Caller) -> bool:
        return caller.spiffe_id in self._admins

    def require_admin(self, caller: Caller) -> None:
        if not self.is_admin(caller):
            raise AccessDenied("this endpoint is for the STS administrators (admins in the configuration)")
