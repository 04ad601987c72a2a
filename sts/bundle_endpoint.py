"""A trust domain's bundle from its SPIFFE bundle endpoint (SPIFFE_Federation.md): federation with a
partner without the partner's (or our own) SPIRE agent.

:class:`BundleEndpointSource` is a :class:`~sts.trust.BundleSource`. A background thread per source
and process polls the endpoint (:func:`sts.bundle_fetch.fetch`: bounded in time and size, no
redirects, authenticated per profile), parses the answer with the same parser as bundle files
(:meth:`~sts.trust.TrustBundle.from_spiffe_bundle`, the x5c and kid rules included) and accepts it
only when:

* it has JWT authorities (this server verifies JWT-SVIDs: a bundle without any would refuse every
  SVID of the partner; a partner revokes a key by publishing a bundle without *that* key);
* no X.509 authority names another trust domain in a ``spiffe://`` URI SAN (a bundle carries no
  trust domain name, §7.3: that is the one trace of a wrong bundle that can be seen; JWT keys show
  nothing, and CA certificates without a SPIFFE URI SAN show nothing either);
* for ``https_spiffe``, one of its X.509 authorities is the anchor of (or issued part of) the chain
  the endpoint itself just presented: a bundle that cannot authenticate its own endpoint is not this
  trust domain's current bundle, and accepting it would lock us out at the next poll;
* its ``spiffe_sequence`` is not lower than the highest seen (Bundle §4.1.1); an equal sequence
  with other keys is refused (the sequence MUST change with the contents), an equal one with the same
  keys confirms the bundle we hold (same objects, so verification caches stay valid). A bundle
  without a sequence is the most recent one (Federation §4.2).

Whatever is refused or fails, the last good bundle stays in use and the reason is logged and kept for
``/readyz``. The last good bundle is served for ``max_staleness`` after it was last fetched (or
confirmed); past that :meth:`BundleEndpointSource.current` raises
:class:`~sts.errors.TemporarilyUnavailable` (503 for that trust domain's SVIDs, ``/readyz`` not
ready) until a fetch succeeds again. The bootstrap bundle of ``https_spiffe`` only authenticates the
endpoint until a bundle is fetched; it never verifies SVIDs.

The poll interval is the bundle's ``spiffe_refresh_hint`` (300 s without one, §4.1), bounded to
[:data:`MIN_REFRESH_SECONDS`, :data:`MAX_REFRESH_SECONDS`] and to a third of ``max_staleness`` (so
two failed polls in a row still leave a fresh bundle). A failed poll is retried after
:data:`MIN_REFRESH_SECONDS`, doubling up to that interval (§6.2: never aggressively).

Every good fetch is persisted (:func:`write_cache`: atomic rename, mode 0600) with the wall-clock
time it was fetched; a process that starts while the endpoint is down serves the persisted bundle
until ``max_staleness`` after that time. Several worker processes each poll and write the same file
(each write is a whole file).

Imports ``sts.bundle_fetch``, ``sts.config`` (the settings type), ``sts.errors``, ``sts.spiffeid``,
``sts.strict_json`` and ``sts.trust``; must not import web, policy, exchange or store modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sts.bundle_fetch import (
    FETCH_TIMEOUT_SECONDS,
    MAX_BODY_BYTES,
    Fetched,
    FetchError,
    SpiffePeerCheck,
    fetch,
    spiffe_context,
    web_pki_context,
)
from sts.config import TrustDomainSettings
from sts.errors import ConfigError, TemporarilyUnavailable
from sts.spiffeid import SpiffeId, TrustDomain
from sts.strict_json import loads_object, numeric_date
from sts.trust import BundleError, TrustBundle, load_bundle_file

log = logging.getLogger(__name__)

MIN_REFRESH_SECONDS = 5.0
"""Never poll more often, whatever the refresh hint says."""
MAX_REFRESH_SECONDS = 3600.0
"""Never poll less often, whatever the refresh hint says."""
DEFAULT_REFRESH_SECONDS = 300.0
"""Without ``spiffe_refresh_hint`` (Federation §4.1: five minutes is recommended)."""
CACHE_FORMAT = "sts-bundle-cache/1"
MAX_CACHE_BYTES = 4 * MAX_BODY_BYTES
_FUTURE_SLACK_SECONDS = 60.0  # a persisted fetch time this far ahead of the clock is not believed


class Refused(Exception):
    """A fetched bundle that parses but is not accepted; the message says why."""


@dataclass(frozen=True, slots=True)
class _Good:
    """The last good bundle: what was fetched, its keys' fingerprint, when (monotonic and wall)."""

    bundle: TrustBundle
    raw: bytes
    fingerprint: str
    fetched_at: float
    fetched_wall: float
    from_cache: bool = False


