"""Read deadlines for many connections at the cost of one timer (issue 11: slow clients).

A per-request ``asyncio.timeout`` costs a timer handle per request (measured: ~8 µs of a ~25 µs
RSGI request). Here a request only registers its task with an absolute deadline (a dict insert);
one sweeper task per event loop wakes every ``interval`` seconds and cancels the tasks whose
deadline has passed. A deadline is therefore met to within ``interval`` (0.25 s), which is all a
read deadline of several seconds needs.
"""

from __future__ import annotations

import asyncio
import time


class Deadlines:
    """Deadlines for tasks of one event loop; :meth:`start` it on that loop before the first use."""

    def __init__(self, interval: float = 0.25) -> None:
        self._interval = interval
        self._due: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())

    def arm(self, seconds: float) -> asyncio.Task[object]:
        """Cancel the current task if it is still armed ``seconds`` from now."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover (only ever called from a coroutine)
            raise RuntimeError("Deadlines.arm() outside a task")
        self._due[task] = time.monotonic() + seconds
        return task

    def disarm(self, task: asyncio.Task[object]) -> bool:
        """Stop watching ``task``; True when its deadline had passed (the cancellation was ours).

        When it was ours, the cancellation is withdrawn (``Task.uncancel``), so the task goes on to
        answer 408 as if nothing had been cancelled.
        """
        self._due.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            task.uncancel()
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
            late = [task for task, due in self._due.items() if due <= now]
            for task in late:
                del self._due[task]
                self._expired.add(task)
                task.cancel()
