"""The RFC 8693 token-exchange grant: a parsed request in, a signed access token (or a refusal) out.

Steps in order (DESIGN.md): parse → authenticate the client (optional) → verify subject and actor
JWT-SVIDs → resolve the one target in the catalog → scopes → task → Cedar policy → mint an RFC 9068
``at+jwt`` with the class's key → audit. Every refusal is an :class:`~sts.errors.StsError`; nothing is
signed on an error path, and every decision, issued or refused, is audited.

Delegation rules (RFC 8693 §1.1, §2.1, §4.1, §4.4), each closing a way to act for someone who did not
take part:

- A token we issued that is bound (``cnf``) is a subject or actor token only with the proof its
  ``cnf`` demands on this request: a DPoP proof made with the key of ``cnf.jkt`` (RFC 9449 §6, §7.1),
  the TLS client certificate of ``cnf.x5t#S256`` (RFC 8705 §3). Holding a copy proves nothing.
- A JWT-SVID actor token names this issuer as its only audience (one also sent elsewhere could be
  replayed from there). A token we issued is an actor token only when the client authenticates on this
  request (mTLS X.509-SVID or ``jwt-spiffe`` client assertion) as its ``sub``, it is that workload's own
  token (no ``act``; its ``client_id`` is its ``sub``), and its audience is the target of this exchange.
- A token we issued is a subject token only with an actor that serves its audience or that its
  ``may_act`` names; a ``may_act`` that is not ``{"sub": "<SPIFFE ID>"}`` refuses the exchange.
- Re-exchanging never crosses token class (tool → data, data → tool) unless policy opens that crossing
  explicitly (``@allow_class_crossing``, see :mod:`sts.policy`); crossings are audited as such.

Knows nothing of HTTP: it must not import Flask or ``sts.web``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from sts.audit import AuditLog
from sts.binding import DpopProof, DpopVerifier, certificate_thumbprint
from sts.catalog import Catalog, CatalogEntry, is_scope_token
from sts.client_auth import has_client_assertion, verify_client_assertion
from sts.config import LimitSettings
from sts.errors import (
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    InvalidToken,
    RateLimited,
    StsError,
    TemporarilyUnavailable,
    UnsupportedGrantType,
)
from sts.keys import KeyRing
from sts.policy import SVID_SUBJECT, Decision, Policy, PolicyRequest, TaskFacts
from sts.rate_lease import BackgroundRunner, RateLimiter
from sts.spiffeid import SpiffeId, SpiffeIdError
from sts.store import RETENTION_SECONDS, Budget, Store, SubjectRevocation, TaskRecord, TokenRecord
from sts.svid import JwtSvidVerifier, X509SvidVerifier
from sts.tasks import TaskService
from sts.token_index import TokenIndexWriter

log = logging.getLogger(__name__)

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
REQUESTABLE_TOKEN_TYPES = (TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT)
PARTY_TOKEN_TYPES = (TOKEN_TYPE_JWT, TOKEN_TYPE_ACCESS_TOKEN)
MULTI_VALUED = frozenset({"audience", "resource"})
MIN_LIFETIME_SECONDS = 1
# Parameters that end up in tokens and audit lines are bounded; tokens are bounded by the verifier.
MAX_PARAMETER_CHARS = {"task_id": 256, "client_id": 2048, "audience": 2048, "resource": 2048, "scope": 2048}


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    """The parameters of one ``POST /token``, parsed once (RFC 6749 §3.2, RFC 8693 §2.1)."""

    grant_type: str
    subject_token: str | None = None
    subject_token_type: str | None = None
    audiences: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    scope: str = ""
    requested_token_type: str = TOKEN_TYPE_ACCESS_TOKEN
    actor_token: str | None = None
    actor_token_type: str | None = None
    task_id: str | None = None
    client_id: str | None = None
    client_assertion: str | None = None
    client_assertion_type: str | None = None
    # Set by the HTTP layer, never from the form: the DPoP header and the TLS client certificate chain.
    dpop_proof: str | None = None
    client_certificates: tuple[x509.Certificate, ...] = ()

    @classmethod
    def from_form(
        cls,
        form: Mapping[str, Sequence[str]],
        *,
        dpop_proof: str | None = None,
        client_certificates: tuple[x509.Certificate, ...] = (),
    ) -> ExchangeRequest:
        """Parse a form body: duplicated parameters other than audience/resource are refused
        (RFC 6749 §3.1), empty values count as omitted, unknown parameters are ignored (§3.2).
        ``dpop_proof`` and ``client_certificates`` are what the HTTP layer saw outside the form."""
        values: dict[str, str] = {}
        for name, items in form.items():
            limit = MAX_PARAMETER_CHARS.get(name)
            if limit is not None and any(len(v) > limit for v in items):
                raise InvalidRequest(f"parameter '{name}' is longer than {limit} characters")
            if name in MULTI_VALUED:
                continue
            if len(items) > 1:
                raise InvalidRequest(f"parameter '{name}' must not be repeated")
            if items and items[0] != "":
                values[name] = items[0]
        grant_type = values.get("grant_type")
        if grant_type is None:
            raise InvalidRequest("missing parameter 'grant_type'")
        return cls(
            grant_type=grant_type,
            subject_token=values.get("subject_token"),
            subject_token_type=values.get("subject_token_type"),
            audiences=tuple(v for v in form.get("audience", ()) if v),
            resources=tuple(v for v in form.get("resource", ()) if v),
            scope=values.get("scope", ""),
            requested_token_type=values.get("requested_token_type", TOKEN_TYPE_ACCESS_TOKEN),
            actor_token=values.get("actor_token"),
            actor_token_type=values.get("actor_token_type"),
            task_id=values.get("task_id"),
            client_id=values.get("client_id"),
            client_assertion=values.get("client_assertion"),
            client_assertion_type=values.get("client_assertion_type"),
            dpop_proof=dpop_proof,
            client_certificates=client_certificates,
        )


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """The RFC 8693 §2.2.1 success response."""

    access_token: str
    expires_in: int
    scope: str
    token_type: str = "Bearer"
    issued_token_type: str = TOKEN_TYPE_ACCESS_TOKEN
    jti: str = ""
    # For the one log line per issued token (never the token itself): who, for what, bound how.
    subject: str = ""
    target: str = ""
    token_class: str = ""
    task_id: str | None = None
    binding: str = "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "issued_token_type": self.issued_token_type,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
            "scope": self.scope,
        }


@dataclass(frozen=True, slots=True)
class Party:
    """A verified subject or actor: from a JWT-SVID (``token_class`` ``svid``), or a token we issued.

    ``audience`` is the SVID's ``aud`` list, or the one target of an issued token; ``may_act`` is the
    one actor RFC 8693 §4.4 allows, already checked to be well formed.
    """

    spiffe_id: SpiffeId
    expiry: int
    token_class: str = SVID_SUBJECT
    audience: tuple[str, ...] = ()
    act: dict[str, Any] | None = None
    may_act: SpiffeId | None = None
    task_id: str | None = None
    client_id: str | None = None

    @property
    def issued(self) -> bool:
        """A token this server issued (re-exchanged), not a JWT-SVID."""
        return self.token_class != SVID_SUBJECT


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who called, when the client authenticated (draft-ietf-oauth-spiffe-client-auth); ``x5t`` for mTLS."""

    spiffe_id: SpiffeId
    method: str
    x5t: str | None = None