def fingerprint(bundle: TrustBundle) -> str:
    """The keys of a bundle, order-free: JWT ``kid`` + SubjectPublicKeyInfo, X.509 certificates (DER)."""
    digest = hashlib.sha256()
    for kid, key in sorted(bundle.jwt_authorities.items()):
        spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        digest.update(b"jwt\0" + kid.encode() + b"\0" + spki)
    for der in sorted(c.public_bytes(Encoding.DER) for c in bundle.x509_authorities):
        digest.update(b"x509\0" + der)
    return digest.hexdigest()


def foreign_trust_domains(bundle: TrustBundle) -> set[str]:
    """The trust domains other than the bundle's own that its X.509 authorities name in a
    ``spiffe://`` URI SAN (SPIFFE CA certificates carry ``spiffe://<trust domain>``)."""
    foreign: set[str] = set()
    for certificate in bundle.x509_authorities:
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (x509.ExtensionNotFound, ValueError):
            continue
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if not uri.lower().startswith("spiffe://"):
                continue
            name = uri[len("spiffe://") :].split("/", 1)[0].lower()
            if name != bundle.trust_domain.name:
                foreign.add(name[:255])
    return foreign


def authenticates(authorities: tuple[x509.Certificate, ...], chain: tuple[x509.Certificate, ...]) -> bool:
    """Whether one of ``authorities`` is in ``chain`` or directly issued one of its certificates."""
    if not chain:
        return False
    anchors = {a.public_bytes(Encoding.DER) for a in authorities}
    for certificate in chain:
        if certificate.public_bytes(Encoding.DER) in anchors:
            return True
        for authority in authorities:
            try:
                certificate.verify_directly_issued_by(authority)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
    return False


