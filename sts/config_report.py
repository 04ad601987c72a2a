"""``sts config check``: everything ``sts serve`` checks before it starts workers, without side effects.

:func:`check_config` loads the settings, the policies (against the catalog), the trust bundles read
from files and the signing keys, parses the store URL and looks at the audit path, and returns a
:class:`ConfigReport`: what it found (for a person to read) and every problem, one line each, that
would stop ``sts serve``. Problems are collected, not raised, so one run names all of them.

Read-only: no key is created or rotated (``sts serve`` would; the report says so), no SQLite file or
audit log is created, and nothing is connected to: not Redis (``sts serve`` does not either before its
workers start; they report it on ``/readyz``), not the Workload API (only its socket file is looked
at). The listen port is not probed: a running server holds it while its next configuration is checked.
"""

from __future__ import annotations

import os
import ssl
import stat
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from sts.catalog import TokenClass
from sts.config import KeySettings, Settings, load_settings
from sts.errors import ConfigError, StsError
from sts.keys import SigningKey, check_may_serve, read_key
from sts.policy import POLICY_SUFFIX, CedarPolicy, PolicyLoadError
from sts.runtime import build_trust_store
from sts.store.factory import open_store, sqlite_path
from sts.trust import TrustBundle
from sts.web.listeners import spreads_connections

__all__ = ["ConfigReport", "check_config"]

_LABEL_WIDTH = 15


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


