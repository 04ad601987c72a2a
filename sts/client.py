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

Thread-safe: one lock guards the cache, and one exchange at a time runs per cache key, so a burst of
requests for the same target costs one exchange.

Must not import Flask or the server side (``sts.exchange``, ``sts.web``): it runs inside workloads.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Protocol

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

log = logging.getLogger(__name__)

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
CLIENT_ASSERTION_TYPE_JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
SERVER_CA_RECHECK_SECONDS = 30.0  # how stale the STS's CA file may get after an X.509 CA rotation

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
                self._refresh_at = now + max(1.0, (_unverified_exp(token) - now) / 2)
            return self._token


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


class TokenClient:
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
        self.issuer = issuer.rstrip("/")
        self.token_endpoint = token_endpoint or f"{self.issuer}/token"
        self.mtls_token_endpoint = mtls_token_endpoint
        self._svids: SvidSource = (
            svids if svids is not None else WorkloadApiSvids(socket, timeout=timeout, spiffe_id=spiffe_id)
        )
        self._owns_svids = svids is None
        self._server_ca = server_ca
        self._session = session if session is not None else requests.Session()
        self._owns_session = session is None
        self._timeout = timeout
        self._refresh_margin = refresh_margin
        self._max_attempts = max(1, max_attempts)
        self._max_retry_wait = max_retry_wait
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._cache: dict[_CacheKey, AccessToken] = {}
        self._flights: dict[_CacheKey, threading.Lock] = {}
        self._task_epochs: dict[str, int] = {}
        self._tls: _TlsIdentity | None = None
        self._previous_tls: _TlsIdentity | None = None
        self._tls_lock = threading.Lock()
        self._server_ca_memory: MemoryFile | None = None
        self._previous_server_ca: MemoryFile | None = None
        self._server_ca_pem = b""
        self._server_ca_checked = float("-inf")

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
            with self._lock:
                cached = self._fresh(key)
                if cached is not None:
                    return cached
                epoch = self._task_epochs.get(want.task_id, 0) if want.task_id else 0
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
            with self._lock:
                # An end_task() that ran while we were exchanging wins: the token is returned, not kept.
                if want.task_id is None or self._task_epochs.get(want.task_id, 0) == epoch:
                    self._prune()
                    self._cache[key] = issued
            return issued

    def end_task(self, task_id: str) -> None:
        """Forget every token of ``task_id``: none is handed out again, even one being exchanged now."""
        with self._lock:
            self._task_epochs[task_id] = self._task_epochs.get(task_id, 0) + 1
            for key in [k for k in self._cache if k.task_id == task_id]:
                del self._cache[key]

    def invalidate(self, token: str) -> None:
        """Forget one token (a resource server answered ``invalid_token``: revoked or expired early)."""
        with self._lock:
            for key in [k for k, v in self._cache.items() if v.value == token]:
                del self._cache[key]

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

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

    def _fresh(self, key: _CacheKey) -> AccessToken | None:
        token = self._cache.get(key)
        if token is None:
            return None
        if token.usable(self._clock(), self._refresh_margin):
            return token
        del self._cache[key]
        return None

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, v in self._cache.items() if not v.usable(now, self._refresh_margin)]:
            del self._cache[key]

    def _exchange(self, want: TokenRequest) -> AccessToken:
        """One RFC 8693 exchange (with retries); the JWT-SVIDs are fetched fresh for it."""
        form: dict[str, str] = {
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token_type": TOKEN_TYPE_JWT,
            "subject_token": self._svids.jwt_svid(self.issuer),
            "scope": " ".join(sorted(want.scopes)),
        }
        if want.audience is not None:
            form["audience"] = want.audience
        else:
            form["resource"] = str(want.resource)
        if want.task_id is not None:
            form["task_id"] = want.task_id
        endpoint = self.token_endpoint
        if want.client_assertion:
            # RFC 7523 §3: audience = the token endpoint URL, so a SPIRE agent (one cached SVID per
            # audience set) hands out an SVID distinct from the subject token.
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE_JWT_SPIFFE
            form["client_assertion"] = self._svids.jwt_svid(endpoint)
        if want.mtls:
            if self.mtls_token_endpoint is None:
                raise ValueError("mtls needs mtls_token_endpoint (the STS's TLS listener)")
            endpoint = self.mtls_token_endpoint

        def headers() -> dict[str, str]:
            # A new proof per attempt: the STS refuses a replayed jti.
            return {"DPoP": want.dpop.proof("POST", endpoint)} if want.dpop is not None else {}

        started = self._clock()
        body = self._call("POST", endpoint, data=form, headers=headers, tls=want.mtls)
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
        body = {
            "assignee": assignee,
            "targets": [{"target": t, "scopes": sorted(s)} for t, s in targets.items()],
            "purpose": purpose,
            "ttl_seconds": ttl_seconds,
        }
        return self._call_as_caller("POST", f"{self.issuer}/tasks", json=body)

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
        """One request with bounded retries of 429/503 and connection failures; errors as ``sts.errors``.

        A retry never comes before ``Retry-After``; when the server asks for a longer wait than
        ``max_retry_wait`` the refusal is raised at once (a spent task budget says "until the deadline").
        """
        extra: dict[str, Any] = {}
        if tls:
            identity = self._tls_identity()
            extra = {"cert": (identity.cert_file, identity.key_file), "verify": self._server_ca_file()}
        for attempt in range(1, self._max_attempts + 1):
            backoff = min(self._max_retry_wait, 0.2 * 2 ** (attempt - 1))
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
                self._sleep(backoff)
                continue
            body = _json_or_none(response)
            if 200 <= response.status_code < 300:
                return body if isinstance(body, dict) else {}
            error = error_from_response(response.status_code, body, response.headers)
            if response.status_code not in RETRIED_STATUSES or attempt == self._max_attempts:
                raise error
            wait = max(backoff, float(_retry_after(response.headers) or 0))
            if wait > self._max_retry_wait:
                raise error
            log.info("the STS answered %s; retrying in %.1fs", response.status_code, wait)
            self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _tls_identity(self) -> _TlsIdentity:
        """The current X.509-SVID in memory files; re-fetched after half its lifetime."""
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
            cert, key_file = MemoryFile(cert_pem, "svid.pem"), MemoryFile(key_pem, "svid.key")
            identity = _TlsIdentity(cert, key_file, x5t, refresh_at=begins + (ends - begins) / 2)
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

    def close(self) -> None:
        if self._owns_session:
            self._session.close()
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

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _refused_token(www_authenticate: str | None) -> bool:
    """RFC 6750 §3.1 / RFC 9449 §7.1: the resource server says the token itself is no good."""
    return www_authenticate is not None and 'error="invalid_token"' in www_authenticate