class BundleEndpointSource:
    """One trust domain's bundle, polled from its bundle endpoint; thread-safe; see the module docstring."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        url: str,
        *,
        profile: str,
        max_staleness: float,
        spiffe_id: SpiffeId | None = None,
        bootstrap: TrustBundle | None = None,
        ca_file: Path | None = None,
        cache_file: Path | None = None,
        min_refresh: float = MIN_REFRESH_SECONDS,
        max_refresh: float = MAX_REFRESH_SECONDS,
        fetch_timeout: float = FETCH_TIMEOUT_SECONDS,
        max_body_bytes: int = MAX_BODY_BYTES,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if profile == "https_spiffe":
            if spiffe_id is None or bootstrap is None:
                raise ValueError("https_spiffe needs the endpoint's SPIFFE ID and a bootstrap bundle")
            if not bootstrap.x509_authorities:
                raise ValueError(
                    "the bootstrap bundle has no X.509 authority to authenticate the endpoint with"
                )
            self._web_context: ssl.SSLContext | None = None
        elif profile == "https_web":
            self._web_context = web_pki_context(ca_file)  # OSError, ssl.SSLError
        else:
            raise ValueError(f"unknown endpoint profile {profile!r}")
        self._trust_domain = trust_domain
        self.url = url
        self.profile = profile
        self.spiffe_id = spiffe_id
        self.max_staleness = max_staleness
        self.cache_file = cache_file
        self._bootstrap = bootstrap
        self._min_refresh = min_refresh
        self._max_refresh = max_refresh
        self._fetch_timeout = fetch_timeout
        self._max_body_bytes = max_body_bytes
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._persist_lock = threading.Lock()
        self._good: _Good | None = None
        self._high_sequence: int | None = None
        self._failures = 0
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self._persist_error: str | None = None
        self._attempted = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._load_cache()

    # ---- BundleSource ------------------------------------------------------------------------------

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    def current(self) -> TrustBundle:
        """The last good bundle while it is fresh; never waits for the network."""
        with self._lock:
            good, last_error = self._good, self._last_error
        if good is None:
            raise TemporarilyUnavailable(
                f"no trust bundle for {self._trust_domain} from its bundle endpoint yet",
                detail=last_error or "not fetched yet",
            )
        age = self._clock() - good.fetched_at
        if age > self.max_staleness:
            raise TemporarilyUnavailable(
                f"the trust bundle of {self._trust_domain} from its bundle endpoint is stale",
                detail=(
                    f"last good fetch {age:.0f}s ago (max_staleness {self.max_staleness:g}s); "
                    f"last error: {last_error or 'none'}"
                ),
            )
        return good.bundle

    def describe(self) -> dict[str, object]:
        """``/readyz``: the endpoint, the bundle's sequence, when it was last fetched, its age, the
        poll interval and what went wrong last."""
        with self._lock:
            good, last_error, last_attempt = self._good, self._last_error, self._last_attempt
            persist_error = self._persist_error
        details: dict[str, object] = {
            "source": "bundle_endpoint",
            "endpoint": self.url,
            "endpoint_profile": self.profile,
            "sequence": good.bundle.sequence if good else None,
            "last_refresh": round(good.fetched_wall, 3) if good else None,
            "age_seconds": round(max(0.0, self._clock() - good.fetched_at), 1) if good else None,
            "max_staleness": self.max_staleness,
            "refresh_seconds": self.refresh_interval(),
            "last_attempt": round(last_attempt, 3) if last_attempt is not None else None,
            "last_error": last_error,
            "from_cache": good.from_cache if good else False,
            "cache_file": str(self.cache_file) if self.cache_file else None,
        }
        if persist_error is not None:
            details["cache_error"] = persist_error
        return details

    @property
    def persist_problem(self) -> str | None:
        """Why the last good bundle could not be written to ``cache_file`` (None: it was, or no file)."""
        with self._lock:
            return self._persist_error

    # ---- the poller --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start polling in a daemon thread (once); the first fetch is at once."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=_poll,
            args=(weakref.ref(self), self._stopped),
            name=f"bundle-endpoint-{self._trust_domain}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait until the first poll of this process finished (either way); False on timeout."""
        return self._attempted.wait(timeout)

    def servable(self) -> bool:
        """Whether :meth:`current` would answer now (a fresh bundle, fetched or persisted)."""
        try:
            self.current()
        except TemporarilyUnavailable:
            return False
        return True

    def refresh_interval(self) -> float:
        """Seconds between good polls: the refresh hint, bounded (see the module docstring)."""
        with self._lock:
            good = self._good
        hint = good.bundle.refresh_hint if good and good.bundle.refresh_hint else DEFAULT_REFRESH_SECONDS
        interval = min(max(float(hint), self._min_refresh), self._max_refresh)
        return max(self._min_refresh, min(interval, self.max_staleness / 3))

    def refresh(self) -> float:
        """Poll once (blocking, bounded by the fetch timeout); the seconds until the next poll.

        Never raises: every failure keeps the last good bundle and is logged.
        """
        attempt = self._wall()
        try:
            fetched = self._fetch()
            bundle = TrustBundle.from_spiffe_bundle(self._trust_domain, fetched.body)
            self._accept(bundle, fetched)
        except (FetchError, BundleError, Refused) as e:
            return self._failed(attempt, str(e), refused=not isinstance(e, FetchError))
        except Exception as e:  # a bug must not end the poller: log it, keep the last good bundle
            log.exception("bundle endpoint %s for %s: unexpected error", self.url, self._trust_domain)
            return self._failed(attempt, f"unexpected error: {type(e).__name__}", refused=False)
        finally:
            self._attempted.set()
        with self._lock:
            self._last_attempt = attempt
            self._failures = 0
            self._last_error = None
        return self.refresh_interval()

    def _fetch(self) -> Fetched:
        if self._web_context is not None:
            return fetch(
                self.url, self._web_context, timeout=self._fetch_timeout, max_body_bytes=self._max_body_bytes
            )
        assert self.spiffe_id is not None  # noqa: S101 (checked in __init__)
        context = spiffe_context(self._endpoint_authorities())
        return fetch(
            self.url,
            context,
            check_peer=SpiffePeerCheck(self.spiffe_id),
            timeout=self._fetch_timeout,
            max_body_bytes=self._max_body_bytes,
        )

    def _endpoint_authorities(self) -> tuple[x509.Certificate, ...]:
        """Federation §5.2.2.4: the latest bundle of the endpoint's (our partner's) trust domain: the
        last fetched one, else the bootstrap bundle."""
        with self._lock:
            good = self._good
        if good is not None and good.bundle.x509_authorities:
            return good.bundle.x509_authorities
        return self._bootstrap.x509_authorities if self._bootstrap is not None else ()

    def _accept(self, bundle: TrustBundle, fetched: Fetched) -> None:
        """Take ``bundle`` as the last good one, or raise :class:`Refused` (state unchanged)."""
        if not bundle.jwt_authorities:
            raise Refused(
                "the bundle has no JWT authorities (every JWT-SVID of the trust domain would be refused)"
            )
        foreign = foreign_trust_domains(bundle)
        if foreign:
            raise Refused(
                f"an X.509 authority of the bundle names trust domain {sorted(foreign)[0]!r}: it is not "
                f"the bundle of {self._trust_domain}"
            )
        if self.profile == "https_spiffe" and not authenticates(bundle.x509_authorities, fetched.chain):
            raise Refused(
                "no X.509 authority of the bundle authenticates the endpoint's own certificate (the bundle "
                "of another trust domain, or one that would lock us out of the endpoint)"
            )
        now, wall = self._clock(), self._wall()
        keys_print = fingerprint(bundle)
        with self._lock:
            previous = self._good
            high = self._high_sequence
            sequence = bundle.sequence
            if sequence is not None and high is not None and sequence < high:
                raise Refused(f"spiffe_sequence {sequence} is older than {high}, the newest seen")
            same_keys = previous is not None and previous.fingerprint == keys_print
            if sequence is not None and sequence == high and not same_keys:
                raise Refused(
                    f"spiffe_sequence {sequence} is the one we hold, with other keys (the sequence must "
                    "change whenever the contents do)"
                )
            confirmed = previous is not None and same_keys and sequence == previous.bundle.sequence
            kept = previous.bundle if confirmed and previous is not None else bundle
            self._good = _Good(kept, fetched.body, keys_print, now, wall)
            # With the bundle, in one step: describe() never shows the new bundle beside an old error.
            self._last_error = None
            self._failures = 0
            if sequence is not None:
                self._high_sequence = sequence if high is None else max(high, sequence)
        if confirmed:
            log.debug(
                "bundle endpoint %s for %s: bundle confirmed (sequence %s)",
                self.url,
                self._trust_domain,
                sequence,
            )
        else:
            if sequence is None:
                log.warning(
                    "bundle endpoint %s for %s: the bundle has no spiffe_sequence; taking it as the newest",
                    self.url,
                    self._trust_domain,
                )
            log.info(
                "bundle endpoint %s for %s: new bundle, sequence %s (was %s), %d JWT and %d X.509 "
                "authorities, refresh hint %s",
                self.url,
                self._trust_domain,
                sequence,
                previous.bundle.sequence if previous else None,
                len(bundle.jwt_authorities),
                len(bundle.x509_authorities),
                bundle.refresh_hint,
            )
        self._persist(fetched.body, wall)

    def _failed(self, attempt: float, reason: str, *, refused: bool) -> float:
        with self._lock:
            self._last_attempt = attempt
            self._last_error = reason
            self._failures += 1
            failures = self._failures
            good = self._good
        keeping = (
            f"keeping the bundle fetched {self._clock() - good.fetched_at:.0f}s ago"
            if good is not None
            else "no bundle to serve"
        )
        level = logging.ERROR if refused else logging.WARNING
        log.log(
            level,
            "bundle endpoint %s for %s: %s %s; %s",
            self.url,
            self._trust_domain,
            "refused the bundle:" if refused else "fetch failed:",
            reason,
            keeping,
        )
        return min(self._min_refresh * (1 << min(failures - 1, 20)), self.refresh_interval())

    # ---- persistence -------------------------------------------------------------------------------

    def _persist(self, raw: bytes, fetched_wall: float) -> None:
        if self.cache_file is None:
            return
        try:
            with self._persist_lock:
                write_cache(self.cache_file, self._trust_domain, self.url, raw, fetched_wall)
        except OSError as e:
            problem: str | None = f"cannot write {self.cache_file}: {e.strerror or e}"
        else:
            problem = None
        with self._lock:
            first = problem is not None and self._persist_error != problem
            self._persist_error = problem
        if first:
            log.error(
                "bundle endpoint for %s: %s (a restart would not keep the bundle)",
                self._trust_domain,
                problem,
            )

    def _load_cache(self) -> None:
        """Start from the persisted last good bundle, if there is one for this endpoint; a bad file is
        logged and ignored (never a reason not to start)."""
        if self.cache_file is None:
            return
        try:
            loaded = read_cache(self.cache_file, self._trust_domain, self.url)
        except CacheError as e:
            log.warning("bundle endpoint for %s: ignoring the persisted bundle: %s", self._trust_domain, e)
            return
        if loaded is None:
            return
        bundle, raw, fetched_wall = loaded
        wall = self._wall()
        if fetched_wall > wall + _FUTURE_SLACK_SECONDS:
            log.warning(
                "bundle endpoint for %s: ignoring the persisted bundle: fetched in the future (%s)",
                self._trust_domain,
                self.cache_file,
            )
            return
        age = max(0.0, wall - fetched_wall)
        self._good = _Good(
            bundle, raw, fingerprint(bundle), self._clock() - age, fetched_wall, from_cache=True
        )
        self._high_sequence = bundle.sequence
        log.info(
            "bundle endpoint for %s: persisted bundle (sequence %s) fetched %.0fs ago; it serves until "
            "max_staleness (%gs) after that unless the endpoint answers",
            self._trust_domain,
            bundle.sequence,
            age,
            self.max_staleness,
        )


