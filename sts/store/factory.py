"""``open_store(url)``: the store URL grammar, checked before any backend is touched.

    memory://                     MemoryStore (one process; tests)
    sqlite:///abs/path/sts.db     SqliteStore on that file (``sqlite:////abs/…`` is the same file)
    redis://host[:port][/db]      DurableRedisStore; ``rediss://`` for TLS; query options go to redis-py
    redis+sentinel://host[:port][,host[:port]…][/master[/db]]
                                  DurableRedisStore on the primary the Sentinels name;
                                  ``rediss+sentinel://`` for TLS (``sts.store.redis_connect``)

A wrong URL is a ``ValueError`` whose message names what is wrong (config turns it into an error
naming ``store.url``). Relative SQLite paths are refused rather than resolved against whatever the
working directory happens to be. Backends are imported only when chosen, so ``redis`` is needed only
by deployments that use it.

Imports only ``sts.store`` of the project.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sts.store import RedisOptions, Store

REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")


def open_store(
    url: str,
    *,
    clock: Callable[[], float] = time.time,
    redis: RedisOptions | None = None,
    report: Callable[[Mapping[str, Any]], None] | None = None,
) -> Store:
    """The store named by ``url``; ValueError (naming the scheme or the fault) for anything else.

    ``redis`` are the ``store.redis`` settings of a Redis store; ``report`` receives the audit records
    of store losses (``sts.store.epoch``).
    """
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"store URL {url!r} has no scheme (memory://, sqlite:///abs/path, redis://)")
    if scheme == "memory":
        if rest not in ("", "//"):
            raise ValueError(f"memory store URL takes nothing after 'memory://', got {url!r}")
        from sts.store.memory import MemoryStore

        return MemoryStore(clock)
    if scheme == "sqlite":
        from sts.store.sqlite import SqliteStore

        return SqliteStore(sqlite_path(url), clock=clock)
    if scheme in REDIS_SCHEMES:
        from sts.store.redis_connect import check_url
        from sts.store.redis_durable import DurableRedisStore

        check_url(url)
        return DurableRedisStore(url, clock=clock, options=redis, report=report)
    raise ValueError(
        f"unknown store URL scheme {scheme!r}: use memory://, sqlite:///abs/path, redis:// or redis+sentinel://"
    )


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///abs/path`` URL: absolute, without ``.``/``..`` parts, taken verbatim.

    The path is not percent-decoded: config builds these URLs by joining a path to ``sqlite://``.
    """
    rest = url.partition(":")[2]
    if not rest.startswith("//"):
        raise ValueError(f"store URL {url!r}: write sqlite:///abs/path/to/sts.db")
    raw = rest[2:]
    if not raw.startswith("/"):
        raise ValueError(
            f"store URL {url!r}: the SQLite path {raw!r} is relative (or names a host); "
            "write an absolute path, sqlite:///abs/path/to/sts.db"
        )
    if "?" in raw or "#" in raw:
        raise ValueError(f"store URL {url!r}: a SQLite store URL takes no query or fragment")
    parts = raw.split("/")
    if any(part in (".", "..") for part in parts):
        raise ValueError(
            f"store URL {url!r}: the SQLite path must be absolute without '.' or '..' parts "
            "(relative paths are refused)"
        )
    path = Path("/" + raw.lstrip("/"))
    if raw.endswith("/") or path == Path("/"):
        raise ValueError(f"store URL {url!r}: the SQLite path names a directory, not a file")
    return path
