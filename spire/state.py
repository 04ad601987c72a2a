"""The identity state the development Workload API serves: CAs, current X.509-SVIDs, and a version number.

Owns :class:`IdentityState`: one :class:`spire.ca.DevCa` per trust domain of the registry, the current
X.509-SVID of every registered workload, and a version that grows on every change (SVID renewal, CA
rotation, retired authority dropped, registration removed). Everything sits behind one condition
variable, so a stream can wait for the next version and then send the full new state
(SPIFFE_Workload_API.md §4.2-4.4). Readers get immutable :class:`WorkloadSnapshot` values.

Passive: it never starts threads; the server calls :meth:`IdentityState.maintain` from its own.
Imports ``sts.spiffeid``, ``sts.trust``, ``spire.ca`` and ``spire.registry``; must not import gRPC or
the generated protobuf module.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from spire.ca import DEFAULT_CA_TTL, DevCa, X509SvidMaterial
from spire.registry import Registry, Workload
from sts.spiffeid import SpiffeId, TrustDomain
from sts.trust import TrustBundle

logger = logging.getLogger(__name__)


class UnknownWorkload(LookupError):
    """No identity is issued to this workload (not registered, or its registration was removed)."""


@dataclass(frozen=True, slots=True)
class Bundles:
    """Every trust domain's authorities at one version, in the forms the Workload API hands out."""

    x509_der: Mapping[TrustDomain, bytes]
    """CA certificates as concatenated DER."""
    jwt_jwks: Mapping[TrustDomain, bytes]
    """JWT authorities as a JWKS (JSON bytes), keys with ``kid`` and without ``use``."""
    trust: Mapping[TrustDomain, TrustBundle]
    """The same authorities parsed, for verifying with ``sts.svid``."""


@dataclass(frozen=True, slots=True)
class WorkloadSnapshot:
    """What one workload may see at one version: its identity, its SVID and every bundle."""

    version: int
    workload: Workload
    svid: X509SvidMaterial
    bundles: Bundles