def _poll(ref: weakref.ref[BundleEndpointSource], stopped: threading.Event) -> None:
    """The poller: holds its source only while polling, so a dropped source ends its thread."""
    delay = 0.0
    while not stopped.wait(delay):
        source = ref()
        if source is None:
            return
        delay = source.refresh()
        del source


# ---- the cache file ------------------------------------------------------------------------------


class CacheError(Exception):
    """The persisted bundle cannot be used; the message says why."""


def write_cache(path: Path, trust_domain: TrustDomain, url: str, raw: bytes, fetched_wall: float) -> None:
    """Write the last good bundle atomically: a new 0600 file in the same directory, fsync'ed, renamed
    over ``path``; the directory is created 0700 when missing. Raises ``OSError``."""
    document = {
        "format": CACHE_FORMAT,
        "trust_domain": str(trust_domain),
        "endpoint": url,
        "fetched_at": round(fetched_wall, 3),
        "bundle": raw.decode("utf-8"),
    }
    data = json.dumps(document, indent=1).encode("utf-8")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_cache(path: Path, trust_domain: TrustDomain, url: str) -> tuple[TrustBundle, bytes, float] | None:
    """The persisted bundle, its bytes and wall-clock fetch time; None when there is no file or it is
    for another trust domain or endpoint. Raises :class:`CacheError` for a file that cannot be used."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"cannot read {path}: {e.strerror}") from e
    if not path.is_file() or path.is_symlink():
        raise CacheError(f"{path} is not a regular file")
    if st.st_mode & 0o022 or st.st_uid != os.getuid():
        raise CacheError(f"{path} is writable by others or not ours: it could hand us any trust")
    if st.st_size > MAX_CACHE_BYTES:
        raise CacheError(f"{path} is larger than {MAX_CACHE_BYTES} bytes")
    try:
        document = loads_object(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} cannot be read as a bundle cache: {e}") from e
    if document.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path} is not a bundle cache of this version")
    if document.get("trust_domain") != str(trust_domain) or document.get("endpoint") != url:
        log.info("the persisted bundle %s is for another trust domain or endpoint; not used", path)
        return None
    fetched_wall = numeric_date(document.get("fetched_at"))
    raw = document.get("bundle")
    if fetched_wall is None or not isinstance(raw, str):
        raise CacheError(f"{path} has no fetch time or no bundle")
    data = raw.encode("utf-8")
    try:
        bundle = TrustBundle.from_spiffe_bundle(trust_domain, data)
    except BundleError as e:
        raise CacheError(f"{path}: {e}") from e
    return bundle, data, fetched_wall


# ---- from the settings ---------------------------------------------------------------------------


def default_cache_file(keys_dir: Path, trust_domain: TrustDomain) -> Path:
    """``<keys.dir>/../bundles/<trust domain>.json``: next to the keys, in the server's state."""
    return keys_dir.parent / "bundles" / f"{trust_domain}.json"


