"""The direct log path (``sts.logsafe.log_direct``) writes exactly what ``logging`` would, or hands over.

The token endpoint logs one record per exchange through it. Each test configures the real root
logger with our handler over a captured ``sys.stderr``, then compares the direct line with the line
``logging``'s own path writes for the same record (forced by a filter or a second handler), for
caller-controlled text of every kind, in both formats.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sts.logsafe import FORMAT, SafeFormatter, configure_logging, log_direct

TEMPLATE = "issued %s token for %s (jti %s, request %s)"


def _server_logging(monkeypatch: pytest.MonkeyPatch, level: str = "INFO", log_format: str = "text") -> io.StringIO:
    """The root logger as the server configures it (our handler alone, over a captured ``sys.stderr``),
    all restored by ``monkeypatch``. Called in the test's body: pytest adds its own capturing handler
    to the root logger only once the test's fixtures are set up."""
    for flag in ("logThreads", "logProcesses", "logMultiprocessing", "_srcfile"):
        monkeypatch.setattr(logging, flag, getattr(logging, flag))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    captured = io.StringIO()
    monkeypatch.setattr("sys.stderr", captured)
    configure_logging(level, log_format)
    return captured


class _Keep(logging.Filter):
    """A logger filter that passes every record: its presence alone sends records through ``logging``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return True


def _both_paths(
    captured: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
    moment: float,
    args: tuple[object, ...],
    fields: dict[str, object],
) -> tuple[str, str]:
    """The line written directly and the line ``logging`` writes, both at ``moment``."""
    logger = logging.getLogger("sts.web")
    with monkeypatch.context() as frozen:
        frozen.setattr(time, "time", lambda: moment)
        start = captured.tell()
        log_direct(logger, logging.INFO, TEMPLATE, args, fields)
        direct = captured.getvalue()[start:]
        logger.addFilter(keep := _Keep())
        try:
            start = captured.tell()
            log_direct(logger, logging.INFO, TEMPLATE, args, fields)
            through_logging = captured.getvalue()[start:]
        finally:
            logger.removeFilter(keep)
    return direct, through_logging


caller_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    texts=st.tuples(caller_text, caller_text, caller_text, caller_text),
    task=st.one_of(st.none(), caller_text),
    log_format=st.sampled_from(["text", "json"]),
    moment=st.one_of(
        st.floats(1_600_000_000, 2_000_000_000),
        st.integers(1_600_000_000, 2_000_000_000).map(lambda second: second + 0.9999),  # msecs 999, not 1000
    ),
)
def test_the_direct_line_is_the_line_logging_writes(
    texts: tuple[str, str, str, str], task: str | None, log_format: str, moment: float
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:  # hypothesis runs many examples per test
        captured = _server_logging(monkeypatch, log_format=log_format)
        fields: dict[str, object] = {"request_id": texts[3], "sub": texts[1], "task_id": task, "jti": texts[2]}
        direct, through_logging = _both_paths(captured, monkeypatch, moment, texts, fields)
    assert direct == through_logging
    assert direct.endswith("\n") and direct.count("\n") == 1  # one record, one line, whatever the text
    if log_format == "json":
        document = json.loads(direct)
        assert document["sub"] == texts[1] and document.get("task_id") == task


def test_refusal_at_error_level_reads_as_logging_writes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _server_logging(monkeypatch, "INFO")
    logger = logging.getLogger("sts.web")
    log_direct(logger, logging.ERROR, "refused %s", ("temporarily_unavailable",), {"error": "x"})
    line = stderr.getvalue()
    assert " ERROR sts.web: refused temporarily_unavailable\n" in line
    assert SafeFormatter(FORMAT).renders_directly


def test_below_the_level_nothing_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _server_logging(monkeypatch, "WARNING")
    log_direct(logging.getLogger("sts.web"), logging.INFO, TEMPLATE, ("a", "b", "c", "d"), {})
    assert stderr.getvalue() == ""


@pytest.mark.parametrize(("owner", "position"), [("", 0), ("", 1), ("sts", 0)])
def test_a_second_handler_gets_the_record_too(monkeypatch: pytest.MonkeyPatch, owner: str, position: int) -> None:
    """An embedding application's handler (or a test's) sees every record: the direct path steps aside."""
    stderr = _server_logging(monkeypatch, "INFO")
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    collect = Collect()
    holder = logging.getLogger(owner)  # the root (before or after ours), or the "sts" logger between
    monkeypatch.setattr(holder, "handlers", list(holder.handlers))
    holder.handlers.insert(position, collect)
    log_direct(logging.getLogger("sts.web"), logging.INFO, TEMPLATE, ("a", "b", "c", "d"), {"jti": "c"})
    assert [r.getMessage() for r in seen] == ["issued a token for b (jti c, request d)"]
    assert seen[0].__dict__["jti"] == "c"
    assert stderr.getvalue().count("issued a token for b") == 1


def test_a_filter_that_drops_the_record_is_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _server_logging(monkeypatch, "INFO")
    logger = logging.getLogger("sts.web")

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return False

    logger.addFilter(drop := Drop())
    try:
        log_direct(logger, logging.INFO, TEMPLATE, ("a", "b", "c", "d"), {})
    finally:
        logger.removeFilter(drop)
    assert stderr.getvalue() == ""


def test_a_handler_level_above_the_record_is_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _server_logging(monkeypatch, "INFO")
    (handler,) = logging.getLogger().handlers
    handler.setLevel(logging.WARNING)
    log_direct(logging.getLogger("sts.web"), logging.INFO, TEMPLATE, ("a", "b", "c", "d"), {})
    assert stderr.getvalue() == ""


def test_another_format_goes_through_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _server_logging(monkeypatch, "INFO")
    (handler,) = logging.getLogger().handlers
    handler.setFormatter(SafeFormatter("%(levelname)s|%(message)s"))
    log_direct(logging.getLogger("sts.web"), logging.INFO, "hello %s", ("x\ny",), {})
    assert stderr.getvalue() == "INFO|hello x\\x0ay\n"


def test_a_failing_stream_is_reported_by_the_handler_and_never_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    _server_logging(monkeypatch)
    (handler,) = logging.getLogger().handlers
    reported: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", reported.append)

    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    monkeypatch.setattr("sys.stderr", Broken())
    log_direct(logging.getLogger("sts.web"), logging.INFO, TEMPLATE, ("a", "b", "c", "d"), {"jti": "c"})
    assert [r.getMessage() for r in reported] == ["issued a token for b (jti c, request d)"]


def test_lines_from_many_threads_never_interleave(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _server_logging(monkeypatch, "INFO")
    logger = logging.getLogger("sts.web")

    def write(thread: int) -> None:
        for n in range(500):
            log_direct(logger, logging.INFO, TEMPLATE, (f"t{thread}", "x" * 200, n, "r"), {})

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 8 * 500
    whole = re.compile(r"\S+ \S+ INFO sts\.web: issued t(\d) token for x{200} \(jti (\d+), request r\)")
    matches = [whole.fullmatch(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches, strict=True) if not m][:3]
    for thread in range(8):
        numbers = [int(m.group(2)) for m in matches if m and m.group(1) == str(thread)]
        assert numbers == list(range(500))  # every line of each thread, whole and in order