@dataclass(slots=True)
class _Trail:
    """What one exchange learned so far; becomes its audit record, allowed or refused."""

    request_id: str
    fields: dict[str, Any] = field(default_factory=dict)


class TokenExchange:
    """The grant itself; one instance per process, shared by all requests (no per-request state)."""

    def __init__(
        self,
        *,
        issuer: str,
        verifier: JwtSvidVerifier,
        catalog: Catalog,
        policy: Policy,
        keys: KeyRing,
        audit: AuditLog,
        max_ttl: int,
        store: Store,
        tasks: TaskService,
        limits: LimitSettings,
        dpop: DpopVerifier,
        x509: X509SvidVerifier,
        token_urls: tuple[str, ...],
        issued_claims: Callable[[str, float], dict[str, Any] | None],
        max_delegation_depth: int,
        assertion_verifiers: Sequence[JwtSvidVerifier] = (),
        rate: RateLimiter | None = None,
        index: TokenIndexWriter | None = None,
    ) -> None:
        # Both keep the store writes of a plain exchange off its path (sts.rate_lease, sts.token_index).
        self._rate_ahead = BackgroundRunner() if rate is None else None  # ours to stop at close
        self.rate = rate if rate is not None else RateLimiter(store, ahead=self._rate_ahead)
        self.index = index if index is not None else TokenIndexWriter(store)
        self.issued_claims = issued_claims
        self.max_delegation_depth = max_delegation_depth
        self.dpop = dpop
        self.x509 = x509
        self.token_urls = token_urls
        self.store = store
        self.tasks = tasks
        self.limits = limits
        self.issuer = issuer
        self.verifier = verifier
        # jwt-spiffe client assertions: audience = the issuer, or one of this listener's token URLs.
        self.assertion_verifiers = tuple(assertion_verifiers) or (verifier,)
        self.catalog = catalog
        self.policy = policy
        self.keys = keys
        self.audit = audit
        self.max_ttl = max_ttl

    def close(self) -> None:
        """Stop the rate limit's leases ahead and write the token index entries still queued (a
        graceful stop loses none), both before the store closes."""
        if self._rate_ahead is not None:
            self._rate_ahead.close()
        self.index.close()

    def exchange(
        self,
        request: ExchangeRequest,
        *,
        request_id: str,
        now: float | None = None,
        anonymous_refusal: Callable[[StsError, float], StsError | None] | None = None,
    ) -> IssuedToken:
        """Run every check and mint the token; audits the outcome either way.

        ``anonymous_refusal`` (the HTTP layer's per-source budget, ``sts.refusal_limit``) is asked
        about refusals met before any credential verified (no subject, no client): when it returns
        an error, that error is raised instead and no audit line is written for this request.
        """
        current = time.time() if now is None else now
        trail = _Trail(request_id)
        try:
            issued = self._exchange(request, trail, current)
        except StsError as e:
            authenticated = "spiffe_id" in trail.fields or "client_id" in trail.fields
            if anonymous_refusal is not None and not authenticated:
                limited = anonymous_refusal(e, current)
                if limited is not None:
                    raise limited from e
            self.record_refusal(e, request_id=request_id, fields=trail.fields, now=current)
            raise
        except Exception:
            # Not a refusal but a bug; it still leaves its audit line before the web layer answers 500.
            self.record_refusal(StsError(), request_id=request_id, fields=trail.fields, now=current)
            raise
        self.audit.record(
            {"event": "token_exchange", "decision": "allow", "request_id": request_id, **trail.fields},
            now=current,
        )
        return issued

    def record_refusal(
        self,
        error: StsError,
        *,
        request_id: str,
        fields: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        """Audit one refused exchange, also those refused before they could be parsed (by the HTTP layer)."""
        self.audit.record(
            {
                "event": "token_exchange",
                "decision": "deny",
                "request_id": request_id,
                "error": error.error,
                "error_description": error.description,
                "rule": getattr(error, "rule", None),
                **(fields or {}),
            },
            now=now,
        )

    def _exchange(self, request: ExchangeRequest, trail: _Trail, now: float) -> IssuedToken:
        subject_token, subject_token_type = _check_shape(request)
        client = self._authenticate_client(request, now)
        if client is not None:
            trail.fields.update(client_id=str(client.spiffe_id), client_auth=client.method)
        dpop = (
            self.dpop.verify(request.dpop_proof, method="POST", urls=self.token_urls, now=now)
            if request.dpop_proof is not None
            else None
        )
        proven = _confirmation(dpop, client)
        # RFC 7800 §3.1: a cnf names one key. With a DPoP proof on an mTLS connection the certificate
        # authenticates the client and the token is bound to the DPoP key (RFC 9449 §6).
        cnf = {"jkt": proven["jkt"]} if "jkt" in proven else proven
        binding = "dpop" if dpop else ("mtls" if cnf else "none")
        if cnf:
            trail.fields["binding"] = binding

        subject = self._party(subject_token, subject_token_type, "subject_token", proven, now)
        trail.fields["spiffe_id"] = str(subject.spiffe_id)
        if subject.issued:
            trail.fields["subject_token_class"] = subject.token_class
        self._check_rate(subject.spiffe_id, now)
        actor = self._verify_actor(request, client, proven, now)
        if actor is not None:
            trail.fields["actor"] = str(actor.spiffe_id)
        act = self._delegation(subject, actor)
        if act is not None:
            trail.fields["act"] = act
        client_id = self._check_client_binding(request, client, subject, actor)
        # The subject's kill switch and its exceptions in one store read (one round trip on Redis).
        checks = self.store.issuance_checks(str(subject.spiffe_id))
        _refuse_if_cut_off(checks.revocation, "subject_token", now)
        if actor is not None:
            _refuse_if_cut_off(self.store.subject_revocation(str(actor.spiffe_id)), "actor_token", now)

        entry = self.catalog.resolve(request.audiences, request.resources)
        trail.fields.update(target=entry.id, token_class=entry.token_class.value)
        if actor is not None and actor.issued and actor.audience != (entry.id,):
            # RFC 9068 §4 audience restriction: the actor's token is good for its own target only.
            raise InvalidRequest(
                f"actor_token: its audience is {actor.audience[0]}, not the target of this exchange "
                "(a token issued by this server acts only towards the target it was issued for)"
            )
        scopes = self.catalog.check_scopes(entry, _parse_scope(request.scope))
        trail.fields["scopes"] = sorted(scopes)

        if subject.task_id is not None and request.task_id not in (None, subject.task_id):
            raise InvalidRequest("a token issued under a task can only be exchanged within that task")
        task = None
        if request.task_id is not None:
            trail.fields["task_id"] = request.task_id
            task = self.tasks.check_for_exchange(request.task_id, subject.spiffe_id, entry.id, scopes, now)
        # Break-glass is for the named workload itself: never lent to an actor working through it.
        exception = None
        if actor is None:
            exception = next(
                (
                    grant
                    for grant in checks.exceptions
                    if grant.active(now) and grant.target == entry.id and scopes <= grant.scopes
                ),
                None,
            )
        if exception is not None:
            trail.fields["exception_id"] = exception.id

        policy_request = PolicyRequest(
            principal=subject.spiffe_id,
            target=entry,
            scopes=scopes,
            now=int(now),
            client_auth=client.method if client else "none",
            task=_task_facts(task),
            actor=actor.spiffe_id if actor else None,
            actors=frozenset(actor_chain(act)),
            binding=binding,
            break_glass=exception is not None,
            subject_token_class=subject.token_class,
        )
        decision = self._decide(policy_request, trail)

        budget = (
            Budget(
                f"budget:{task.id}",
                limit=self.limits.tokens_per_task,
                expires_at=task.deadline + RETENTION_SECONDS,
            )
            if task is not None
            else None
        )
        return self._mint(
            entry,
            scopes,
            subject,
            actor,
            task,
            requested_token_type=request.requested_token_type,
            client_id=client_id,
            cnf=cnf,
            act=act,
            # Conservative: any token issued while an exception applied ends with the exception.
            not_after=exception.expires_at if exception is not None else None,
            policy_ttl=decision.ttl_seconds,
            trail=trail,
            now=now,
            budget=budget,
            exception_id=exception.id if exception is not None else None,
        )

    def _decide(self, request: PolicyRequest, trail: _Trail) -> Decision:
        """Ask policy (step 6): refuse unless every scope is permitted and any class crossing is opened.

        The crossing check is a second default deny after Cedar's: a ``tool`` token re-exchanged for a
        ``data`` target (or the reverse) needs a determining permit that carries
        ``@allow_class_crossing`` for exactly that crossing; it is audited whether refused or allowed.
        """
        crossing = request.class_crossing
        if crossing is not None:
            trail.fields["class_crossing"] = crossing
        decision = self.policy.decide(request)
        trail.fields["policy_ids"] = list(decision.policy_ids)
        if decision.errors:
            # A policy that cannot be evaluated is a dependency down: refuse, and let operators see why.
            trail.fields["policy_errors"] = list(decision.errors)
            raise TemporarilyUnavailable("policy could not be evaluated", detail="; ".join(decision.errors))
        if not decision.allowed:
            trail.fields["denied_scopes"] = list(decision.denied_scopes)
            wanted = " ".join(sorted(request.scopes))
            raise InvalidTarget(
                f"policy does not permit {request.principal} to use {request.target.id} with scope {wanted}",
                detail=decision.reason,
            )
        if crossing is not None and crossing not in decision.class_crossings:
            raise InvalidTarget(
                f"subject_token: a {request.subject_token_class} token is not exchanged for a "
                f"{request.target.token_class.value} token unless policy explicitly permits the crossing",
                detail=f"{crossing} is not opened by an @allow_class_crossing permit ({decision.reason})",
            )
        return decision

    def _mint(
        self,
        entry: CatalogEntry,
        scopes: frozenset[str],
        subject: Party,
        actor: Party | None,
        task: TaskRecord | None,
        *,
        requested_token_type: str,
        client_id: str,
        cnf: dict[str, str],
        act: dict[str, Any] | None,
        not_after: int | None,
        policy_ttl: int | None,
        trail: _Trail,
        now: float,
        budget: Budget | None = None,
        exception_id: str | None = None,
    ) -> IssuedToken:
        """Build the RFC 9068 claims and sign them; ``exp`` never outlives the subject SVID (DESIGN.md).

        The token is indexed for the operators' live view. A task token in the same store write that
        takes the task's budget (``Store.record_token``), so a task exchange costs no extra round trip;
        a spent budget refuses (429) with nothing recorded. A token issued under an exception is also
        recorded before it is returned: withdrawing the exception finds it there to revoke it. Any other
        token's entry is queued and written in a batch (:mod:`sts.token_index`): the token is
        verifiable and revocable without it.
        """
        issued_at = int(now)
        lifetimes = [entry.max_ttl, self.max_ttl] + ([policy_ttl] if policy_ttl is not None else [])
        # A delegated token lives no longer than either party's SVID.
        # Never past either party's SVID, nor past the task's deadline.
        bounds = [subject.expiry] + ([actor.expiry] if actor else []) + ([task.deadline] if task else [])
        if not_after is not None:
            bounds.append(not_after)  # a token opened by an exception ends with it
        expires_at = min(issued_at + min(lifetimes), *bounds)
        if expires_at - issued_at < MIN_LIFETIME_SECONDS:
            raise InvalidRequest("subject_token: expires too soon to issue a token from it")
        jti = secrets.token_urlsafe(16)
        scope = " ".join(sorted(scopes))
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": str(subject.spiffe_id),
            "aud": entry.id,
            "client_id": client_id,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": expires_at,
            "jti": jti,
            "scope": scope,
            "token_class": entry.token_class.value,
        }
        if task is not None:
            claims["task_id"] = task.id
        elif subject.task_id is not None:
            # Delegating a task-scoped token keeps it in the task: completing the task ends this one too.
            claims["task_id"] = subject.task_id
        if cnf:
            claims["cnf"] = cnf
        if act is not None:
            claims["act"] = act
        binding = "dpop" if "jkt" in cnf else ("mtls" if cnf else "none")
        record = TokenRecord(
            jti=jti,
            spiffe_id=claims["sub"],
            target=entry.id,
            token_class=entry.token_class.value,
            issued_at=issued_at,
            expires_at=expires_at,
            binding=binding,
            task_id=claims.get("task_id"),
            exception_id=exception_id,
        )
        if budget is None and exception_id is None:
            self.index.add(record)
        elif not self.store.record_token(record, budget=budget):
            # Only a budget (so a task) refuses.
            raise RateLimited(
                f"the task's token budget ({self.limits.tokens_per_task}) is spent",
                retry_after=max(1, int((task.deadline if task else expires_at) - now)),
            )
        token = self.keys.sign(entry.token_class, claims)
        trail.fields.update(jti=jti, exp=expires_at, kid=self.keys.active(entry.token_class).kid)
        return IssuedToken(
            access_token=token,
            expires_in=expires_at - issued_at,
            scope=scope,
            token_type="DPoP" if "jkt" in cnf else "Bearer",
            issued_token_type=requested_token_type,
            jti=jti,
            subject=claims["sub"],
            target=entry.id,
            token_class=entry.token_class.value,
            task_id=claims.get("task_id"),
            binding=binding,
        )

    def _check_rate(self, spiffe_id: SpiffeId, now: float) -> None:
        """Exchanges per workload per second, leased from the shared store (:mod:`sts.rate_lease`): never
        more than the limit across replicas, and most exchanges of a busy workload write nothing."""
        if not self.rate.admit(f"rate:{spiffe_id}", limit=self.limits.per_workload_per_second, now=now):
            raise RateLimited(
                f"more than {self.limits.per_workload_per_second} exchanges per second from this workload",
                retry_after=1,
            )


    def _authenticate_client(self, request: ExchangeRequest, now: float) -> ClientIdentity | None:
        """mTLS with an X.509-SVID, or a ``jwt-spiffe`` client assertion (a JWT-SVID for this issuer only)."""
        assertion = has_client_assertion(request.client_assertion, request.client_assertion_type)
        if request.client_certificates:
            if assertion:
                raise InvalidRequest("authenticate the client one way: TLS certificate or client assertion")
            try:
                certificate = self.x509.verify(request.client_certificates, now=now)
            except InvalidToken as e:
                raise InvalidClient(f"client certificate: {e.description}", detail=e.detail) from e
            thumbprint = certificate_thumbprint(certificate.leaf)
            return ClientIdentity(certificate.spiffe_id, "spiffe_x509", thumbprint)
        if not assertion:
            return None
        svid = verify_client_assertion(
            self.assertion_verifiers, request.client_assertion, request.client_assertion_type, now=now
        )
        if request.client_assertion in (request.subject_token, request.actor_token):
            # Replaying the subject's own bearer SVID proves nothing more than holding it. A SPIRE agent
            # returns one cached SVID per audience set: ask for the assertion with aud = token endpoint.
            raise InvalidClient(
                "client_assertion must be a JWT-SVID of its own, not the subject or actor token: fetch it "
                "with the token endpoint URL as audience (a SPIRE agent caches one SVID per audience)"
            )
        return ClientIdentity(svid.spiffe_id, "spiffe_jwt")

    def _check_client_binding(
        self,
        request: ExchangeRequest,
        client: ClientIdentity | None,
        subject: Party,
        actor: Party | None,
    ) -> str:
        """The ``client_id`` of the token: the authenticated client, else the subject workload itself.

        An unauthenticated ``client_id`` can only name the subject; an authenticated client must be
        the subject or, when delegating, the actor (draft-ietf-oauth-spiffe-client-auth).
        """
        if request.client_id is not None:
            try:
                claimed = SpiffeId.parse(request.client_id)
            except SpiffeIdError as e:
                raise InvalidClient("client_id must be the client's SPIFFE ID") from e
            expected = client.spiffe_id if client else subject.spiffe_id
            if claimed != expected:
                raise InvalidClient("client_id does not match the authenticated client")
        if client is None:
            return str(subject.spiffe_id)
        allowed = {subject.spiffe_id} | ({actor.spiffe_id} if actor else set())
        if client.spiffe_id not in allowed:
            raise InvalidClient("the authenticated client is neither the subject nor the actor")
        return str(client.spiffe_id)

    def _verify_actor(
        self, request: ExchangeRequest, client: ClientIdentity | None, proven: Mapping[str, str], now: float
    ) -> Party | None:
        """RFC 8693 §2.1 ``actor_token``: proof that the actor itself takes part in this request.

        A JWT-SVID is the actor's own proof of identity, but only if this issuer is its only audience:
        an SVID also sent to another audience can be replayed by that audience to pose as the actor.
        A token we issued proves nothing of who presents it (its audience received a copy), so it is an
        actor token only when the client authenticates as its subject on this request (mTLS X.509-SVID
        or ``jwt-spiffe`` client assertion), and only as that workload's own token: not a delegated one
        (its subject did not act) nor one another client holds. Its audience is checked against the
        target once it is resolved (:meth:`_exchange`).
        """
        if request.actor_token is None and request.actor_token_type is None:
            return None
        if request.actor_token is None or request.actor_token_type is None:
            raise InvalidRequest("actor_token and actor_token_type go together (RFC 8693 §2.1)")
        if request.actor_token_type not in PARTY_TOKEN_TYPES:
            raise InvalidRequest("actor_token_type must be " + " or ".join(PARTY_TOKEN_TYPES))
        actor = self._party(request.actor_token, request.actor_token_type, "actor_token", proven, now)
        if not actor.issued:
            if actor.audience != (self.issuer,):
                raise InvalidRequest(
                    "actor_token: a JWT-SVID actor token must have this issuer as its only audience"
                )
            return actor
        if client is None or client.spiffe_id != actor.spiffe_id:
            raise InvalidRequest(
                "actor_token: a token issued by this server is an actor token only when the client "
                "authenticates (mTLS X.509-SVID or jwt-spiffe client_assertion) as its subject"
            )
        if actor.act is not None or actor.client_id != str(actor.spiffe_id):
            raise InvalidRequest(
                "actor_token: must be the actor's own token, "
                "not one issued by delegation or to another client"
            )
        return actor

    def _party(
        self, token: str, token_type: str, parameter: str, proven: Mapping[str, str], now: float
    ) -> Party:
        """A JWT-SVID, or an active token this server issued (delegation: it brings its ``act`` chain).

        ``proven`` is the ``cnf`` this request proved (:func:`_confirmation`): an issued token bound to
        a key is usable only with the proof of that key (RFC 9449 §7.1, RFC 8705 §3).
        """
        if token_type == TOKEN_TYPE_ACCESS_TOKEN:
            claims = self.issued_claims(token, now)
            if claims is None:
                raise InvalidRequest(f"{parameter}: not an active token issued by this server")
            _check_possession(claims.get("cnf"), proven, parameter)
            return Party(
                spiffe_id=SpiffeId.parse(claims["sub"]),
                expiry=int(claims["exp"]),
                token_class=claims["token_class"],
                audience=(claims["aud"],),
                act=claims.get("act"),
                may_act=_may_act(claims, parameter),
                task_id=claims.get("task_id"),
                client_id=claims.get("client_id"),
            )
        try:
            svid = self.verifier.verify(token, now=now)
        except InvalidToken as e:
            raise e.for_parameter(parameter) from e
        return Party(
            svid.spiffe_id, svid.expiry, audience=svid.audience, may_act=_may_act(svid.claims, parameter)
        )

    def _delegation(self, subject: Party, actor: Party | None) -> dict[str, Any] | None:
        """RFC 8693 §4.1/§4.4: the new ``act``: this actor, with the chain the subject token carried inside.

        A token we issued can be a subject only for delegation, and only by a workload that serves its
        audience (the one it was sent to) or that its ``may_act`` names. Chains are bounded in depth.
        """
        if actor is None:
            if subject.issued:
                raise InvalidRequest("a token issued by this server is a subject only with an actor_token")
            return None
        if subject.may_act is not None and subject.may_act != actor.spiffe_id:
            raise InvalidRequest("the subject token's may_act does not name this actor")
        if subject.issued and subject.may_act is None:
            entry = self.catalog.get(subject.audience[0])
            if entry is None or actor.spiffe_id not in entry.resource_servers:
                raise InvalidRequest("only a service the subject token was issued to may act with it")
        act: dict[str, Any] = {"sub": str(actor.spiffe_id)}
        if subject.act is not None:
            act["act"] = subject.act
        if len(actor_chain(act)) > self.max_delegation_depth:
            raise InvalidRequest(f"the delegation chain is longer than {self.max_delegation_depth} actors")
        return act


