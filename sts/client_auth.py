"""The ``jwt-spiffe`` client assertion: a JWT-SVID that authenticates an OAuth client.

draft-ietf-oauth-spiffe-client-auth profiles RFC 7521 §4.2 / RFC 7523 §2.2: the client sends
``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-spiffe`` and its JWT-SVID as
``client_assertion``; the authenticated client is the SVID's SPIFFE ID (method ``spiffe_jwt``). The
token endpoint, introspection and revocation all accept it, through this one function.

The SVID's audience must be exactly one value that identifies this server: its issuer, or the URL
of the endpoint the assertion is sent to (RFC 7523 §3 item 3 allows the token endpoint URL). An
assertion that also names another audience could be replayed by that audience to pose as the client.

Why the endpoint URL matters: a SPIRE agent caches JWT-SVIDs per (SPIFFE ID, audience set) and hands
out the same token for half its life, so a client asking for its subject token and its assertion with
the same audience gets one string twice, and the same string twice proves nothing more than holding
it once. Asking for the assertion with audience = the token endpoint URL yields a distinct SVID that
a thief of the subject token does not have.

Knows nothing of HTTP; must not import Flask.
"""

from __future__ import annotations

from collections.abc import Sequence

from sts.errors import InvalidClient, InvalidToken
from sts.strict_json import b64url_decode, loads
from sts.svid import JwtSvidVerifier, VerifiedJwtSvid

CLIENT_ASSERTION_TYPE_JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"


def has_client_assertion(assertion: str | None, assertion_type: str | None) -> bool:
    """Whether the request attempts assertion authentication at all (either parameter sent)."""
    return assertion is not None or assertion_type is not None


def verify_client_assertion(
    verifiers: Sequence[JwtSvidVerifier],
    assertion: str | None,
    assertion_type: str | None,
    *,
    now: float | None = None,
) -> VerifiedJwtSvid:
    """The client's verified JWT-SVID, or RFC 6749 §5.2 ``invalid_client`` saying which rule failed.

    ``verifiers`` hold one verifier per acceptable audience (the issuer first, then endpoint URLs);
    the assertion's single ``aud`` value picks one, so a bad assertion costs one verification.
    """
    if assertion is None or assertion_type is None:
        raise InvalidClient("client_assertion and client_assertion_type go together")
    if assertion_type != CLIENT_ASSERTION_TYPE_JWT_SPIFFE:
        raise InvalidClient(f"client_assertion_type must be {CLIENT_ASSERTION_TYPE_JWT_SPIFFE}")
    claimed = _claimed_audience(assertion)
    verifier = next((v for v in verifiers if (v.audience,) == claimed), verifiers[0])
    try:
        svid = verifier.verify(assertion, now=now)
    except InvalidToken as e:
        raise InvalidClient(f"client_assertion: {e.description}", detail=e.detail) from e
    if svid.audience != (verifier.audience,):
        accepted = " or ".join(v.audience for v in verifiers)
        raise InvalidClient(f"client_assertion: audience must be exactly one of: {accepted}")
    return svid


def _claimed_audience(token: str) -> tuple[str, ...] | None:
    """The unverified ``aud`` of a compact JWS, only to pick the verifier (which then checks it)."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > 16384:
        return None
    try:
        claims = loads(b64url_decode(parts[1]))
    except ValueError:  # JsonError too
        return None
    audience = claims.get("aud") if isinstance(claims, dict) else None
    if isinstance(audience, str):
        return (audience,)
    if isinstance(audience, list) and all(isinstance(a, str) for a in audience):
        return tuple(audience)
    return None
