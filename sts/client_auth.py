"""The ``jwt-spiffe`` client assertion: a JWT-SVID that authenticates an OAuth client.

draft-ietf-oauth-spiffe-client-auth profiles RFC 7521 §4.2 / RFC 7523 §2.2: the client sends
``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-spiffe`` and its JWT-SVID as
``client_assertion``; the authenticated client is the SVID's SPIFFE ID (method ``spiffe_jwt``). The
token endpoint, introspection and revocation all accept it, through this one function.

The SVID's audience must be this issuer and nothing else: an assertion that also names another
audience could be replayed by that audience to pose as the client (RFC 7523 §3 item 3).

Knows nothing of HTTP; must not import Flask.
"""

from __future__ import annotations

from sts.errors import InvalidClient, InvalidToken
from sts.svid import JwtSvidVerifier, VerifiedJwtSvid

CLIENT_ASSERTION_TYPE_JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"


def has_client_assertion(assertion: str | None, assertion_type: str | None) -> bool:
    """Whether the request attempts assertion authentication at all (either parameter sent)."""
    return assertion is not None or assertion_type is not None


def verify_client_assertion(
    verifier: JwtSvidVerifier,
    assertion: str | None,
    assertion_type: str | None,
    *,
    now: float | None = None,
) -> VerifiedJwtSvid:
    """The client's verified JWT-SVID, or RFC 6749 §5.2 ``invalid_client`` saying which rule failed."""
    if assertion is None or assertion_type is None:
        raise InvalidClient("client_assertion and client_assertion_type go together")
    if assertion_type != CLIENT_ASSERTION_TYPE_JWT_SPIFFE:
        raise InvalidClient(f"client_assertion_type must be {CLIENT_ASSERTION_TYPE_JWT_SPIFFE}")
    try:
        svid = verifier.verify(assertion, now=now)
    except InvalidToken as e:
        raise InvalidClient(f"client_assertion: {e.description}", detail=e.detail) from e
    if svid.audience != (verifier.audience,):
        raise InvalidClient("client_assertion: audience must be this issuer only")
    return svid