def _check_shape(request: ExchangeRequest) -> tuple[str, str]:
    """RFC 8693 §2.1: the grant, the subject token and the token types this server handles."""
    if request.grant_type != GRANT_TYPE_TOKEN_EXCHANGE:
        raise UnsupportedGrantType(f"only {GRANT_TYPE_TOKEN_EXCHANGE} is supported here")
    if request.subject_token is None:
        raise InvalidRequest("missing parameter 'subject_token'")
    if request.subject_token_type is None:
        raise InvalidRequest("missing parameter 'subject_token_type'")
    if request.subject_token_type not in PARTY_TOKEN_TYPES:
        raise InvalidRequest("subject_token_type must be " + " or ".join(PARTY_TOKEN_TYPES))
    if request.requested_token_type not in REQUESTABLE_TOKEN_TYPES:
        raise InvalidRequest("requested_token_type must be " + " or ".join(REQUESTABLE_TOKEN_TYPES))
    return request.subject_token, request.subject_token_type


def actor_chain(act: Any) -> list[str]:
    """Every actor of a nested ``act`` claim, current first (only our own signed claims get here)."""
    actors: list[str] = []
    while isinstance(act, Mapping) and isinstance(act.get("sub"), str):
        actors.append(act["sub"])
        act = act.get("act")
    return actors


