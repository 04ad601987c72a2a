"""One ``sts dev`` per state directory: a lock file holding the owner's pid.

The lock is an ``flock`` on ``DIR/dev.lock``: the kernel drops it when its process dies, however it
dies, so a lock that can be taken is provably stale and the sockets and ``dev.json`` it left behind
may be replaced; a lock that cannot be taken belongs to a live instance, which is left untouched.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from sts.errors import ConfigError

LOCK_NAME = "dev.lock"


class StateDirLock:
    """Held for the life of one ``sts dev``; refuses (:class:`ConfigError`) when another one holds it."""

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> StateDirLock:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{self._path.parent} is in use by a running sts dev (pid {owner}); "
                "stop it first, or give another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            self._path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
