"""The operators' token index for plain exchanges, written in batches off the request path.

A plain token (no task budget, no break-glass exception) needs its index entry only for the live view
(``/admin/tokens``, ``/admin/tasks/<id>``): it stays verifiable and revocable without it, by ``jti``,
task and workload kill switch, none of which reads the index. So :meth:`TokenIndexWriter.add` queues
the entry and a background thread writes the queue with :meth:`~sts.store.Store.record_tokens` every
:data:`FLUSH_INTERVAL` seconds, or sooner when :data:`FLUSH_AT` entries wait: one store transaction for
many exchanges instead of one each.

Bounds, fail closed:

- **Back-pressure.** When :data:`MAX_QUEUED` entries are unwritten (the store is slow or down), ``add``
  writes synchronously with :meth:`~sts.store.Store.record_token`: the request pays, and a store
  error reaches it (StoreUnavailable, 503). Memory never grows past the bound.
- **Failure.** A failed background write keeps the entries and retries on the next tick; it is logged
  once per streak of failures.
- **Staleness.** Another process's entries appear within about :data:`FLUSH_INTERVAL`; the admin views
  call :meth:`TokenIndexWriter.flush` first, so this process's own are always there.
- **Crash.** A killed worker loses at most its last ~:data:`FLUSH_INTERVAL` seconds of plain entries;
  a graceful stop (``close``, from ``Services.close``) writes them all.

Task tokens (the budget is taken in the same write) and tokens issued under an exception (withdrawing
it revokes them through the index, so the entry must be durable before the token is returned) never
come here: :mod:`sts.exchange` records them synchronously.

The thread is started lazily by the process that adds, never inherited: a forked child starts with an
empty queue (its parent writes its own entries).

Imports only ``sts.store`` of the project.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

from sts.store import Store, StoreUnavailable, TokenRecord

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.05  # seconds between background writes
FLUSH_AT = 256  # entries that wake the writer before its interval
MAX_QUEUED = 10_000  # unwritten entries past which add() writes synchronously
MAX_BATCH = 1024  # entries per record_tokens call
CLOSE_TIMEOUT = 5.0  # seconds close() waits for a background write in progress


class TokenIndexWriter:
    """A bounded queue of index entries and the daemon thread that writes it; see the module."""

    def __init__(
        self,
        store: Store,
        *,
        interval: float = FLUSH_INTERVAL,
        flush_at: int = FLUSH_AT,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self._store = store
        self._interval = interval
        self._flush_at = max(1, flush_at)
        self._max_queued = max(0, max_queued)
        self._reset()
        _LIVE.add(self)

    def _reset(self) -> None:
        """A fresh, empty, open writer for this process (after a fork: nothing of the parent's)."""
        self._lock = threading.Lock()  # the queue, the thread, closed
        self._flushing = threading.Lock()  # one writer at a time: entries leave from the front only
        self._queue: list[TokenRecord] = []
        self._wake = threading.Event()  # something is queued
        self._full = threading.Event()  # a batch is full: write before the interval ends
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failing = False
        self._pid = os.getpid()

    @property
    def queued(self) -> int:
        """Entries not written yet."""
        return len(self._queue)

    def add(self, record: TokenRecord) -> None:
        """Queue ``record``; written synchronously instead when the queue is full or the writer closed."""
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            if not self._closed and len(self._queue) < self._max_queued:
                self._queue.append(record)
                if len(self._queue) == 1:
                    self._wake.set()  # the first entry: the writer starts its interval
                if len(self._queue) >= self._flush_at:
                    self._full.set()
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="sts-token-index", daemon=True)
                    self._thread.start()
                return
        self._store.record_token(record)  # back-pressure: this request pays (and sees a store error)

    def flush(self) -> None:
        """Write every entry queued now; a store error propagates and leaves the rest queued."""
        if self._pid != os.getpid():
            self._reset()
        with self._flushing:
            with self._lock:
                remaining = len(self._queue)
            while remaining > 0:
                with self._lock:
                    batch = self._queue[: min(MAX_BATCH, remaining)]
                self._store.record_tokens(batch)
                with self._lock:
                    del self._queue[: len(batch)]  # add() only appends: the front is still this batch
                remaining -= len(batch)

    def close(self) -> None:
        """Stop the thread and write what is queued (a graceful stop loses nothing); later adds are
        written synchronously. A store error here is logged, not raised: shutdown goes on."""
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        self._stop.set()
        self._wake.set()
        self._full.set()
        if thread is not None:
            thread.join(CLOSE_TIMEOUT)
        try:
            self.flush()
        except Exception as exc:  # any failure: say what is lost, then keep shutting down
            log.error(  # noqa: TRY400 (an expected store failure: its detail, no traceback)
                "token index: %d entries of plain tokens not written at shutdown: %s", self.queued, _why(exc)
            )

    def _run(self) -> None:
        """Sleep while nothing is queued; then write once per interval (sooner when a batch is full)."""
        while not self._stop.is_set():
            self._wake.clear()
            if not self._queue:  # read after the clear: an add from now on sets it again
                self._wake.wait()
            self._full.wait(self._interval)
            self._full.clear()
            if self._stop.is_set():
                return  # close() writes the rest itself
            try:
                self.flush()
            except Exception as exc:  # the thread must live on: the entries are retried
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "token index: writing %d entries failed, retrying every %.0f ms: %s",
                        self.queued,
                        self._interval * 1000,
                        _why(exc),
                    )
                continue
            if self._failing:
                self._failing = False
                log.info("token index: written again")


def _why(exc: Exception) -> str:
    if isinstance(exc, StoreUnavailable):
        return exc.detail or exc.description
    return f"{type(exc).__name__}: {exc}"


_LIVE: weakref.WeakSet[TokenIndexWriter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for writer in list(_LIVE):
        writer._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