def _may_act(claims: Mapping[str, Any], parameter: str) -> SpiffeId | None:
    """RFC 8693 §4.4 ``may_act``: exactly ``{"sub": "<SPIFFE ID>"}``, or absent; anything else refuses.

    Fail closed: a ``may_act`` we cannot read must not read as "anyone may act", and ignoring members
    we do not match (``iss`` …) would widen the party it names, so they are refused too.
    """
    if "may_act" not in claims:
        return None
    may_act = claims["may_act"]
    problem = f'{parameter}: may_act must be an object {{"sub": "<SPIFFE ID>"}} (RFC 8693 §4.4)'
    if not isinstance(may_act, Mapping) or may_act.keys() != {"sub"} or not isinstance(may_act["sub"], str):
        raise InvalidRequest(problem)
    try:
        return SpiffeId.parse(may_act["sub"])
    except SpiffeIdError as e:
        raise InvalidRequest(f"{problem}: {e}") from e


def _check_possession(cnf: Any, proven: Mapping[str, str], parameter: str) -> None:
    """A bound token is usable only by whoever proves, on this request, the key its ``cnf`` names.

    RFC 9449 §6/§7.1: ``jkt`` needs this request's DPoP proof made with that key (the proof is fresh
    and single use, so it proves possession now). RFC 8705 §3: ``x5t#S256`` needs that very TLS client
    certificate on this connection. Every member must be met; a ``cnf`` we cannot check refuses.
    """
    if cnf is None:
        return
    if not isinstance(cnf, Mapping) or not cnf:
        raise InvalidRequest(f"{parameter}: its confirmation (cnf) cannot be checked")
    for member, value in cnf.items():
        if member == "jkt":
            if proven.get("jkt") != value:
                raise InvalidRequest(
                    f"{parameter}: bound to a DPoP key; send a DPoP proof made with that key"
                )
        elif member == "x5t#S256":
            if proven.get("x5t#S256") != value:
                raise InvalidRequest(
                    f"{parameter}: bound to a TLS client certificate; present that certificate (mTLS)"
                )
        else:
            raise InvalidRequest(f"{parameter}: its confirmation (cnf) cannot be checked")


