"""A per-source budget for refusals of requests that never authenticated (issue 11).

Every refusal is audited, so an anonymous client sending garbage as fast as it can would grow the
audit log without bound. This limiter gives each source address a budget of *refusals* per window.
Only refusals are counted and only a refusal is ever turned into ``429``: a request that carries a
valid credential is served whatever its address has done, so an attacker that shares an address
with workloads (a NAT, a node) cannot use the limit to lock them out. Refusals past the budget are
not audited one by one; when the window ends one summary line says how many were suppressed
(nothing is dropped silently).

The state is per worker process and bounded: at most ``max_sources`` addresses are tracked; past
that, new addresses share one overflow bucket (``"*"``), which is still bounded and still audited.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

OVERFLOW_SOURCE = "*"


@dataclass(slots=True)
class _Window:
    started: float
    refusals: int = 0
    suppressed: int = 0


def source_key(source: str) -> str:
    """The address a budget is kept for: an IPv6 source by its /64 (one host usually holds a whole
    /64, so per-address budgets would be 2**64 budgets), an IPv4 source as it is."""
    if ":" not in source:
        return source
    try:
        return str(ipaddress.IPv6Network(f"{source}/64", strict=False))
    except ValueError:
        return source


class RefusalLimiter:
    """``admit(source, now)`` for each anonymous refusal: True means audit and answer it normally."""

    def __init__(
        self,
        *,
        per_window: int,
        window_seconds: float = 60.0,
        max_sources: int = 10_000,
        report: Callable[[str, int, float, float], None],
    ) -> None:
        self._per_window = per_window
        self._window = window_seconds
        self._max_sources = max_sources
        self._report = report  # (source, suppressed, window start, window end): one audit line
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, _Window] = OrderedDict()  # oldest window first

    def admit(self, source: str, now: float) -> bool:
        """Count one refusal for ``source``; False when its budget for this window is spent."""
        source = source_key(source)
        with self._lock:
            ended = self._expire(now)
            key = source if source in self._windows or len(self._windows) < self._max_sources else None
            key = key or OVERFLOW_SOURCE
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(started=now)
            window.refusals += 1
            admitted = window.refusals <= self._per_window
            if not admitted:
                window.suppressed += 1
        self._flush(ended)
        return admitted

    def retry_after(self, source: str, now: float) -> int:
        """Whole seconds until ``source``'s window ends (for ``Retry-After``), at least 1."""
        with self._lock:
            window = self._windows.get(source_key(source)) or self._windows.get(OVERFLOW_SOURCE)
            remaining = (window.started + self._window - now) if window else 1.0
        return max(1, int(remaining + 0.999))

    def close(self, now: float) -> None:
        """Report every window that still holds suppressed refusals (at shutdown)."""
        with self._lock:
            ended = list(self._windows.items())
            self._windows.clear()
        self._flush(ended, end=now)

    def _expire(self, now: float) -> list[tuple[str, _Window]]:
        ended = []
        while self._windows:
            source, window = next(iter(self._windows.items()))
            if window.started + self._window > now:
                break
            self._windows.popitem(last=False)
            ended.append((source, window))
        return ended

    def _flush(self, ended: list[tuple[str, _Window]], end: float | None = None) -> None:
        for source, window in ended:
            if window.suppressed:
                finish = window.started + self._window if end is None else end
                self._report(source, window.suppressed, window.started, finish)
