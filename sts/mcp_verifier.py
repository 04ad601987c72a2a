"""Our access tokens for MCP tool servers: a ``TokenVerifier`` of the official MCP Python SDK.

An MCP server built with the SDK (``mcp.server.mcpserver.MCPServer(token_verifier=..., auth=...)``,
or its ``BearerAuthBackend``) hands every ``Authorization: Bearer`` token to
:meth:`McpTokenVerifier.verify_token`; we run :class:`sts.verify.TokenVerifier` on it — signature by
the tool key set, ``aud`` = this server, lifetime, revocation — and return the SDK's ``AccessToken``.
Anything refused is ``None``, which the SDK answers with 401 (and 403 for scopes it requires itself).

**Authorization discovery** (MCP authorization, RFC 9728): give the verifier this server's catalog
URI (``TokenVerifier(resource="https://search.example.org/mcp", scopes=["invoke"], ...)``, the
catalog entry's ``resource``) and build the SDK's settings with :func:`auth_settings`. The SDK then
serves the protected resource metadata (``resource`` = that URI, ``authorization_servers`` = our
issuer, ``scopes_supported``) at ``/.well-known/oauth-protected-resource<path>`` and answers a request
without a good token with ``401`` and ``WWW-Authenticate: Bearer error="invalid_token", …,
resource_metadata="<that URL>"``, which leads an MCP client to the metadata and from there to our
STS; a workload then exchanges its SPIFFE identity there for a tool token with ``resource=`` that URI
(:class:`sts.client.TokenClient`, RFC 8693), and calls again with it.

The SDK only speaks ``Bearer`` and passes neither DPoP proofs nor the TLS client certificate, so a
sender-constrained token (``cnf``) is always refused here: bound tokens need a server that sees the
proof (:mod:`sts.asgi_verifier`, ``TokenVerifier.require_token``). Our verifier checks ``aud``
itself; :func:`auth_settings` also lets the SDK compare the token's resource (ours reports the
verifier's ``resource``) with ``resource_server_url``.

The SDK answers every refusal with its own fixed challenge (``error_description="Authentication
required"``), so the reason reaches the server's developer only through the log: the verifier logs
each refusal once, at INFO on ``sts.verify``, naming its rule (``access token refused (rule:
audience): ...``; the rules are listed in :mod:`sts.verify`). Other failures (the STS or the
Workload API unreachable) are logged here, as warnings. Constructing the
:class:`~sts.verify.TokenVerifier` already fails (:class:`~sts.verify.WorkloadApiUnavailable`) when
the Workload API socket it needs cannot be reached.

Imports ``mcp`` (the extra ``pip install 'spiffe-sts[mcp]'``); nothing else in ``sts`` imports this
module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sts.errors import StsError
from sts.logsafe import escape
from sts.verify import InvalidAccessToken, TokenVerifier

try:
    from mcp.server.auth.provider import AccessToken
    from mcp.server.auth.settings import AuthSettings
except ModuleNotFoundError as missing:  # pragma: no cover - the base install has no MCP SDK
    raise ModuleNotFoundError(
        "sts.mcp_verifier needs the MCP SDK: pip install 'spiffe-sts[mcp]'", name=missing.name
    ) from missing

__all__ = ["McpTokenVerifier", "auth_settings"]

log = logging.getLogger(__name__)


def auth_settings(verifier: TokenVerifier, *, required_scopes: Iterable[str] | None = None) -> AuthSettings:
    """The MCP SDK's ``AuthSettings`` for a server guarded by ``verifier`` (which needs ``resource=``).

    ``issuer_url`` is our issuer and ``resource_server_url`` the verifier's ``resource`` (the
    catalog URI), so the SDK's RFC 9728 metadata and its challenge lead clients to our STS.
    ``required_scopes`` (default: the verifier's ``scopes``) are what every call needs (403
    ``insufficient_scope`` otherwise) and what the metadata advertises.
    """
    if verifier.resource is None:
        raise ValueError("auth_settings needs TokenVerifier(resource=<this MCP server's catalog URI>)")
    scopes = sorted(verifier.scopes if required_scopes is None else frozenset(required_scopes))
    # Validated by the model itself, which keeps a path-less issuer as written (no trailing "/"): RFC
    # 8414 §3.3 compares issuers as strings.
    return AuthSettings.model_validate(
        {
            "issuer_url": verifier.issuer,
            "resource_server_url": verifier.resource,
            "required_scopes": scopes or None,
            "validate_token_resource": True,
        }
    )


class McpTokenVerifier:
    """Satisfies ``mcp.server.auth.provider.TokenVerifier``; ``scope``: what every call must carry.

    Verification may call the STS (keys, introspection) and blocks, so it runs in a worker thread,
    never on the server's event loop.
    """

    def __init__(self, verifier: TokenVerifier, *, scope: str | Iterable[str] = ()) -> None:
        self._verifier = verifier
        self._scope = frozenset(scope.split() if isinstance(scope, str) else scope)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            verified = await self._verifier.averify(token, scheme="Bearer", scope=self._scope)
        except InvalidAccessToken:
            return None  # logged by the verifier, with its rule
        except StsError as e:
            log.warning(
                "MCP request refused: %s (%s): %s", e.description, e.error, escape(e.detail or e.description)
            )
            return None
        aud = verified.claims.get("aud")
        # The token's aud is this server (checked): its resource is the verifier's catalog URI.
        resource = self._verifier.resource or (aud if isinstance(aud, str) else None)
        return AccessToken(
            token=token,
            client_id=verified.client_id,
            scopes=sorted(verified.scopes),
            expires_at=verified.expires_at,
            resource=resource,
            subject=verified.subject,
            claims=dict(verified.claims),
        )
