"""Read deadlines for many connections at the cost of one timer (issue 11: slow clients).

A per-request ``asyncio.timeout`` or ``wait_for`` costs a timer handle (and for ``wait_for`` a task)
per request (measured: ~8 µs of a ~25 µs request). Here a request only registers its task (or the
future it awaits) with an absolute deadline: a dict insert. One sweeper task per event loop wakes
every ``interval`` seconds and cancels what is past its deadline, so the awaiting coroutine gets
``CancelledError`` and answers 408. A deadline is met to within ``interval`` (0.25 s), which is all
a read deadline of several seconds needs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Cancellable(Protocol):
    def cancel(self) -> bool: ...


class Deadlines:
    """Deadlines for futures of one event loop; :meth:`start` it on that loop before the first use."""

    def __init__(self, interval: float = 0.25) -> None:
        self._interval = interval
        self._due: dict[Cancellable, float] = {}
        self._expired: set[Cancellable] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())

    def arm(self, future: Cancellable, seconds: float) -> None:
        """Cancel ``future`` if it is still armed ``seconds`` from now."""
        self._due[future] = time.monotonic() + seconds

    def disarm(self, future: Cancellable) -> bool:
        """Stop watching ``future``; True when its deadline had passed (the cancellation was ours).

        For a task, our cancellation is then withdrawn (``Task.uncancel``), so it goes on to answer
        408 as if it had not been cancelled.
        """
        self._due.pop(future, None)
        if future in self._expired:
            self._expired.discard(future)
            if isinstance(future, asyncio.Task):
                future.uncancel()
            return True
        return False

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            now = time.monotonic()
            late = [future for future, due in self._due.items() if due <= now]
            for future in late:
                del self._due[future]
                self._expired.add(future)
                future.cancel()
