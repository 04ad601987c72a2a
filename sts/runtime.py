"""Composition root: turns :class:`~sts.config.Settings` into the wired, typed parts of one server.

Everything that parses keys, bundles, policies or the catalog happens here, once per process, so no
request ever pays for it. A part that cannot be built raises ConfigError and start-up stops.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from sts.admin import Admin
from sts.audit import AuditLog
from sts.binding import DpopVerifier
from sts.callers import CallerAuthenticator
from sts.config import Settings, store_settings
from sts.errors import ConfigError, TemporarilyUnavailable
from sts.exchange import TokenExchange
from sts.introspection import Introspection
from sts.keys import KeyRing
from sts.metrics import Metrics
from sts.policy import CedarPolicy
from sts.refusal_limit import RefusalLimiter
from sts.store import RedisOptions, Store, StoreUnavailable
from sts.store.factory import open_store
from sts.svid import JwtSvidVerifier, X509SvidVerifier
from sts.tasks import TaskService
from sts.token_index import TokenIndexWriter
from sts.trust import BundleError, BundleSource, FileBundleSource, TrustStore
from sts.workload_api import WorkloadApiBundleSource, WorkloadApiWatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Services:
    """The parts one process serves with; built by :func:`build_services`."""

    settings: Settings
    trust: TrustStore
    keys: KeyRing
    policy: CedarPolicy
    audit: AuditLog
    exchange: TokenExchange
    store: Store
    callers: CallerAuthenticator
    tasks: TaskService
    introspection: Introspection
    admin: Admin
    refusals: RefusalLimiter
    watcher: WorkloadApiWatcher | None = None
    metrics: Metrics | None = None  # None: metrics.enabled is false (no /metrics, nothing counted)

    def readiness(self) -> Readiness:
        """What stops this process from serving correctly right now (no problems: ready), what an
        operator should know although it serves (warnings), and where each trust domain stands."""
        problems = self.trust.readiness()
        warnings: list[str] = []
        try:
            self.store.ping()
        except StoreUnavailable as e:
            log.warning("not ready: state store: %s", e.detail)
            problems.append(f"state store: {e.description}")
        # A store loss is a warning, not a problem: exchanges are refused (503) meanwhile, but the pods
        # must stay reachable for the admin's acknowledgement (POST /admin/store-loss/ack).
        warnings.extend(f"state store: {warning}" for warning in self.store.condition().warnings)
        from_workload_api = {t.trust_domain for t in self.settings.trust_domains if t.workload_api}
        domains: dict[str, dict[str, object]] = {}
        served_configured = 0
        for trust_domain in sorted(self.trust.trust_domains, key=str):
            # What the source says about itself: a file's path; a bundle endpoint's URL, profile,
            # sequence, last refresh, age, poll interval and last error (nothing for workload-api).
            details = self.trust.describe(trust_domain)
            source = (
                "workload-api" if trust_domain in from_workload_api else str(details.pop("source", "file"))
            )
            cache_error = details.get("cache_error")
            if cache_error is not None:
                warnings.append(
                    f"trust domain {trust_domain}: the last good bundle is not persisted ({cache_error}): a "
                    "restart while its bundle endpoint is down loses the trust domain"
                )
            try:
                bundle = self.trust.bundle_for(trust_domain)
            except TemporarilyUnavailable:
                domains[str(trust_domain)] = {"source": source, "available": False, **details}
                continue  # the trust store reported it
            jwt_keys = len(bundle.jwt_authorities) if bundle else 0
            x509_authorities = len(bundle.x509_authorities) if bundle else 0
            domains[str(trust_domain)] = {
                "source": source,
                "available": True,
                "jwt_authorities": jwt_keys,
                "x509_authorities": x509_authorities,
                **details,
            }
            if jwt_keys:
                served_configured += 1
            elif source == "workload-api":
                warnings.append(
                    f"trust domain {trust_domain} is configured (bundle: workload-api) but the Workload "
                    "API does not serve it: federate it with this SPIRE server, or remove it; its SVIDs "
                    "are refused"
                )
            else:
                problems.append(f"trust domain {trust_domain}: no JWT authorities")
        if not self.trust.trust_domains:
            problems.append("no trust domains are configured (trust_domains): no SVID can be verified")
        elif not served_configured and not problems:
            problems.append("no configured trust domain has JWT authorities: no SVID can be verified")
        if self.watcher is not None:
            problems.extend(p for p in self.watcher.stream_problems() if p not in problems)
        served = self.watcher.served_trust_domains() if self.watcher is not None else None
        return Readiness(problems, warnings, domains, served)

    def close(self) -> None:
        """Stop background streams and close the audit log (tests, and the parent of the workers)."""
        self.refusals.close(time.time())
        if self.watcher is not None:
            self.watcher.stop()
        self.trust.close()  # the bundle-endpoint pollers
        self.exchange.close()  # the queued token index entries, written before the store closes
        self.store.close()
        self.audit.close()


@dataclass(frozen=True, slots=True)
class Readiness:
    """``/readyz``: ready when ``problems`` is empty; ``served`` is every trust domain the Workload
    API delivers (None without a Workload API, or before its first update)."""

    problems: list[str]
    warnings: list[str]
    trust_domains: dict[str, dict[str, object]]
    served: list[str] | None

    def to_json(self) -> dict[str, object]:
        document: dict[str, object] = {
            "status": "ready" if not self.problems else "not ready",
            "problems": self.problems,
            "warnings": self.warnings,
            "trust_domains": self.trust_domains,
        }
        if self.served is not None:
            document["workload_api_serves"] = self.served
        return document


def build_trust_store(settings: Settings, *, connect: bool) -> tuple[TrustStore, WorkloadApiWatcher | None]:
    """One source per configured trust domain; Workload API domains share one watcher; each bundle
    endpoint domain polls in a thread of its own (:mod:`sts.bundle_endpoint`).

    ``connect=False`` checks the configuration without opening the Workload API streams or polling
    bundle endpoints (bundle files, CA files and persisted endpoint bundles are read): the parent of
    forked workers must not hold gRPC or poller threads, and ``sts config check`` connects to nothing.
    With ``connect=True`` an endpoint domain without a fresh persisted bundle waits (at most the
    fetch timeout) for its first poll, so a worker that can be ready starts ready.
    """
    from sts.bundle_endpoint import BundleEndpointSource, source_from_settings
    from sts.bundle_fetch import FETCH_TIMEOUT_SECONDS

    watcher = None
    tls = settings.listen.tls
    wanted = any(entry.workload_api for entry in settings.trust_domains) or (
        tls is not None and tls.cert is None
    )
    if wanted and settings.workload_api.socket:
        watcher = WorkloadApiWatcher(
            settings.workload_api.socket,
            max_staleness=settings.workload_api.max_staleness,
            server_name=urlsplit(tls.public_url).hostname if tls is not None and tls.cert is None else None,
        )
    sources: list[BundleSource] = []
    endpoints: list[BundleEndpointSource] = []
    for entry in settings.trust_domains:
        if entry.bundle_file is not None:
            try:
                sources.append(FileBundleSource(entry.trust_domain, entry.bundle_file))
            except (BundleError, OSError) as e:
                raise ConfigError(f"trust_domains.{entry.trust_domain}.bundle_file: {e}") from e
        elif entry.workload_api and watcher is not None:
            sources.append(WorkloadApiBundleSource(entry.trust_domain, watcher))
        elif entry.bundle_endpoint is not None:
            endpoint = source_from_settings(
                entry, default_max_staleness=settings.workload_api.max_staleness, keys_dir=settings.keys.dir
            )
            sources.append(endpoint)
            endpoints.append(endpoint)
        else:
            raise ConfigError(
                f"trust_domains.{entry.trust_domain}: bundle: workload-api needs workload_api.socket "
                "(or SPIFFE_ENDPOINT_SOCKET)"
            )
    if connect:
        if watcher is not None:
            watcher.start()
        for endpoint in endpoints:
            endpoint.start()
        deadline = time.monotonic() + FETCH_TIMEOUT_SECONDS + 1
        for endpoint in endpoints:
            if not endpoint.servable():
                endpoint.wait_first_attempt(max(0.0, deadline - time.monotonic()))
            if not endpoint.servable():
                log.warning(
                    "no trust bundle for %s from %s yet; not ready until it arrives",
                    endpoint.trust_domain,
                    endpoint.url,
                )
    if watcher is not None and connect and not watcher.wait_first_update(settings.workload_api.start_timeout):
        log.warning("no trust bundles from the Workload API yet; not ready until they arrive")
    return TrustStore(sources), watcher


def build_store(settings: Settings, audit: AuditLog) -> Store:
    """The store of ``store.url`` with its ``store.redis`` settings; store losses go to the audit log.

    A Redis store's durability is checked here (it connects once, also in the parent of the workers,
    which closes it again before they start): without a replica and without ``appendonly yes`` start-up
    is refused naming ``store.redis.require_durability``, or only warned about when it is false. A Redis
    that does not answer yet is checked again when it does (its security writes are refused meanwhile).
    """
    stored = store_settings(settings)
    redis = stored.redis
    for name, path in (
        ("password_file", redis.password_file),
        ("sentinel_password_file", redis.sentinel_password_file),
        ("tls_ca_file", redis.tls_ca_file),
    ):
        if path is None:
            continue
        try:
            path.read_bytes()
        except OSError as e:
            raise ConfigError(f"store.redis.{name}: cannot read {path}: {e.strerror}") from e
    options = RedisOptions(
        require_durability=redis.require_durability,
        wait_timeout=float(redis.wait_timeout),
        master_name=redis.master_name,
        username=redis.username,
        password_file=redis.password_file,
        sentinel_password_file=redis.sentinel_password_file,
        tls_ca_file=redis.tls_ca_file,
    )
    try:
        store = open_store(stored.url, redis=options, report=lambda event: audit.record(dict(event)))
    except ValueError as e:
        raise ConfigError(f"store.url: {e}") from e
    except StoreUnavailable as e:
        raise ConfigError(f"store.url: cannot open the store: {e.detail}") from e
    problem = store.check_durability()
    if problem is not None:
        if redis.require_durability:
            store.close()
            raise ConfigError(
                f"store.redis.require_durability: {problem}; or set store.redis.require_durability: false "
                "to start anyway"
            )
        log.warning("%s (store.redis.require_durability: false: starting anyway)", problem)
    return store


def build_services(settings: Settings, *, connect: bool = True) -> Services:
    """Wire every part; raises ConfigError naming what is wrong."""
    trust, watcher = build_trust_store(settings, connect=connect)
    try:
        keys = KeyRing.load_or_create(settings.keys)
    except OSError as e:
        raise ConfigError(f"keys.dir: cannot use {settings.keys.dir}: {e.strerror}") from e
    policy = CedarPolicy.from_directory(settings.policy_dir, settings.catalog)
    # Metrics observe the audit log: every counted decision is one audit record (sts.metrics).
    metrics = Metrics.from_settings(settings, policy.policy_ids) if settings.metrics.enabled else None
    try:
        audit = AuditLog(
            settings.audit_path,
            stdout=settings.audit_stdout,
            observers=(metrics.observe,) if metrics is not None else (),
        )
    except OSError as e:
        raise ConfigError(f"audit.path: cannot open {settings.audit_path}: {e.strerror}") from e
    store = build_store(settings, audit)
    token_index = TokenIndexWriter(store)  # plain tokens' index entries, written in batches
    tasks = TaskService(
        store=store,
        catalog=settings.catalog,
        policy=policy,
        audit=audit,
        max_ttl=settings.tasks.max_ttl,
        admins=settings.admins,
    )
    verifier = JwtSvidVerifier(
        trust,
        settings.issuer,
        leeway_seconds=settings.tokens.svid_leeway,
        max_token_bytes=settings.tokens.max_svid_bytes,
    )
    introspection = Introspection(
        issuer=settings.issuer, keys=keys, store=store, catalog=settings.catalog, audit=audit
    )
    x509_verifier = X509SvidVerifier(trust)
    token_urls = _token_urls(settings)
    # RFC 7523 §3: a client assertion names this issuer or the token endpoint it is sent to.
    tokens = settings.tokens
    assertion_verifiers = (
        verifier,
        *(
            JwtSvidVerifier(
                trust, url, leeway_seconds=tokens.svid_leeway, max_token_bytes=tokens.max_svid_bytes
            )
            for url in token_urls
        ),
    )
    exchange = TokenExchange(
        issuer=settings.issuer,
        verifier=verifier,
        assertion_verifiers=assertion_verifiers,
        catalog=settings.catalog,
        policy=policy,
        keys=keys,
        audit=audit,
        max_ttl=settings.tokens.max_ttl,
        store=store,
        tasks=tasks,
        limits=settings.limits,
        dpop=DpopVerifier(use_once=lambda key, expires_at: store.use_once(key, expires_at=expires_at)),
        x509=x509_verifier,
        issued_claims=introspection.active_claims,
        max_delegation_depth=settings.tokens.max_delegation_depth,
        token_urls=token_urls,
        index=token_index,
    )
    return Services(
        settings=settings,
        trust=trust,
        keys=keys,
        policy=policy,
        audit=audit,
        exchange=exchange,
        store=store,
        callers=CallerAuthenticator(verifier, settings.admins, store, x509_verifier),
        tasks=tasks,
        introspection=introspection,
        admin=Admin(
            store=store,
            catalog=settings.catalog,
            audit=audit,
            max_token_ttl=settings.tokens.max_ttl,
            index=token_index,
        ),
        refusals=RefusalLimiter(
            per_window=settings.limits.anonymous_refusals_per_minute,
            report=lambda source, count, start, end: audit.record(
                {
                    "event": "refusals_suppressed",
                    "decision": "deny",
                    "source": source,
                    "count": count,
                    "window_start": round(start, 3),
                    "window_end": round(end, 3),
                }
            ),
        ),
        watcher=watcher,
        metrics=metrics,
    )


def _token_urls(settings: Settings) -> tuple[str, ...]:
    """RFC 9449 §4.3 step 9: the DPoP ``htu`` must be the URL the request was sent to, so each
    listener accepts only its own token endpoint. The plain listener serves the issuer's URL; the TLS
    listener its ``public_url``, and the issuer's URL too when that is https (an ingress may route it
    there); never a plain-http issuer URL, which only the plain listener can serve."""
    issuer_endpoint = f"{settings.issuer}/token"
    if settings.listen.tls is None:
        return (issuer_endpoint,)
    own = f"{settings.listen.tls.public_url}/token"
    routed_here = settings.issuer.startswith("https://") and issuer_endpoint != own
    return (own, issuer_endpoint) if routed_here else (own,)
