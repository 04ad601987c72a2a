"""Composition root: turns :class:`~sts.config.Settings` into the wired, typed parts of one server.

Everything that parses keys, bundles, policies or the catalog happens here, once per process, so no
request ever pays for it. A part that cannot be built raises ConfigError and start-up stops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sts.audit import AuditLog
from sts.config import Settings
from sts.errors import ConfigError, TemporarilyUnavailable
from sts.exchange import TokenExchange
from sts.keys import KeyRing
from sts.policy import CedarPolicy
from sts.svid import JwtSvidVerifier
from sts.trust import BundleError, BundleSource, FileBundleSource, TrustStore

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

    def readiness(self) -> list[str]:
        """What stops this process from serving correctly right now (empty: ready)."""
        problems = list(self.trust.readiness())
        for trust_domain in self.trust.trust_domains:
            try:
                bundle = self.trust.bundle_for(trust_domain)
            except TemporarilyUnavailable as e:
                problems.append(f"trust domain {trust_domain}: {e.description}")
                continue
            if bundle is None or not bundle.jwt_authorities:
                problems.append(f"trust domain {trust_domain}: no JWT authorities")
        return sorted(set(problems))


def build_trust_store(settings: Settings) -> TrustStore:
    sources: list[BundleSource] = []
    for entry in settings.trust_domains:
        if entry.bundle_file is not None:
            try:
                sources.append(FileBundleSource(entry.trust_domain, entry.bundle_file))
            except (BundleError, OSError) as e:
                raise ConfigError(f"trust_domains.{entry.trust_domain}.bundle_file: {e}") from e
        else:
            raise ConfigError(
                f"trust_domains.{entry.trust_domain}: Workload API and bundle endpoint sources are not "
                "available in this version; use bundle_file"
            )
    return TrustStore(sources)


def build_services(settings: Settings) -> Services:
    """Wire every part; raises ConfigError naming what is wrong."""
    trust = build_trust_store(settings)
    try:
        keys = KeyRing.load_or_create(settings.keys)
    except OSError as e:
        raise ConfigError(f"keys.dir: cannot use {settings.keys.dir}: {e.strerror}") from e
    policy = CedarPolicy.from_directory(settings.policy_dir, settings.catalog)
    try:
        audit = AuditLog(settings.audit_path)
    except OSError as e:
        raise ConfigError(f"audit.path: cannot open {settings.audit_path}: {e.strerror}") from e
    verifier = JwtSvidVerifier(
        trust,
        settings.issuer,
        leeway_seconds=settings.tokens.svid_leeway,
        max_token_bytes=settings.tokens.max_svid_bytes,
    )
    exchange = TokenExchange(
        issuer=settings.issuer,
        verifier=verifier,
        catalog=settings.catalog,
        policy=policy,
        keys=keys,
        audit=audit,
        max_ttl=settings.tokens.max_ttl,
    )
    return Services(settings, trust, keys, policy, audit, exchange)
