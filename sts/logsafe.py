"""Logging in which a caller can never forge a record (issue 11: log injection), as text or JSON lines.

Caller-controlled text reaches log lines in many places (a parameter name, a URL path, a header, an
exception message). Instead of escaping at each call site, every record of the process goes through
one formatter that escapes the *whole formatted message*: line breaks, NUL and every other control
character (C0, DEL, C1, and the Unicode line/paragraph separators) become ``\\xNN`` / ``\\uNNNN``,
and backslashes are doubled, so one record is always exactly one line and the escaping cannot be
undone by the input. A traceback (only ever from our own bugs) keeps its lines, each indented under
its record, so no continuation line can look like the start of a record.

``logging.format: json`` writes one JSON object per line instead (time, level, logger, message, and
the request fields a record carries: ``request_id``, ``sub``, ``target``, ...): JSON string escaping
gives the same guarantee. Every component logs through the root logger (uvicorn is configured with
``log_config=None``), so one format holds for the whole process.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import cast

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
# Fields a record may carry (``extra=``) that the JSON form writes as members of their own.
JSON_FIELDS = ("request_id", "sub", "target", "token_class", "task_id", "binding", "jti", "error")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line, every control character visible and reversible."""
    return _UNSAFE.sub(_escape_one, text)


class _SecondStamp:
    """The text of a record's second, made once a second: ``time.strftime`` is most of what formatting
    a record's time costs, and a busy server logs many records in the same second. One tuple is
    swapped whole, so threads never see a second paired with another second's text."""

    def __init__(self, pattern: str, converter: Callable[[float | None], time.struct_time]) -> None:
        self._pattern = pattern
        self._converter = converter
        self._last: tuple[int, str] = (-1, "")

    def text(self, created: float) -> str:
        second, text = self._last
        if int(created) != second:
            text = time.strftime(self._pattern, self._converter(created))
            self._last = (int(created), text)
        return text


class SafeFormatter(logging.Formatter):
    """A formatter whose every record is one line, whatever the message and its arguments contain."""

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._stamp = _SecondStamp(self.default_time_format, self.converter)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """``logging.Formatter``'s text (local time, ``,mmm``), its second made once a second."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._stamp.text(record.created)},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    @property
    def renders_directly(self) -> bool:
        """Whether :meth:`render` writes this formatter's lines: only for :data:`FORMAT`, the one
        :func:`configure_logging` installs (another format goes through ``logging.Formatter``)."""
        return type(self) is SafeFormatter and self._fmt == FORMAT and self.datefmt is None

    def render(
        self, created: float, levelname: str, name: str, message: str, fields: Mapping[str, object]
    ) -> str:
        """The line :meth:`format` makes of a record with these attributes and no exception, in
        :data:`FORMAT`, without the record (see :func:`log_direct`)."""
        return f"{self._stamp.text(created)},{_msecs(created):03d} {levelname} {name}: {escape(message)}"

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        text = super().formatException(ei)
        return "\n".join("    | " + escape(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    | " + escape(line) for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line; a traceback is one string member (``exception``)."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _SecondStamp("%Y-%m-%dT%H:%M:%S", time.gmtime)

    @property
    def renders_directly(self) -> bool:
        """Whether :meth:`render` writes this formatter's lines (not for a subclass, which may differ)."""
        return type(self) is JsonFormatter

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        head = (record.levelname, record.name, record.getMessage())
        return self._document(record.created, int(record.msecs), head, record.__dict__, exception)

    def render(
        self, created: float, levelname: str, name: str, message: str, fields: Mapping[str, object]
    ) -> str:
        """The line :meth:`format` makes of a record with these attributes, ``fields`` as its
        ``extra`` and no exception, without the record (see :func:`log_direct`)."""
        return self._document(created, _msecs(created), (levelname, name, message), fields, None)

    def _document(
        self,
        created: float,
        msecs: int,
        head: tuple[str, str, str],
        fields: Mapping[str, object],
        exception: str | None,
    ) -> str:
        """The JSON line: ``head`` is the record's level name, logger name and message."""
        levelname, name, message = head
        document: dict[str, object] = {
            "time": f"{self._stamp.text(created)}.{msecs:03d}Z",
            "level": levelname,
            "logger": name,
            "message": message,
        }
        for field in JSON_FIELDS:
            value = fields.get(field)
            if value is not None:
                document[field] = value
        if exception:
            document["exception"] = exception
        return json.dumps(document, ensure_ascii=True, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _msecs(created: float) -> int:
    """A record's milliseconds as ``logging.LogRecord`` computes them from ``time.time()``."""
    return int((created - int(created)) * 1000)


def _direct_handler(logger: logging.Logger, level: int) -> _StderrHandler | None:
    """Our stderr handler when it is the one handler a record of ``logger`` at ``level`` reaches and
    nothing else could see or change the record (no filter, a formatter that renders directly); else None.

    Walked on every call (two or three loggers): an embedding application or a test may add a
    handler or a filter at any time, and its records must then go through ``logging`` as usual.
    """
    if logger.filters or logger.disabled:
        return None
    found: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None:
                return None
            found = handler
        current = current.parent if current.propagate else None
    if (
        type(found) is not _StderrHandler
        or found.filters
        or level < found.level
        or not getattr(found.formatter, "renders_directly", False)
    ):
        return None
    return found


def log_direct(
    logger: logging.Logger, level: int, template: str, args: tuple[object, ...], fields: Mapping[str, object]
) -> None:
    """``logger.log(level, template, *args, extra=fields)``, written straight by our handler when it is
    the only one the record would reach: the very line its formatter makes of the record, one write.

    Why: the token endpoint logs one record per exchange, and logging's general path (a
    ``LogRecord`` of some thirty attributes, the walk to the handlers, the handler's lock, the
    formatter's ``%`` style) cost about 60 µs of a 430 µs exchange in a busy worker (bench/README.md).
    The line is the same (tests/test_log_safety.py compares the two paths for both formats), so is
    its escaping, and so is the one flushed write per record. Anything else (another handler, a
    filter, a level set on the handler, another format) takes ``logging``'s own path.
    """
    if not logger.isEnabledFor(level):
        return
    handler = _direct_handler(logger, level)
    if handler is None:
        logger.log(level, template, *args, extra=fields)
        return
    formatter = cast(SafeFormatter | JsonFormatter, handler.formatter)
    levelname = logging.getLevelName(level)
    line = formatter.render(time.time(), levelname, logger.name, template % args, fields) + "\n"
    handler.acquire()
    try:
        stream = sys.stderr
        stream.write(line)
        stream.flush()
    except RecursionError:  # as StreamHandler.emit (bpo-36272)
        raise
    except Exception:  # as StreamHandler.emit: the handler reports it, the caller is not disturbed
        record = logger.makeRecord(logger.name, level, "(direct)", 0, template, args, None, extra=fields)
        handler.handleError(record)
    finally:
        handler.release()


def configure_logging(level: str | int, log_format: str = "text") -> None:
    """Our handler (stderr, :class:`SafeFormatter` or :class:`JsonFormatter`) on the root logger,
    once; the level as given.

    Handlers someone else installed (an embedding application, a test runner) are left alone. The
    record fields neither format shows (thread, process and the caller's source line) are no longer
    collected, as the logging HOWTO's "Optimization" section describes: finding the caller walks the
    stack on every record, and the token endpoint logs one record per issued token.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else SafeFormatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
