"""Typed, frozen settings from one YAML file plus ``STS_*`` environment overrides.

This is the only module that reads the environment. Every key is checked once here: unknown keys,
wrong types and bad values stop start-up with a :class:`~sts.errors.ConfigError` naming the key and
its line. Relative paths are resolved against the config file's directory. Every setting has a
safe default: no trust domain and no catalog entry means nothing can be issued.

Imports ``sts.errors``, ``sts.spiffeid``, ``sts.catalog`` and ``sts.strict_json`` only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml

from sts.catalog import DEFAULT_MAX_TTL_SECONDS, Catalog, CatalogEntry, Sensitivity, TokenClass
from sts.errors import ConfigError
from sts.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from sts.strict_json import split_uri

log = logging.getLogger(__name__)

CONFIG_ENV = "STS_CONFIG"

SUPPORTED_SIGNING_ALGORITHMS = ("ES256",)
# At most 18 digits: int() of a longer text is slow or, past 4300 digits, a ValueError.
_DURATION = re.compile(r"^(\d{1,18})\s*(s|m|h|d)?$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
MAX_NUMBER = 2**31 - 1
"""The largest whole number (or duration in seconds, ~68 years) any setting takes: larger values are
typing mistakes, and would overflow float arithmetic, C ints and timers further on."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """The TLS (and mTLS) listener: the certificate is the server's X.509-SVID from the Workload API
    (``cert``/``key`` None, rotated without restart) or a file pair; client certificates are optional
    and verified as X.509-SVIDs against their own trust domain's bundle."""

    cert: Path | None
    key: Path | None
    public_url: str


@dataclass(frozen=True, slots=True)
class ListenSettings:
    host: str = "127.0.0.1"
    port: int = 8443
    tls: TlsSettings | None = None


ENDPOINT_PROFILES = ("https_web", "https_spiffe")
"""SPIFFE_Federation.md §5.2: the two bundle endpoint profiles."""
MIN_ENDPOINT_STALENESS = 15
"""The shortest ``max_staleness`` of a bundle endpoint: three polls at the shortest poll interval
(``sts.bundle_endpoint.MIN_REFRESH_SECONDS``, 5 s)."""


@dataclass(frozen=True, slots=True)
class TrustDomainSettings:
    """Where one trust domain's bundle comes from: exactly one of the three sources.

    With ``bundle_endpoint`` (SPIFFE Federation): ``endpoint_profile`` says how the endpoint is
    authenticated; ``https_web`` with ``endpoint_ca_file`` (None: the system roots), ``https_spiffe``
    with ``endpoint_spiffe_id`` (in this trust domain: a self-serving endpoint) and
    ``bootstrap_bundle_file``. ``max_staleness`` None means ``workload_api.max_staleness``;
    ``cache_file`` None means ``<keys.dir>/../bundles/<trust domain>.json`` (resolved by the runtime,
    which knows ``keys.dir``).
    """

    trust_domain: TrustDomain
    bundle_file: Path | None = None
    workload_api: bool = False
    bundle_endpoint: str | None = None
    endpoint_profile: str | None = None
    endpoint_ca_file: Path | None = None
    endpoint_spiffe_id: SpiffeId | None = None
    bootstrap_bundle_file: Path | None = None
    max_staleness: int | None = None
    cache_file: Path | None = None


@dataclass(frozen=True, slots=True)
class WorkloadApiSettings:
    """The Workload API socket (else ``SPIFFE_ENDPOINT_SOCKET``) and how long its bundles may go stale."""

    socket: str | None = None
    max_staleness: int = 300
    start_timeout: int = 10


