"""How the STS reaches its Redis: one primary, or the primary a set of Sentinels names; TLS; ACL credentials.

    redis://[user@]host[:port][/db]                       one Redis (the primary)
    rediss://…                                            the same over TLS
    redis+sentinel://[user@]host[:port][,host[:port]…][/master[/db]]
                                                          the primary Redis Sentinel names (port 26379)
    rediss+sentinel://…                                   the same, TLS to the Sentinels and the Redis

The password is read from ``store.redis.password_file`` on every new connection (so a rotated Secret is
used without a restart), not taken from the URL in the configuration file; a URL password (from
``STS_STORE_URL``, a Secret) still works. Sentinels that require a password get
``store.redis.sentinel_password_file``. ``store.redis.tls_ca_file`` is the CA that signs the Redis (and
Sentinel) certificates; without it the system CAs are used.

Every connection is checked once when it is made (``on_connect``): it must reach the primary (``ROLE``
answers ``master``; where the ACL does not allow ROLE this is skipped), and it reads the store epoch
(``sts.store.epoch``) so a replaced Redis is noticed before it answers anything.

Imports only ``sts.store`` of the project (and ``redis``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.retry import Retry
from redis.sentinel import Sentinel

from sts.store import RedisOptions

__all__ = ["Connected", "FileCredentials", "RedisOptions", "SentinelUrl", "check_url", "connect"]

CONNECT_TIMEOUT = 0.5  # seconds; a dead or unreachable Redis must not hold a request for long
READ_TIMEOUT = 1.0
HEALTH_CHECK_INTERVAL = 15  # seconds idle before a pooled connection is PINGed before use
SENTINEL_PORT = 26379
REDIS_PORT = 6379
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master: str | None
    db: int
    tls: bool
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """``redis+sentinel://[user[:password]@]host[:port][,host[:port]…][/master[/db]]``.

    ValueError naming the fault."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"store URL {url!r}: not a redis+sentinel:// URL")
    if "?" in rest or "#" in rest:
        raise ValueError(f"store URL {url!r}: a Sentinel URL takes no query or fragment")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        try:
            parts = urlsplit(f"//{item}")
            port = parts.port
        except ValueError:
            raise ValueError(f"store URL {url!r}: the Sentinel {item!r} has no valid port") from None
        if not parts.hostname:
            raise ValueError(
                f"store URL {url!r} names no Sentinel host: write redis+sentinel://host:26379/mymaster/0"
            )
        if port == 0:
            raise ValueError(f"store URL {url!r}: port 0 is not a Sentinel port")
        sentinels.append((parts.hostname, port or SENTINEL_PORT))
    segments = [unquote(s) for s in path.split("/")] if path else []
    if len(segments) > 2 or (segments and not segments[0] and len(segments) > 1):
        raise ValueError(
            f"store URL {url!r}: the path is /master/db (redis+sentinel://host:26379/mymaster/0)"
        )
    master = segments[0] if segments and segments[0] else None
    db_text = segments[1] if len(segments) > 1 else ""
    if db_text and not db_text.isdigit():
        raise ValueError(f"store URL {url!r}: the database {db_text!r} must be a number")
    return SentinelUrl(
        sentinels=tuple(sentinels),
        master=master,
        db=int(db_text) if db_text else 0,
        tls=scheme.lower() == "rediss+sentinel",
        username=username,
        password=password,
    )


def check_url(url: str) -> None:
    """Refuse what redis-py would misread or only fail on at the first request: no host, a bad port or db."""
    scheme = url.partition(":")[0].lower()
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
        return
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"store URL {url!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"store URL {url!r} names no host: write redis://host:6379/0")
    if port == 0:
        raise ValueError(f"store URL {url!r}: port 0 is not a Redis port")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"store URL {url!r}: the database {db!r} must be a number (redis://host:6379/0)")


def client_defaults() -> dict[str, Any]:
    """Timeouts and retries every Redis client of the store uses."""
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": READ_TIMEOUT,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        # Retry once, at once, and only when the connection broke (not on a timeout): that heals a pooled
        # connection a restarted Redis closed, and a dead Redis still fails at once.
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    }


