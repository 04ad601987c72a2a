"""``sts audit tail`` and ``sts audit grep``: read the decision log (:mod:`sts.audit`) without a SIEM.

The log can be many gigabytes and is written while it is read, so everything here streams: ``grep``
reads one line at a time, ``tail -n`` finds its start by scanning backwards from the end, and no line
longer than :data:`MAX_LINE` bytes is ever held in memory (a real record is a few hundred bytes; such
a line is reported and skipped while being read through). The file may hold anything, since an
attacker with write access, a crash mid-write or a wrong path put it there: a line that is not UTF-8
JSON, not an audit record, or whose ``hash`` does not match its content is reported on standard
error with its line number and left out, and the command goes on. With ``--verify`` such a line, or a
printed record whose link to the previous record of its chain is broken, stops the command with
exit 1: what was printed before it was checked, nothing after it is shown.

Human output escapes every value with :func:`sts.logsafe.escape` (a caller chooses much of what a
record holds: a SPIFFE ID's path, an error description, a request path), so one record is one
terminal line that no value can forge or recolour; ``--json`` prints the original lines byte for
byte, so they can still be verified downstream.

Exit codes follow ``sts``: 0 success, 1 a negative answer (``grep`` matched nothing, like grep(1);
``--verify`` found a problem), 2 a usage error or an unreadable file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from sts.audit import GENESIS
from sts.config import parse_duration
from sts.logsafe import escape

EXIT_OK, EXIT_NO, EXIT_USAGE = 0, 1, 2
AUDIT_PATH_ENV = "STS_AUDIT_PATH"
# Longest line considered a record: far above any real one, low enough to hold safely.
MAX_LINE = 1 << 20
_BLOCK = 1 << 16
POLL_SECONDS = 0.25
# Where a SPIFFE ID sits in a record: the subject (token_exchange), the actor token's, the
# authenticated client's, the caller of an API (tasks, introspection, revocation, admin), a task's
# assignee and creator.
SPIFFE_ID_FIELDS = ("spiffe_id", "actor", "client_id", "caller", "assignee", "creator")
# --decision words: the ones operators use, and the ones the records carry.
DECISIONS = {"issued": "allow", "refused": "deny", "allow": "allow", "deny": "deny", "ignored": "ignored"}
# Fields of the human line, in this order, after the time, event and decision.
HUMAN_FIELDS = (
    ("spiffe_id", "sub"),
    ("actor", "actor"),
    ("client_id", "client"),
    ("caller", "caller"),
    ("target", "target"),
    ("task_id", "task"),
    ("error", "error"),
    ("error_description", "why"),
    ("reason", "reason"),
    ("path", "path"),
    ("jti", "jti"),
    ("request_id", "request"),
)
_NEEDS_QUOTES = re.compile(r'[\s"=]')
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:\d{2})$")


class Problem(Exception):
    """A line that is not an intact audit record, or a broken chain: fatal only under ``--verify``."""


@dataclass(frozen=True, slots=True)
class Filters:
    """What ``grep`` keeps; an empty filter keeps everything."""

    task: str | None = None
    spiffe_id: str | None = None
    since: float | None = None
    decision: str | None = None
    error: str | None = None

    def match(self, entry: dict[str, Any]) -> bool:
        if self.task is not None and entry.get("task_id") != self.task:
            return False
        if self.spiffe_id is not None and not any(entry.get(f) == self.spiffe_id for f in SPIFFE_ID_FIELDS):
            return False
        if self.since is not None:
            ts = entry.get("ts")
            if not isinstance(ts, int | float) or isinstance(ts, bool) or ts < self.since:
                return False
        if self.decision is not None and entry.get("decision") != self.decision:
            return False
        return self.error is None or entry.get("error") == self.error


@dataclass(slots=True)
class ChainState:
    """The last (seq, hash) of each chain seen, to check that a printed record follows its predecessor.

    ``from_start``: the reading began at the first line of the file, so a chain first seen must start
    at seq 1 from the genesis hash; otherwise (a tail window) its first record is taken as the anchor.
    """

    from_start: bool
    last: dict[str, tuple[int, str]] = field(default_factory=dict)

    def link(self, entry: dict[str, Any], *, check: bool) -> None:
        chain, seq, prev, claimed = entry["chain"], entry["seq"], entry["prev"], entry["hash"]
        known = self.last.get(chain)
        if check and (known is not None or self.from_start):
            expected_seq, expected_prev = known if known is not None else (0, GENESIS)
            if seq != expected_seq + 1 or prev != expected_prev:
                raise Problem(f"chain {escape(str(chain))} broken (a record is missing or out of order)")
        self.last[chain] = (seq, claimed)


def parse_since(text: str, *, now: float | None = None) -> float:
    """``--since``: a duration back from now (``90s``, ``10m``, ``2h``, ``3d``) or an RFC 3339 time.

    An RFC 3339 time must carry its offset (``Z`` or ``+02:00``): a local time would mean different
    records on the operator's laptop and on the pod.
    """
    seconds = parse_duration(text)
    if seconds is not None and not text.strip().isdigit():
        return (time.time() if now is None else now) - seconds
    if _RFC3339.match(text.strip()):
        try:
            moment = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return moment.timestamp()
    raise ValueError(
        f"--since {text!r}: give a duration (10m, 2h, 3d) or an RFC 3339 time (2026-01-31T08:00:00Z)"
    )


def read_lines(stream: BinaryIO, *, final_partial: bool = True) -> Iterator[bytes | int]:
    """Each line of ``stream`` without its newline; a line over :data:`MAX_LINE` bytes is read
    through without being kept and yielded as its length (an int).

    ``final_partial``: yield a last line that has no newline (a finished file); when following a
    live file it is instead left unread, since its writer may not be done with it.
    """
    while True:
        start = stream.tell() if not final_partial else 0
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line[:-1].rstrip(b"\r")
            continue
        if len(line) <= MAX_LINE:  # the end of the file without a newline
            if final_partial:
                yield line
            else:
                stream.seek(start)
            return
        length = len(line)
        while True:  # too long: skip to its end, counting
            rest = stream.readline(_BLOCK)
            length += len(rest)
            if not rest or rest.endswith(b"\n"):
                break
        if not rest and not final_partial:
            stream.seek(start)
            return
        yield length - (1 if rest.endswith(b"\n") else 0)


def parse_record(line: bytes | int) -> dict[str, Any]:
    """The record a line holds, its hash checked; :class:`Problem` when it is not an intact record."""
    if isinstance(line, int):
        raise Problem(f"line of {line} bytes is too long for an audit record (limit {MAX_LINE})")
    try:
        entry = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Problem("not an audit record (not UTF-8 JSON)") from None
    if not isinstance(entry, dict) or not {"hash", "chain", "seq", "prev"} <= entry.keys():
        raise Problem("not an audit record (no hash chain)")
    claimed = entry["hash"]
    unhashed = {k: v for k, v in entry.items() if k != "hash"}
    canonical = json.dumps(unhashed, separators=(",", ":"), sort_keys=True, default=str)
    if hashlib.sha256(canonical.encode()).hexdigest() != claimed:
        raise Problem("record was altered (hash mismatch)")
    return entry


def _value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = escape(text)
    return '"' + text.replace('"', '\\"') + '"' if _NEEDS_QUOTES.search(text) or not text else text


def human_line(entry: dict[str, Any]) -> str:
    """One terminal line: UTC time, event, decision, then the identifying fields the record has."""
    ts = entry.get("ts")
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        moment = datetime.fromtimestamp(ts, UTC)
        when = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    else:
        when = "-"
    parts = [when, _value(entry.get("event", "-")), _value(entry.get("decision", "-"))]
    for key, label in HUMAN_FIELDS:
        value = entry.get(key)
        if value is not None and value != "":
            parts.append(f"{label}={_value(value)}")
    return " ".join(parts)


def tail_offset(stream: BinaryIO, lines: int) -> int:
    """Where the last ``lines`` lines of ``stream`` start, found by reading backwards from its end."""
    end = stream.seek(0, os.SEEK_END)
    if lines <= 0 or end == 0:
        return end
    position = end
    stream.seek(end - 1)
    wanted = lines + (1 if stream.read(1) == b"\n" else 0)  # the final newline ends the last line
    while position > 0:
        size = min(_BLOCK, position)
        position -= size
        stream.seek(position)
        block = stream.read(size)
        count = block.count(b"\n")
        if count >= wanted:
            index = len(block)
            for _ in range(wanted):
                index = block.rindex(b"\n", 0, index)
            return position + index + 1
        wanted -= count
    return 0


def _count_lines(stream: BinaryIO, offset: int) -> int:
    """Lines before ``offset`` (only computed when a problem must name its line)."""
    here = stream.tell()
    stream.seek(0)
    count, left = 0, offset
    while left > 0:
        block = stream.read(min(_BLOCK * 16, left))
        if not block:
            break
        count += block.count(b"\n")
        left -= len(block)
    stream.seek(here)
    return count


@dataclass(slots=True)
class Printer:
    """Prints records (human or raw JSON), reports problems, and under ``verify`` makes them fatal."""

    out: TextIO
    err: TextIO
    raw: bool
    verify: bool
    chains: ChainState
    printed: int = 0
    skipped: int = 0

    def take(self, number: int | Callable[[], int], line: bytes | int, filters: Filters | None) -> None:
        """Consider one line: print it when it is an intact record ``filters`` keep.

        Raises :class:`Problem` (its message naming the line) when ``verify`` and it is not intact.
        """
        try:
            entry = parse_record(line)
        except Problem as problem:
            self._problem(number, problem)
            return
        keep = filters is None or filters.match(entry)
        try:
            self.chains.link(entry, check=self.verify and keep)
        except Problem as problem:
            self._problem(number, problem)
            return
        if not keep:
            return
        if self.raw and isinstance(line, bytes):  # always bytes here: parse_record refuses lengths
            self.out.write(line.decode("utf-8") + "\n")
        else:
            self.out.write(human_line(entry) + "\n")
        self.printed += 1

    def _problem(self, number: int | Callable[[], int], problem: Problem) -> None:
        where = number if isinstance(number, int) else number()
        message = f"line {where}: {problem}"
        if self.verify:
            raise Problem(message)
        self.skipped += 1
        print(f"sts audit: {message}", file=self.err)


def grep(stream: BinaryIO, filters: Filters, *, raw: bool, verify: bool, out: TextIO, err: TextIO) -> Printer:
    """Every intact record of ``stream`` that ``filters`` keep, streamed from its first line."""
    printer = Printer(out, err, raw, verify, ChainState(from_start=True))
    for number, line in enumerate(read_lines(stream), 1):
        printer.take(number, line, filters)
    return printer


def follow(
    path: Path,
    lines: int,
    *,
    raw: bool,
    verify: bool,
    out: TextIO,
    err: TextIO,
    stop: Callable[[], bool] | None = None,
) -> Printer:
    """The last ``lines`` records of ``path``; with ``stop`` given, then every record appended until
    ``stop()`` is true (polled), like ``tail -F``: a rotated or truncated file is read again from
    its first line. Only complete lines are read, so a record being written is never cut."""
    stream: BinaryIO = open(path, "rb")  # noqa: SIM115 (reopened on rotation)
    try:
        start = tail_offset(stream, lines)
        printer = Printer(out, err, raw, verify, ChainState(from_start=start == 0))
        stream.seek(start)
        base: list[int] = []  # lines before start, counted once if a problem needs it

        def numbering(index: int) -> Callable[[], int]:
            def number() -> int:
                if not base:
                    base.append(_count_lines(stream, start))
                return base[0] + index

            return number

        index = 0
        for line in read_lines(stream, final_partial=stop is None):
            index += 1
            printer.take(numbering(index) if start else index, line, None)
        out.flush()
        if stop is None:
            return printer
        while not stop():
            for line in read_lines(stream, final_partial=False):
                index += 1
                printer.take(numbering(index) if start else index, line, None)
            out.flush()
            try:
                current = os.stat(path)
            except FileNotFoundError:  # between a rotation's rename and the new file
                time.sleep(POLL_SECONDS)
                continue
            mine = os.fstat(stream.fileno())
            replaced = (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev)
            if replaced or current.st_size < stream.tell():
                print(
                    f"sts audit: {escape(str(path))} was rotated or truncated: read from its start", file=err
                )
                stream.close()
                stream = open(path, "rb")  # noqa: SIM115
                start, index, base = 0, 0, []
                printer.chains = ChainState(from_start=True)
                continue
            time.sleep(POLL_SECONDS)
        return printer
    finally:
        stream.close()


# --------------------------------------------------------------------------------------- the commands


def add_audit_query_commands(audit_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``tail`` and ``grep`` on the ``sts audit`` group that sts/cli.py builds."""
    tail = audit_subparsers.add_parser(
        "tail",
        help="print the last records of an audit log, optionally following it",
        description="Print the last N records of an audit log (human lines, or the raw JSON lines "
        "with --json); with --follow keep printing records as they are appended (Ctrl-C stops). A "
        "malformed or altered line is reported on stderr with its number and skipped; with --verify "
        "it, or a broken chain link between printed records, stops the command with exit 1.",
    )
    tail.add_argument(
        "file",
        type=Path,
        nargs="?",
        default=None,
        help=f"the audit log (default: ${AUDIT_PATH_ENV})",
    )
    tail.add_argument(
        "-n", "--lines", type=int, default=10, metavar="N", help="records to print (default: 10)"
    )
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing appended records")
    _output_options(tail)
    tail.set_defaults(run=_tail)

    grep_command = audit_subparsers.add_parser(
        "grep",
        help="print the records of an audit log that match every filter given",
        description="Stream an audit log and print the records matching every filter given (human "
        "lines, or the raw JSON lines with --json). Exit 0 when a record matched, 1 when none did. "
        "A malformed or altered line is reported on stderr with its number and skipped; with "
        "--verify it, or a printed record whose chain link is broken, stops the command with exit 1.",
    )
    grep_command.add_argument("file", type=Path, help="the audit log (JSON lines); - for standard input")
    grep_command.add_argument("--task", metavar="ID", help="records of this task (task_id)")
    grep_command.add_argument(
        "--spiffe-id",
        metavar="ID",
        help="records naming this SPIFFE ID as subject, actor, client, caller, assignee or creator",
    )
    grep_command.add_argument(
        "--since", metavar="WHEN", help="records from then on: a duration back (10m, 2h, 3d) or RFC 3339"
    )
    grep_command.add_argument(
        "--decision",
        choices=sorted(DECISIONS),
        help="issued (= allow) or refused (= deny); allow, deny, ignored as written in the records",
    )
    grep_command.add_argument(
        "--error", metavar="CODE", help="refusals with this error code (invalid_grant, …)"
    )
    _output_options(grep_command)
    grep_command.set_defaults(run=_grep)


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the raw JSON lines, byte for byte")
    parser.add_argument(
        "--verify", action="store_true", help="stop with exit 1 at a malformed, altered or unlinked record"
    )


