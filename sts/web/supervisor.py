"""The plain listener's worker supervisor: uvicorn's, with a deadline on stopping.

uvicorn's :class:`~uvicorn.supervisors.Multiprocess` forwards SIGINT/SIGTERM to its workers and then
joins each one without a time limit, so one worker stuck past its graceful shutdown keeps ``sts
serve`` (and the port) alive forever. Here the join is bounded by the drain deadline plus a margin
for the lifespan shutdown (token index, audit log and store flushed); a worker still alive then is killed and
logged, so a stop always ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

import uvicorn
from uvicorn.supervisors import Multiprocess

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported
MULTIPROC_PREFIX = "sts-metrics-"

SHUTDOWN_MARGIN_SECONDS = 3.0  # after the drain: lifespan shutdown, the token index written, the store closed


class BoundedMultiprocess(Multiprocess):
    """:class:`Multiprocess` whose stop takes at most ``drain_seconds`` + a margin."""

    def __init__(
        self,
        config: uvicorn.Config,
        sockets: list[socket.socket],
        *,
        drain_seconds: float,
    ) -> None:
        super().__init__(config, sockets=sockets)
        self._drain_seconds = drain_seconds

    def join_all(self) -> None:
        deadline = time.monotonic() + self._drain_seconds + SHUTDOWN_MARGIN_SECONDS
        for worker in self.processes:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in self.processes:
            if worker.process.is_alive():
                log.error("worker %s did not stop within the drain deadline; killing it", worker.pid)
                worker.kill()
                worker.join()

    def keep_subprocess_alive(self) -> None:
        """uvicorn's restart of dead workers, then their metrics files marked dead (``sts.metrics``)."""
        before = {worker.pid for worker in self.processes}
        super().keep_subprocess_alive()
        after = {worker.pid for worker in self.processes}
        if before - after:
            from sts.metrics import worker_exited

            for pid in before - after:
                worker_exited(pid)


@contextlib.contextmanager
def multiprocess_dir(parent: str | None = None) -> Iterator[str]:
    """A private ``PROMETHEUS_MULTIPROC_DIR`` for the workers of one ``sts serve``, removed on exit.

    Always a fresh directory (mode 0700, from ``mkdtemp``): files left by another run would be summed
    into this one's counters. It must be set before this process or any worker imports
    prometheus_client (workers are spawned or forked later), which is why it lives here and not in
    ``sts.metrics``. Its name carries this process's pid, so that the next start removes the
    directories of runs that could not remove their own (killed, or ended without unwinding).
    """
    parent = parent if parent is not None else tempfile.gettempdir()
    remove_stale_multiprocess_dirs(parent)
    directory = tempfile.mkdtemp(prefix=f"{MULTIPROC_PREFIX}{os.getpid()}-", dir=parent)
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)


def remove_stale_multiprocess_dirs(parent: str) -> list[str]:
    """Remove this user's ``sts-metrics-<pid>-*`` directories under ``parent`` whose ``sts serve`` is
    gone; the paths removed. Another user's, a live process's, and names of another form stay."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        pid_text = entry.name.removeprefix(MULTIPROC_PREFIX).partition("-")[0]
        if not entry.name.startswith(MULTIPROC_PREFIX) or not pid_text.isdigit() or len(pid_text) > 10:
            continue
        try:
            mine = entry.stat(follow_symlinks=False).st_uid == os.getuid()
            if not mine or not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        if _process_alive(int(pid_text)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process, alive
    except (OverflowError, ValueError):
        return False  # a number no process can have
    return True
