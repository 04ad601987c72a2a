"""The workload's side of the STS: exchange its SPIFFE identity for access tokens, and cache them safely.

:class:`TokenClient` gets the workload's JWT-SVID from the Workload API (py-spiffe; the socket from the
argument or ``SPIFFE_ENDPOINT_SOCKET``), exchanges it at ``POST /token`` (RFC 8693) for one target,
optionally bound to a DPoP key (RFC 9449) or to its X.509-SVID over mutual TLS (RFC 8705), and caches
each token per (target, scopes, task, binding, client authentication) until shortly before ``exp`` —
and never past its task: :meth:`TokenClient.end_task` drops the task's tokens, and so does any
``invalid_request`` answer to an exchange for that task (the task ended or was revoked). Refusals come
back as the :mod:`sts.errors` classes the server raised; 429 and 503 are retried with bounded backoff
that never comes before ``Retry-After``. :class:`RequestsTokenAuth` and :class:`HttpxTokenAuth`
attach the right token (and a fresh DPoP proof with ``ath``) to every request.

A cached token dies with its task, and the client learns it without waiting for a refusal wherever
that is cheap: :meth:`TokenClient.complete_task` drops the task's tokens before it asks the STS, a
task's deadline (noted from :meth:`TokenClient.create_task` and :meth:`TokenClient.task`, or by
:meth:`TokenClient.note_task_deadline`) ends their use, :meth:`TokenClient.revoke` forgets the token,
and the auth adapters forget a token on any 401 (or ``invalid_token`` challenge) of a resource server.

Thread-safe: one lock guards the cache, and one exchange at a time runs per cache key, so a burst of
requests for the same target costs one exchange. :class:`AsyncTokenClient` keeps the same rules for
asyncio and trio programs (``httpx.AsyncClient``; one exchange in flight per key across tasks).

Must not import Flask or the server side (``sts.exchange``, ``sts.web``): it runs inside workloads.
"""

from __future__ import annotations

import email.utils
import logging
import re
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC
from typing import Any, Protocol

import anyio
import anyio.to_thread
import httpx
import jwt
import requests
import requests.auth
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, WorkloadApiClient, X509Svid
from spiffe.errors import PySpiffeError