def source_from_settings(
    entry: TrustDomainSettings, *, default_max_staleness: int, keys_dir: Path
) -> BundleEndpointSource:
    """The source of one ``trust_domains.<td>`` entry with ``bundle_endpoint``; raises ConfigError
    naming the key (files that cannot be read or parsed, an unusable bootstrap bundle)."""
    if entry.bundle_endpoint is None or entry.endpoint_profile is None:
        raise ConfigError(f"trust_domains.{entry.trust_domain}: no bundle_endpoint")
    where = f"trust_domains.{entry.trust_domain}"
    bootstrap = None
    if entry.bootstrap_bundle_file is not None:
        try:
            bootstrap = load_bundle_file(entry.trust_domain, entry.bootstrap_bundle_file)
        except BundleError as e:
            raise ConfigError(f"{where}.bootstrap_bundle_file: {e}") from e
        if not bootstrap.x509_authorities:
            raise ConfigError(
                f"{where}.bootstrap_bundle_file: {entry.bootstrap_bundle_file} has no X.509 authority, so it "
                "cannot authenticate the https_spiffe endpoint"
            )
        foreign = foreign_trust_domains(bootstrap)
        if foreign:
            raise ConfigError(
                f"{where}.bootstrap_bundle_file: an X.509 authority names trust domain "
                f"{sorted(foreign)[0]!r}, not {entry.trust_domain}"
            )
    max_staleness = entry.max_staleness or default_max_staleness
    if max_staleness < 3 * MIN_REFRESH_SECONDS:
        raise ConfigError(
            f"{where}.max_staleness: defaults to workload_api.max_staleness ({default_max_staleness}s), "
            f"but a bundle endpoint needs at least {3 * MIN_REFRESH_SECONDS:g}s (three polls at the "
            "shortest interval): set trust_domains.<td>.max_staleness"
        )
    try:
        return BundleEndpointSource(
            entry.trust_domain,
            entry.bundle_endpoint,
            profile=entry.endpoint_profile,
            max_staleness=max_staleness,
            spiffe_id=entry.endpoint_spiffe_id,
            bootstrap=bootstrap,
            ca_file=entry.endpoint_ca_file,
            cache_file=entry.cache_file or default_cache_file(keys_dir, entry.trust_domain),
        )
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{where}.endpoint_ca_file: cannot load {entry.endpoint_ca_file}: {e}") from e
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e