def _grep(args: argparse.Namespace) -> int:
    try:
        since = None if args.since is None else parse_since(args.since)
    except ValueError as e:
        print(f"sts: {e}", file=sys.stderr)
        return EXIT_USAGE
    filters = Filters(
        task=args.task,
        spiffe_id=args.spiffe_id,
        since=since,
        decision=None if args.decision is None else DECISIONS[args.decision],
        error=args.error,
    )

    def run() -> Printer:
        if str(args.file) == "-":
            return grep(
                sys.stdin.buffer, filters, raw=args.json, verify=args.verify, out=sys.stdout, err=sys.stderr
            )
        with open(args.file, "rb") as stream:
            return grep(stream, filters, raw=args.json, verify=args.verify, out=sys.stdout, err=sys.stderr)

    outcome = _run(args.file, run)
    if isinstance(outcome, int):
        return outcome
    return EXIT_OK if outcome.printed else EXIT_NO


def _tail(args: argparse.Namespace) -> int:
    path = args.file
    if path is None:
        if not os.environ.get(AUDIT_PATH_ENV):
            print(f"sts: give the audit log's path, or set ${AUDIT_PATH_ENV}", file=sys.stderr)
            return EXIT_USAGE
        path = Path(os.environ[AUDIT_PATH_ENV])
    if args.lines < 0:
        print("sts: -n must be 0 or more", file=sys.stderr)
        return EXIT_USAGE

    def run() -> Printer:
        return follow(
            path,
            args.lines,
            raw=args.json,
            verify=args.verify,
            out=sys.stdout,
            err=sys.stderr,
            stop=(lambda: False) if args.follow else None,
        )

    outcome = _run(path, run)
    return outcome if isinstance(outcome, int) else EXIT_OK


def _run(path: Path, run: Callable[[], Printer]) -> Printer | int:
    """Run a command body; its exit code on an unreadable file, a --verify problem, Ctrl-C, EPIPE."""
    try:
        printer = run()
        sys.stdout.flush()
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # `| head`: the reader has what it wanted
            _quiet_stdout()
            return EXIT_OK
        print(f"sts: cannot read {escape(str(path))}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except Problem as problem:
        sys.stdout.flush()
        print(f"sts audit: {problem} (--verify: stopped)", file=sys.stderr)
        return EXIT_NO
    except KeyboardInterrupt:
        sys.stdout.flush()
        return EXIT_OK
    if printer.skipped:
        print(f"sts audit: {printer.skipped} lines skipped (not intact audit records)", file=sys.stderr)
    return printer


def _quiet_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """``python -m sts.audit_query tail|grep ...``: the same commands without the rest of ``sts``
    (what the tests run as a subprocess, and usable where only the package is installed)."""
    parser = argparse.ArgumentParser(prog="sts audit", description="query an audit log")
    add_audit_query_commands(parser.add_subparsers(title="audit commands", required=True))
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