from sts.binding import DpopKey, InvalidDpopProof, certificate_thumbprint
from sts.errors import (
    AccessDenied,
    InvalidCallerToken,
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    NotFound,
    RateLimited,
    RequestTooLarge,
    StsError,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from sts.memfile import MemoryFile

__all__ = [
    "CLIENT_ASSERTION_TYPE_JWT_SPIFFE",
    "GRANT_TYPE_TOKEN_EXCHANGE",
    "TOKEN_TYPE_JWT",
    "AccessToken",
    "AsyncTokenClient",
    "CachedJwtSvid",
    "DpopKey",
    "HttpxTokenAuth",
    "RequestsTokenAuth",
    "SvidSource",
    "TokenClient",
    "TokenRequest",
    "WorkloadApiSvids",
    "error_from_response",
]

log = logging.getLogger(__name__)

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
CLIENT_ASSERTION_TYPE_JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
SERVER_CA_RECHECK_SECONDS = 30.0  # how stale the STS's CA file may get after an X.509 CA rotation
# How long a copy of our own SVID is kept before the agent is asked again (it caches: a cheap call).
SVID_RECHECK_SECONDS = 30.0

# RFC 6749 §5.2 / RFC 6750 / RFC 9449 codes → the class the server raised for them.
ERROR_CLASSES: Mapping[str, type[StsError]] = {
    "invalid_request": InvalidRequest,
    "invalid_client": InvalidClient,
    "invalid_target": InvalidTarget,
    "invalid_scope": InvalidScope,
    "unsupported_grant_type": UnsupportedGrantType,
    "rate_limited": RateLimited,
    "temporarily_unavailable": TemporarilyUnavailable,
    "invalid_token": InvalidCallerToken,
    "access_denied": AccessDenied,
    "not_found": NotFound,
    "invalid_dpop_proof": InvalidDpopProof,
    "server_error": StsError,
}
RETRIED_STATUSES = frozenset({429, 503})
DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_ERROR_DESCRIPTION_CHARS = 512


def error_from_response(status: int, body: Any, headers: Mapping[str, str]) -> StsError:
    """The :mod:`sts.errors` instance for one RFC 6749 §5.2 error answer (unknown codes: the base class).

    The description is the server's public ``error_description``; nothing else of the answer is kept.
    """
    code = body.get("error") if isinstance(body, dict) else None
    description = body.get("error_description") if isinstance(body, dict) else None
    if not isinstance(description, str) or not description:
        description = f"the STS answered {status}"
    description = description[:MAX_ERROR_DESCRIPTION_CHARS]
    if status == 413:
        return RequestTooLarge(description)
    cls = ERROR_CLASSES.get(code, StsError) if isinstance(code, str) else StsError
    if cls is RateLimited:
        return RateLimited(description, retry_after=_retry_after(headers) or 1)
    return cls(description, detail=f"HTTP {status}, error {code!r}")


def _retry_after(headers: Mapping[str, str]) -> int | None:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date; None when absent or unreadable."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0, int(when.timestamp() - time.time()))


class SvidSource(Protocol):
    """Where the workload's SVIDs come from: the Workload API in production, anything in tests."""

    def jwt_svid(self, audience: str) -> str:
        """A fresh JWT-SVID of this workload for ``audience``."""
        ...

    def x509_svid(self) -> tuple[list[x509.Certificate], Any]:
        """This workload's X.509-SVID: its chain (leaf first) and private key."""
        ...

    def x509_authorities(self) -> list[x509.Certificate]:
        """The X.509 authorities of this workload's trust domain (to verify a SPIFFE server)."""
        ...

    def close(self) -> None: ...


class WorkloadApiSvids:
    """:class:`SvidSource` over py-spiffe's :class:`~spiffe.WorkloadApiClient` (one-shot calls).

    ``socket`` is ``unix:///path``; None lets py-spiffe read ``SPIFFE_ENDPOINT_SOCKET``. The
    connection is made on first use, so a client can be built before the agent is up.

    ``spiffe_id`` picks this workload's identity when the agent serves it several (one socket, one
    process matching several registration entries: SPIRE returns them all, ordered by entry ID, and
    the "default" is merely the first). Without it the first SVID is used.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        spiffe_id: str | None = None,
    ) -> None:
        self._socket = socket
        self._timeout = timeout
        self._spiffe_id = SpiffeId(spiffe_id) if spiffe_id is not None else None
        self._client: WorkloadApiClient | None = None
        self._lock = threading.Lock()

    def _api(self) -> WorkloadApiClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = WorkloadApiClient(socket_path=self._socket)
                except PySpiffeError as e:
                    raise TemporarilyUnavailable("the Workload API is not reachable", detail=str(e)) from e
            return self._client

    def jwt_svid(self, audience: str) -> str:
        try:
            api = self._api()
            svid = api.fetch_jwt_svid(audience={audience}, subject=self._spiffe_id, timeout=self._timeout)
        except PySpiffeError as e:
            raise TemporarilyUnavailable("the Workload API gave no JWT-SVID", detail=str(e)) from e
        return str(svid.token)

    def _chosen(self, svids: Sequence[X509Svid]) -> X509Svid:
        for svid in svids:
            if self._spiffe_id is None or svid.spiffe_id == self._spiffe_id:
                chosen: X509Svid = svid
                return chosen
        served = ", ".join(str(s.spiffe_id) for s in svids) or "none"
        raise TemporarilyUnavailable(
            "the Workload API serves no X.509-SVID for this SPIFFE ID",
            detail=f"wanted {self._spiffe_id}; served {served}",
        )

    def x509_svid(self) -> tuple[list[x509.Certificate], Any]:
        try:
            svids = self._api().fetch_x509_svids(timeout=self._timeout)
        except PySpiffeError as e:
            raise TemporarilyUnavailable("the Workload API gave no X.509-SVID", detail=str(e)) from e
        svid = self._chosen(svids)
        return list(svid.cert_chain), svid.private_key

    def x509_authorities(self) -> list[x509.Certificate]:
        try:
            context = self._api().fetch_x509_context(timeout=self._timeout)
        except PySpiffeError as e:
            raise TemporarilyUnavailable("the Workload API gave no X.509 bundle", detail=str(e)) from e
        svid = self._chosen(context.x509_svids)
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        return list(bundle.x509_authorities) if bundle is not None else []

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> WorkloadApiSvids:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CachedJwtSvid:
    """A JWT-SVID for one audience, re-fetched once half its lifetime is gone (SPIRE rotates likewise).

    For callers that present their own SVID often (a resource server introspecting); an exchange
    fetches a fresh one instead, so that a client assertion is never the subject token.
    """

    def __init__(self, source: SvidSource, audience: str, *, clock: Callable[[], float] = time.time) -> None:
        self._source = source
        self._audience = audience
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def get(self) -> str:
        now = self._clock()
        with self._lock:
            if self._token is None or now >= self._refresh_at:
                token = self._source.jwt_svid(self._audience)
                self._token = token
                # At most SVID_RECHECK_SECONDS old: after a JWT authority is tainted and revoked, SPIRE's
                # agent re-mints at once, and a copy kept for half its life would be refused meanwhile.
                half_life = max(1.0, (_unverified_exp(token) - now) / 2)
                self._refresh_at = now + min(half_life, SVID_RECHECK_SECONDS)
            return self._token

    def invalidate(self) -> None:
        """Forget the cached SVID (the STS refused it): the next :meth:`get` asks the agent again."""
        with self._lock:
            self._token = None


def _unverified_exp(token: str) -> float:
    """The ``exp`` of a JWT we were just handed by our own Workload API (only to schedule a refresh)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return 0.0
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else 0.0


@dataclass(frozen=True, slots=True)
class AccessToken:
    """One issued token and how to present it (RFC 6750 ``Bearer`` or RFC 9449 ``DPoP``)."""

    value: str = field(repr=False)
    token_type: str
    expires_at: float
    scopes: frozenset[str]
    target: str
    task_id: str | None = None
    dpop_key: DpopKey | None = field(default=None, repr=False, compare=False)
    issued_at: float = 0.0

    def usable(self, now: float, margin: float) -> bool:
        """Still worth handing out: more than ``margin`` (at most half the lifetime) left before ``exp``."""
        return self.expires_at - now > min(margin, (self.expires_at - self.issued_at) / 2)

    def headers(self, method: str, url: str, *, now: float | None = None) -> dict[str, str]:
        """The request headers for one call: ``Authorization``, and a fresh DPoP proof bound by ``ath``."""
        if self.dpop_key is not None and self.token_type.lower() == "dpop":
            return {
                "Authorization": f"DPoP {self.value}",
                "DPoP": self.dpop_key.proof(method.upper(), url, access_token=self.value, now=now),
            }
        return {"Authorization": f"Bearer {self.value}"}


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """What a caller wants: one target (``audience`` catalog id or ``resource`` URI), scopes, task, binding.

    ``dpop``: bind the token to this key (``cnf.jkt``). ``mtls``: exchange over mutual TLS with the
    X.509-SVID, which authenticates the client and binds the token to the certificate
    (``cnf.x5t#S256``; present the same certificate to the resource server). ``client_assertion``:
    authenticate with a second JWT-SVID (``jwt-spiffe``), for policies that want client authentication
    without TLS.
    """

    audience: str | None = None
    resource: str | None = None
    scopes: frozenset[str] = frozenset()
    task_id: str | None = None
    dpop: DpopKey | None = field(default=None, compare=False, hash=False)
    mtls: bool = False
    client_assertion: bool = False

    @classmethod
    def of(
        cls,
        *,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | Iterable[str] = (),
        task_id: str | None = None,
        dpop: DpopKey | None = None,
        mtls: bool = False,
        client_assertion: bool = False,
    ) -> TokenRequest:
        if (audience is None) == (resource is None):
            raise ValueError("name exactly one target: audience or resource")
        scopes = frozenset(scope.split() if isinstance(scope, str) else scope)
        if not scopes:
            raise ValueError("ask for at least one scope")
        if mtls and client_assertion:
            raise ValueError("authenticate one way: mtls or client_assertion")
        return cls(audience, resource, scopes, task_id, dpop, mtls, client_assertion)

    @property
    def target(self) -> str:
        return self.audience if self.audience is not None else str(self.resource)


@dataclass(frozen=True, slots=True)
class _CacheKey:
    kind: str
    target: str
    scopes: frozenset[str]
    task_id: str | None
    jkt: str | None
    x5t: str | None
    client_assertion: bool


@dataclass(frozen=True, slots=True)
class _TlsIdentity:
    """The X.509-SVID as memory files (``ssl`` loads chains only from paths; the key never touches
    disk, :mod:`sts.memfile`) and when to fetch a newer one."""

    cert: MemoryFile
    key: MemoryFile
    x5t: str
    refresh_at: float

    @property
    def cert_file(self) -> str:
        return self.cert.path

    @property
    def key_file(self) -> str:
        return self.key.path

    def close(self) -> None:
        self.cert.close()
        self.key.close()


class _ClientBase:
    """What :class:`TokenClient` and :class:`AsyncTokenClient` share: the cache and its rules, the
    workload's SVIDs and TLS identity, the exchange's form and answer. No network I/O of its own
    but the Workload API (py-spiffe, blocking)."""

    def __init__(
        self,
        issuer: str,
        *,
        socket: str | None,
        spiffe_id: str | None,
        svids: SvidSource | None,
        token_endpoint: str | None,
        mtls_token_endpoint: str | None,
        server_ca: str | None,
        timeout: float,
        refresh_margin: float,
        max_attempts: int,
        max_retry_wait: float,
        clock: Callable[[], float],
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.token_endpoint = token_endpoint or f"{self.issuer}/token"
        self.mtls_token_endpoint = mtls_token_endpoint
        self._svids: SvidSource = (
            svids if svids is not None else WorkloadApiSvids(socket, timeout=timeout, spiffe_id=spiffe_id)
        )
        self._owns_svids = svids is None
        self._server_ca = server_ca
        self._timeout = timeout
        self._refresh_margin = refresh_margin
        self._max_attempts = max(1, max_attempts)
        self._max_retry_wait = max_retry_wait
        self._clock = clock
        self._lock = threading.Lock()  # never held across I/O or an await
        self._cache: dict[_CacheKey, AccessToken] = {}
        self._task_epochs: dict[str, int] = {}
        self._task_deadlines: dict[str, float] = {}
        self._tls: _TlsIdentity | None = None
        self._previous_tls: _TlsIdentity | None = None
        self._tls_lock = threading.Lock()
        self._server_ca_memory: MemoryFile | None = None
        self._previous_server_ca: MemoryFile | None = None
        self._server_ca_pem = b""
        self._server_ca_checked = float("-inf")

    # --- the cache ----------------------------------------------------------------------------

    def end_task(self, task_id: str) -> None:
        """Forget every token of ``task_id``: none is handed out again, even one being exchanged now."""
        with self._lock:
            self._task_epochs[task_id] = self._task_epochs.get(task_id, 0) + 1
            for key in [k for k in self._cache if k.task_id == task_id]:
                del self._cache[key]

    def note_task_deadline(self, task_id: str, expires_at: float) -> None:
        """The task ends at ``expires_at`` (epoch seconds): no cached token of it is handed out after.

        :meth:`TokenClient.create_task` and :meth:`TokenClient.task` note it from the STS's answer; an
        agent handed a task id (and its ``expires_at``) by its orchestrator may note it itself.
        """
        with self._lock:
            self._task_deadlines[task_id] = float(expires_at)

    def invalidate(self, token: str) -> None:
        """Forget one token (a resource server answered 401 or ``invalid_token``: revoked, or dead early)."""
        with self._lock:
            for key in [k for k, v in self._cache.items() if v.value == token]:
                del self._cache[key]

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def _cached(self, key: _CacheKey) -> AccessToken | None:
        with self._lock:
            return self._fresh(key)

    def _fresh(self, key: _CacheKey) -> AccessToken | None:
        """The cached token for ``key`` if it may still be handed out (lock held)."""
        token = self._cache.get(key)
        if token is None:
            return None
        now = self._clock()
        if token.usable(now, self._refresh_margin) and not self._task_over(key.task_id, now):
            return token
        del self._cache[key]
        return None

    def _task_over(self, task_id: str | None, now: float) -> bool:
        deadline = self._task_deadlines.get(task_id) if task_id is not None else None
        return deadline is not None and now >= deadline

    def _prune(self) -> None:
        now = self._clock()
        for key, token in list(self._cache.items()):
            if not token.usable(now, self._refresh_margin) or self._task_over(key.task_id, now):
                del self._cache[key]
        for task_id in [t for t, deadline in self._task_deadlines.items() if deadline <= now - 3600]:
            del self._task_deadlines[task_id]  # long over: a token of it is refused by the STS anyway

    def _epoch(self, want: TokenRequest) -> int:
        with self._lock:
            return self._task_epochs.get(want.task_id, 0) if want.task_id else 0

    def _keep(self, key: _CacheKey, want: TokenRequest, issued: AccessToken, epoch: int) -> None:
        """Cache ``issued`` unless its task ended while it was being exchanged (end_task wins)."""
        with self._lock:
            if want.task_id is None or self._task_epochs.get(want.task_id, 0) == epoch:
                self._prune()
                self._cache[key] = issued

    def _key(self, want: TokenRequest) -> _CacheKey:
        return _CacheKey(
            kind="audience" if want.audience is not None else "resource",
            target=want.target,
            scopes=want.scopes,
            task_id=want.task_id,
            jkt=want.dpop.jkt if want.dpop is not None else None,
            x5t=self._tls_identity().x5t if want.mtls else None,
            client_assertion=want.client_assertion,
        )

    def _note_task(self, body: Mapping[str, Any]) -> None:
        """Learn from a task object of the STS (create, read): its deadline, and whether it is over."""
        task_id, expires_at = body.get("task_id"), body.get("expires_at")
        if not isinstance(task_id, str):
            return
        if isinstance(expires_at, int | float) and not isinstance(expires_at, bool):
            self.note_task_deadline(task_id, expires_at)
        if body.get("status") not in (None, "active"):
            self.end_task(task_id)

    # --- the exchange -------------------------------------------------------------------------

    def _endpoint(self, want: TokenRequest) -> str:
        if not want.mtls:
            return self.token_endpoint
        if self.mtls_token_endpoint is None:
            raise ValueError("mtls needs mtls_token_endpoint (the STS's TLS listener)")
        return self.mtls_token_endpoint

    def _form(self, want: TokenRequest, subject_token: str, assertion: str | None) -> dict[str, str]:
        form: dict[str, str] = {
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token_type": TOKEN_TYPE_JWT,
            "subject_token": subject_token,
            "scope": " ".join(sorted(want.scopes)),
        }
        if want.audience is not None:
            form["audience"] = want.audience
        else:
            form["resource"] = str(want.resource)
        if want.task_id is not None:
            form["task_id"] = want.task_id
        if assertion is not None:
            # RFC 7523 §3: audience = the token endpoint URL, so a SPIRE agent (one cached SVID per
            # audience set) hands out an SVID distinct from the subject token.
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE_JWT_SPIFFE
            form["client_assertion"] = assertion
        return form

    def _issued(self, body: Mapping[str, Any], want: TokenRequest, started: float) -> AccessToken:
        try:
            value = body["access_token"]
            token_type = str(body.get("token_type", "Bearer"))
            expires_in = float(body["expires_in"])
            scopes = frozenset(str(body.get("scope", "")).split()) or want.scopes
        except (KeyError, TypeError, ValueError) as e:
            raise StsError("the STS answered 200 without a usable token", detail=repr(body)[:200]) from e
        if not isinstance(value, str):
            raise StsError("the STS answered 200 without a usable token")
        if want.dpop is not None and token_type.lower() != "dpop":
            # Asked for a bound token and got a bearer one: it would be refused by DPoP-aware servers.
            raise StsError("the STS did not bind the token to the DPoP key")
        return AccessToken(
            value=value,
            token_type=token_type,
            expires_at=started + expires_in,
            scopes=scopes,
            target=want.target,
            task_id=want.task_id,
            dpop_key=want.dpop,
            issued_at=started,
        )

    def _task_body(
        self, assignee: str, targets: Mapping[str, Iterable[str]], purpose: str, ttl_seconds: int
    ) -> dict[str, Any]:
        return {
            "assignee": assignee,
            "targets": [{"target": t, "scopes": sorted(s)} for t, s in targets.items()],
            "purpose": purpose,
            "ttl_seconds": ttl_seconds,
        }

    def _retry_wait(self, attempt: int, status: int, headers: Mapping[str, str], body: Any) -> float:
        """How long to wait before attempt ``attempt + 1`` after a refusal; raises it when not retried.

        Only 429 and 503 are retried, never sooner than ``Retry-After``; a server asking for a longer
        wait than ``max_retry_wait`` (a spent task budget says "until the deadline") is raised at once.
        """
        error = error_from_response(status, body, headers)
        if status not in RETRIED_STATUSES or attempt == self._max_attempts:
            raise error
        wait = max(self._backoff(attempt), float(_retry_after(headers) or 0))
        if wait > self._max_retry_wait:
            raise error
        log.info("the STS answered %s; retrying in %.1fs", status, wait)
        return wait

    def _backoff(self, attempt: int) -> float:
        return min(self._max_retry_wait, 0.2 * 2.0 ** (attempt - 1))

    # --- the X.509-SVID -----------------------------------------------------------------------

    def _tls_identity(self) -> _TlsIdentity:
        """The current X.509-SVID in memory files; the agent is asked again every
        :data:`SVID_RECHECK_SECONDS` (new memory files only when the certificate changed)."""
        now = self._clock()
        with self._tls_lock:
            if self._tls is not None and now < self._tls.refresh_at:
                return self._tls
            chain, key = self._svids.x509_svid()
            leaf = chain[0]
            cert_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            x5t = certificate_thumbprint(leaf)
            begins = leaf.not_valid_before_utc.timestamp()
            ends = leaf.not_valid_after_utc.timestamp()
            # Asked again within SVID_RECHECK_SECONDS: SPIRE re-issues early when its CA is tainted.
            refresh_at = min(begins + (ends - begins) / 2, now + SVID_RECHECK_SECONDS)
            if self._tls is not None and self._tls.x5t == x5t:
                self._tls = replace(self._tls, refresh_at=refresh_at)
                return self._tls
            cert, key_file = MemoryFile(cert_pem, "svid.pem"), MemoryFile(key_pem, "svid.key")
            identity = _TlsIdentity(cert, key_file, x5t, refresh_at=refresh_at)
            # A session may still hold the previous paths for a token bound to the previous
            # certificate: they stay readable for one more rotation.
            if self._previous_tls is not None:
                self._previous_tls.close()
            self._previous_tls, self._tls = self._tls, identity
            return identity

    def client_certificate_files(self) -> tuple[str, str]:
        """The X.509-SVID as (certificate chain, key) paths: present them with an mTLS-bound token.

        The paths are memory files of this process (``/proc/self/fd/N`` on Linux), valid until the
        certificate has rotated twice or the client is closed; nothing is written to disk.
        """
        identity = self._tls_identity()
        return identity.cert_file, identity.key_file

    def _server_ca_file(self) -> str:
        """The CA file that verifies the STS's TLS certificate: ``server_ca`` as given, or this
        workload's X.509 bundle from the Workload API, re-read every :data:`SERVER_CA_RECHECK_SECONDS`
        so that a CA rotation (SPIRE prepares and activates a new X.509 authority) never breaks mTLS."""
        with self._tls_lock:
            now = self._clock()
            if self._server_ca_memory is not None and (
                self._server_ca is not None or now < self._server_ca_checked + SERVER_CA_RECHECK_SECONDS
            ):
                return self._server_ca_memory.path
            if self._server_ca is not None:
                pem = self._server_ca.encode("ascii")
            else:
                authorities = self._svids.x509_authorities()
                if not authorities:
                    raise TemporarilyUnavailable("no trust bundle to verify the STS's certificate with")
                pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in authorities)
            self._server_ca_checked = now
            if self._server_ca_memory is None or pem != self._server_ca_pem:
                if self._previous_server_ca is not None:
                    self._previous_server_ca.close()  # a session may still read the last one: keep it
                self._previous_server_ca = self._server_ca_memory
                self._server_ca_memory, self._server_ca_pem = MemoryFile(pem, "server-ca.pem"), pem
            return self._server_ca_memory.path

    def _close_identity(self) -> None:
        if self._owns_svids:
            self._svids.close()
        with self._tls_lock:
            for identity in (self._tls, self._previous_tls):
                if identity is not None:
                    identity.close()
            self._tls = self._previous_tls = None
            for ca_file in (self._server_ca_memory, self._previous_server_ca):
                if ca_file is not None:
                    ca_file.close()
            self._server_ca_memory = self._previous_server_ca = None


class TokenClient(_ClientBase):
    """Access tokens for one workload, from one STS; see the module docstring for the rules it keeps.

    ``issuer``: the STS issuer (the audience of the JWT-SVIDs it accepts). ``token_endpoint``
    defaults to ``<issuer>/token``; ``mtls_token_endpoint`` is the TLS listener's (``https``), whose
    certificate is verified with ``server_ca`` (PEM) or else with this workload's trust bundle from
    the Workload API, against the URL's host name (re-read when the bundle changes). ``spiffe_id``
    picks the workload's identity when its agent serves several (:class:`WorkloadApiSvids`).
    ``refresh_margin``: a cached token is not handed
    out when it has less than this left (at most half its lifetime). ``clock`` and ``sleep`` are
    injectable for tests.
    """

    def __init__(
        self,
        issuer: str,
        *,
        socket: str | None = None,
        spiffe_id: str | None = None,
        svids: SvidSource | None = None,
        token_endpoint: str | None = None,
        mtls_token_endpoint: str | None = None,
        server_ca: str | None = None,
        session: requests.Session | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        refresh_margin: float = 10.0,
        max_attempts: int = 4,
        max_retry_wait: float = 10.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            issuer,
            socket=socket,
            spiffe_id=spiffe_id,
            svids=svids,
            token_endpoint=token_endpoint,
            mtls_token_endpoint=mtls_token_endpoint,
            server_ca=server_ca,
            timeout=timeout,
            refresh_margin=refresh_margin,
            max_attempts=max_attempts,
            max_retry_wait=max_retry_wait,
            clock=clock,
        )
        self._session = session if session is not None else requests.Session()
        self._owns_session = session is None
        self._sleep = sleep
        self._flights: dict[_CacheKey, threading.Lock] = {}

    # --- tokens -------------------------------------------------------------------------------

    def token(
        self,
        *,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | Iterable[str] = (),
        task_id: str | None = None,
        dpop: DpopKey | None = None,
        mtls: bool = False,
        client_assertion: bool = False,
    ) -> AccessToken:
        """A token for one target: from the cache while it has ``refresh_margin`` left, else exchanged."""
        return self.get(
            TokenRequest.of(
                audience=audience,
                resource=resource,
                scope=scope,
                task_id=task_id,
                dpop=dpop,
                mtls=mtls,
                client_assertion=client_assertion,
            )
        )

    def get(self, want: TokenRequest) -> AccessToken:
        """:meth:`token` for a prepared :class:`TokenRequest` (what the auth adapters hold)."""
        key = self._key(want)
        with self._lock:
            cached = self._fresh(key)
            if cached is not None:
                return cached
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:  # one exchange per key; the others wait for it and take its result
            cached = self._cached(key)
            if cached is not None:
                return cached
            epoch = self._epoch(want)
            try:
                issued = self._exchange(want)
            except InvalidRequest:
                # The task ended, was revoked, or never was ours: nothing cached for it is good any more.
                if want.task_id is not None:
                    self.end_task(want.task_id)
                raise
            finally:
                with self._lock:
                    if self._flights.get(key) is flight:
                        del self._flights[key]
            self._keep(key, want, issued, epoch)
            return issued

    def _exchange(self, want: TokenRequest) -> AccessToken:
        """One RFC 8693 exchange (with retries); the JWT-SVIDs are fetched fresh for it."""
        endpoint = self._endpoint(want)
        subject = self._svids.jwt_svid(self.issuer)
        assertion = self._svids.jwt_svid(self.token_endpoint) if want.client_assertion else None
        form = self._form(want, subject, assertion)

        def headers() -> dict[str, str]:
            # A new proof per attempt: the STS refuses a replayed jti.
            return {"DPoP": want.dpop.proof("POST", endpoint)} if want.dpop is not None else {}

        started = self._clock()
        body = self._call("POST", endpoint, data=form, headers=headers, tls=want.mtls)
        return self._issued(body, want, started)

    # --- tasks --------------------------------------------------------------------------------

    def create_task(
        self,
        assignee: str,
        targets: Mapping[str, Iterable[str]],
        *,
        purpose: str,
        ttl_seconds: int,
    ) -> dict[str, Any]:
        """``POST /tasks`` as this workload (an orchestrator); the answer has ``task_id``, ``expires_at``."""
        body = self._task_body(assignee, targets, purpose, ttl_seconds)
        task = self._call_as_caller("POST", f"{self.issuer}/tasks", json=body)
        self._note_task(task)
        return task

    def task(self, task_id: str) -> dict[str, Any]:
        """``GET /tasks/{id}`` (creator or assignee): the task; its deadline is noted, and when it is no
        longer active its cached tokens are dropped at once."""
        task = self._call_as_caller("GET", f"{self.issuer}/tasks/{task_id}")
        self._note_task(task)
        return task

    def complete_task(self, task_id: str) -> dict[str, Any]:
        """``POST /tasks/{id}/complete``: every token of the task dies at the STS, and here at once."""
        self.end_task(task_id)
        return self._call_as_caller("POST", f"{self.issuer}/tasks/{task_id}/complete", json={})

    def revoke(self, token: str) -> None:
        """RFC 7009 revocation of one of this workload's own tokens; forgotten here as well."""
        self.invalidate(token)
        self._call_as_caller("POST", f"{self.issuer}/revoke", data={"token": token})

    def _call_as_caller(
        self, method: str, url: str, *, json: Any = None, data: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """A JSON endpoint, authenticated with a JWT-SVID as bearer (DESIGN.md: tasks, revoke)."""
        svid = self._svids.jwt_svid(self.issuer)
        return self._call(
            method, url, json=json, data=data, headers=lambda: {"Authorization": f"Bearer {svid}"}
        )

    # --- transport ----------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        url: str,
        *,
        headers: Callable[[], dict[str, str]],
        data: Mapping[str, str] | None = None,
        json: Any = None,
        tls: bool = False,
    ) -> dict[str, Any]:
        """One request with bounded retries of 429/503 and connection failures; errors as ``sts.errors``."""
        extra: dict[str, Any] = {}
        if tls:
            identity = self._tls_identity()
            extra = {"cert": (identity.cert_file, identity.key_file), "verify": self._server_ca_file()}
        for attempt in range(1, self._max_attempts + 1):
            try:
                response = self._session.request(
                    method,
                    url,
                    data=data,
                    json=json,
                    headers=headers(),
                    timeout=self._timeout,
                    allow_redirects=False,
                    **extra,
                )
            except requests.RequestException as e:
                if attempt == self._max_attempts:
                    raise TemporarilyUnavailable("the STS cannot be reached", detail=str(e)) from e
                self._sleep(self._backoff(attempt))
                continue
            body = _json_or_none(response)
            if 200 <= response.status_code < 300:
                return body if isinstance(body, dict) else {}
            self._sleep(self._retry_wait(attempt, response.status_code, response.headers, body))
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._owns_session:
            self._session.close()
        self._close_identity()

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTokenClient(_ClientBase):
    """:class:`TokenClient` for asyncio (and trio) programs, over ``httpx.AsyncClient``.

    The same cache and rules: one exchange in flight per cache key however many tasks ask at once (the
    others await it and take its token), tokens never handed out past ``refresh_margin``, their task's
    end (:meth:`end_task`, :meth:`complete_task`, a known deadline) or a resource server's 401; 429
    and 503 retried after ``Retry-After``. The Workload API calls (py-spiffe, blocking) run in worker
    threads; nothing here blocks the event loop on the network.

    ``http``: the ``httpx.AsyncClient`` to the STS (one is made and closed with this client
    otherwise); mTLS exchanges use a client of their own holding the X.509-SVID, renewed when the
    SVID or the STS's CA changes. ``sleep`` is awaited between retries (injectable for tests).
    Use as ``async with AsyncTokenClient(...) as client:`` or call :meth:`aclose`.
    """

    def __init__(
        self,
        issuer: str,
        *,
        socket: str | None = None,
        spiffe_id: str | None = None,
        svids: SvidSource | None = None,
        token_endpoint: str | None = None,
        mtls_token_endpoint: str | None = None,
        server_ca: str | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        refresh_margin: float = 10.0,
        max_attempts: int = 4,
        max_retry_wait: float = 10.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        super().__init__(
            issuer,
            socket=socket,
            spiffe_id=spiffe_id,
            svids=svids,
            token_endpoint=token_endpoint,
            mtls_token_endpoint=mtls_token_endpoint,
            server_ca=server_ca,
            timeout=timeout,
            refresh_margin=refresh_margin,
            max_attempts=max_attempts,
            max_retry_wait=max_retry_wait,
            clock=clock,
        )
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout)
        self._owns_http = http is None
        self._sleep = sleep
        self._flights: dict[_CacheKey, anyio.Lock] = {}
        self._mtls_http: tuple[tuple[str, str], httpx.AsyncClient] | None = None
        self._retired_http: list[httpx.AsyncClient] = []

    # --- tokens -------------------------------------------------------------------------------

    async def token(
        self,
        *,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | Iterable[str] = (),
        task_id: str | None = None,
        dpop: DpopKey | None = None,
        mtls: bool = False,
        client_assertion: bool = False,
    ) -> AccessToken:
        """A token for one target: from the cache while it has ``refresh_margin`` left, else exchanged."""
        return await self.get(
            TokenRequest.of(
                audience=audience,
                resource=resource,
                scope=scope,
                task_id=task_id,
                dpop=dpop,
                mtls=mtls,
                client_assertion=client_assertion,
            )
        )

    async def get(self, want: TokenRequest) -> AccessToken:
        """:meth:`token` for a prepared :class:`TokenRequest` (what the auth adapters hold)."""
        key = await anyio.to_thread.run_sync(self._key, want) if want.mtls else self._key(want)
        with self._lock:
            cached = self._fresh(key)
            if cached is not None:
                return cached
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = anyio.Lock()
        async with flight:  # one exchange per key; the others wait for it and take its result
            cached = self._cached(key)
            if cached is not None:
                return cached
            epoch = self._epoch(want)
            try:
                issued = await self._exchange(want)
            except InvalidRequest:
                if want.task_id is not None:
                    self.end_task(want.task_id)
                raise
            finally:
                with self._lock:
                    if self._flights.get(key) is flight:
                        del self._flights[key]
            self._keep(key, want, issued, epoch)
            return issued

    async def _exchange(self, want: TokenRequest) -> AccessToken:
        endpoint = self._endpoint(want)
        subject = await anyio.to_thread.run_sync(self._svids.jwt_svid, self.issuer)
        assertion = (
            await anyio.to_thread.run_sync(self._svids.jwt_svid, self.token_endpoint)
            if want.client_assertion
            else None
        )
        form = self._form(want, subject, assertion)

        def headers() -> dict[str, str]:
            return {"DPoP": want.dpop.proof("POST", endpoint)} if want.dpop is not None else {}

        started = self._clock()
        body = await self._call("POST", endpoint, data=form, headers=headers, tls=want.mtls)
        return self._issued(body, want, started)

    # --- tasks --------------------------------------------------------------------------------

    async def create_task(
        self,
        assignee: str,
        targets: Mapping[str, Iterable[str]],
        *,
        purpose: str,
        ttl_seconds: int,
    ) -> dict[str, Any]:
        """``POST /tasks`` as this workload; the answer has ``task_id``, ``expires_at`` (noted)."""
        body = self._task_body(assignee, targets, purpose, ttl_seconds)
        task = await self._call_as_caller("POST", f"{self.issuer}/tasks", json=body)
        self._note_task(task)
        return task

    async def task(self, task_id: str) -> dict[str, Any]:
        """``GET /tasks/{id}``: the task; its deadline noted, its tokens dropped when it is over."""
        task = await self._call_as_caller("GET", f"{self.issuer}/tasks/{task_id}")
        self._note_task(task)
        return task

    async def complete_task(self, task_id: str) -> dict[str, Any]:
        """``POST /tasks/{id}/complete``: every token of the task dies at the STS, and here at once."""
        self.end_task(task_id)
        return await self._call_as_caller("POST", f"{self.issuer}/tasks/{task_id}/complete", json={})

    async def revoke(self, token: str) -> None:
        """RFC 7009 revocation of one of this workload's own tokens; forgotten here as well."""
        self.invalidate(token)
        await self._call_as_caller("POST", f"{self.issuer}/revoke", data={"token": token})

    async def _call_as_caller(
        self, method: str, url: str, *, json: Any = None, data: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        svid = await anyio.to_thread.run_sync(self._svids.jwt_svid, self.issuer)
        return await self._call(
            method, url, json=json, data=data, headers=lambda: {"Authorization": f"Bearer {svid}"}
        )

    # --- transport ----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        url: str,
        *,
        headers: Callable[[], dict[str, str]],
        data: Mapping[str, str] | None = None,
        json: Any = None,
        tls: bool = False,
    ) -> dict[str, Any]:
        """One request with bounded retries of 429/503 and connection failures; errors as ``sts.errors``."""
        http = await self._tls_http() if tls else self._http
        for attempt in range(1, self._max_attempts + 1):
            try:
                response = await http.request(
                    method,
                    url,
                    data=data,
                    json=json,
                    headers=headers(),
                    timeout=self._timeout,
                    follow_redirects=False,
                )
            except httpx.TransportError as e:
                if attempt == self._max_attempts:
                    raise TemporarilyUnavailable("the STS cannot be reached", detail=str(e)) from e
                await self._sleep(self._backoff(attempt))
                continue
            body = _httpx_json_or_none(response)
            if 200 <= response.status_code < 300:
                return body if isinstance(body, dict) else {}
            await self._sleep(self._retry_wait(attempt, response.status_code, response.headers, body))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _tls_http(self) -> httpx.AsyncClient:
        """The mTLS client: the current X.509-SVID and the STS's CA in its SSL context (remade on change)."""

        def files() -> tuple[str, str, str]:
            identity = self._tls_identity()
            return identity.cert_file, identity.key_file, self._server_ca_file()

        cert_file, key_file, ca_file = await anyio.to_thread.run_sync(files)
        current = self._mtls_http
        if current is not None and current[0] == (cert_file, ca_file):
            return current[1]
        context = ssl.create_default_context(cafile=ca_file)
        context.load_cert_chain(cert_file, key_file)
        client = httpx.AsyncClient(verify=context, timeout=self._timeout)
        if current is not None:
            self._retired_http.append(current[1])  # requests in flight may still use it; closed at aclose
        self._mtls_http = ((cert_file, ca_file), client)
        return client

    async def aclose(self) -> None:
        clients = [c for c in (self._mtls_http[1] if self._mtls_http else None,) if c is not None]
        for client in [*clients, *self._retired_http]:
            await client.aclose()
        self._mtls_http, self._retired_http = None, []
        if self._owns_http:
            await self._http.aclose()
        await anyio.to_thread.run_sync(self._close_identity)

    async def __aenter__(self) -> AsyncTokenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _httpx_json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


_INVALID_TOKEN = re.compile(r'(?:^|[\s,])error\s*=\s*"?invalid_token"?(?:$|[\s,])')


def _token_died(status: int, www_authenticate: str | None) -> bool:
    """RFC 6750 §3.1 / RFC 9449 §7.1: the resource server refused the token itself: any 401 (a token
    we attached was not accepted: revoked, expired early, its task over), or ``invalid_token`` in a
    challenge of any status. A 403 ``insufficient_scope`` is about the request, not the token."""
    return status == 401 or (www_authenticate is not None and bool(_INVALID_TOKEN.search(www_authenticate)))


class RequestsTokenAuth(requests.auth.AuthBase):
    """``requests`` auth: the right token for every request (cached), with a fresh DPoP proof each time.

    A ``401`` (or an ``invalid_token`` challenge) makes the client forget that token, so the next
    request exchanges anew (and learns from the STS if the task has ended). For an ``mtls`` token,
    give the session the same certificate: ``session.cert = client.client_certificate_files()``.
    """

    def __init__(self, client: TokenClient, want: TokenRequest | None = None, **wanted: Any) -> None:
        """``want``, or the keyword arguments of :meth:`TokenClient.token`, say which token to attach."""
        self._client = client
        self._want = want if want is not None else TokenRequest.of(**wanted)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self._client.get(self._want)
        r.headers.update(token.headers(str(r.method), str(r.url)))
        r.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return r

    def _on_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        if _token_died(response.status_code, response.headers.get("WWW-Authenticate")):
            self._client.invalidate(_presented(response.request.headers.get("Authorization")))
        return response


class HttpxTokenAuth(httpx.Auth):
    """``httpx`` auth for ``httpx.Client`` and ``httpx.AsyncClient``: like :class:`RequestsTokenAuth`.

    With a :class:`TokenClient` it serves both kinds of client (in an ``AsyncClient`` the exchange,
    which blocks, runs in a worker thread); with an :class:`AsyncTokenClient`, ``AsyncClient`` only.
    """

    def __init__(
        self, client: TokenClient | AsyncTokenClient, want: TokenRequest | None = None, **wanted: Any
    ) -> None:
        """``want``, or the keyword arguments of :meth:`TokenClient.token`, say which token to attach."""
        self._client = client
        self._want = want if want is not None else TokenRequest.of(**wanted)

    def _apply(self, request: httpx.Request, token: AccessToken) -> None:
        request.headers.update(token.headers(request.method, str(request.url)))

    def _after(self, response: httpx.Response) -> None:
        if _token_died(response.status_code, response.headers.get("WWW-Authenticate")):
            self._client.invalidate(_presented(response.request.headers.get("Authorization")))

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not isinstance(self._client, TokenClient):
            raise TypeError("an AsyncTokenClient serves httpx.AsyncClient only; use a TokenClient here")
        self._apply(request, self._client.get(self._want))
        response = yield request
        self._after(response)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if isinstance(self._client, AsyncTokenClient):
            token = await self._client.get(self._want)
        else:
            token = await anyio.to_thread.run_sync(self._client.get, self._want)
        self._apply(request, token)
        response = yield request
        self._after(response)


def _presented(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer|DPoP <token>`` header."""
    return (authorization or "").partition(" ")[2].strip()
