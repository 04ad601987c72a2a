"""The decision log: one JSON line per decision (issued or refused), hash-chained per writer.

Each process writes its own chain: every record carries ``chain`` (a random id fixed at start),
``seq`` and ``prev`` (the SHA-256 of the previous record of that chain), and its own ``hash`` over
its canonical JSON without ``hash``. Deleting, reordering or editing a line breaks the chain, and
:func:`verify_chain` finds where. Several worker processes append to one file safely: each record is
one ``write`` on an ``O_APPEND`` descriptor.

Observers (``observers=``) are called with every event after it is written: ``sts.metrics`` counts
decisions from them, so metrics and the audit log cannot disagree. ``stdout=True`` (``audit.stdout``)
also writes every line to standard output (a log collector's copy of the same chained record).

Must not import Flask or anything of the request path; it is given plain dicts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

GENESIS = "0" * 64

log = logging.getLogger(__name__)

Observer = Callable[[Mapping[str, Any]], None]
"""Called with each recorded event (the fields given to :meth:`AuditLog.record`), after it is written."""


class AuditLog:
    """Appends decision records to a file (or standard output with path ``-``)."""

    def __init__(self, path: str, *, stdout: bool = False, observers: Sequence[Observer] = ()) -> None:
        self.path = path
        self._fd = (
            sys.stdout.fileno()
            if path == "-"
            else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        )
        # With path "-" the line already goes to standard output: written once, never twice.
        self._copy_fd = sys.stdout.fileno() if stdout and path != "-" else None
        self._observers = tuple(observers)
        self._chain = secrets.token_hex(8)
        self._seq = 0
        self._prev = GENESIS
        self._lock = threading.Lock()

    def record(self, event: Mapping[str, Any], *, now: float | None = None) -> None:
        """Write one decision; ``event`` holds its fields (decision, error, spiffe_id, target, …)."""
        with self._lock:
            self._seq += 1
            entry = {
                "ts": round(time.time() if now is None else now, 3),
                **event,
                "chain": self._chain,
                "seq": self._seq,
                "prev": self._prev,
            }
            # One canonical text: hashed as it is, then written with the hash appended as its last member.
            canonical = _canonical(entry)
            digest = hashlib.sha256(canonical.encode()).hexdigest()
            line = f'{canonical[:-1]},"hash":"{digest}"}}\n'.encode()
            os.write(self._fd, line)
            if self._copy_fd is not None:
                os.write(self._copy_fd, line)
            self._prev = digest
        for observer in self._observers:
            try:
                observer(event)
            except Exception:  # an observer (metrics) must never break the decision it observes
                log.exception("audit observer failed on a %s event", event.get("event"))

    def close(self) -> None:
        if self.path != "-":
            os.close(self._fd)


# One encoder for every line (what ``json.dumps`` with these options builds on each call).
_CANONICAL = json.JSONEncoder(separators=(",", ":"), sort_keys=True, default=str)


def _canonical(entry: Mapping[str, Any]) -> str:
    return _CANONICAL.encode(entry)


def _digest(entry: Mapping[str, Any]) -> str:
    canonical = _canonical(entry)
    return hashlib.sha256(canonical.encode()).hexdigest()


def verify_chain(lines: Iterable[str]) -> list[str]:
    """Check every chain in an audit log; returns the problems found (empty: intact)."""
    problems: list[str] = []
    last: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not {"hash", "chain", "seq", "prev"} <= entry.keys():
            problems.append(f"line {number}: not an audit record")
            continue
        claimed = entry.pop("hash")
        chain, seq, prev = entry["chain"], entry["seq"], entry["prev"]
        if _digest(entry) != claimed:
            problems.append(f"line {number}: record was altered (hash mismatch)")
        expected_seq, expected_prev = last.get(chain, (0, GENESIS))
        if seq != expected_seq + 1 or prev != expected_prev:
            problems.append(f"line {number}: chain {chain} broken (a record is missing or out of order)")
        last[chain] = (seq, claimed)
    return problems
