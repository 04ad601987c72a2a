"""The one error tree of the STS: every refusal is an :class:`StsError` carrying its protocol form.

Each class fixes the RFC 6749 §5.2 / RFC 8693 §2.2.2 ``error`` code and the HTTP status. The
``description`` is public (it goes into ``error_description``) and never holds verification
details such as key ids or bundle contents; ``detail`` is for the log only.

    StsError (server_error, 500)
     ├── InvalidRequest (invalid_request, 400)
     │    ├── InvalidToken          a subject/actor token failed verification (rule named)
     │    ├── RequestTooLarge       body over the cap (413)
     │    └── RequestTimeout        body (or head) too slow (408)
     ├── InvalidClient (invalid_client, 401)
     ├── InvalidTarget (invalid_target, 400)
     ├── InvalidScope (invalid_scope, 400)
     ├── UnsupportedGrantType (unsupported_grant_type, 400)
     ├── RateLimited (rate_limited, 429, Retry-After)
     ├── TemporarilyUnavailable (temporarily_unavailable, 503)
     ├── InvalidCallerToken (invalid_token, 401)   RFC 6750: the bearer JWT-SVID of a JSON endpoint
     ├── AccessDenied (access_denied, 403)         authenticated, but not allowed (policy, not admin)
     └── NotFound (not_found, 404)                 no such task (or not yours: no oracle)

``ConfigError`` is apart: it stops start-up, it is never an HTTP answer.

This module imports nothing of the project.
"""

from __future__ import annotations

from typing import ClassVar


class StsError(Exception):
    """A refusal in protocol form; unexpected failures become the base class (``server_error``)."""

    error: ClassVar[str] = "server_error"
    status: ClassVar[int] = 500

    def __init__(self, description: str = "internal error", *, detail: str | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.detail = detail

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers this error must carry (``WWW-Authenticate``, ``Retry-After``)."""
        return {}

    def to_json(self) -> dict[str, str]:
        """The RFC 6749 §5.2 error body."""
        return {"error": self.error, "error_description": self.description}


class InvalidRequest(StsError):
    error = "invalid_request"
    status = 400


class InvalidToken(InvalidRequest):
    """A subject or actor token failed one verification rule (RFC 8693 §2.2.2: ``invalid_request``).

    ``rule`` is a stable short name of the rule (``expired``, ``audience``, ``signature`` …) for
    logs, metrics and tests; the description says it in words.
    """

    def __init__(self, rule: str, description: str, *, detail: str | None = None) -> None:
        super().__init__(description, detail=detail)
        self.rule = rule

    def for_parameter(self, parameter: str) -> InvalidToken:
        """The same refusal, its description prefixed with the request parameter that carried the token."""
        err = InvalidToken(self.rule, f"{parameter}: {self.description}", detail=self.detail)
        err.__cause__ = self
        return err


class RequestTooLarge(InvalidRequest):
    status = 413

    def headers(self) -> dict[str, str]:
        # The rest of the body is never read, so the connection cannot carry another request.
        return {"Connection": "close"}


class RequestTimeout(InvalidRequest):
    """The request (its body, on the TLS listener also its head) did not arrive within its deadline."""

    status = 408

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class InvalidClient(StsError):
    """RFC 6749 §5.2: client authentication failed or is not supported.

    A challenge (``WWW-Authenticate``) only for the HTTP authentication scheme the client used
    (``scheme``); clients that authenticated in the body (``client_assertion``) or by mTLS used none,
    and a challenge there would hide the ``error_description`` from clients that read it first.
    """

    error = "invalid_client"
    status = 401

    def __init__(self, description: str, *, detail: str | None = None, scheme: str | None = None) -> None:
        super().__init__(description, detail=detail)
        self.scheme = scheme

    def headers(self) -> dict[str, str]:
        if self.scheme is None:
            return {}
        return {"WWW-Authenticate": f'{self.scheme} realm="sts", error="invalid_client"'}


class InvalidTarget(StsError):
    error = "invalid_target"
    status = 400


class InvalidScope(StsError):
    error = "invalid_scope"
    status = 400


class UnsupportedGrantType(StsError):
    error = "unsupported_grant_type"
    status = 400


class RateLimited(StsError):
    error = "rate_limited"
    status = 429

    def __init__(self, description: str, *, retry_after: int, detail: str | None = None) -> None:
        super().__init__(description, detail=detail)
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class TemporarilyUnavailable(StsError):
    """A dependency (trust bundles, policy, store, keys) cannot answer: we refuse rather than guess."""

    error = "temporarily_unavailable"
    status = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class InvalidCallerToken(StsError):
    """RFC 6750 §3.1: the caller's bearer token (its JWT-SVID) is missing or does not verify."""

    error = "invalid_token"
    status = 401

    def __init__(self, description: str, *, detail: str | None = None, missing: bool = False) -> None:
        super().__init__(description, detail=detail)
        self.missing = missing  # no credential at all: RFC 6750 §3.1, the challenge carries no error code

    def headers(self) -> dict[str, str]:
        if self.missing:
            return {"WWW-Authenticate": 'Bearer realm="sts"'}
        description = self.description.replace('"', "'")
        return {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{description}"'}


class AccessDenied(StsError):
    error = "access_denied"
    status = 403


class NotFound(StsError):
    error = "not_found"
    status = 404


class ConfigError(Exception):
    """A setting is wrong; start-up stops with a message naming the key (and line when known)."""
