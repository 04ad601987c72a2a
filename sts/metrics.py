"""Prometheus metrics: counters derived from the audit log, gauges computed when scraped.

Every counted decision is counted from the audit record that already describes it
(:meth:`Metrics.observe` is an :class:`~sts.audit.AuditLog` observer), so metrics and the audit log
cannot disagree. Label values are bounded by construction: error codes come from the
:class:`~sts.errors.StsError` classes, targets, policy ids and trust domains from the configuration;
anything else becomes ``other``. No SPIFFE ID, jti, task id or secret is ever a label.

``sts serve`` runs several worker processes: it creates a private ``PROMETHEUS_MULTIPROC_DIR``
(``sts.web.supervisor.multiprocess_dir``) before anything imports ``prometheus_client``, so each
worker's counters are memory-mapped files there and a scrape of any worker sums them all.
Gauges are not stored at all:
:class:`ScrapeCollector` reads the store and the trust store when ``/metrics`` is asked, so nothing
on the ``/token`` path pays for them. Without that variable (tests, embedding) the counters are
ordinary in-process values.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

import sts
from sts.catalog import TokenClass
from sts.errors import StsError

if TYPE_CHECKING:
    from sts.config import Settings
    from sts.store import Store
    from sts.trust import TrustStore

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"

# Buckets for one /token answer: an exchange costs ~0.5 ms; a store round trip or policy error more.
DURATION_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05)

# Read once, as prometheus_client chose its value class when it was imported (memory-mapped files
# when the variable was set): what is exposed must be what is counted.
_DIRECTORY = os.environ.get(MULTIPROC_ENV)
# ``*_created`` series would differ per process and are not exposed in multiprocess mode: never.
disable_created_metrics()  # type: ignore[no-untyped-call]
_REGISTRY = CollectorRegistry(auto_describe=True)
EXCHANGES = Counter(
    "sts_token_exchanges",
    "Token exchanges answered, by result (issued or refused) and RFC 6749/8693 error code.",
    ["result", "error", "token_class", "binding"],
    registry=_REGISTRY,
)
EXCHANGE_DURATION = Histogram(
    "sts_token_exchange_duration_seconds",
    "Time to answer POST /token, from the complete request to the answer.",
    buckets=DURATION_BUCKETS,
    registry=_REGISTRY,
)
POLICY_DECISIONS = Counter(
    "sts_policy_decisions",
    "Policy decisions of token exchanges, by decision and determining policy id.",
    ["decision", "policy_id"],
    registry=_REGISTRY,
)
STORE_ERRORS = Counter(
    "sts_store_operation_errors",
    "State store failures answered 503 (or met while scraping), by backend and operation.",
    ["backend", "operation"],
    registry=_REGISTRY,
)
TOKENS_ISSUED = Counter(
    "sts_tokens_issued", "Tokens issued, by catalog target.", ["target"], registry=_REGISTRY
)
REVOCATIONS = Counter(
    "sts_revocations",
    "Revocations made: token (RFC 7009), jti, task or subject (kill switch).",
    ["kind"],
    registry=_REGISTRY,
)
RATE_LIMITED = Counter(
    "sts_rate_limited",
    "Requests refused 429 (rate limits and anonymous refusal budgets).",
    registry=_REGISTRY,
)


def _error_codes() -> frozenset[str]:
    """Every error code the server can answer: the ``error`` of each StsError class."""
    codes: set[str] = set()
    pending: list[type[StsError]] = [StsError]
    while pending:
        cls = pending.pop()
        codes.add(cls.error)
        pending.extend(cls.__subclasses__())
    return frozenset(codes)


_BINDINGS = frozenset({"none", "dpop", "mtls"})
_TOKEN_CLASSES = frozenset(c.value for c in TokenClass)
_REVOKED_KINDS = {"jti": "jti", "task_id": "task", "spiffe_id": "subject"}
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


_CHILDREN: dict[tuple[Counter, tuple[str, ...]], Counter] = {}


def _child(counter: Counter, key: tuple[str, ...]) -> Counter:
    """``counter.labels(*key)`` without its lock on every exchange: the label sets are bounded, so
    each child is looked up once and then read from a dict (safe under the GIL)."""
    child = _CHILDREN.get((counter, key))
    if child is None:
        child = _CHILDREN.setdefault((counter, key), counter.labels(*key))
    return child


def _bounded(value: object, allowed: frozenset[str], *, missing: str = "") -> str:
    if value is None or value == "":
        return missing
    return value if isinstance(value, str) and value in allowed else OTHER


def _name(value: object) -> str:
    """A backend or operation name from code (``StoreUnavailable.backend``); anything odd is unknown."""
    return value if isinstance(value, str) and _NAME.fullmatch(value) else "unknown"


class Metrics:
    """This process's metrics: the audit observer, the web layer's hooks and the scrape output.

    Only built when ``metrics.enabled`` (``Services.metrics`` is None otherwise, and nothing is
    counted). The counters are module-level (one set per process, as prometheus_client requires);
    what this object adds is the configuration that bounds their label values.
    """

    def __init__(
        self,
        *,
        targets: Iterable[str],
        policy_ids: Iterable[str],
        allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
    ) -> None:
        self._targets = frozenset(targets)
        self._policy_ids = frozenset(policy_ids)
        self._errors = _error_codes()
        self.allow = allow

    @classmethod
    def from_settings(cls, settings: Settings, policy_ids: Iterable[str]) -> Metrics:
        return cls(
            targets=(entry.id for entry in settings.catalog),
            policy_ids=policy_ids,
            allow=settings.metrics.allow,
        )

    # -- counters (the hot path: a few dict lookups and value increments)

    def observe(self, event: Mapping[str, Any]) -> None:
        """An :class:`~sts.audit.AuditLog` observer: count what one audit record says happened."""
        kind = event.get("event")
        if kind == "token_exchange":
            self._exchange(event)
        elif kind == "api_refusal":
            if event.get("error") == "rate_limited":
                RATE_LIMITED.inc()
        elif kind == "refusals_suppressed":
            count = event.get("count")
            if isinstance(count, int) and count > 0:
                RATE_LIMITED.inc(count)
        elif kind == "admin_revocation":
            REVOCATIONS.labels(_REVOKED_KINDS.get(str(event.get("revoked")), OTHER)).inc()
        elif kind == "revoke" and event.get("decision") == "allow":
            REVOCATIONS.labels("token").inc()
        elif kind == "task_complete" and event.get("decision") == "allow":
            REVOCATIONS.labels("task").inc()

    def _exchange(self, event: Mapping[str, Any]) -> None:
        issued = event.get("decision") == "allow"
        error = "" if issued else _bounded(event.get("error"), self._errors, missing="server_error")
        key = (
            "issued" if issued else "refused",
            error,
            _bounded(event.get("token_class"), _TOKEN_CLASSES),
            # An unbound token's record carries no binding; a refusal met before binding has none yet.
            _bounded(event.get("binding"), _BINDINGS, missing="none" if issued else ""),
        )
        _child(EXCHANGES, key).inc()
        if issued:
            _child(TOKENS_ISSUED, (_bounded(event.get("target"), self._targets, missing=OTHER),)).inc()
        elif error == "rate_limited":
            RATE_LIMITED.inc()
        policy_ids = event.get("policy_ids")
        if not isinstance(policy_ids, list):
            return  # the exchange was refused before policy was asked
        if "policy_errors" in event:
            decision = "error"
        elif "denied_scopes" in event:
            decision = "deny"
        else:
            decision = "allow"
        if not policy_ids:  # a default deny: no policy determined it
            _child(POLICY_DECISIONS, (decision, "default")).inc()
        for policy_id in policy_ids:
            _child(POLICY_DECISIONS, (decision, _bounded(policy_id, self._policy_ids, missing=OTHER))).inc()

    def observe_duration(self, seconds: float) -> None:
        EXCHANGE_DURATION.observe(seconds)

    def store_error(self, error: BaseException) -> None:
        """A :class:`~sts.store.StoreUnavailable` turned into a 503 (or met while scraping)."""
        STORE_ERRORS.labels(
            _name(getattr(error, "backend", "unknown")), _name(getattr(error, "operation", "unknown"))
        ).inc()

    # -- access and exposition (only when scraped)

    def allows(self, address: str) -> bool:
        """``metrics.allow``: empty allows every source; otherwise the peer must be in a network."""
        if not self.allow:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.allow)

    def exposition(self, store: Store, trust: TrustStore) -> bytes:
        """The text exposition: scrape-time gauges first (a store error they meet is counted in the
        same answer), then every process's counters (multiprocess) or this one's."""
        counters: _Collector = (
            MultiProcessCollector(None, path=_DIRECTORY)  # type: ignore[no-untyped-call]
            if _DIRECTORY
            else _REGISTRY
        )
        return generate_latest(_Chain((ScrapeCollector(self, store, trust), counters)))


class _Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class _Chain:
    """Several collectors as one (what ``generate_latest`` asks for), without a registry to build."""

    def __init__(self, collectors: Iterable[_Collector]) -> None:
        self._collectors = tuple(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


class ScrapeCollector:
    """Gauges read when scraped: build info, active tasks and exceptions, trust bundle age/sequence.

    A store that fails here leaves its gauge without a sample (never a guess, never a 500) and is
    counted in ``sts_store_operation_errors_total``.
    """

    def __init__(self, metrics: Metrics, store: Store, trust: TrustStore) -> None:
        self._metrics = metrics
        self._store = store
        self._trust = trust

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        build = GaugeMetricFamily("sts_build_info", "The running version (always 1).", labels=["version"])
        build.add_metric([sts.__version__], 1)
        yield build
        tasks = GaugeMetricFamily("sts_tasks_active", "Tasks neither completed nor past their deadline.")
        count = getattr(self._store, "active_task_count", None)
        if callable(count):
            self._sample(tasks, lambda: float(count(now)))
        yield tasks
        exceptions = GaugeMetricFamily("sts_break_glass_active", "Break-glass exceptions in force now.")
        self._sample(exceptions, lambda: float(sum(1 for g in self._store.exceptions() if g.active(now))))
        yield exceptions
        yield from self._bundles()

    def _sample(self, family: GaugeMetricFamily, read: Callable[[], float]) -> None:
        from sts.store import StoreUnavailable

        try:
            family.add_metric([], read())
        except StoreUnavailable as e:
            self._metrics.store_error(e)
        except Exception:  # a scrape never fails because of one gauge
            log.exception("metrics: could not compute %s", family.name)

    def _bundles(self) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "sts_trust_bundle_age_seconds",
            "Seconds since the trust bundle was last loaded or fetched.",
            labels=["trust_domain", "source"],
        )
        sequence = GaugeMetricFamily(
            "sts_trust_bundle_sequence", "The trust bundle's spiffe_sequence.", labels=["trust_domain"]
        )
        for trust_domain in sorted(self._trust.trust_domains, key=str):
            try:
                facts = self._trust.describe(trust_domain)
                source = str(facts.get("source") or "workload_api")
                seq = facts.get("sequence") if "sequence" in facts else self._bundle_sequence(trust_domain)
            except Exception:
                log.exception("metrics: could not describe the trust bundle of %s", trust_domain)
                continue
            seconds = facts.get("age_seconds")
            if isinstance(seconds, int | float):
                age.add_metric([str(trust_domain), _bounded(source, _SOURCES)], float(seconds))
            if isinstance(seq, int):
                sequence.add_metric([str(trust_domain)], float(seq))
        yield age
        yield sequence

    def _bundle_sequence(self, trust_domain: Any) -> int | None:
        from sts.errors import TemporarilyUnavailable

        try:
            bundle = self._trust.bundle_for(trust_domain)
        except TemporarilyUnavailable:
            return None
        return bundle.sequence if bundle is not None else None


_SOURCES = frozenset({"file", "bundle_endpoint", "workload_api"})


def worker_exited(pid: int | None) -> None:
    """A worker process ended: drop its live-gauge files (its counters stay: they are totals).

    No gauge here is stored per process today (they are computed when scraped), so this only keeps
    the directory right for any ``livesum``/``liveall`` gauge added later.
    """
    if pid is not None and _DIRECTORY:
        mark_process_dead(pid, _DIRECTORY)  # type: ignore[no-untyped-call]
