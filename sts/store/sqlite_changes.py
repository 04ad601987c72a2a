"""The change generation of a SQLite store's kill switches and exceptions, shared by its processes.

Every exchange reads its subject's kill switch and exceptions (``SqliteStore.issuance_checks``); they
change only when an administrator acts, yet reading them from SQLite is ~13 µs alone and ~40-60 µs
inside a busy worker (its page cache goes cold between exchanges; measured in bench/README.md). So
each process keeps what it read in memory, tagged with this generation, and reads SQLite again as
soon as the generation moves. The generation is a 64-bit counter in a file beside the database
(``<database>-changes``, mode 0600, its real path so a symlinked database shares it), read with one
``pread`` and written under an exclusive ``flock``, like a sequence lock:

* a writer, holding the lock, makes the counter odd *before* it writes the rows, and even again only
  *after* its commit (:meth:`ChangeGeneration.changing`);
* a reader reads the counter *before* SQLite. An odd counter (a write in progress, or a writer that
  died between the two: ``flock`` is released with the process, the counter stays odd) is never
  cached, nor is one lower than a counter this process has seen (a file replaced or rewritten).

So a reader whose check began after a write returned sees it, exactly as without memory: a change
committed while the reader was reading SQLite is either in what it read or moves the counter past the
tag it cached under. What no counter can catch (an older build writing the same file during an
upgrade, which does not know of the counter) is bounded by the entries' lifetime in the store
(one second).

Imports nothing of the project.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = "-changes"
_COUNTER = struct.Struct("<Q")


class ChangeGeneration:
    """One process's handle on the counter file of one database (safe across threads and processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()  # flock excludes other processes; this, the threads of this one
        self._seen = 0

    @classmethod
    def beside(cls, database: Path) -> ChangeGeneration | None:
        """The counter of ``database``, or None when its file cannot be opened (then nothing is kept in
        memory and every read goes to SQLite, as before)."""
        path = Path(os.path.realpath(database) + SUFFIX)
        try:
            return cls(path)
        except OSError as e:
            log.warning(
                "%s: cannot open %s (%s): every exchange reads its kill switch and exceptions from SQLite",
                database,
                path,
                e,
            )
            return None

    def current(self) -> int | None:
        """The counter to tag a read with, or None when what is read now must not be kept: a write is
        in progress (odd), or the counter went back (the file was replaced), or it cannot be read."""
        try:
            value = self._read()
        except OSError:
            return None
        if value % 2 or value < self._seen:
            return None
        self._seen = value
        return value

    @contextmanager
    def changing(self) -> Iterator[None]:
        """Around a write of kill switches or exceptions: odd before the write, even after its commit.

        Raises OSError, with nothing written, when the counter cannot be made odd. When it cannot be
        made even again the write stands and the error is logged: an odd counter only stops this file's
        readers from keeping anything in memory until the next change.
        """
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                value = self._read()
                in_progress = value + 1 if value % 2 == 0 else value + 2  # odd: a writer died here before
                os.pwrite(self._fd, _COUNTER.pack(in_progress), 0)
                try:
                    yield
                finally:
                    try:
                        os.pwrite(self._fd, _COUNTER.pack(in_progress + 1), 0)
                    except OSError:
                        log.exception(
                            "%s: the change counter stays odd: kill switches and exceptions are read "
                            "from SQLite on every exchange until the next change",
                            self.path,
                        )
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _read(self) -> int:
        data = os.pread(self._fd, _COUNTER.size, 0)
        return _COUNTER.unpack(data)[0] if len(data) == _COUNTER.size else 0

    def close(self) -> None:
        os.close(self._fd)