@dataclass(slots=True)
class ConfigReport:
    """What ``sts config check`` found: labelled facts, warnings (start anyway) and problems (refuse)."""

    source: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when ``sts serve`` would start with this configuration."""
        return not self.problems

    def add(self, label: str, text: str) -> None:
        self.facts.append((label, text))

    def warn(self, text: str) -> None:
        self.warnings.append(_one_line(text))

    def problem(self, text: str) -> None:
        self.problems.append(_one_line(text))

    def render(self) -> str:
        """The facts and warnings, one per line, labels aligned (problems are printed on their own)."""
        lines = [f"{label + ':':<{_LABEL_WIDTH}}{text}" for label, text in self.facts]
        lines.extend(f"{'warning:':<{_LABEL_WIDTH}}{warning}" for warning in self.warnings)
        return "\n".join(lines)

    def summary(self) -> str:
        if self.ok:
            return f"{'result:':<{_LABEL_WIDTH}}OK: sts serve would start with this configuration"
        return (
            f"{'result:':<{_LABEL_WIDTH}}{_plural(len(self.problems), 'problem')}: "
            "sts serve would refuse to start"
        )


def check_config(path: Path, *, now: float | None = None) -> ConfigReport:
    """Check the configuration ``sts serve --config path`` would run with (``STS_*`` variables apply)."""
    report = ConfigReport(str(path))
    report.add("configuration", str(path))
    try:
        settings = load_settings(path)
    except ConfigError as e:
        report.problem(str(e))
        return report
    current = int(time.time() if now is None else now)
    report.add("issuer", settings.issuer)
    _listeners(report, settings)
    _trust_domains(report, settings)
    _catalog(report, settings)
    _policies(report, settings)
    _store(report, settings)
    report.add("admins", ", ".join(sorted(str(admin) for admin in settings.admins)) or "none")
    _keys(report, settings.keys, current)
    # sts serve opens the audit log after the keys: the directories it made for them exist by then.
    made = set() if _cannot_create(settings.keys.dir, directory=True) else _missing(settings.keys.dir)
    _audit(report, settings.audit_path, made)
    return report


def _listeners(report: ConfigReport, settings: Settings) -> None:
    listen, workers = settings.listen, _plural(settings.server.workers, "worker")
    if spreads_connections(settings.server.reuse_port, settings.server.workers):
        workers += ", one listening socket each: server.reuse_port"
    elif settings.server.reuse_port:
        workers += ", sharing one socket: server.reuse_port needs two workers or more, on Linux"
    if listen.tls is None:
        report.add("listener", f"plain HTTP on {listen.host}:{listen.port} ({workers})")
    else:
        tls = listen.tls
        if tls.cert is None or tls.key is None:
            certificate = "certificate: the X.509-SVID from the Workload API"
        else:
            certificate = f"cert {tls.cert}, key {tls.key}"
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(tls.cert), str(tls.key))
            except (ssl.SSLError, OSError) as e:
                report.problem(f"listen.tls: cannot load the certificate {tls.cert} and key {tls.key}: {e}")
        report.add(
            "listener",
            f"TLS on {listen.host}:{listen.port}, public_url {tls.public_url} ({certificate}; {workers})",
        )
    report.add("mtls_url", settings.mtls_url or "none (the metadata names no mTLS endpoint aliases)")


def _trust_domains(report: ConfigReport, settings: Settings) -> None:
    if not settings.trust_domains:
        report.add("trust domains", "none")
        report.warn("trust_domains: none configured: no SVID can be verified, no token issued")
    for entry in settings.trust_domains:
        if entry.bundle_file is not None:
            source = f"bundle_file {entry.bundle_file}"
        elif entry.workload_api:
            source = f"workload-api {settings.workload_api.socket}"
        else:
            source = f"bundle_endpoint {entry.bundle_endpoint} ({entry.endpoint_profile})"
        try:
            # Exactly what sts serve builds, one trust domain at a time so every bad one is named.
            trust, _ = build_trust_store(replace(settings, trust_domains=(entry,)), connect=False)
            bundle = trust.bundle_for(entry.trust_domain) if entry.bundle_file is not None else None
        except (ConfigError, StsError, OSError) as e:
            report.problem(str(e))
            source += " (not loaded)"
        else:
            if bundle is not None:
                source += f" ({_authorities(bundle)})"
        report.add("trust domain", f"{entry.trust_domain}  {source}")
    tls = settings.listen.tls
    socket = settings.workload_api.socket
    wanted = any(entry.workload_api for entry in settings.trust_domains) or (
        tls is not None and tls.cert is None
    )
    if wanted and socket is not None:
        socket_path = Path(socket.removeprefix("unix://"))
        try:
            is_socket = stat.S_ISSOCK(socket_path.stat().st_mode)
        except OSError:
            is_socket = False
        if not is_socket:
            report.warn(
                f"workload_api.socket: no socket at {socket_path} now: sts serve starts, but is not "
                "ready until the Workload API answers there"
            )


def _authorities(bundle: TrustBundle) -> str:
    return (
        f"{_plural(len(bundle.jwt_authorities), 'JWT authority', 'JWT authorities')}, "
        f"{_plural(len(bundle.x509_authorities), 'X.509 authority', 'X.509 authorities')}"
    )


def _catalog(report: ConfigReport, settings: Settings) -> None:
    entries = sorted(settings.catalog, key=lambda entry: entry.id)
    if not entries:
        report.add("catalog", "empty")
        report.warn("catalog: empty: no token can be issued")
    for entry in entries:
        report.add(
            "catalog",
            f"{entry.id}  class {entry.token_class.value}, scopes {' '.join(sorted(entry.scopes))}, "
            f"max_ttl {entry.max_ttl}s, {entry.sensitivity.label}",
        )


def _policies(report: ConfigReport, settings: Settings) -> None:
    directory = settings.policy_dir
    try:
        policy = CedarPolicy.from_directory(directory, settings.catalog)
    except PolicyLoadError as e:
        report.problems.extend(_one_line(f"policy: {problem}") for problem in e.problems)
        report.add("policies", f"{directory} (not loaded)")
        return
    per_file = Counter(origin.rpartition(":")[0] for origin in policy.origins.values())
    files = sorted(p for p in directory.glob(f"*{POLICY_SUFFIX}") if p.is_file())
    report.add(
        "policies",
        f"{directory}: {_plural(len(policy.policy_ids), 'policy', 'policies')} "
        f"in {_plural(len(files), 'file')}",
    )
    for file in files:
        count = per_file.get(str(file), 0)
        report.add("policy file", f"{file.name} ({_plural(count, 'policy', 'policies')})")


def _store(report: ConfigReport, settings: Settings) -> None:
    url = settings.store_url
    scheme = url.partition(":")[0].lower()
    try:
        if scheme == "sqlite":
            path = sqlite_path(url)
            report.add("store", f"sqlite {path}")
            reason = _cannot_create(path, directory=False)
            if reason:
                report.problem(f"store.url: cannot open the store: sqlite {path}: {reason}")
            return
        # memory:// and redis:// open without connecting (redis-py connects on the first command).
        store = open_store(url)
        store.close()
    except ValueError as e:
        report.problem(f"store.url: {_without_password(str(e), url)}")
        report.add("store", f"{scheme} (not usable)")
        return
    if scheme == "memory":
        report.add("store", "memory (this process only)")
        if settings.server.workers > 1:
            report.warn(
                f"store.url: memory:// is per process: the {settings.server.workers} workers would not "
                "share tasks, revocations, DPoP proofs or rate limits"
            )
        return
    address = getattr(store, "address", "?")  # never the URL: it may hold a password
    report.add("store", f"{scheme} {address}{' (TLS)' if scheme == 'rediss' else ''} (not connected)")


def _without_password(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (``redis://:secret@host``) replaced by ``***``."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def _keys(report: ConfigReport, settings: KeySettings, now: int) -> None:
    """Like ``KeyRing.load_or_create`` but read-only: reads every key file, creates and rotates none."""
    directory = settings.dir
    report.add(
        "keys",
        f"{directory} (generate: {str(settings.generate).lower()}, rotate_after {settings.rotate_after}s)",
    )
    if directory.exists() and not directory.is_dir():
        report.problem(f"keys.dir: cannot use {directory}: not a directory")
        return
    writable = not _cannot_create(directory, directory=True)
    for token_class in TokenClass:
        label = f"keys {token_class.value}"
        loaded: list[SigningKey] = []
        unreadable = 0
        for path in sorted((directory / token_class.value).glob("*.pem")):
            try:
                loaded.append(read_key(path, token_class))
            except ConfigError as e:
                report.problem(str(e))
                unreadable += 1
            except OSError as e:
                report.problem(f"keys: cannot read {path}: {e.strerror}")
                unreadable += 1
        if unreadable:
            report.add(label, f"{_plural(unreadable, 'bad key file')} (see the problems)")
            continue
        if not loaded and not writable:
            report.problem(f"keys.dir: {directory} is read-only and holds no {token_class} key")
            report.add(label, "none")
            continue
        try:
            check_may_serve(settings, token_class, loaded)
        except ConfigError as e:
            report.problem(str(e))
            report.add(label, "none usable (keys.generate is false)")
            continue
        if not loaded:
            report.add(label, "none yet: sts serve would generate a development key")
            report.warn(
                f"keys.dir: no {token_class} key in {directory}: sts serve would generate a development "
                "key; provision keys with 'sts keys create --config FILE' before production use"
            )
            continue
        newest = max(loaded, key=lambda key: key.created_at)
        development = sum(key.generated_for_development for key in loaded)
        text = f"{_plural(len(loaded), 'key')} ({development} development), active {newest.kid}"
        if now - newest.created_at >= settings.rotate_after:
            text += (
                "; older than rotate_after: sts serve would rotate it"
                if writable
                else "; older than rotate_after: provision a new one"
            )
        elif newest.generated_for_development:
            report.warn(f"keys: the active {token_class} key {newest.kid} is a generated development key")
        report.add(label, text)


def _audit(report: ConfigReport, audit_path: str, made: set[Path]) -> None:
    """``made``: the directories sts serve creates before it opens the audit log (for the keys)."""
    if audit_path == "-":
        report.add("audit", "standard output")
        return
    path = Path(audit_path)
    report.add("audit", str(path))
    if not path.parent.is_dir() and path.parent not in made:  # AuditLog creates no directory
        report.problem(f"audit.path: cannot open {path}: no directory {path.parent}")
        return
    reason = _cannot_create(path, directory=False)
    if reason:
        report.problem(f"audit.path: cannot open {path}: {reason}")


def _missing(directory: Path) -> set[Path]:
    """``directory`` and its ancestors that do not exist (``mkdir(parents=True)`` would make them)."""
    return {d for d in (directory, *directory.parents) if not d.exists()}


def _cannot_create(path: Path, *, directory: bool) -> str | None:
    """Why this user could not open ``path`` for writing (creating it and missing parents), else None.

    Asked with ``os.access`` only, so checking changes nothing on disk.
    """
    if path.exists():
        if path.is_dir() != directory:
            return "is a directory" if path.is_dir() else "is not a directory"
        if not os.access(path, os.W_OK | (os.X_OK if directory else 0)):
            return "permission denied"
        return None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"permission denied in {ancestor}"
    return None
