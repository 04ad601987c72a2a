"""The resource server's side: check an access token of this STS before serving a request.

:class:`TokenVerifier` is configured with the issuer, the resource server's own audience (its catalog
id) and the one token class it serves (``tool`` or ``data``). It discovers the class's key set through
RFC 8414 metadata (``<class>_jwks_uri``, else ``jwks_uri``) and trusts only keys whose ``kid`` names
that class, so a data service can never accept a tool token, whatever its ``aud`` says. Checks, in
this order (RFC 9068 §4, RFC 8725 §3.1, RFC 9449 §7, RFC 8705 §3, RFC 7662):

1. compact JWS, header ``typ: at+jwt``, ``alg: ES256`` (nothing else), no ``crit``, a ``kid`` of our class;
2. the signature, with the key of that ``kid`` (refreshing the key set on an unknown ``kid`` at most
   once per interval);
3. ``iss``, ``aud`` = this server, ``token_class``, ``exp``/``nbf``/``iat`` with a small leeway, and
   the RFC 9068 claims present;
4. ``cnf``: ``x5t#S256`` against the caller's TLS client certificate, ``jkt`` against a DPoP proof
   (``htm``, ``htu``, ``ath``, single-use ``jti``); a bound token without its proof is refused, and so
   is a DPoP-bound token sent as ``Bearer``;
5. revocation: introspection at the STS (as this server's own SPIFFE identity) with a short cache,
   failing closed once the STS has been unreachable past a bound;
6. scope.

Failures are :class:`InvalidAccessToken` (RFC 6750 ``invalid_token``, 401), :class:`DpopProofRefused`
(RFC 9449 ``invalid_dpop_proof``, 401), :class:`InsufficientScope` (403) or
:class:`~sts.errors.TemporarilyUnavailable` (503); each knows its ``WWW-Authenticate`` challenge, and
:meth:`TokenVerifier.refusal` turns any of them into a framework-free HTTP answer (:class:`Refusal`).
:meth:`TokenVerifier.require_token` is the Flask decorator that renders them (Flask is the ``flask``
extra, imported only when a Flask helper is used); :mod:`sts.asgi_verifier` does the same for
Starlette and FastAPI, :mod:`sts.mcp_verifier` for the MCP SDK.

**Protected resource metadata** (RFC 9728). A verifier given ``resource=`` (this service's catalog
URI, the RFC 8707 resource its clients ask the STS for) describes itself:
:meth:`TokenVerifier.resource_metadata` is the document (``resource``, ``authorization_servers`` = the
issuer, ``scopes_supported``, ``bearer_methods_supported``, ``dpop_signing_alg_values_supported``,
``dpop_bound_access_tokens_required``), served at :attr:`TokenVerifier.resource_metadata_path`
(``/.well-known/oauth-protected-resource`` + the resource's path, RFC 9728 §3.1) by
:meth:`TokenVerifier.init_app` (Flask) and :mod:`sts.asgi_verifier`; every 401 and 403 challenge then
carries ``resource_metadata="<its URL>"`` (RFC 9728 §5.1), so a client that knows nothing but the
service's URL finds our issuer. ``require_dpop=True`` refuses every token that is not DPoP-bound
(rule ``unbound``) and says so in the metadata (``dpop_bound_access_tokens_required``) and the
challenges (``DPoP`` only).

**Several replicas**: DPoP proofs are single-use (RFC 9449 §11.1). The default :class:`ReplayCache`
remembers them in this process; replicas behind one load balancer share :class:`RedisReplayCache`
(``replay=RedisReplayCache("redis://…").use_once``; the ``redis`` extra), so a proof accepted by one
replica is refused by all.

Every refusal names the rule that failed: :attr:`InvalidAccessToken.rule`, repeated at the end of its
description, so that ``str(error)``, the challenge's and the body's ``error_description`` and the log
line the verifier writes (logger ``sts.verify``, INFO) all say it, e.g. ``the access token is not a
valid token of this issuer for this service (rule: audience)``. The description is fixed text: no
key material, no expected value (issuer, audience, class), nothing the caller sent, so a refusal is
no oracle. What the token held and what was expected go only to ``detail`` and that log line, the
caller's text escaped (:func:`sts.logsafe.escape`). Challenge parameters are quoted strings of
RFC 6750 §3 characters (printable ASCII without ``"`` and ``\\``). A request without any token
(:class:`MissingToken`) is answered with both schemes and no error code (RFC 6750 §3.1). The rules
(:data:`RULES`; stable names, for logs, metrics and tests):

``malformed``       not a compact JWS of at most 8192 characters, or its header or claims are not
                    JSON objects we accept (:mod:`sts.strict_json`)
``typ``             the header's ``typ`` is not ``at+jwt`` (RFC 9068 §4)
``alg``             the header's ``alg`` is not ``ES256`` (RFC 8725 §3.1: never taken from the token)
``crit``            the header has ``crit`` (RFC 7515 §4.1.11: no extension is understood)
``key``             no ``kid``, a ``kid`` of another token class, or no key of that ``kid`` in the key set
``signature``       the ES256 signature does not verify with the key of its ``kid``
``claims``          an RFC 9068 §2.2 claim is missing or of the wrong type (``iss``, ``sub``,
                    ``client_id``, ``jti``, ``token_class`` strings; ``exp``, ``iat``, ``nbf``
                    NumericDates; ``scope`` a string)
``issuer``          ``iss`` is not the configured issuer
``audience``        ``aud`` is not this service (a list must be exactly this one service)
``token_class``     ``token_class`` is not the class this service accepts
``expired``         ``exp`` (plus the leeway) has passed
``not_yet_valid``   ``nbf`` or ``iat`` is later than now (plus the leeway)
``scheme``          a DPoP-bound token sent as ``Bearer``, or an unbound one sent as ``DPoP``
``cnf``             a ``cnf`` this service cannot check (a member other than ``jkt`` / ``x5t#S256``)
``mtls``            ``cnf.x5t#S256`` without that TLS client certificate on the connection (RFC 8705 §3)
``dpop_proof``      the DPoP proof is missing, more than one, malformed, replayed, or does not fit the
                    request (``htm``, ``htu``, ``iat``, ``ath``; RFC 9449 §4.3, §7.1)
``dpop_key``        the DPoP proof is sound but made with another key than ``cnf.jkt``
``dpop_url``        the verifier was given no request URL, so it cannot check a proof's ``htu``
``unbound``         this service requires DPoP-bound tokens (``require_dpop=True``) and this one is not
``revoked``         the STS answers that the token is not active (revoked, or not for this server; RFC 7662)
``scope``           a good token without the scope the endpoint needs (``insufficient_scope``, 403)
``missing``         no token at all (:class:`MissingToken`: the challenge carries no error code)

The warm path (keys and introspection cached) decodes the header once, verifies the signature with a
key parsed once, and does no I/O. Time is injectable (``clock``, ``now``). In an event loop use
:meth:`TokenVerifier.averify_request`: the checks (and any key-set refresh, introspection or replay
store call they need) run in a worker thread, never on the loop.

Must not import the server side (``sts.exchange``, ``sts.web``, ``sts.keys``), nor Flask or redis at
module level: ``pip install spiffe-sts`` (no extras) imports this module.
"""

from __future__ import annotations

import functools
import hmac
import logging
import math
import os
import re
import socket as socketlib
import ssl
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