@dataclass(frozen=True, slots=True)
class KeySettings:
    """Where the signing keys live; ``generate: false`` (production) refuses to start without
    provisioned keys instead of making development keys."""

    dir: Path
    algorithm: str = "ES256"
    rotate_after: int = 86400
    generate: bool = True


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """Lifetimes and the JWT-SVID checks every exchange applies."""

    max_ttl: int = DEFAULT_MAX_TTL_SECONDS
    svid_leeway: int = 30
    max_svid_bytes: int = 8192
    max_delegation_depth: int = 3


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Shared by every replica through the store: exchanges per workload per second, tokens per task."""

    per_workload_per_second: int = 20
    tokens_per_task: int = 200
    # Per source address, per worker: refusals of requests that never authenticated (issue 11). Only
    # refusals count and only refusals are answered 429, so an attacker sharing a workload's address
    # cannot lock that workload out; suppressed refusals leave one summary audit line per window.
    anonymous_refusals_per_minute: int = 600


@dataclass(frozen=True, slots=True)
class TaskSettings:
    max_ttl: int = 3600


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The server of ``sts serve``: ``workers`` processes (default: the cores), each one event loop.

    The plain listener's connections (:mod:`sts.web.plain_server`) and the TLS listener's
    (:mod:`sts.web.tls_server`) keep the same deadlines and limits.
    """

    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads: int = 1  # accepted for old configurations; each worker serves on one thread
    max_body_bytes: int = 64 * 1024
    # Deadlines against slow clients: request line and headers (and idle keep-alive), then the
    # whole body, then (TLS listener) the handshake. A connection that misses one is answered 408
    # or closed; no connection ever holds a thread.
    header_timeout: int = 5
    body_timeout: int = 10
    handshake_timeout: int = 5
    # Connections per worker (slow ones included); past it a request is answered 503 at once.
    max_connections: int = 4096
    # On SIGTERM/SIGINT: how long requests in flight may take to finish before workers are killed.
    drain_timeout: int = 10
    # One listening socket per worker (SO_REUSEPORT, Linux): the kernel spreads connections. Off by
    # default: a process of the same user in the same network namespace could join the group and
    # take the connections (sts.web.listeners).
    reuse_port: bool = False


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Prometheus ``/metrics`` on the main listener(s): on by default, optionally limited by source address.

    The exposition holds no secrets and no per-workload labels (every label value is bounded), so the
    default is open to anyone who can reach the listener; ``allow`` narrows it to scrapers' networks.
    """

    enabled: bool = True
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # empty: any source address


@dataclass(frozen=True, slots=True)
class Settings:
    issuer: str
    listen: ListenSettings
    trust_domains: tuple[TrustDomainSettings, ...]
    workload_api: WorkloadApiSettings
    keys: KeySettings
    store_url: str
    catalog: Catalog
    policy_dir: Path
    admins: frozenset[SpiffeId]
    limits: LimitSettings
    tasks: TaskSettings
    tokens: TokenSettings
    audit_path: str
    server: ServerSettings
    log_level: str
    source: str = "<defaults>"
    log_format: str = "text"  # logging.format: text (one escaped line) or json (one object per line)
    # The base URL of this issuer's TLS (mTLS) listener, when it has one: RFC 8705 §5
    # ``mtls_endpoint_aliases`` point there, from both listeners' (identical) metadata.
    mtls_url: str | None = None
    # audit.stdout: every audit line also goes to standard output (JSON, hash-chained) for a log
    # collector, besides audit.path when that is a file.
    audit_stdout: bool = False
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


class _Tree:
    """The YAML document with the line of every key, so errors can point at the file."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}
        self.from_env: dict[str, str] = {}
        try:
            loader = yaml.SafeLoader(text)
            try:
                node = loader.get_single_node()
                self.data = self._convert(loader, node, "") if node is not None else {}
            finally:
                loader.dispose()
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from e
        if not isinstance(self.data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of settings")

    def _convert(self, loader: yaml.SafeLoader, node: yaml.Node, path: str) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node)
                if not isinstance(key, str):
                    raise ConfigError(f"{source_line(self.source, key_node)}: keys must be strings")
                child = f"{path}.{key}" if path else key
                if key in out:
                    raise ConfigError(f"{source_line(self.source, key_node)}: '{child}' appears twice")
                out[key] = self._convert(loader, value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(loader, item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        try:
            return loader.construct_object(node)
        except (ValueError, OverflowError) as e:
            # PyYAML raises plain ValueError for what it cannot build: an integer of more than 4300
            # digits, a timestamp such as 2024-13-45. A setting, not a traceback.
            raise ConfigError(f"{source_line(self.source, node)}: '{path}' is not a valid value ({e})") from e

    def where(self, path: str) -> str:
        variable = self.from_env.get(path)
        if variable is not None:
            return f"environment {variable}"
        line = self.lines.get(path)
        return f"{self.source}, line {line}" if line else self.source


def source_line(source: str, node: yaml.Node) -> str:
    return f"{source}, line {node.start_mark.line + 1}"


class _Section:
    """Reads one mapping of the tree; every key must be taken, the rest are reported as unknown."""

    def __init__(self, tree: _Tree, path: str, data: Any) -> None:
        self.tree, self.path = tree, path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(path, "must be a mapping")
        self.data: dict[str, Any] = data
        self.taken: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, path: str, message: str) -> Any:
        raise ConfigError(f"{self.tree.where(path)}: '{path}' {message}")

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str) -> Any:
        self.taken.add(name)
        return self.data.get(name)

    def get(self, name: str, kind: type[T], default: T) -> T:
        value = self.raw(name)
        if value is None:
            return default
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            self.fail(self.key(name), "must be a whole number")  # .nan and .inf are floats: refused here
        if kind is int and abs(value) > MAX_NUMBER:
            self.fail(self.key(name), f"must be a whole number of at most {MAX_NUMBER}")
        if kind is str and not isinstance(value, str):
            self.fail(self.key(name), "must be a string")
        if kind is bool and not isinstance(value, bool):
            self.fail(self.key(name), "must be true or false")
        return value  # type: ignore[no-any-return]

    def positive(self, name: str, default: int) -> int:
        value = self.get(name, int, default)
        if value <= 0:
            self.fail(self.key(name), "must be greater than zero")
        return value

    def duration(self, name: str, default: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        seconds = parse_duration(value)
        if seconds is None or not 0 < seconds <= MAX_NUMBER:
            self.fail(
                self.key(name),
                f"must be a positive duration such as 300, 300s, 5m, 24h or 1d (at most {MAX_NUMBER} s)",
            )
        return seconds  # type: ignore[return-value]

    def path_value(self, name: str, base: Path, default: str | None = None) -> Path | None:
        value = self.get(name, str, default) if default is not None else self.get(name, str, "")
        if not value:
            return None
        path = Path(value).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else base / path))

    def section(self, name: str) -> _Section:
        return _Section(self.tree, self.key(name), self.raw(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.taken)
        if unknown:
            self.fail(self.key(unknown[0]), "is not a known setting" + _did_you_mean(unknown[0], self.taken))


def _did_you_mean(name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_duration(value: object) -> int | None:
    """Seconds from ``300``, ``"300s"``, ``"5m"``, ``"24h"``, ``"1d"``; None when not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return None


# Environment overrides: variable → dotted key. Values are YAML scalars (so STS_LISTEN_PORT=9000 is a number).
ENV_OVERRIDES: Mapping[str, str] = {
    "STS_ISSUER": "issuer",
    "STS_MTLS_URL": "mtls_url",
    "STS_LISTEN_HOST": "listen.host",
    "STS_LISTEN_PORT": "listen.port",
    "STS_STORE_URL": "store.url",
    "STS_KEYS_DIR": "keys.dir",
    "STS_POLICY_DIR": "policy.dir",
    "STS_AUDIT_PATH": "audit.path",
    "STS_LOG_LEVEL": "log_level",
    "STS_LOG_FORMAT": "logging.format",
    "STS_WORKERS": "server.workers",
    "STS_METRICS_ENABLED": "metrics.enabled",
}


def _apply_env(tree: _Tree, environ: Mapping[str, str]) -> None:
    for variable, dotted in ENV_OVERRIDES.items():
        if variable not in environ:
            continue
        node: dict[str, Any] = tree.data
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{variable}: '{part}' in the file is not a mapping")
            node = child
        try:
            node[leaf] = yaml.safe_load(environ[variable])
        except (yaml.YAMLError, ValueError, OverflowError) as e:  # ValueError: see _Tree._convert
            raise ConfigError(f"environment {variable}: not a valid value: {e}") from e
        tree.from_env[dotted] = variable
    unknown = sorted(
        k for k in environ if k.startswith("STS_") and k not in ENV_OVERRIDES and k != CONFIG_ENV
    )
    for variable in unknown:
        log.warning(
            "ignoring unknown environment variable %s (known: %s)", variable, ", ".join(ENV_OVERRIDES)
        )


def load_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check the whole configuration; raises ConfigError naming the first bad key."""
    env = os.environ if environ is None else environ
    if path is None:
        tree, base = _Tree("{}", "<defaults>"), Path.cwd()
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from e
        tree, base = _Tree(text, str(path)), path.resolve().parent
    _apply_env(tree, env)
    return _build(tree, base, env)


def _build(tree: _Tree, base: Path, env: Mapping[str, str]) -> Settings:
    top = _Section(tree, "", tree.data)

    listen_section = top.section("listen")
    host = listen_section.get("host", str, "127.0.0.1")
    port = listen_section.get("port", int, 8443)
    if not 0 <= port <= 65535:
        listen_section.fail(listen_section.key("port"), "must be a TCP port (0-65535)")
    tls = _tls(listen_section.section("tls"), base, host, port) if listen_section.has("tls") else None
    listen_section.done()

    issuer = top.get("issuer", str, f"http://{host}:{port}")
    _check_issuer(top, issuer)
    mtls_url = _mtls_url(top, tls)

    trust_domains = _trust_domains(top.section("trust_domains"), base)

    workload_api = _workload_api(top.section("workload_api"), env, trust_domains)
    if tls is not None and tls.cert is None and workload_api.socket is None:
        top.fail(
            "listen.tls.certificate", "workload-api needs workload_api.socket (or SPIFFE_ENDPOINT_SOCKET)"
        )

    keys_section = top.section("keys")
    keys = KeySettings(
        dir=keys_section.path_value("dir", base, "state/keys") or base / "state/keys",
        algorithm=keys_section.get("algorithm", str, "ES256"),
        rotate_after=keys_section.duration("rotate_after", 86400),
        generate=keys_section.get("generate", bool, True),
    )
    if keys.algorithm not in SUPPORTED_SIGNING_ALGORITHMS:
        keys_section.fail(
            keys_section.key("algorithm"), f"must be one of {', '.join(SUPPORTED_SIGNING_ALGORITHMS)}"
        )
    keys_section.done()

    store_url = _store_url(top.section("store"), base)

    tokens_section = top.section("tokens")
    tokens = TokenSettings(
        max_ttl=tokens_section.duration("max_ttl", DEFAULT_MAX_TTL_SECONDS),
        svid_leeway=tokens_section.get("svid_leeway", int, 30),
        max_svid_bytes=tokens_section.positive("max_svid_bytes", 8192),
        max_delegation_depth=tokens_section.positive("max_delegation_depth", 3),
    )
    if not 0 <= tokens.svid_leeway <= 300:
        tokens_section.fail(tokens_section.key("svid_leeway"), "must be between 0 and 300 seconds")
    tokens_section.done()

    catalog = _catalog(top, tokens.max_ttl)

    policy_section = top.section("policy")
    policy_dir = policy_section.path_value("dir", base, "policies") or base / "policies"
    policy_section.done()

    admins = frozenset(_spiffe_ids(top, "admins"))

    limits_section = top.section("limits")
    limits = LimitSettings(
        per_workload_per_second=limits_section.positive("per_workload_per_second", 20),
        tokens_per_task=limits_section.positive("tokens_per_task", 200),
        anonymous_refusals_per_minute=limits_section.positive("anonymous_refusals_per_minute", 600),
    )
    limits_section.done()

    tasks_section = top.section("tasks")
    tasks = TaskSettings(max_ttl=tasks_section.duration("max_ttl", 3600))
    tasks_section.done()

    audit_section = top.section("audit")
    audit_raw = audit_section.get("path", str, "-")
    audit_path = audit_raw if audit_raw == "-" else str(audit_section.path_value("path", base))
    audit_stdout = audit_section.get("stdout", bool, False)
    audit_section.done()

    metrics = _metrics(top.section("metrics"))

    server_section = top.section("server")
    server = ServerSettings(
        workers=server_section.positive("workers", os.cpu_count() or 1),
        threads=server_section.positive("threads", 1),
        max_body_bytes=server_section.positive("max_body_bytes", 64 * 1024),
        header_timeout=server_section.duration("header_timeout", 5),
        body_timeout=server_section.duration("body_timeout", 10),
        handshake_timeout=server_section.duration("handshake_timeout", 5),
        max_connections=server_section.positive("max_connections", 4096),
        drain_timeout=server_section.duration("drain_timeout", 10),
        reuse_port=server_section.get("reuse_port", bool, False),
    )
    if not 1 <= server.drain_timeout <= 300:
        server_section.fail(server_section.key("drain_timeout"), "must be between 1 and 300 seconds")
    server_section.done()

    log_level, log_format = _logging(top)
    top.done()

    return Settings(
        issuer=issuer,
        listen=ListenSettings(host=host, port=port, tls=tls),
        trust_domains=trust_domains,
        workload_api=workload_api,
        keys=keys,
        store_url=store_url,
        catalog=catalog,
        policy_dir=policy_dir,
        admins=admins,
        limits=limits,
        tasks=tasks,
        tokens=tokens,
        audit_path=audit_path,
        server=server,
        log_level=log_level,
        source=tree.source,
        mtls_url=mtls_url,
        log_format=log_format,
        audit_stdout=audit_stdout,
        metrics=metrics,
    )


def _metrics(section: _Section) -> MetricsSettings:
    """``metrics.enabled`` and ``metrics.allow`` (a list of addresses or CIDR networks)."""
    enabled = section.get("enabled", bool, True)
    allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    if section.has("allow"):
        raw = section.raw("allow")
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            section.fail(section.key("allow"), "must be a list of addresses or CIDR networks")
        for item in raw:
            try:
                allow.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                section.fail(section.key("allow"), f"{item!r} is not an address or a CIDR network")
    section.done()
    return MetricsSettings(enabled=enabled, allow=tuple(allow))


_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_MASTER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """``store.redis``: how the Redis store is reached (Sentinel, TLS, ACL credentials from files) and how
    durable its security writes must be (docs/operations.md)."""

    require_durability: bool = True
    wait_timeout: int = 2
    sentinels: tuple[str, ...] = ()
    master_name: str = "mymaster"
    username: str | None = None
    password_file: Path | None = None
    sentinel_password_file: Path | None = None
    tls_ca_file: Path | None = None


class StoreSettings(str):
    """``store.url`` (the string itself, so ``Settings.store_url`` is still the URL) with ``store.redis``.

    With ``store.redis.sentinels`` the URL is the ``redis+sentinel://`` URL they make.
    """

    redis: RedisSettings

    def __new__(cls, url: str, redis: RedisSettings | None = None) -> StoreSettings:
        value = super().__new__(cls, url)
        value.redis = redis if redis is not None else RedisSettings()
        return value

    def __reduce__(self) -> tuple[type[StoreSettings], tuple[str, RedisSettings]]:
        return (StoreSettings, (str(self), self.redis))

    @property
    def url(self) -> str:
        return str(self)


def store_settings(settings: Settings) -> StoreSettings:
    """The store settings of ``settings`` (a plain ``store_url`` string has the default ``store.redis``)."""
    url = settings.store_url
    return url if isinstance(url, StoreSettings) else StoreSettings(url)


def _store_url(section: _Section, base: Path) -> StoreSettings:
    redis = _redis_settings(section.section("redis"), base)
    given = section.has("url")
    url = section.get("url", str, f"sqlite://{base / 'state/sts.db'}")
    relative = url.removeprefix("sqlite:///")
    if url.startswith("sqlite:///") and relative.startswith(("./", "../")):
        # sqlite:///./x.db and sqlite:///../x.db are relative to the config file, like every other path.
        url = f"sqlite://{os.path.normpath(base / relative)}"
    if redis.sentinels:
        url = _sentinel_url(section, url if given else None, redis)
    scheme, _, rest = url.partition("://")
    if scheme.lower() in _SENTINEL_SCHEMES:
        userinfo, _, hosts = rest.partition("/")[0].rpartition("@")
        if not hosts:
            section.fail(section.key("url"), "must name the Sentinels: redis+sentinel://host:26379/mymaster/0")
        password = userinfo.partition(":")[2] if ":" in userinfo else None
    else:
        parts = _split(url)
        if parts is None or parts.scheme not in ("sqlite", "redis", "rediss", "memory"):
            section.fail(
                section.key("url"),
                "must be sqlite:///path, redis://host:port/db, redis+sentinel://host:26379/master/db "
                "or memory://",
            )
        password = parts.password if parts is not None and parts.scheme.startswith("redis") else None
    if password is not None and redis.password_file is not None:
        section.fail(
            section.key("url"), "holds a password, and store.redis.password_file names one: give it once"
        )
    if password is not None and "store.url" not in section.tree.from_env:
        log.warning(
            "%s: 'store.url' holds a Redis password in the configuration file; put it in a file named by "
            "store.redis.password_file (a mounted Secret) instead",
            section.tree.where("store.url"),
        )
    section.done()
    return StoreSettings(url, redis)


def _redis_settings(section: _Section, base: Path) -> RedisSettings:
    """``store.redis``, read whatever the store URL is (so a typo is found before Redis is used)."""
    sentinels_raw = section.raw("sentinels") or []
    if not isinstance(sentinels_raw, list) or not all(isinstance(s, str) for s in sentinels_raw):
        section.fail(section.key("sentinels"), "must be a list of host:port strings")
    sentinels = []
    for index, item in enumerate(sentinels_raw):
        parts = _split(f"//{item.strip()}")
        if parts is None or not parts.hostname or parts.path or parts.query or parts.port == 0:
            section.fail(f"{section.key('sentinels')}[{index}]", "must be host:port (26379 if left out)")
        sentinels.append(item.strip())
    master_name = section.get("master_name", str, "mymaster")
    if not _MASTER_NAME.match(master_name):
        section.fail(section.key("master_name"), "must be a Sentinel master name (letters, digits, . _ -)")
    settings = RedisSettings(
        require_durability=section.get("require_durability", bool, True),
        wait_timeout=section.duration("wait_timeout", 2),
        sentinels=tuple(sentinels),
        master_name=master_name,
        username=section.get("username", str, "") or None,
        password_file=section.path_value("password_file", base),
        sentinel_password_file=section.path_value("sentinel_password_file", base),
        tls_ca_file=section.path_value("tls_ca_file", base),
    )
    if settings.wait_timeout > 60:
        section.fail(section.key("wait_timeout"), "must be at most 60 seconds (a revocation waits for it)")
    section.done()
    return settings


def _sentinel_url(section: _Section, url: str | None, redis: RedisSettings) -> str:
    """The ``redis+sentinel://`` URL of ``store.redis.sentinels``: in place of a missing ``store.url``,
    or filling in the hosts of ``redis+sentinel:///master/db`` (``rediss+sentinel://`` for TLS)."""
    hosts = ",".join(redis.sentinels)
    if url is None:
        return f"redis+sentinel://{hosts}/{redis.master_name}/0"
    scheme, sep, rest = url.partition("://")
    netloc, _, path = rest.partition("/")
    userinfo, at, named = netloc.rpartition("@")
    if not sep or scheme.lower() not in _SENTINEL_SCHEMES or named:
        section.fail(
            section.key("url"),
            "with store.redis.sentinels must be left out, or be redis+sentinel:///master/db (or "
            "rediss+sentinel://) without hosts: give the Sentinels once",
        )
    return f"{scheme}://{userinfo}{at}{hosts}/{path or f'{redis.master_name}/0'}"


def _split(url: str) -> SplitResult | None:
    """``urlsplit(url)``, or None where it or its ``port`` raises ValueError (``redis://[::1``, ``:99999``).

    Store URLs may hold any file path (spaces, non-ASCII), so they are not held to
    :func:`sts.strict_json.split_uri`; identifiers (issuer, public URL) are.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return None
    return parts


def _tls(section: _Section, base: Path, host: str, port: int) -> TlsSettings:
    """``tls: {certificate: workload-api}`` or ``tls: {cert: FILE, key: FILE}``, optional ``public_url``."""
    source = section.get("certificate", str, "")
    cert, key = section.path_value("cert", base), section.path_value("key", base)
    if source not in ("", "workload-api"):
        section.fail(section.key("certificate"), "must be workload-api (or give cert and key files)")
    if bool(source) == bool(cert or key) or (cert is None) != (key is None):
        section.fail(section.path, "needs either certificate: workload-api or both cert and key")
    public_url = section.get("public_url", str, f"https://{host}:{port}")
    parts = split_uri(public_url)
    if parts is None or parts.scheme != "https":
        section.fail(section.key("public_url"), "must be an https URL")
    section.done()
    return TlsSettings(cert=cert, key=key, public_url=public_url.rstrip("/"))


def _workload_api(
    section: _Section, env: Mapping[str, str], trust_domains: tuple[TrustDomainSettings, ...]
) -> WorkloadApiSettings:
    settings = WorkloadApiSettings(
        socket=section.get("socket", str, "") or env.get("SPIFFE_ENDPOINT_SOCKET") or None,
        max_staleness=section.duration("max_staleness", 300),
        start_timeout=section.duration("start_timeout", 10),
    )
    if settings.socket is not None and not settings.socket.startswith("unix:///"):
        section.fail(section.key("socket"), "must be unix:///absolute/path")
    if settings.socket is None and any(t.workload_api for t in trust_domains):
        section.fail(
            section.key("socket"),
            "is needed (or SPIFFE_ENDPOINT_SOCKET) because a trust domain uses bundle: workload-api",
        )
    section.done()
    return settings


def _logging(top: _Section) -> tuple[str, str]:
    """``log_level`` and ``logging.format`` (``text``: escaped lines; ``json``: one object per line)."""
    log_level = top.get("log_level", str, "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        top.fail("log_level", "must be one of debug, info, warning, error")
    section = top.section("logging")
    log_format = section.get("format", str, "text")
    if log_format not in ("text", "json"):
        section.fail(section.key("format"), "must be text or json")
    section.done()
    return log_level, log_format


def _mtls_url(top: _Section, tls: TlsSettings | None) -> str | None:
    """``mtls_url``: where this issuer's TLS listener is, so the metadata can name it (RFC 8705 §5).

    Both listeners of one issuer serve one metadata document (RFC 8414 §3), so the plain listener's
    configuration names the TLS listener's public URL here; on the TLS listener it defaults to
    ``listen.tls.public_url`` and, if given, must be that URL.
    """
    if not top.has("mtls_url"):
        return tls.public_url if tls is not None else None
    value = top.get("mtls_url", str, "")
    parts = split_uri(value)
    if parts is None or parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        top.fail("mtls_url", "must be the https URL of the TLS listener, without query or fragment")
    if value.endswith("/"):
        top.fail("mtls_url", "must not end with '/' (the endpoint paths are appended to it)")
    if tls is not None and value != tls.public_url:
        top.fail("mtls_url", f"must equal listen.tls.public_url ({tls.public_url}) on the TLS listener")
    return value


def _check_issuer(top: _Section, issuer: str) -> None:
    """RFC 8414 §2: an https URL with no query or fragment; plain http only on loopback (development)."""
    parts = split_uri(issuer)  # None for "http://[::1", a bad port, white space or non-ASCII
    if parts is None or parts.query or parts.fragment or not parts.hostname:
        top.fail("issuer", "must be an absolute URL without query or fragment (RFC 8414 §2)")
    elif parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS):
        top.fail("issuer", "must use https (plain http is allowed only on a loopback address)")
    if issuer.endswith("/"):
        top.fail("issuer", "must not end with '/' (it is compared as an exact string)")


def _trust_domains(section: _Section, base: Path) -> tuple[TrustDomainSettings, ...]:
    out: list[TrustDomainSettings] = []
    for name in list(section.data):
        key = section.key(name)
        try:
            trust_domain = TrustDomain.parse(name)
        except SpiffeIdError as e:
            section.fail(key, f"is not a trust domain name: {e}")
        entry = section.section(name)
        bundle_file = entry.path_value("bundle_file", base)
        bundle = entry.get("bundle", str, "")
        endpoint = entry.get("bundle_endpoint", str, "") or None
        if bundle and bundle != "workload-api":
            entry.fail(entry.key("bundle"), "must be 'workload-api' (or use bundle_file / bundle_endpoint)")
        chosen = sum(bool(x) for x in (bundle_file, bundle, endpoint))
        if chosen != 1:
            entry.fail(key, "needs exactly one of bundle: workload-api, bundle_file or bundle_endpoint")
        settings = _bundle_endpoint(
            entry, base, TrustDomainSettings(trust_domain, bundle_file, bool(bundle), endpoint)
        )
        entry.done()
        if any(existing.trust_domain == trust_domain for existing in out):
            section.fail(key, f"names trust domain {trust_domain} a second time")
        out.append(settings)
    return tuple(out)


def _bundle_endpoint(entry: _Section, base: Path, source: TrustDomainSettings) -> TrustDomainSettings:
    """``source`` with the ``bundle_endpoint`` keys of its entry (SPIFFE_Federation.md §5).

    Every key is read (and so checked) whatever the source; a key of the endpoint given without
    ``bundle_endpoint``, or one of the other profile, is refused.
    """
    trust_domain, endpoint = source.trust_domain, source.bundle_endpoint
    profile = entry.get("endpoint_profile", str, "") or None
    ca_file = entry.path_value("endpoint_ca_file", base)
    spiffe_id_text = entry.get("endpoint_spiffe_id", str, "") or None
    bootstrap = entry.path_value("bootstrap_bundle_file", base)
    max_staleness = entry.duration("max_staleness", 0) or None
    if max_staleness is not None and max_staleness < MIN_ENDPOINT_STALENESS:
        entry.fail(
            entry.key("max_staleness"),
            f"must be at least {MIN_ENDPOINT_STALENESS}s: the bundle endpoint is polled at most every "
            "5 s, and the bundle must outlive a failed poll or two",
        )
    cache_file = entry.path_value("cache_file", base)
    given = {
        "endpoint_profile": profile,
        "endpoint_ca_file": ca_file,
        "endpoint_spiffe_id": spiffe_id_text,
        "bootstrap_bundle_file": bootstrap,
        "max_staleness": max_staleness,
        "cache_file": cache_file,
    }
    if endpoint is None:
        for name, value in given.items():
            if value is not None:
                entry.fail(entry.key(name), "applies only with bundle_endpoint")
        return source
    # §5.2.1.1, §5.2.2.1: https, no userinfo; the other components are not constrained, but a
    # fragment is never sent, so one can only be a mistake.
    parts = split_uri(endpoint)
    if (
        parts is None
        or parts.scheme != "https"
        or not parts.hostname
        or "@" in parts.netloc
        or parts.fragment
        or "#" in endpoint
    ):
        entry.fail(
            entry.key("bundle_endpoint"),
            "must be an https URL with a host, without userinfo or fragment (SPIFFE Federation §5.2)",
        )
    if profile is None:
        entry.fail(entry.path, "needs endpoint_profile (https_web or https_spiffe) with bundle_endpoint")
    if profile not in ENDPOINT_PROFILES:
        entry.fail(entry.key("endpoint_profile"), "must be https_web or https_spiffe")
    spiffe_id = None
    if profile == "https_web":
        for name in ("endpoint_spiffe_id", "bootstrap_bundle_file"):
            if given[name] is not None:
                entry.fail(entry.key(name), "applies only with endpoint_profile: https_spiffe")
    else:
        if ca_file is not None:
            entry.fail(
                entry.key("endpoint_ca_file"),
                "applies only with endpoint_profile: https_web (https_spiffe is authenticated "
                "with the trust domain's own bundle)",
            )
        spiffe_id = _endpoint_spiffe_id(entry, spiffe_id_text, trust_domain)
        if bootstrap is None:
            entry.fail(
                entry.path,
                "needs bootstrap_bundle_file with endpoint_profile: https_spiffe (the partner's bundle "
                "that authenticates the endpoint until a newer one is fetched)",
            )
    return TrustDomainSettings(
        trust_domain,
        source.bundle_file,
        source.workload_api,
        endpoint,
        endpoint_profile=profile,
        endpoint_ca_file=ca_file,
        endpoint_spiffe_id=spiffe_id,
        bootstrap_bundle_file=bootstrap,
        max_staleness=max_staleness,
        cache_file=cache_file,
    )


def _endpoint_spiffe_id(entry: _Section, text: str | None, trust_domain: TrustDomain) -> SpiffeId:
    """``endpoint_spiffe_id`` (§5.2.2.2): the leaf X.509-SVID's SPIFFE ID the endpoint must present."""
    key = entry.key("endpoint_spiffe_id")
    if text is None:
        entry.fail(
            entry.path,
            "needs endpoint_spiffe_id (the endpoint's SPIFFE ID) with endpoint_profile: https_spiffe",
        )
    try:
        spiffe_id = SpiffeId.parse(text or "")
    except SpiffeIdError as e:
        entry.fail(key, f"is not a SPIFFE ID: {e}")
    if not spiffe_id.path:
        entry.fail(key, "must name a workload (have a path): the endpoint presents a leaf X.509-SVID")
    if not spiffe_id.member_of(trust_domain):
        entry.fail(
            key,
            f"must be in trust domain {trust_domain}: only self-serving bundle endpoints are supported "
            "(authenticated with the bundle they serve)",
        )
    return spiffe_id


def _catalog(top: _Section, default_max_ttl: int) -> Catalog:
    raw = top.raw("catalog") or []
    if not isinstance(raw, list):
        top.fail("catalog", "must be a list of targets")
    entries: list[CatalogEntry] = []
    for index, item in enumerate(raw):
        section = _Section(top.tree, f"catalog[{index}]", item)
        entry_id = section.get("id", str, "")
        class_name = section.get("class", str, "")
        scopes = section.raw("scopes")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            section.fail(section.key("scopes"), "must be a list of scope names")
        try:
            token_class = TokenClass(class_name)
        except ValueError:
            section.fail(section.key("class"), "must be 'tool' or 'data'")
        try:
            sensitivity = Sensitivity.parse(section.get("sensitivity", str, "internal"))
        except ValueError as e:
            section.fail(section.key("sensitivity"), str(e))
        max_ttl = section.duration("max_ttl", default_max_ttl)
        resource = section.get("resource", str, "") or None
        resource_servers = frozenset(_spiffe_ids(section, "resource_servers"))
        section.done()
        try:
            entries.append(
                CatalogEntry(
                    id=entry_id,
                    token_class=token_class,
                    scopes=frozenset(scopes),
                    sensitivity=sensitivity,
                    resource=resource,
                    max_ttl=min(max_ttl, default_max_ttl),
                    resource_servers=resource_servers,
                )
            )
        except ValueError as e:
            section.fail(section.path, f"is not a valid target: {e}")
    try:
        return Catalog(entries)
    except ValueError as e:
        return top.fail("catalog", str(e))  # type: ignore[no-any-return]


def _spiffe_ids(section: _Section, name: str) -> list[SpiffeId]:
    raw = section.raw(name) or []
    key = section.key(name)
    if not isinstance(raw, list):
        section.fail(key, "must be a list of SPIFFE IDs")
    out = []
    for index, item in enumerate(raw):
        try:
            out.append(SpiffeId.parse(item))
        except SpiffeIdError as e:
            section.fail(f"{key}[{index}]", f"is not a SPIFFE ID: {e}")
    return out


def config_path_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    """The config file a WSGI worker process should load (``STS_CONFIG``), set by ``sts serve``."""
    value = (os.environ if environ is None else environ).get(CONFIG_ENV)
    return Path(value) if value else None