class RequestsTokenAuth(requests.auth.AuthBase):
    """``requests`` auth: the right token for every request (cached), with a fresh DPoP proof each time.

    A ``401`` with ``error="invalid_token"`` makes the client forget that token, so the next request
    exchanges anew (and learns from the STS if the task has ended). For an ``mtls`` token, give the
    session the same certificate: ``session.cert = client.client_certificate_files()``.
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
        if response.status_code == 401 and _refused_token(response.headers.get("WWW-Authenticate")):
            self._client.invalidate(_presented(response.request.headers.get("Authorization")))
        return response


class HttpxTokenAuth(httpx.Auth):
    """``httpx`` auth (sync and async clients): like :class:`RequestsTokenAuth`.

    In an async client the exchange, which blocks, runs in a worker thread.
    """

    def __init__(self, client: TokenClient, want: TokenRequest | None = None, **wanted: Any) -> None:
        """``want``, or the keyword arguments of :meth:`TokenClient.token`, say which token to attach."""
        self._client = client
        self._want = want if want is not None else TokenRequest.of(**wanted)

    def _apply(self, request: httpx.Request, token: AccessToken) -> None:
        request.headers.update(token.headers(request.method, str(request.url)))

    def _after(self, response: httpx.Response) -> None:
        if response.status_code == 401 and _refused_token(response.headers.get("WWW-Authenticate")):
            self._client.invalidate(_presented(response.request.headers.get("Authorization")))

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._apply(request, self._client.get(self._want))
        response = yield request
        self._after(response)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await anyio.to_thread.run_sync(self._client.get, self._want)
        self._apply(request, token)
        response = yield request
        self._after(response)


def _presented(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer|DPoP <token>`` header."""
    return (authorization or "").partition(" ")[2].strip()