import anyio.to_thread
import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sts.binding import DPOP_ALGORITHMS, DpopVerifier, InvalidDpopProof, certificate_thumbprint
from sts.client import CachedJwtSvid, SvidSource, WorkloadApiSvids
from sts.errors import ConfigError, StsError, TemporarilyUnavailable
from sts.logsafe import escape
from sts.strict_json import JsonError, b64url_decode, loads, numeric_date

if TYPE_CHECKING:  # the flask extra; imported at run time only by the Flask helpers
    from flask import Flask, Response

__all__ = [
    "NOT_OURS",
    "RESOURCE_METADATA_PATH",
    "RULES",
    "DpopProofRefused",
    "InsufficientScope",
    "Introspection",
    "InvalidAccessToken",
    "MissingToken",
    "RedisReplayCache",
    "Refusal",
    "ReplayCache",
    "RevocationCheck",
    "TokenVerifier",
    "VerifiedToken",
    "WorkloadApiUnavailable",
    "challenge",
    "challenge_text",
    "client_certificate",
    "current_token",
    "error_response",
    "refusal",
    "resource_metadata_path",
]

log = logging.getLogger(__name__)

ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})  # RFC 9068 §4 (media types: any case)
TOKEN_CLASSES = frozenset({"tool", "data"})
MAX_TOKEN_CHARS = 8192
MAX_REMEMBERED_HEADERS = 64  # one per key in practice; more means someone is sending junk headers
REQUIRED_STRING_CLAIMS = ("iss", "sub", "client_id", "jti", "token_class")
TIME_CLAIMS = ("exp", "iat", "nbf")
NOT_OURS = "the access token is not a valid token of this issuer for this service"
RULES: Mapping[str, str] = {  # rule -> when it refuses; the module docstring says more
    "malformed": "not a compact JWS, or its header or claims are not JSON objects we accept",
    "typ": "the header's typ is not at+jwt",
    "alg": "the header's alg is not ES256",
    "crit": "the header has crit",
    "key": "no kid, a kid of another token class, or no key of that kid",
    "signature": "the signature does not verify with the key of its kid",
    "claims": "a required claim is missing or of the wrong type",
    "issuer": "iss is not the configured issuer",
    "audience": "aud is not this service",
    "token_class": "token_class is not the class this service accepts",
    "expired": "exp has passed",
    "not_yet_valid": "nbf or iat is in the future",
    "scheme": "a DPoP-bound token sent as Bearer, or an unbound one as DPoP",
    "cnf": "a cnf this service cannot check",
    "mtls": "cnf x5t#S256 without that client certificate",
    "dpop_proof": "the DPoP proof is missing, malformed, replayed or does not fit the request",
    "dpop_key": "the DPoP proof is made with another key than cnf jkt",
    "dpop_url": "no request URL to check the DPoP proof's htu against",
    "unbound": "this service requires DPoP-bound tokens and this one is not",
    "revoked": "the STS answers that the token is not active",
    "scope": "the token lacks the scope the endpoint needs",
    "missing": "no token at all",
}
RESOURCE_METADATA_PATH = "/.well-known/oauth-protected-resource"  # RFC 9728 §3
SHOWN_CHARS = 80  # at most this much of a caller's value goes into a detail (the log line)
# RFC 6750 §3: error_description is %x20-21 / %x23-5B / %x5D-7E; anything else in a parameter goes.
_NOT_CHALLENGE_TEXT = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_ES256 = ec.ECDSA(hashes.SHA256())
_P = ParamSpec("_P")
_R = TypeVar("_R")


class InvalidAccessToken(StsError):
    """RFC 6750 §3.1 ``invalid_token``: the token is malformed, not ours, expired, revoked or misused.

    ``rule`` names the check that failed, one of :data:`RULES`. ``reason`` says it in fixed words,
    without key material or expected values; ``description`` (also ``str()``, the ``error_description``
    of challenge and body) is the reason followed by ``(rule: <rule>)``. ``detail``, for the log only,
    says what the token held (caller text escaped). ``scheme`` is the challenge to answer with
    (``Bearer`` or ``DPoP``).
    """

    error = "invalid_token"
    status = 401

    def __init__(
        self, rule: str, reason: str, *, scheme: str = "Bearer", detail: str | None = None
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"not a rule of sts.verify: {rule!r}")
        super().__init__(f"{reason} (rule: {rule})", detail=detail)
        self.rule = rule
        self.reason = reason
        self.scheme = scheme

    def challenge_parameters(self) -> dict[str, str]:
        return {"error": self.error, "error_description": challenge_text(self.description)}

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": challenge(self.scheme, self.challenge_parameters())}


class MissingToken(InvalidAccessToken):
    """RFC 6750 §3.1: no credentials at all; the challenge carries no error code, only the schemes."""

    def __init__(self, *, detail: str | None = None) -> None:
        super().__init__("missing", "send an access token: Authorization: Bearer|DPoP <token>", detail=detail)

    def challenge_parameters(self) -> dict[str, str]:
        return {}


class DpopProofRefused(InvalidAccessToken):
    """RFC 9449 §7.1: the DPoP proof is missing, malformed, replayed or made with another key."""

    error = "invalid_dpop_proof"

    def __init__(self, reason: str, *, rule: str = "dpop_proof", detail: str | None = None) -> None:
        super().__init__(rule, reason, scheme="DPoP", detail=detail)


class InsufficientScope(InvalidAccessToken):
    """RFC 6750 §3.1 ``insufficient_scope`` (403): a good token without the scope this endpoint needs."""

    error = "insufficient_scope"
    status = 403

    def __init__(self, required: frozenset[str], *, scheme: str, detail: str | None = None) -> None:
        wanted = " ".join(sorted(required))
        super().__init__("scope", f"this endpoint needs scope {wanted}", scheme=scheme, detail=detail)
        self.required = required

    def challenge_parameters(self) -> dict[str, str]:
        return super().challenge_parameters() | {"scope": " ".join(sorted(self.required))}


class WorkloadApiUnavailable(ConfigError):
    """A :class:`TokenVerifier` that introspects needs this server's JWT-SVID, and cannot get one.

    Raised by the constructor, never by ``verify``: no socket given (``socket=``) nor in
    ``SPIFFE_ENDPOINT_SOCKET``, the socket does not exist, nothing listens on it, or the Workload API
    there gives this workload no JWT-SVID for the issuer. ``socket`` is the socket tried (None when
    there was none); the message names it and what to do. A :class:`~sts.errors.ConfigError`: it
    stops start-up, it is never an HTTP answer.
    """

    def __init__(self, message: str, *, socket: str | None) -> None:
        super().__init__(message)
        self.socket = socket


def challenge_text(text: str) -> str:
    """``text`` as an RFC 6750 §3 quoted-string value: ``"`` becomes ``'``; ``\\`` and every character
    outside printable ASCII become ``?``, so a parameter can neither end early nor split the header."""
    return _NOT_CHALLENGE_TEXT.sub("?", text.replace('"', "'"))


def challenge(scheme: str, parameters: Mapping[str, str]) -> str:
    """An RFC 9110 §11.6.1 challenge; a ``DPoP`` one also lists the proof algorithms (RFC 9449 §7.1)."""
    items = dict(parameters)
    if scheme == "DPoP":
        items["algs"] = " ".join(DPOP_ALGORITHMS)
    rendered = ", ".join(f'{name}="{challenge_text(value)}"' for name, value in items.items())
    return f"{scheme} {rendered}".rstrip()


