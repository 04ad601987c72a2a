"""Trust bundles streamed from the SPIFFE Workload API (a SPIRE agent, or our development server).

One :class:`WorkloadApiWatcher` per process keeps two py-spiffe streams open (``FetchJWTBundles`` and
``FetchX509SVID``, whose messages carry the X.509 bundles) and turns every update into
:class:`~sts.trust.TrustBundle` objects once, so requests never parse keys. Every update is the
complete state (Workload API §4.3): a trust domain missing from it was redacted and is dropped.

Fail closed: py-spiffe's own retry would hide an outage, so each stream runs with
``retry_connect=False`` under our supervisor, which notes when the stream broke and reconnects
with backoff. The last bundles stay in use for ``max_staleness``; past that (or before the first
update) :meth:`WorkloadApiBundleSource.current` raises ``TemporarilyUnavailable`` and ``/readyz``
says why.

A federated trust domain that has only JWT authorities arrives from SPIRE as *empty bytes* in the
X.509 stream's ``federated_bundles``; py-spiffe 0.3 cannot parse them and the whole X.509 stream
would fail on every update (no renewal of our own TLS certificate). :class:`_TolerantClient` reads
empty bytes as an empty X.509 authority set (SPIFFE Trust Domain and Bundle §4: a bundle may hold
no X.509 authorities). Readiness covers both streams: either one stale is not ready.

Must not import web, policy or exchange code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from spiffe import JwtBundleSet, WorkloadApiClient, X509Bundle, X509BundleSet
from spiffe import TrustDomain as SpiffeTrustDomain
from spiffe.errors import PySpiffeError
from spiffe.workloadapi.x509_context import X509Context

from sts.errors import TemporarilyUnavailable
from sts.spiffeid import SpiffeIdError, TrustDomain
from sts.trust import JwtAuthority, TrustBundle

log = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0


class _TolerantClient(WorkloadApiClient):
    """py-spiffe's client, except that an empty federated X.509 bundle is an empty authority set."""

    @staticmethod
    def _create_x509_bundle_set(resp_bundles: Mapping[str, bytes]) -> X509BundleSet:
        bundles = [
            X509Bundle(SpiffeTrustDomain(td), set())
            if not der
            else X509Bundle.parse_raw(SpiffeTrustDomain(td), der)
            for td, der in resp_bundles.items()
        ]
        return X509BundleSet.of(bundles)


@dataclass(slots=True)
class _StreamHealth:
    """When one stream last delivered, and since when it has been broken (None: healthy)."""

    name: str
    updated_at: float | None = None
    broken_since: float | None = None
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class OwnSvid:
    """The server's X.509-SVID: leaf-first chain and key; ``version`` grows with every rotation."""

    version: int
    chain: tuple[x509.Certificate, ...]
    private_key: Any