class FileCredentials(CredentialProvider):
    """ACL user and a password read from a file (re-read when it changes: a rotated Secret)."""

    def __init__(self, username: str | None, password_file: Path) -> None:
        self._username = username
        self._file = password_file
        self._lock = threading.Lock()
        self._cached: tuple[float, str] | None = None

    def password(self) -> str:
        with self._lock:
            mtime = self._file.stat().st_mtime
            if self._cached is None or self._cached[0] != mtime:
                text = self._file.read_text(encoding="utf-8").rstrip("\r\n")
                self._cached = (mtime, text)
            return self._cached[1]

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        try:
            secret = self.password()
        except OSError as e:
            raise redis.AuthenticationError(f"cannot read the Redis password file {self._file}: {e}") from e
        return (self._username, secret) if self._username else (secret,)


@dataclass(frozen=True, slots=True)
class Connected:
    """Clients for the primary, how to name it in messages, and the Sentinel manager if there is one.

    ``writer`` has its own pool whose read timeout also covers ``WAIT`` (``store.redis.wait_timeout``):
    security writes wait for a replica's confirmation without tripping the short read timeout of
    ``client``, which every other command keeps (a dead Redis still fails fast).
    """

    client: redis.Redis
    writer: redis.Redis
    address: str
    sentinel: Sentinel | None


def connect(url: str, options: RedisOptions, on_connect: Callable[[Any], None]) -> Connected:
    """The client for ``url`` (nothing is connected until it is used)."""
    scheme = url.partition(":")[0].lower()
    kwargs: dict[str, Any] = {**client_defaults(), "redis_connect_func": on_connect}
    if scheme in ("rediss", "rediss+sentinel") and options.tls_ca_file is not None:
        kwargs["ssl_ca_certs"] = str(options.tls_ca_file)
    if scheme in SENTINEL_SCHEMES:
        parsed = parse_sentinel_url(url)
        username = parsed.username or options.username
        if options.password_file is not None and parsed.password is not None:
            raise ValueError("the Redis password is given twice: in store.url and store.redis.password_file")
        if options.password_file is not None:
            kwargs["credential_provider"] = FileCredentials(username, options.password_file)
        elif parsed.password is not None or username:
            kwargs.update(username=username, password=parsed.password)
        sentinel_kwargs: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": READ_TIMEOUT,
        }
        if options.sentinel_password_file is not None:
            sentinel_kwargs["credential_provider"] = FileCredentials(None, options.sentinel_password_file)
        if parsed.tls:
            kwargs["ssl"] = True
            sentinel_kwargs["ssl"] = True
            if options.tls_ca_file is not None:
                sentinel_kwargs["ssl_ca_certs"] = str(options.tls_ca_file)
        master = parsed.master or options.master_name
        # redis < 8.2 leaves Sentinel untyped; 8.2 types it: the ignores hold for both.
        manager = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs, **kwargs
        )
        client = cast("redis.Redis", manager.master_for(master, db=parsed.db))  # type: ignore[no-untyped-call,unused-ignore]
        writer = cast(
            "redis.Redis",
            manager.master_for(master, db=parsed.db, socket_timeout=_write_timeout(options)),  # type: ignore[no-untyped-call,unused-ignore]
        )
        hosts = ",".join(f"{host}:{port}" for host, port in parsed.sentinels)
        return Connected(client, writer, f"sentinel {hosts} master {master}/{parsed.db}", manager)
    parts = urlsplit(url)
    if options.password_file is not None:
        if parts.password is not None:
            raise ValueError("the Redis password is given twice: in store.url and store.redis.password_file")
        username = unquote(parts.username) if parts.username else options.username
        kwargs["credential_provider"] = FileCredentials(username, options.password_file)
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # the user goes with it
    elif options.username and not parts.username:
        kwargs["username"] = options.username
    client = redis.Redis.from_url(url, **kwargs)
    writer = redis.Redis.from_url(url, **{**kwargs, "socket_timeout": _write_timeout(options)})
    connection = client.connection_pool.connection_kwargs
    address = f"{connection.get('host', '?')}:{connection.get('port', '?')}/{connection.get('db', 0)}"
    return Connected(client, writer, address, None)


def _write_timeout(options: RedisOptions) -> float:
    return READ_TIMEOUT + options.wait_timeout
