"""The plain listener's worker supervisor: uvicorn's, with a deadline on stopping.

uvicorn's :class:`~uvicorn.supervisors.Multiprocess` forwards SIGINT/SIGTERM to its workers and then
joins each one without a time limit, so one worker stuck past its graceful shutdown keeps ``sts
serve`` (and the port) alive forever. Here the join is bounded by the drain deadline plus a margin
for the lifespan shutdown (audit log and store flushed); a worker still alive then is killed and
logged, so a stop always ends.
"""

from __future__ import annotations

import logging
import socket
import time

import uvicorn
from uvicorn.supervisors import Multiprocess

log = logging.getLogger(__name__)

SHUTDOWN_MARGIN_SECONDS = 3.0  # after the drain: lifespan shutdown, closing the store


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