class WorkloadApiWatcher:
    """The process's connection to the Workload API; thread-safe, reconnects by itself."""

    def __init__(
        self,
        socket: str,
        *,
        max_staleness: float,
        server_name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket = socket
        self.max_staleness = max_staleness
        # The TLS listener's host name: when this process matches several entries, the SVID that names
        # it (DNS SAN) is the server certificate, not merely the first entry's (SPIRE's "default").
        self.server_name = server_name.lower() if server_name else None
        self._clock = clock
        self._lock = threading.Lock()
        self._first_jwt_update = threading.Event()
        self._stopped = threading.Event()
        self._jwt: Mapping[TrustDomain, Mapping[str, JwtAuthority]] = {}
        self._x509: Mapping[TrustDomain, tuple[x509.Certificate, ...]] = {}
        self._bundles: Mapping[TrustDomain, TrustBundle] = {}
        self._own_svid: OwnSvid | None = None
        self._health = {"jwt": _StreamHealth("JWT bundles"), "x509": _StreamHealth("X.509 bundles")}
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for kind in self._health:
            thread = threading.Thread(
                target=self._supervise, args=(kind,), name=f"workload-api-{kind}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def wait_first_update(self, timeout: float) -> bool:
        """Block start-up until JWT bundles arrive (or ``timeout``); False means start not ready."""
        return self._first_jwt_update.wait(timeout)

    def stop(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout=2)

    def bundle(self, trust_domain: TrustDomain) -> TrustBundle | None:
        """The trust domain's current bundle, None if the Workload API does not serve it.

        Raises TemporarilyUnavailable before the first update and once the JWT stream has been broken
        for longer than ``max_staleness``: stale trust is no trust.
        """
        with self._lock:
            self._check_fresh()
            return self._bundles.get(trust_domain)

    def stream_problems(self) -> list[str]:
        """Readiness of both streams: one that never delivered, or broken past ``max_staleness``.

        The X.509 stream carries this server's own certificate (TLS listener) and the X.509
        authorities that verify mTLS clients, so it counts as much as the JWT stream does.
        """
        problems = []
        with self._lock:
            now = self._clock()
            for health in self._health.values():
                if health.updated_at is None:
                    waiting = health.last_error or "waiting"
                    problems.append(f"Workload API {health.name}: no update yet ({waiting})")
                elif health.broken_since is not None and now - health.broken_since > self.max_staleness:
                    broken_for = now - health.broken_since
                    problems.append(
                        f"Workload API {health.name}: broken for {broken_for:.0f}s: {health.last_error}"
                    )
        return problems

    def served_trust_domains(self) -> list[str] | None:
        """Every trust domain the Workload API delivers now (configured or not); None before the
        first update or once the streams are stale."""
        with self._lock:
            try:
                self._check_fresh()
            except TemporarilyUnavailable:
                return None
            return sorted(str(td) for td in self._bundles)

    def _check_fresh(self) -> None:
        health = self._health["jwt"]
        if health.updated_at is None:
            raise TemporarilyUnavailable(
                "trust bundles from the Workload API are not available yet",
                detail=health.last_error or "no update received",
            )
        if health.broken_since is not None and self._clock() - health.broken_since > self.max_staleness:
            raise TemporarilyUnavailable(
                "trust bundles from the Workload API are stale",
                detail=f"stream broken for {self._clock() - health.broken_since:.0f}s: {health.last_error}",
            )

    def _supervise(self, kind: str) -> None:
        """Keep one stream open; on any error or stream end, note it and reconnect with backoff."""
        backoff = BACKOFF_FIRST_SECONDS
        while not self._stopped.is_set():
            ended = threading.Event()
            delivered = threading.Event()

            def on_error(error: Exception, ended: threading.Event = ended) -> None:
                self._broken(kind, str(error))
                ended.set()

            try:
                client = _TolerantClient(socket_path=self.socket)
            except PySpiffeError as e:
                self._broken(kind, str(e))
            else:
                try:
                    handle = self._open(kind, client, delivered, on_error)
                    while not ended.is_set() and not self._stopped.wait(0.2):
                        pass
                    handle.cancel()
                finally:
                    client.close()
            backoff = BACKOFF_FIRST_SECONDS if delivered.is_set() else min(backoff * 2, BACKOFF_MAX_SECONDS)
            self._stopped.wait(backoff)

    def _open(
        self,
        kind: str,
        client: WorkloadApiClient,
        delivered: threading.Event,
        on_error: Callable[[Exception], None],
    ) -> Any:
        if kind == "jwt":

            def on_jwt(bundles: JwtBundleSet) -> None:
                self._accept_jwt(bundles)
                delivered.set()

            return client.stream_jwt_bundles(on_jwt, on_error, retry_connect=False)

        def on_x509(context: X509Context) -> None:
            self._accept_x509(context)
            delivered.set()

        return client.stream_x509_contexts(on_x509, on_error, retry_connect=False)

    def _broken(self, kind: str, error: str) -> None:
        with self._lock:
            health = self._health[kind]
            if health.broken_since is None:
                health.broken_since = self._clock()
                log.warning("Workload API %s stream broken (%s): %s", health.name, self.socket, error)
            health.last_error = error

    def _delivered(self, kind: str) -> None:
        health = self._health[kind]
        if health.broken_since is not None or health.updated_at is None:
            log.info("Workload API %s stream up (%s)", health.name, self.socket)
        health.updated_at = self._clock()
        health.broken_since = None
        health.last_error = ""

    def _accept_jwt(self, update: JwtBundleSet) -> None:
        authorities: dict[TrustDomain, Mapping[str, JwtAuthority]] = {}
        for bundle in update.bundles:
            trust_domain = _trust_domain(bundle.trust_domain.name)
            if trust_domain is None:
                continue
            keys = {
                kid: key
                for kid, key in bundle.jwt_authorities.items()
                if isinstance(key, RSAPublicKey | EllipticCurvePublicKey)
            }
            authorities[trust_domain] = MappingProxyType(keys)
        with self._lock:
            self._jwt = authorities
            self._rebuild()
            self._delivered("jwt")
        self._first_jwt_update.set()

    def _accept_x509(self, context: X509Context) -> None:
        authorities: dict[TrustDomain, tuple[x509.Certificate, ...]] = {}
        for bundle in context.x509_bundle_set.bundles:
            trust_domain = _trust_domain(bundle.trust_domain.name)
            if trust_domain is not None:
                authorities[trust_domain] = tuple(bundle.x509_authorities)
        with self._lock:
            self._x509 = authorities
            chosen = self._server_svid(context)
            self._own_svid = OwnSvid(
                version=self._own_svid.version + 1 if self._own_svid else 1,
                chain=tuple(chosen.cert_chain),
                private_key=chosen.private_key,
            )
            self._rebuild()
            self._delivered("x509")

    def _server_svid(self, context: X509Context) -> Any:
        """The SVID whose DNS names include :attr:`server_name`, else the default (first) one."""
        if self.server_name is not None:
            for svid in context.x509_svids:
                try:
                    names = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                except x509.ExtensionNotFound:
                    continue
                if self.server_name in (n.lower() for n in names.get_values_for_type(x509.DNSName)):
                    return svid
            log.warning(
                "no X.509-SVID of this process names %s (DNS SAN); serving TLS with %s",
                self.server_name,
                context.default_svid.spiffe_id,
            )
        return context.default_svid

    def own_svid(self) -> OwnSvid | None:
        """This server's own X.509-SVID (its TLS certificate), the newest the stream delivered."""
        with self._lock:
            return self._own_svid

    def _rebuild(self) -> None:
        """Join the latest JWT and X.509 authorities per trust domain (caller holds the lock)."""
        domains = set(self._jwt) | set(self._x509)
        self._bundles = {
            td: TrustBundle(
                td, jwt_authorities=self._jwt.get(td, {}), x509_authorities=self._x509.get(td, ())
            )
            for td in domains
        }


def _trust_domain(name: str) -> TrustDomain | None:
    """py-spiffe normalises names leniently; we keep only the canonical ones."""
    try:
        return TrustDomain.parse(name)
    except SpiffeIdError:
        log.warning("ignoring a bundle for a trust domain that is not canonical: %r", name)
        return None


class WorkloadApiBundleSource:
    """A :class:`~sts.trust.BundleSource` for one trust domain, served by the shared watcher."""

    def __init__(self, trust_domain: TrustDomain, watcher: WorkloadApiWatcher) -> None:
        self._trust_domain = trust_domain
        self._watcher = watcher

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    def current(self) -> TrustBundle:
        bundle = self._watcher.bundle(self._trust_domain)
        if bundle is None:
            # The stream is healthy but no longer serves this domain (e.g. federation removed): untrusted.
            return TrustBundle(self._trust_domain)
        return bundle