class IdentityState:
    """The versioned identity state of every registered workload; thread-safe."""

    def __init__(
        self,
        registry: Registry,
        *,
        clock: Callable[[], float] = time.time,
        ca_ttl: float = DEFAULT_CA_TTL,
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._changed = threading.Condition()
        self._closed = False
        self._version = 1
        self._cas: dict[TrustDomain, DevCa] = {
            trust_domain: DevCa(trust_domain, clock=clock, ca_ttl=ca_ttl)
            for trust_domain in registry.trust_domains
        }
        self._workloads: dict[str, Workload] = dict(registry.workloads)
        self._svids: dict[str, X509SvidMaterial] = {
            name: self._issue(workload) for name, workload in self._workloads.items()
        }
        self._bundles = self._collect_bundles()

    @property
    def registry(self) -> Registry:
        """The registration this state started from (removals are not reflected here)."""
        return self._registry

    @property
    def version(self) -> int:
        with self._changed:
            return self._version

    @property
    def closed(self) -> bool:
        with self._changed:
            return self._closed

    def now(self) -> float:
        return self._clock()

    def ca(self, trust_domain: TrustDomain) -> DevCa:
        """The CA of ``trust_domain``; KeyError when the registry does not declare it."""
        return self._cas[trust_domain]

    # Reading.

    def snapshot(self, name: str) -> WorkloadSnapshot:
        """The current state as ``name`` sees it; raises :class:`UnknownWorkload`."""
        with self._changed:
            workload = self._workloads.get(name)
            if workload is None:
                raise UnknownWorkload(name)
            return WorkloadSnapshot(self._version, workload, self._svids[name], self._bundles)

    def wait_for_change(self, seen_version: int, timeout: float) -> None:
        """Block until the version is not ``seen_version``, the state closes, :meth:`wake`, or timeout."""
        with self._changed:
            if self._version == seen_version and not self._closed:
                self._changed.wait(timeout)

    def wake(self) -> None:
        """Wake every waiter without a change, so cancelled streams notice at once."""
        with self._changed:
            self._changed.notify_all()

    def mint_jwt_svid(self, name: str, audience: Sequence[str]) -> tuple[SpiffeId, str]:
        """A JWT-SVID for workload ``name``; raises :class:`UnknownWorkload`."""
        with self._changed:
            workload = self._workloads.get(name)
        if workload is None:
            raise UnknownWorkload(name)
        ca = self._cas[workload.spiffe_id.trust_domain]
        return workload.spiffe_id, ca.mint_jwt_svid(workload.spiffe_id, audience, workload.jwt_ttl)

    # Changing.

    def rotate_ca(self, trust_domain: TrustDomain) -> None:
        """New CA and JWT key for ``trust_domain``; its workloads get SVIDs from the new CA at once."""
        with self._changed:
            ca = self._cas.get(trust_domain)
            if ca is None:
                raise ValueError(f"trust domain {trust_domain} is not served by this registry")
            ca.rotate()
            for name, workload in self._workloads.items():
                if workload.spiffe_id.member_of(trust_domain):
                    self._svids[name] = self._issue(workload)
            self._bump()
        logger.info(
            "rotated the CA and JWT key of %s; the old ones stay in the bundles until unused", trust_domain
        )

    def deregister(self, name: str) -> None:
        """Remove workload ``name``: from now on its calls get PERMISSION_DENIED, its streams end so."""
        with self._changed:
            if self._workloads.pop(name, None) is None:
                raise UnknownWorkload(name)
            del self._svids[name]
            self._bump()
        logger.info("removed the registration of workload %s", name)

    def maintain(self) -> float:
        """Renew SVIDs at half-life, rotate CAs at half-life, drop unused retired authorities.

        Returns when the next such event is due (Unix seconds), so the caller knows how long to sleep.
        """
        with self._changed:
            now = self._clock()
            changed = False
            for trust_domain, ca in self._cas.items():
                if now >= ca.ca_rotation_due():
                    ca.rotate()
                    logger.info("the CA of %s reached half its lifetime: rotated", trust_domain)
                    for name, workload in self._workloads.items():
                        if workload.spiffe_id.member_of(trust_domain):
                            self._svids[name] = self._issue(workload)
                    changed = True
                if ca.prune():
                    logger.info(
                        "dropped retired authorities of %s: every SVID they signed has expired", trust_domain
                    )
                    changed = True
            for name, svid in self._svids.items():
                if now >= svid.renewal_due():
                    self._svids[name] = self._issue(self._workloads[name])
                    logger.debug("renewed the X.509-SVID of workload %s", name)
                    changed = True
            if changed:
                self._bump()
            return self._next_due()

    def close(self) -> None:
        """Mark the state closed and wake every waiter: streams end (the server is stopping)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # Internals (called with the lock held).

    def _issue(self, workload: Workload) -> X509SvidMaterial:
        return self._cas[workload.spiffe_id.trust_domain].issue_x509_svid(
            workload.spiffe_id, workload.x509_ttl, dns_names=workload.dns_names
        )

    def _bump(self) -> None:
        self._bundles = self._collect_bundles()
        self._version += 1
        self._changed.notify_all()

    def _collect_bundles(self) -> Bundles:
        return Bundles(
            x509_der=MappingProxyType({td: ca.x509_bundle_der() for td, ca in self._cas.items()}),
            jwt_jwks=MappingProxyType({td: ca.jwt_jwks() for td, ca in self._cas.items()}),
            trust=MappingProxyType({td: ca.trust_bundle() for td, ca in self._cas.items()}),
        )

    def _next_due(self) -> float:
        due = [svid.renewal_due() for svid in self._svids.values()]
        for ca in self._cas.values():
            due.append(ca.ca_rotation_due())
            prune = ca.next_prune()
            if prune is not None:
                due.append(prune)
        return min(due)