def _confirmation(dpop: DpopProof | None, client: ClientIdentity | None) -> dict[str, str]:
    """RFC 9449 §6 ``jkt`` and RFC 8705 §3.1 ``x5t#S256``: every key the holder proved it has."""
    cnf: dict[str, str] = {}
    if dpop is not None:
        cnf["jkt"] = dpop.jkt
    if client is not None and client.x5t is not None:
        cnf["x5t#S256"] = client.x5t
    return cnf


def _task_facts(task: TaskRecord | None) -> TaskFacts | None:
    if task is None:
        return None
    return TaskFacts(task.id, task.purpose, SpiffeId.parse(task.creator), task.deadline)


def _parse_scope(scope: str) -> frozenset[str]:
    """RFC 6749 §3.3: space-delimited scope tokens."""
    scopes = frozenset(scope.split(" ")) - {""}
    if not all(is_scope_token(s) for s in scopes):
        raise InvalidScope("scope holds characters RFC 6749 §3.3 does not allow")
    return scopes


def _refuse_if_cut_off(revocation: SubjectRevocation | None, parameter: str, now: float) -> None:
    """The admin kill switch: no new token for a revoked SPIFFE ID until its end time."""
    if revocation is not None and revocation.blocks_issuance(now):
        raise InvalidRequest(f"{parameter}: access of this workload has been revoked by an administrator")
