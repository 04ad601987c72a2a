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
  cached, nor is one lower than a counter this process has seen.

So a reader whose check began after a write returned sees it, exactly as without memory: a change
committed while the reader was reading SQLite is either in what it read or moves the counter past the
tag it cached under. A tag names the counter file too (its inode): a file deleted or replaced under a
running server is noticed within :data:`FILE_CHECK_SECONDS`, then nothing is kept until this process
has opened the file the path names now (a reader does at once, a writer before it writes). Each
process has its own descriptor (a forked child opens its own, or ``flock`` would not keep it apart from
its parent). What no counter can catch (an older build writing the same file during an upgrade, or a
process that could not open the counter) is bounded by the entries' lifetime in the store (one second).

Imports nothing of the project.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = "-changes"
_COUNTER = struct.Struct("<Q")
_LOCK_RETRY_SECONDS = 0.005
FILE_CHECK_SECONDS = 0.25
"""How often a reader checks that its counter file is still the one the path names."""

Generation = tuple[int, int]
"""A read's tag: the counter file's inode and the counter's value."""


class ChangeGeneration:
    """One process's handle on the counter file of one database (safe across threads and processes).

    ``lock_timeout``: how long a writer waits for another process's ``flock`` before it gives up
    (OSError), as SQLite's busy timeout bounds the wait for its write lock.
    """

    def __init__(self, path: Path, *, lock_timeout: float = 5.0) -> None:
        self.path = path
        self._lock_timeout = lock_timeout
        self._closed = False
        self._retired: list[int] = []  # descriptors of files replaced under us (kept open: no reuse)
        self._fd = -1
        # What readers use, swapped whole: the descriptor and its file's inode, so a tag always names
        # the file its value was read from (a reopen on another thread cannot pair one with another's).
        self._file: tuple[int, int] = (-1, 0)
        self._next_file_check = 0.0  # monotonic time of the next check that the file is still there
        self._seen: Generation = (0, 0)  # the highest counter read, with the inode it was read from
        self._reset_locks()
        self._use(self._open())
        _HANDLES.add(self)

    @classmethod
    def beside(cls, database: Path, *, lock_timeout: float = 5.0) -> ChangeGeneration | None:
        """The counter of ``database``, or None when its file cannot be opened (then nothing is kept in
        memory and every read goes to SQLite, as before)."""
        path = Path(os.path.realpath(database) + SUFFIX)
        try:
            return cls(path, lock_timeout=lock_timeout)
        except OSError as e:
            log.warning(
                "%s: cannot open %s (%s): every exchange reads its kill switch and exceptions from SQLite",
                database,
                path,
                e,
            )
            return None

    def current(self) -> Generation | None:
        """The tag for a read about to start, or None when what is read now must not be kept: a write
        is in progress (odd), the counter went back, its file is gone or replaced, or unreadable."""
        fd, inode = self._file
        if self._closed or fd < 0:
            return None
        try:
            value = _read(fd)
            now = time.monotonic()
            if now >= self._next_file_check:  # fstat is a few µs: not on every exchange
                self._next_file_check = now + FILE_CHECK_SECONDS
                if os.fstat(fd).st_nlink == 0:  # deleted or replaced: its writers write elsewhere now
                    self._next_file_check = 0.0
                    self._replace_if_free()
                    return None
        except OSError:
            return None
        tag = (inode, value)
        with self._state:
            seen_inode, seen = self._seen
            if value % 2 or (inode == seen_inode and value < seen):
                return None
            self._seen = tag
        return tag

    def _replace_if_free(self) -> None:
        """Open the file the path names now, unless a writer of this process is at work (it will)."""
        if self._writing.acquire(blocking=False):
            try:
                self._reopen_if_replaced()
            except OSError:
                log.warning("%s: cannot open the change counter again", self.path, exc_info=True)
            finally:
                self._writing.release()

    @contextmanager
    def changing(self) -> Iterator[None]:
        """Around a write of kill switches or exceptions: odd before the write, even after its commit.

        Raises OSError, with nothing written, when the counter cannot be made odd (or its lock is not
        had within ``lock_timeout``). When it cannot be made even again the write stands and the error
        is logged: an odd counter only stops this file's readers from keeping anything until the next
        change.
        """
        with self._writing:
            if self._closed:
                raise OSError(f"{self.path}: closed")
            self._reopen_if_replaced()
            fd = self._fd
            self._flock(fd)
            try:
                value = _read(fd)
                in_progress = value + 1 if value % 2 == 0 else value + 2  # odd: a writer died here before
                os.pwrite(fd, _COUNTER.pack(in_progress), 0)
                try:
                    yield
                finally:
                    try:
                        os.pwrite(fd, _COUNTER.pack(in_progress + 1), 0)
                    except OSError:
                        log.exception(
                            "%s: the change counter stays odd: kill switches and exceptions are read "
                            "from SQLite on every exchange until the next change",
                            self.path,
                        )
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._writing:
            self._closed = True
            for fd in [self._fd, *self._retired]:
                if fd >= 0:
                    os.close(fd)
            self._use(-1)
            self._retired = []

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _reset_locks(self) -> None:
        self._writing = threading.Lock()  # writers of this process, one at a time (flock: processes)
        self._state = threading.Lock()  # _seen
        self._seen = (0, 0)

    def _use(self, fd: int) -> None:
        """Read and write ``fd`` from now on (-1: none)."""
        inode = os.fstat(fd).st_ino if fd >= 0 else 0
        self._fd, self._file = fd, (fd, inode)

    def _reopen_if_replaced(self) -> None:
        """With ``_writing`` held: open the file the path names now, if ours is gone or another one."""
        fd = self._fd
        if fd >= 0:
            try:
                named = os.stat(self.path)
                mine = os.fstat(fd)
                if (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino):
                    return
            except FileNotFoundError:
                pass
        replacement = self._open()
        if fd >= 0:
            self._retired.append(fd)
        self._use(replacement)

    def _flock(self, fd: int) -> None:
        deadline = time.monotonic() + self._lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.path}: another process holds the change lock") from None
                time.sleep(_LOCK_RETRY_SECONDS)
            else:
                return

    def _after_fork_in_child(self) -> None:
        """A forked child shares its parent's descriptor (one open file, one ``flock``): its own."""
        self._reset_locks()
        if self._closed:
            return
        inherited = [self._fd, *self._retired]
        self._retired = []
        try:
            self._use(self._open())
        except OSError:
            self._use(-1)  # nothing kept; this process's writes go on (sts.store.sqlite)
        for fd in inherited:
            if fd >= 0:
                os.close(fd)  # the child's copy only: the parent's stays open


def _read(fd: int) -> int:
    data = os.pread(fd, _COUNTER.size, 0)
    return int(_COUNTER.unpack(data)[0]) if len(data) == _COUNTER.size else 0


_HANDLES: weakref.WeakSet[ChangeGeneration] = weakref.WeakSet()


def _reopen_all_in_child() -> None:
    for handle in list(_HANDLES):
        handle._after_fork_in_child()


os.register_at_fork(after_in_child=_reopen_all_in_child)
