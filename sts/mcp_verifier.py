"""Our access tokens for MCP tool servers: a ``TokenVerifier`` of the official MCP Python SDK.

An MCP server built with the SDK (``mcp.server.mcpserver.MCPServer(token_verifier=..., auth=...)``,
or its ``BearerAuthBackend``) hands every ``Authorization: Bearer`` token to
:meth:`McpTokenVerifier.verify_token`; we run :class:`sts.verify.TokenVerifier` on it — signature by
the tool key set, ``aud`` = this server, lifetime, revocation — and return the SDK's ``AccessToken``.
Anything refused is ``None``, which the SDK answers with 401 (and 403 for scopes it requires itself).

The SDK only speaks ``Bearer`` and passes neither DPoP proofs nor the TLS client certificate, so a
sender-constrained token (``cnf``) is always refused here: bound tokens need a server that sees the
proof (``TokenVerifier.require_token``). Since our verifier checks ``aud`` itself, configure
``AuthSettings(validate_token_resource=False)``.

The SDK answers every refusal with its own fixed challenge (``error_description="Authentication
required"``), so the reason reaches the server's developer only through the log: the verifier logs
each refusal once, at INFO on ``sts.verify``, naming its rule (``access token refused (rule:
audience): ...``; the rules are listed in :mod:`sts.verify`). Other failures (the STS or the
Workload API unreachable) are logged here, as warnings. Constructing the
:class:`~sts.verify.TokenVerifier` already fails (:class:`~sts.verify.WorkloadApiUnavailable`) when
the Workload API socket it needs cannot be reached.

Imports ``mcp`` (the optional extra ``sts[mcp]``); nothing else in ``sts`` imports this module.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import anyio.to_thread
from mcp.server.auth.provider import AccessToken

from sts.errors import StsError
from sts.logsafe import escape
from sts.verify import InvalidAccessToken, TokenVerifier

log = logging.getLogger(__name__)


class McpTokenVerifier:
    """Satisfies ``mcp.server.auth.provider.TokenVerifier``; ``scope``: what every call must carry.

    Verification may call the STS (keys, introspection) and blocks, so it runs in a worker thread,
    never on the server's event loop.
    """

    def __init__(self, verifier: TokenVerifier, *, scope: str | Iterable[str] = ()) -> None:
        self._verifier = verifier
        self._scope = frozenset(scope.split() if isinstance(scope, str) else scope)

    async def verify_token(self, token: str) -> AccessToken | None:
        check = functools.partial(self._verifier.verify, token, scheme="Bearer", scope=self._scope)
        try:
            verified = await anyio.to_thread.run_sync(check)
        except InvalidAccessToken:
            return None  # logged by the verifier, with its rule
        except StsError as e:
            log.warning(
                "MCP request refused: %s (%s): %s", e.description, e.error, escape(e.detail or e.description)
            )
            return None
        aud = verified.claims.get("aud")
        return AccessToken(
            token=token,
            client_id=verified.client_id,
            scopes=sorted(verified.scopes),
            expires_at=verified.expires_at,
            resource=aud if isinstance(aud, str) else None,
            subject=verified.subject,
            claims=dict(verified.claims),
        )