def resource_metadata_path(resource: str) -> str:
    """RFC 9728 §3.1: ``/.well-known/oauth-protected-resource`` + the resource's path (none for ``/``)."""
    path = urlsplit(resource).path
    return RESOURCE_METADATA_PATH + ("" if path in ("", "/") else path)


def _checked_resource(resource: str) -> str:
    """A resource identifier (RFC 9728 §1.2, RFC 8707 §2): an absolute http(s) URL without fragment."""
    parts = urlsplit(resource)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.fragment or "#" in resource:
        raise ValueError(
            "resource must be this service's catalog URI: an absolute https URL without a fragment "
            f"(RFC 8707 section 2), not {resource!r}"
        )
    return resource


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused request as an HTTP answer, for any framework: status, header fields, JSON body.

    ``headers`` may hold ``WWW-Authenticate`` twice (no token at all: one challenge per scheme,
    RFC 6750 §3.1, RFC 9449 §7.1); send each pair as its own field.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: Mapping[str, str]


def refusal(
    error: StsError,
    *,
    resource_metadata: str | None = None,
    dpop_only: bool = False,
) -> Refusal:
    """The answer to ``error``: its status, challenge(s) and RFC 6750 §3 / RFC 6749 §5.2 JSON body.

    ``resource_metadata``: this service's RFC 9728 metadata URL, added to every challenge (§5.1).
    ``dpop_only``: the service takes DPoP-bound tokens only, so every challenge is ``DPoP``.
    An error that is not about the token (503: keys or introspection unreachable) keeps its own
    headers (``Retry-After``). Every answer is ``Cache-Control: no-store``.
    """
    extra = {"resource_metadata": resource_metadata} if resource_metadata else {}
    headers: list[tuple[str, str]] = []
    if isinstance(error, MissingToken):
        body: dict[str, str] = {"error": "invalid_token", "error_description": error.description}
        schemes = ("DPoP",) if dpop_only else ("Bearer", "DPoP")
        headers.extend(("WWW-Authenticate", challenge(scheme, extra)) for scheme in schemes)
    elif isinstance(error, InvalidAccessToken):
        body = error.to_json()
        scheme = "DPoP" if dpop_only else error.scheme
        headers.append(("WWW-Authenticate", challenge(scheme, error.challenge_parameters() | extra)))
    else:
        body = error.to_json()
        headers.extend(error.headers().items())
    headers.append(("Cache-Control", "no-store"))
    return Refusal(error.status, tuple(headers), body)


def _shown(value: object) -> str:
    """A value the caller chose, for a detail (the log): quoted, at most SHOWN_CHARS, escaped."""
    text = value if isinstance(value, str) else repr(value)
    cut = f"{text[:SHOWN_CHARS]}...({len(text)} chars)" if len(text) > SHOWN_CHARS else text
    return f"'{escape(cut)}'" if isinstance(value, str) else escape(cut)


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that passed every check; what a view may rely on."""

    token: str
    claims: Mapping[str, Any]
    subject: str
    client_id: str
    scopes: frozenset[str]
    jti: str
    expires_at: int
    token_class: str
    task_id: str | None
    binding: str  # "dpop", "mtls", "dpop+mtls" or "none"

    def __repr__(self) -> str:
        return f"VerifiedToken(subject={self.subject!r}, jti={self.jti!r}, scopes={sorted(self.scopes)!r})"


class RevocationCheck(Protocol):
    """Is a token (already verified locally) still active? Introspection, or a pushed revocation feed."""

    def active(self, token: str, claims: Mapping[str, Any], now: float) -> bool: ...


@dataclass(slots=True)
class _Answer:
    active: bool
    checked_at: float
    expires_at: float


class Introspection:
    """RFC 7662 at the STS, as this resource server (its JWT-SVID as bearer), with a short cache.

    An ``active`` answer is trusted for ``cache_seconds``; an inactive one until the token's ``exp``
    (revocation is final). When the STS cannot answer, a token seen active is accepted for another
    ``unreachable_grace`` seconds and then refused (:class:`~sts.errors.TemporarilyUnavailable`):
    fail closed. After a failed call the STS is left alone for ``retry_after_failure`` seconds, so
    that an outage does not cost every request a timeout. Concurrent checks of one token share one call.
    """

    def __init__(
        self,
        endpoint: str,
        bearer: Callable[[], str],
        *,
        renew_bearer: Callable[[], None] | None = None,
        session: requests.Session | None = None,
        cache_seconds: float = 5.0,
        unreachable_grace: float = 30.0,
        timeout: float = 3.0,
        retry_after_failure: float = 1.0,
        max_entries: int = 100_000,
    ) -> None:
        self._endpoint = endpoint
        self._retry_after_failure = retry_after_failure
        self._down_until = float("-inf")
        self._bearer = bearer
        self._renew_bearer = renew_bearer
        self._session = session if session is not None else requests.Session()
        self._cache_seconds = cache_seconds
        self._grace = unreachable_grace
        self._timeout = timeout
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._answers: dict[str, _Answer] = {}
        self._flights: dict[str, threading.Lock] = {}

    def active(self, token: str, claims: Mapping[str, Any], now: float) -> bool:
        jti = str(claims["jti"])
        with self._lock:
            answer = self._answers.get(jti)
            if answer is not None and (not answer.active or now - answer.checked_at < self._cache_seconds):
                return answer.active
            flight = self._flights.setdefault(jti, threading.Lock())
        with flight:
            with self._lock:
                answer = self._answers.get(jti)
                if answer is not None and (
                    not answer.active or now - answer.checked_at < self._cache_seconds
                ):
                    return answer.active
            try:
                active = self._ask(token, jti, now)
            except TemporarilyUnavailable:
                if (
                    answer is not None
                    and answer.active
                    and now - answer.checked_at < self._cache_seconds + self._grace
                ):
                    log.warning(
                        "introspection failed; accepting %s on its answer of %.0fs ago",
                        jti,
                        now - answer.checked_at,
                    )
                    return True
                raise
            finally:
                with self._lock:
                    if self._flights.get(jti) is flight:
                        del self._flights[jti]
            with self._lock:
                if len(self._answers) >= self._max_entries:
                    self._prune(now)
                self._answers[jti] = _Answer(active, now, float(claims["exp"]))
            return active

    def _ask(self, token: str, jti: str, now: float) -> bool:
        if now < self._down_until:
            raise TemporarilyUnavailable("the STS could not be reached a moment ago")
        try:
            return self._call(token, jti)
        except TemporarilyUnavailable:
            self._down_until = max(self._down_until, now + self._retry_after_failure)
            raise

    def _call(self, token: str, jti: str) -> bool:
        response = self._post(token)
        if response.status_code == 401 and self._renew_bearer is not None:
            # Our own JWT-SVID refused (e.g. its key was revoked in a rotation): ask the agent for the
            # current one and try once more.
            self._renew_bearer()
            response = self._post(token)
        if response.status_code != 200:
            # Our own credentials refused, or the STS down: either way we cannot know; fail closed.
            raise TemporarilyUnavailable(
                "the STS did not answer the revocation check",
                detail=f"introspection: HTTP {response.status_code}",
            )
        try:
            body = loads(response.content)  # strict (sts.strict_json): never a RecursionError
        except ValueError as e:
            raise TemporarilyUnavailable("the STS did not answer the revocation check") from e
        # An active answer must be about this very token (RFC 7662 §2.2 repeats its claims).
        return isinstance(body, dict) and body.get("active") is True and body.get("jti") == jti

    def _post(self, token: str) -> requests.Response:
        try:
            return self._session.post(
                self._endpoint,
                data={"token": token, "token_type_hint": "access_token"},
                headers={"Authorization": f"Bearer {self._bearer()}"},
                timeout=self._timeout,
                allow_redirects=False,
            )
        except requests.RequestException as e:
            raise TemporarilyUnavailable(
                "the STS cannot be reached to check revocation", detail=str(e)
            ) from e

    def _prune(self, now: float) -> None:
        for jti in [j for j, a in self._answers.items() if a.expires_at < now]:
            del self._answers[jti]
        while len(self._answers) >= self._max_entries:  # still full of live tokens: forget the oldest
            del self._answers[next(iter(self._answers))]


class ReplayCache:
    """Single use of DPoP proof ``jti`` values in this process (RFC 9449 §11.1).

    Several replicas of a resource server need a shared store instead: pass its ``use_once``.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, max_entries: int = 200_000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def use_once(self, key: str, expires_at: int) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            if len(self._seen) >= self._max_entries:
                now = self._clock()
                self._seen = {k: e for k, e in self._seen.items() if e >= now}
                if len(self._seen) >= self._max_entries:
                    return False  # full of live proofs: refuse rather than forget one (no replay window)
            self._seen[key] = expires_at
            return True


class _SetNx(Protocol):
    """What :class:`RedisReplayCache` needs of a Redis client (``redis.Redis`` has it)."""

    def set(self, name: str, value: bytes, *, ex: int | None = None, nx: bool = False) -> Any: ...


class RedisReplayCache:
    """Single use of DPoP proof ``jti`` values across every replica of a resource server, in Redis.

    Each proof key is written with ``SET key 1 NX EX <seconds>`` (RFC 9449 §11.1): the first replica to
    see a proof wins, every other sees it replayed, and Redis forgets it when the proof could no longer
    pass the ``iat`` window anyway. ``redis``: a URL (``redis://host:6379/0``, ``rediss://`` for TLS) or
    a client of the ``redis`` package (the ``redis`` extra: ``pip install 'spiffe-sts[redis]'``).
    When Redis cannot answer the proof is refused with
    :class:`~sts.errors.TemporarilyUnavailable` (503): fail closed, never "not seen".

        verifier = TokenVerifier(..., replay=RedisReplayCache("redis://redis:6379/0").use_once)
    """

    def __init__(
        self,
        redis: str | _SetNx,
        *,
        prefix: str = "sts:dpop:",
        timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(redis, str):
            try:
                import redis as redis_package
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError(
                    "RedisReplayCache needs the redis package: pip install 'spiffe-sts[redis]'", name="redis"
                ) from e
            client: _SetNx = redis_package.Redis.from_url(
                redis, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        else:
            client = redis
        self._redis = client
        self._prefix = prefix
        self._clock = clock

    def use_once(self, key: str, expires_at: int) -> bool:
        seconds = max(1, math.ceil(expires_at - self._clock()))
        try:
            first = self._redis.set(f"{self._prefix}{key}", b"1", ex=seconds, nx=True)
        except Exception as e:  # redis.RedisError, OSError: the store cannot say, so refuse
            raise TemporarilyUnavailable(
                "the DPoP replay store cannot be reached", detail=f"{type(e).__name__}: {e}"
            ) from e
        return bool(first)


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: Mapping[str, ec.EllipticCurvePublicKey]
    fetched_at: float


class TokenVerifier:
    """Verifies access tokens of one class for one audience; see the module docstring for the rules.

    ``revocation``: how to learn of revoked tokens. By default :class:`Introspection` at the STS as
    this server's workload (JWT-SVID from ``socket``/``svids``, else ``SPIFFE_ENDPOINT_SOCKET``);
    :meth:`without_revocation_check` makes a verifier that accepts revoked tokens until ``exp``.
    ``key_refresh_interval``: at most one key-set fetch per interval on an unknown ``kid``;
    ``keys_max_age``: the key set is re-fetched when older (retired keys stop being trusted).
    ``timeout``: for each call to the STS and to the Workload API.

    With the default revocation check and no ``svids``, the constructor fetches this server's first
    JWT-SVID from the Workload API (within ``timeout``), so that a missing or unreachable socket
    stops start-up instead of refusing every request later: it raises :class:`WorkloadApiUnavailable`
    (a :class:`~sts.errors.ConfigError`) naming the socket tried and where it came from (``socket=``
    or ``SPIFFE_ENDPOINT_SOCKET``). A verifier given ``svids`` or ``revocation`` asks nothing then.

    ``resource``: this service's catalog URI (the catalog entry's ``resource``, what clients send as
    RFC 8707 ``resource``); with it the verifier serves RFC 9728 metadata (:meth:`resource_metadata`)
    and every challenge names it. ``scopes``: the scopes to advertise there (the catalog entry's).
    ``require_dpop``: accept DPoP-bound tokens only (rule ``unbound``), and say so.

    Every refusal is logged once, at INFO on ``sts.verify``, naming its rule (see the module
    docstring) with the detail, and the request's method and path when the verifier was given them
    (:meth:`verify_request`, or inside a Flask request).
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        token_class: str,
        revocation: RevocationCheck | None = None,
        socket: str | None = None,
        svids: SvidSource | None = None,
        session: requests.Session | None = None,
        leeway: float = 5.0,
        key_refresh_interval: float = 30.0,
        keys_max_age: float = 300.0,
        introspection_cache_seconds: float = 5.0,
        introspection_unreachable_grace: float = 30.0,
        dpop_window_seconds: int = 60,
        replay: Callable[[str, int], bool] | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        resource: str | None = None,
        scopes: Iterable[str] = (),
        require_dpop: bool = False,
    ) -> None:
        if token_class not in TOKEN_CLASSES:
            raise ValueError(f"token_class must be one of {', '.join(sorted(TOKEN_CLASSES))}")
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.token_class = token_class
        self.resource = _checked_resource(resource) if resource is not None else None
        self.scopes = frozenset(scopes.split() if isinstance(scopes, str) else scopes)
        self.require_dpop = require_dpop
        self._kid_prefix = f"{token_class}-"
        self._session = session if session is not None else requests.Session()
        self._leeway = leeway
        self._refresh_interval = key_refresh_interval
        self._keys_max_age = keys_max_age
        self._timeout = timeout
        self._clock = clock
        self._keys: _KeySet | None = None
        self._headers: dict[str, str] = {}  # header segment → kid, for headers that passed every check
        self._jwks_uri: str | None = None
        self._keys_lock = threading.Lock()
        self._last_fetch_attempt = float("-inf")
        self._dpop = DpopVerifier(
            use_once=replay if replay is not None else ReplayCache(clock=clock).use_once,
            window_seconds=dpop_window_seconds,
        )
        if revocation is None:
            if svids is not None:
                bearer = CachedJwtSvid(svids, self.issuer, clock=clock)
            else:
                bearer = _first_jwt_svid(socket, self.issuer, timeout=timeout, clock=clock)
            revocation = Introspection(
                f"{self.issuer}/introspect",
                bearer.get,
                renew_bearer=bearer.invalidate,
                session=self._session,
                cache_seconds=introspection_cache_seconds,
                unreachable_grace=introspection_unreachable_grace,
                timeout=timeout,
            )
        self._revocation = revocation

    @classmethod
    def without_revocation_check(cls, **settings: Any) -> TokenVerifier:
        """A verifier that never asks whether a token was revoked: revoked tokens pass until ``exp``."""
        return cls(revocation=_NoRevocationCheck(), **settings)

    # --- RFC 9728 protected resource metadata ---------------------------------------------------

    @property
    def resource_metadata_path(self) -> str | None:
        """Where this service's metadata is served (RFC 9728 §3.1); None without ``resource``."""
        return resource_metadata_path(self.resource) if self.resource is not None else None

    @property
    def resource_metadata_url(self) -> str | None:
        """The absolute metadata URL the challenges name (``resource_metadata``, RFC 9728 §5.1)."""
        if self.resource is None:
            return None
        parts = urlsplit(self.resource)
        return f"{parts.scheme}://{parts.netloc}{resource_metadata_path(self.resource)}"

    def resource_metadata(self) -> dict[str, Any]:
        """RFC 9728 §2: this service's metadata document (needs ``resource``).

        ``authorization_servers`` is the issuer alone: a client learns from it where to exchange its
        identity for a token of this service (RFC 8693 with ``resource=`` this document's
        ``resource``), and nothing else issues tokens this verifier accepts.
        """
        if self.resource is None:
            raise ValueError("resource metadata needs TokenVerifier(resource=<this service's catalog URI>)")
        document: dict[str, Any] = {
            "resource": self.resource,
            "authorization_servers": [self.issuer],
            "bearer_methods_supported": ["header"],
            "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS),
            "dpop_bound_access_tokens_required": self.require_dpop,
        }
        if self.scopes:
            document["scopes_supported"] = sorted(self.scopes)
        return document

    def refusal(self, error: StsError) -> Refusal:
        """:func:`refusal` with this service's metadata URL and DPoP requirement in the challenges."""
        return refusal(error, resource_metadata=self.resource_metadata_url, dpop_only=self.require_dpop)

    # --- the checks -----------------------------------------------------------------------------

    def verify(
        self,
        token: str,
        *,
        scheme: str = "Bearer",
        scope: str | Iterable[str] = (),
        dpop_proof: str | None = None,
        method: str = "GET",
        url: str | None = None,
        client_certificate: x509.Certificate | None = None,
        now: float | None = None,
    ) -> VerifiedToken:
        """Every check of the module docstring; ``url`` (without query) is needed for DPoP's ``htu``.

        Raises :class:`InvalidAccessToken` (or a subclass) naming the rule that failed, logged first.
        """
        try:
            return self._verify(
                token,
                scheme=scheme,
                scope=scope,
                dpop_proof=dpop_proof,
                method=method,
                url=url,
                client_certificate=client_certificate,
                now=now,
            )
        except InvalidAccessToken as e:
            _log_refusal(e)
            raise

    async def averify(self, token: str, **options: Any) -> VerifiedToken:
        """:meth:`verify` in a worker thread (``anyio.to_thread``): for event loops, which must never
        wait on the key-set fetch, introspection or replay store a check may need."""
        return await anyio.to_thread.run_sync(functools.partial(self.verify, token, **options))

    async def averify_request(
        self,
        *,
        authorization: str | None,
        dpop: Sequence[str] = (),
        method: str,
        url: str,
        client_certificate: x509.Certificate | None = None,
        scope: str | Iterable[str] = (),
        now: float | None = None,
    ) -> VerifiedToken:
        """:meth:`verify_request` in a worker thread (``anyio.to_thread``), never on the event loop."""
        check = functools.partial(
            self.verify_request,
            authorization=authorization,
            dpop=tuple(dpop),
            method=method,
            url=url,
            client_certificate=client_certificate,
            scope=scope,
            now=now,
        )
        return await anyio.to_thread.run_sync(check)

    def _verify(
        self,
        token: str,
        *,
        scheme: str,
        scope: str | Iterable[str],
        dpop_proof: str | None,
        method: str,
        url: str | None,
        client_certificate: x509.Certificate | None,
        now: float | None,
    ) -> VerifiedToken:
        current = self._clock() if now is None else now
        presented_as = "DPoP" if scheme.lower() == "dpop" else "Bearer"
        claims = self._claims(token, presented_as, current)
        binding = self._check_binding(
            token=token,
            claims=claims,
            scheme=presented_as,
            proof=dpop_proof,
            method=method,
            url=url,
            certificate=client_certificate,
            now=current,
        )
        if not self._revocation.active(token, claims, current):
            raise InvalidAccessToken(
                "revoked",
                "the access token has been revoked or is not active",
                scheme=presented_as,
                detail=f"the STS answers jti {_shown(claims['jti'])} is not active",
            )
        granted = frozenset(claims["scope"].split())
        required = frozenset(scope.split() if isinstance(scope, str) else scope)
        if not required <= granted:
            raise _insufficient(granted, required, presented_as)
        task_id = claims.get("task_id")
        return VerifiedToken(
            token=token,
            claims=claims,
            subject=claims["sub"],
            client_id=claims["client_id"],
            scopes=granted,
            jti=claims["jti"],
            expires_at=int(claims["exp"]),
            token_class=claims["token_class"],
            task_id=task_id if isinstance(task_id, str) else None,
            binding=binding,
        )

    def verify_request(
        self,
        *,
        authorization: str | None,
        dpop: Sequence[str] = (),
        method: str,
        url: str,
        client_certificate: x509.Certificate | None = None,
        scope: str | Iterable[str] = (),
        now: float | None = None,
    ) -> VerifiedToken:
        """RFC 6750 §2.1 / RFC 9449 §7.1: the ``Authorization`` header (``Bearer`` or ``DPoP``) and proofs.

        Raises :class:`InvalidAccessToken` (or a subclass) naming the rule that failed, logged first.
        """
        try:
            scheme, _, token = (authorization or "").strip().partition(" ")
            token = token.strip()
            if scheme.lower() not in ("bearer", "dpop") or not token:
                raise MissingToken(
                    detail="no Authorization header"
                    if not authorization
                    else f"Authorization {_shown(scheme)} carries no Bearer or DPoP token"
                )
            if len(dpop) > 1:
                raise DpopProofRefused("send at most one DPoP proof", detail=f"{len(dpop)} DPoP headers")
            return self._verify(
                token,
                scheme=scheme,
                scope=scope,
                dpop_proof=dpop[0] if dpop else None,
                method=method,
                url=url,
                client_certificate=client_certificate,
                now=now,
            )
        except InvalidAccessToken as e:
            _log_refusal(e, where=f" [{method.upper()} {escape(urlsplit(url).path or '/')}]")
            raise

    def check_scope(
        self,
        token: VerifiedToken,
        scope: str | Iterable[str],
        *,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        """Raise :class:`InsufficientScope` (logged, rule ``scope``) unless ``token`` has every scope of
        ``scope``: for a route that needs more than the check that verified the token asked for."""
        required = frozenset(scope.split() if isinstance(scope, str) else scope)
        if required <= token.scopes:
            return
        error = _insufficient(token.scopes, required, "DPoP" if "dpop" in token.binding else "Bearer")
        where = None if method is None or url is None else f" [{method.upper()} {escape(urlsplit(url).path)}]"
        _log_refusal(error, where=where)
        raise error

    def _claims(self, token: str, scheme: str, now: float) -> dict[str, Any]:
        """Steps 1 to 3: header, signature, then the claims (parsed only once the signature holds)."""
        return self._check_claims(self._signed_payload(token, scheme, now), scheme, now)

    def _signed_payload(self, token: str, scheme: str, now: float) -> str:
        """Steps 1 and 2: the header and the ES256 signature; every key failure reads alike.

        All tokens signed by one key share one header segment, so a header is decoded and checked once
        and its ``kid`` remembered (a bounded map from segment to ``kid``).
        """

        def refuse(rule: str, reason: str, detail: str) -> InvalidAccessToken:
            return InvalidAccessToken(rule, reason, scheme=scheme, detail=detail)

        if len(token) > MAX_TOKEN_CHARS:
            raise refuse(
                "malformed",
                "the access token is too long",
                f"{len(token)} characters, over {MAX_TOKEN_CHARS}",
            )
        parts = token.split(".")
        if len(parts) != 3:
            raise refuse(
                "malformed", "the access token is not a compact JWS", f"{len(parts)} segments, not 3"
            )
        kid = self._headers.get(parts[0])
        if kid is None:
            kid = self._check_header(parts[0], refuse)
        key = self._key(kid, now)
        if key is None:
            keys = self._keys
            known = len(keys.keys) if keys is not None else 0
            raise refuse(
                "key", NOT_OURS, f"no {self.token_class} key has kid {_shown(kid)} ({known} keys known)"
            )
        try:
            signature = b64url_decode(parts[2])
        except ValueError as e:
            raise refuse(
                "malformed", "the access token is not a compact JWS", f"signature segment: {e}"
            ) from e
        if len(signature) != 64:
            raise refuse("signature", NOT_OURS, f"an ES256 signature is 64 bytes, not {len(signature)}")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            key.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), _ES256)
        except (InvalidSignature, UnicodeEncodeError) as e:
            raise refuse("signature", NOT_OURS, f"the signature does not verify (kid {_shown(kid)})") from e
        return parts[1]

    def _check_header(self, segment: str, refuse: Callable[[str, str, str], InvalidAccessToken]) -> str:
        """RFC 9068 §4, RFC 8725 §3.1: ``typ``, the one ``alg``, no ``crit``, a ``kid`` of our class."""
        try:
            header = loads(b64url_decode(segment))
        except ValueError as e:
            raise refuse(
                "malformed", "the access token is not a compact JWS", f"header: {escape(str(e))}"
            ) from e
        if not isinstance(header, dict):
            raise refuse("malformed", "the access token is not a compact JWS", "header: not a JSON object")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
            raise refuse("typ", "the access token's typ must be at+jwt (RFC 9068)", f"typ {_shown(typ)}")
        alg = header.get("alg")
        if alg != "ES256":  # one algorithm, fixed here, never taken from the token
            raise refuse("alg", "the access token's alg must be ES256", f"alg {_shown(alg)}")
        if "crit" in header:
            raise refuse(
                "crit",
                "the access token has critical header parameters this service does not know",
                f"crit {_shown(header['crit'])}",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid.startswith(self._kid_prefix):
            raise refuse(
                "key",
                NOT_OURS,
                "no kid" if kid is None else f"kid {_shown(kid)} is not a {self.token_class} key",
            )
        if len(self._headers) >= MAX_REMEMBERED_HEADERS:
            self._headers.clear()
        self._headers[segment] = kid
        return kid

    def _check_claims(self, payload: str, scheme: str, now: float) -> dict[str, Any]:
        """Step 3: RFC 9068 §4 claims, our ``token_class``, and the lifetime with ``leeway``."""

        def refuse(rule: str, reason: str, detail: str) -> InvalidAccessToken:
            return InvalidAccessToken(rule, reason, scheme=scheme, detail=detail)

        try:
            # Strict JSON (sts.strict_json): no NaN, no integer beyond 64 bits, bounded nesting.
            claims = loads(b64url_decode(payload))
        except ValueError as e:
            if isinstance(e, JsonError) and e.out_of_range and e.member in TIME_CLAIMS:
                # A number JSON allows but no NumericDate can be (sts.strict_json.JsonError).
                raise refuse(
                    "claims",
                    f"the access token's {e.member} must be a NumericDate (RFC 7519 section 2)",
                    escape(str(e)),
                ) from e
            raise refuse(
                "malformed", "the access token's claims are not JSON we accept", f"claims: {escape(str(e))}"
            ) from e
        if not isinstance(claims, dict):
            raise refuse(
                "malformed", "the access token's claims are not a JSON object", "claims: not a JSON object"
            )
        for name in REQUIRED_STRING_CLAIMS:
            if not isinstance(claims.get(name), str):
                raise refuse(
                    "claims",
                    f"the access token has no {name} claim",
                    f"{name} is {'absent' if name not in claims else _shown(claims[name])}, not a string",
                )
        # RFC 7519 §2 NumericDates, bounded (sts.strict_json.numeric_date): adding the leeway can
        # neither overflow nor compare false against NaN.
        exp, iat = numeric_date(claims.get("exp")), numeric_date(claims.get("iat"))
        if exp is None or iat is None:
            raise refuse(
                "claims",
                "the access token's exp and iat must be NumericDates (RFC 7519 section 2)",
                f"exp {_shown(claims.get('exp'))}, iat {_shown(claims.get('iat'))}",
            )
        nbf = numeric_date(claims["nbf"]) if "nbf" in claims else iat
        if nbf is None:
            raise refuse(
                "claims",
                "the access token's nbf must be a NumericDate (RFC 7519 section 2)",
                f"nbf {_shown(claims['nbf'])}",
            )
        if not isinstance(claims.setdefault("scope", ""), str):
            raise refuse(
                "claims", "the access token's scope must be a string", f"scope {_shown(claims['scope'])}"
            )
        if claims["iss"] != self.issuer:
            raise refuse("issuer", NOT_OURS, f"iss {_shown(claims['iss'])}, expected {self.issuer!r}")
        if claims.get("aud") not in (self.audience, [self.audience]):
            raise refuse(
                "audience", NOT_OURS, f"aud {_shown(claims.get('aud'))}, expected {self.audience!r}"
            )
        if claims["token_class"] != self.token_class:
            raise refuse(
                "token_class",
                NOT_OURS,
                f"token_class {_shown(claims['token_class'])}, this service accepts {self.token_class!r}",
            )
        if now >= exp + self._leeway:
            raise refuse(
                "expired",
                "the access token has expired",
                f"exp {exp:.0f} is {now - exp:.0f} s ago (leeway {self._leeway:g} s)",
            )
        start = max(nbf, iat)
        if start > now + self._leeway:
            which = "nbf" if nbf >= iat else "iat"
            raise refuse(
                "not_yet_valid",
                "the access token is not valid yet",
                f"{which} {start:.0f} is {start - now:.0f} s ahead (leeway {self._leeway:g} s)",
            )
        return claims

    def _check_binding(
        self,
        *,
        token: str,
        claims: Mapping[str, Any],
        scheme: str,
        proof: str | None,
        method: str,
        url: str | None,
        certificate: x509.Certificate | None,
        now: float,
    ) -> str:
        """Step 4: RFC 9449 §7.1 (``jkt``) and RFC 8705 §3 (``x5t#S256``); each ``cnf`` member must hold."""
        cnf = claims.get("cnf")
        if self.require_dpop and not (isinstance(cnf, dict) and "jkt" in cnf):
            raise InvalidAccessToken(
                "unbound",
                "this service accepts DPoP-bound access tokens only",
                scheme="DPoP",
                detail=f"cnf {_shown(cnf)}, presented as {scheme}" if cnf is not None else "no cnf",
            )
        if cnf is None:
            if scheme == "DPoP":
                raise InvalidAccessToken(
                    "scheme",
                    "this access token is not DPoP-bound; send it as Bearer",
                    scheme="DPoP",
                    detail="no cnf, presented with the DPoP scheme",
                )
            return "none"
        if not isinstance(cnf, dict) or not cnf or set(cnf) - {"jkt", "x5t#S256"}:
            raise InvalidAccessToken(
                "cnf",
                "the access token is bound in a way this service cannot check",
                scheme=scheme,
                detail=f"cnf {_shown(cnf)}",
            )
        jkt, x5t = cnf.get("jkt"), cnf.get("x5t#S256")
        if not all(value is None or isinstance(value, str) for value in (jkt, x5t)):
            raise InvalidAccessToken(
                "cnf",
                "the access token is bound in a way this service cannot check",
                scheme=scheme,
                detail=f"cnf {_shown(cnf)}",
            )
        kinds = []
        if jkt is not None:
            if scheme != "DPoP":
                raise InvalidAccessToken(
                    "scheme",
                    "this access token is DPoP-bound: send it with the DPoP scheme and a proof",
                    scheme="DPoP",
                    detail="cnf jkt, presented with the Bearer scheme",
                )
            if url is None:
                raise DpopProofRefused(
                    "this service cannot check DPoP proofs here",
                    rule="dpop_url",
                    detail="TokenVerifier.verify was given no url for a DPoP-bound token",
                )
            try:
                checked = self._dpop.verify(
                    proof, method=method.upper(), urls=(url,), access_token=token, now=now
                )
            except InvalidDpopProof as e:
                raise DpopProofRefused(_proof_reason(e), detail=escape(e.detail or e.description)) from e
            # As bytes: compare_digest refuses str that is not ASCII with a TypeError.
            if not hmac.compare_digest(checked.jkt.encode(), jkt.encode()):
                raise DpopProofRefused(
                    "the DPoP proof is not made with the key the access token is bound to",
                    rule="dpop_key",
                    detail=f"proof key thumbprint {checked.jkt!r}, cnf jkt {_shown(jkt)}",
                )
            kinds.append("dpop")
        if x5t is not None:
            if certificate is None or not hmac.compare_digest(
                certificate_thumbprint(certificate).encode(), x5t.encode()
            ):
                raise InvalidAccessToken(
                    "mtls",
                    "this access token is bound to a TLS client certificate this connection did not present",
                    scheme=scheme,
                    detail="no client certificate on this connection"
                    if certificate is None
                    else f"client certificate x5t#S256 {certificate_thumbprint(certificate)!r}, "
                    f"cnf x5t#S256 {_shown(x5t)}",
                )
            kinds.append("mtls")
        return "+".join(kinds)

    # --- keys -----------------------------------------------------------------------------------

    def _key(self, kid: str, now: float) -> ec.EllipticCurvePublicKey | None:
        """The key of ``kid``; fetches the key set when missing, old, or without ``kid`` (rate-limited)."""
        keys = self._keys
        if keys is not None:
            key = keys.keys.get(kid)
            if key is not None and now - keys.fetched_at < self._keys_max_age:
                return key
        with self._keys_lock:
            keys = self._keys
            stale = keys is None or now - keys.fetched_at >= self._keys_max_age
            missing = keys is None or kid not in keys.keys
            if (stale or missing) and now - self._last_fetch_attempt >= self._refresh_interval:
                self._last_fetch_attempt = now
                try:
                    keys = self._keys = _KeySet(self._fetch_keys(), now)
                except TemporarilyUnavailable:
                    if keys is None:
                        raise
                    log.warning(
                        "could not refresh the %s key set; keeping the one from before", self.token_class
                    )
        if keys is None:
            raise TemporarilyUnavailable("the STS's signing keys are not known yet")
        return keys.keys.get(kid)

    def refresh_keys(self) -> None:
        """Fetch the key set now (start-up warm-up, or after a known rotation)."""
        with self._keys_lock:
            now = self._clock()
            self._last_fetch_attempt = now
            self._keys = _KeySet(self._fetch_keys(), now)

    def _fetch_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        if self._jwks_uri is None:
            metadata = self._get_json(f"{self.issuer}/.well-known/oauth-authorization-server")
            if metadata.get("issuer") != self.issuer:  # RFC 8414 §3.3
                raise TemporarilyUnavailable("the STS metadata names another issuer")
            uri = metadata.get(f"{self.token_class}_jwks_uri") or metadata.get("jwks_uri")
            if not isinstance(uri, str):
                raise TemporarilyUnavailable("the STS metadata has no jwks_uri")
            self._jwks_uri = uri
        jwks = self._get_json(self._jwks_uri)
        found: dict[str, ec.EllipticCurvePublicKey] = {}
        for jwk in jwks.get("keys", []) if isinstance(jwks.get("keys"), list) else []:
            key = self._parse_jwk(jwk)
            if key is not None:
                found[jwk["kid"]] = key
        log.info("trusting %d %s signing keys from %s", len(found), self.token_class, self._jwks_uri)
        return found

    def _parse_jwk(self, jwk: Any) -> ec.EllipticCurvePublicKey | None:
        """An ES256 verification key of our class, or None (other classes and kinds are skipped)."""
        if not isinstance(jwk, dict) or not str(jwk.get("kid", "")).startswith(self._kid_prefix):
            return None
        if (jwk.get("kty"), jwk.get("crv")) != ("EC", "P-256") or jwk.get("use", "sig") != "sig":
            return None
        if jwk.get("alg", "ES256") != "ES256" or "d" in jwk:
            return None
        try:
            x = int.from_bytes(b64url_decode(jwk["x"]), "big")
            y = int.from_bytes(b64url_decode(jwk["y"]), "big")
            return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        except (KeyError, TypeError, ValueError):
            return None

    def _get_json(self, url: str) -> dict[str, Any]:
        """A metadata or JWKS document, parsed strictly (sts.strict_json): NaN, duplicate names or deep
        nesting make it unusable (503), never a server error."""
        try:
            response = self._session.get(url, timeout=self._timeout, allow_redirects=False)
            response.raise_for_status()
            body = loads(response.content)
        except (requests.RequestException, ValueError) as e:
            raise TemporarilyUnavailable("the STS's keys cannot be fetched", detail=f"{url}: {e}") from e
        if not isinstance(body, dict):
            raise TemporarilyUnavailable("the STS's keys cannot be fetched", detail=f"{url}: not an object")
        return body

    # --- Flask (the flask extra: imported here, not by the module) --------------------------------

    def require_token(
        self,
        scope: str | Iterable[str] = (),
        *,
        public_base_url: str | None = None,
    ) -> Callable[[Callable[_P, _R]], Callable[_P, _R | Response]]:
        """Flask decorator: the view runs only with a verified token (``current_token()``), else RFC 6750.

        ``public_base_url``: the scheme and host clients use, when a proxy stands in front (DPoP's
        ``htu`` is checked against it and the request path). With ``resource=`` the challenges name
        this service's metadata (serve it with :meth:`init_app`).
        """
        from flask import g, request

        required = frozenset(scope.split() if isinstance(scope, str) else scope)

        def decorator(view: Callable[_P, _R]) -> Callable[_P, _R | Response]:
            @functools.wraps(view)
            def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R | Response:
                url = f"{public_base_url.rstrip('/')}{request.path}" if public_base_url else request.base_url
                try:
                    g.sts_token = self.verify_request(
                        authorization=request.headers.get("Authorization"),
                        dpop=request.headers.getlist("DPoP"),
                        method=request.method,
                        url=url,
                        client_certificate=client_certificate(request.environ),
                        scope=required,
                    )
                except StsError as e:
                    return _flask_answer(e, self.refusal(e))
                return view(*args, **kwargs)

            return guarded

        return decorator

    def init_app(self, app: Flask) -> None:
        """Serve this service's RFC 9728 metadata on ``app`` (GET :attr:`resource_metadata_path`).

        Needs ``resource=``. The document is public and the same for everyone: any origin may read it
        (``Access-Control-Allow-Origin: *``), caches may keep it for five minutes.
        """
        from flask import jsonify

        path = self.resource_metadata_path
        if path is None:
            raise ValueError("init_app needs TokenVerifier(resource=<this service's catalog URI>)")
        document = self.resource_metadata()

        def protected_resource_metadata() -> Response:
            response = jsonify(document)
            response.headers["Cache-Control"] = "public, max-age=300"
            response.headers["Access-Control-Allow-Origin"] = "*"
            return response

        app.add_url_rule(
            path,
            endpoint=f"sts_protected_resource_metadata:{path}",
            view_func=protected_resource_metadata,
            methods=["GET"],
        )


class _NoRevocationCheck:
    def active(self, token: str, claims: Mapping[str, Any], now: float) -> bool:
        return True


def _insufficient(granted: frozenset[str], required: frozenset[str], scheme: str) -> InsufficientScope:
    return InsufficientScope(
        required,
        scheme=scheme,
        detail=f"granted scope {_shown(' '.join(sorted(granted)))}, "
        f"missing {' '.join(sorted(required - granted))!r}",
    )


def _proof_reason(error: InvalidDpopProof) -> str:
    """The public words of a DPoP refusal: sts.binding's, less the parser's message it may append
    (which can quote the caller's member names); that message stays in the detail."""
    cause = error.__cause__
    if isinstance(cause, ValueError):
        return error.description.removesuffix(f" ({cause})")
    return error.description


def _log_refusal(error: InvalidAccessToken, *, where: str | None = None) -> None:
    """The one log line of a refusal: its rule, what the token held, and where (`` [GET /path]``:
    given by :meth:`TokenVerifier.verify_request`, else the Flask request this runs in, if any)."""
    log.info(
        "access token refused (rule: %s)%s: %s; %s %s",
        error.rule,
        _flask_request_line() if where is None else where,
        error.detail or error.reason,
        error.status,
        error.error,
    )


def _flask_request_line() -> str:
    """`` [METHOD /path]`` of the Flask request being handled; empty outside one (or without Flask)."""
    flask = sys.modules.get("flask")  # never imported here: only an application that uses Flask has it
    if flask is None or not flask.has_request_context():
        return ""
    return f" [{flask.request.method} {escape(flask.request.path)}]"


def _first_jwt_svid(
    socket: str | None, issuer: str, *, timeout: float, clock: Callable[[], float]
) -> CachedJwtSvid:
    """This server's JWT-SVID for introspection at ``issuer``, fetched once now: the Workload API must
    answer at construction, within ``timeout`` (:class:`WorkloadApiUnavailable` otherwise)."""
    address = socket or os.environ.get("SPIFFE_ENDPOINT_SOCKET") or None
    if address is None:
        raise WorkloadApiUnavailable(
            "TokenVerifier: no Workload API socket to fetch this server's JWT-SVID from (it introspects "
            "tokens at the STS as this workload): pass socket='unix:///path/to/agent.sock' or set "
            "SPIFFE_ENDPOINT_SOCKET; or pass svids= or revocation=, or use "
            "TokenVerifier.without_revocation_check(...)",
            socket=None,
        )
    origin = "socket=" if socket else "SPIFFE_ENDPOINT_SOCKET"
    problem = _socket_problem(address, timeout)
    if problem is not None:
        raise WorkloadApiUnavailable(
            f"TokenVerifier: the Workload API socket {address} (from {origin}) {problem}; start the "
            "SPIRE agent (or `sts dev`) first, or point socket= / SPIFFE_ENDPOINT_SOCKET at its socket",
            socket=address,
        )
    bearer = CachedJwtSvid(WorkloadApiSvids(address, timeout=timeout), issuer, clock=clock)
    try:
        bearer.get()
    except TemporarilyUnavailable as e:
        raise WorkloadApiUnavailable(
            f"TokenVerifier: the Workload API at {address} (from {origin}) gave this workload no JWT-SVID "
            f"for {issuer} within {timeout:g} s: {e.detail or e.description}",
            socket=address,
        ) from e
    return bearer


def _socket_problem(address: str, timeout: float) -> str | None:
    """What is wrong with a ``unix:`` Workload API socket, said plainly; None if it takes a connection
    (other forms are left to py-spiffe, which says what it makes of them)."""
    if address.startswith("/"):
        return f"is a bare path: write it as unix://{address}"
    if not address.startswith("unix:"):
        return None
    path = address.removeprefix("unix:")
    if not path.startswith("/"):
        return None
    path = "/" + path.lstrip("/")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be examined ({e.strerror or e})"
    if not stat.S_ISSOCK(mode):
        return "is not a socket"
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return "has nothing listening on it (connection refused)"
        except TimeoutError:
            return f"did not accept a connection within {timeout:g} s"
        except OSError as e:
            return f"cannot be connected to ({e.strerror or e})"
    return None


def current_token() -> VerifiedToken:
    """The token :meth:`TokenVerifier.require_token` verified for this (Flask) request."""
    from flask import g

    token: VerifiedToken = g.sts_token
    return token


def error_response(error: StsError) -> Response:
    """The RFC 6750 §3 answer in Flask: JSON error body and challenge(s); no token at all gets both schemes.

    An :class:`InvalidAccessToken` was logged by the verifier already (with its rule); other errors
    (a 503: keys or introspection unreachable) are logged here. :meth:`TokenVerifier.require_token`
    answers with the verifier's own :meth:`~TokenVerifier.refusal` (its metadata URL in the challenges).
    """
    return _flask_answer(error, refusal(error))


def _flask_answer(error: StsError, answer: Refusal) -> Response:
    from flask import jsonify, request

    if not isinstance(error, InvalidAccessToken):
        log.info(
            "refused %s %s: %s %s",
            request.method,
            escape(request.path),
            error.error,
            escape(error.detail or error.description),
        )
    response = jsonify(dict(answer.body))
    response.status_code = answer.status
    for name, value in answer.headers:
        response.headers.add(name, value)
    return response


def client_certificate(environ: Mapping[str, Any]) -> x509.Certificate | None:
    """The TLS client certificate of this request, from the WSGI server.

    ``SSL_CLIENT_CERT`` (PEM) is what werkzeug, nginx and Apache pass; gunicorn (our TLS listener)
    hands over its socket instead. Without either, there is no certificate: an mTLS-bound token fails.
    """
    pem = environ.get("SSL_CLIENT_CERT")
    if isinstance(pem, str) and pem.strip():
        try:
            return x509.load_pem_x509_certificate(pem.encode("ascii"))
        except ValueError:
            return None
    sock = environ.get("gunicorn.socket")
    if isinstance(sock, ssl.SSLSocket):
        der = sock.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    return None
