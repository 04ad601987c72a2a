"""Caller-controlled text can never forge or split a log record (issue 11: log injection).

Against the real server: parameter names, paths and header values with CR, LF, NUL and the
Unicode line separators; then every line of the server's log must be one of its own records.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from urllib.parse import quote

import requests

from sts.logsafe import SafeFormatter, escape
from tests.conftest import RunningServer

FORGED = "2026-12-02 00:00:00,000 INFO sts.web: FORGED"
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


def test_injected_line_breaks_stay_inside_one_record(server: RunningServer) -> None:
    evil = f"x\n{FORGED}\r\n{FORGED}\x00\u2028{FORGED}"
    encoded = quote(evil, safe="")
    requests.post(  # a repeated parameter whose name carries the forged lines
        f"{server.url}/token",
        data=f"{encoded}=1&{encoded}=2&grant_type=a&grant_type=b",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=5,
    )
    requests.post(f"{server.url}/tasks/{encoded}/complete", timeout=5)  # a path, refused (401) and logged
    requests.post(f"{server.url}/token{encoded}", timeout=5)
    requests.post(
        f"{server.url}/token",
        data={"grant_type": evil, "subject_token": evil, "audience": evil, "scope": evil},
        timeout=5,
    )
    time.sleep(0.3)
    log = (server.directory / "server.log").read_bytes()
    assert b"\x00" not in log
    for line in log.decode("utf-8", "replace").split("\n"):
        if not line or line.startswith("    | "):
            continue  # the end; a traceback line under its record
        assert RECORD.match(line), f"a line that is not a record of the server: {line!r}"
        assert not line.startswith(FORGED)
    assert "FORGED" in log.decode(), "the requests above did reach the log, escaped"


def test_the_formatter_escapes_every_control_character_reversibly() -> None:
    record = logging.LogRecord("sts", logging.INFO, __file__, 1, "refused %s", ("a\nb\r\x00\x1b\\n\u2028",), None)
    text = SafeFormatter("%(message)s").format(record)
    assert text == "refused a\\x0ab\\x0d\\x00\\x1b\\\\n\\u2028"
    assert "\n" not in text
    assert escape("plain text, ünïcödé") == "plain text, ünïcödé"


def _fail() -> None:
    raise ValueError(f"boom\n{FORGED}")


def test_a_traceback_stays_under_its_record() -> None:
    try:
        _fail()
    except ValueError:
        record = logging.LogRecord("sts", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = SafeFormatter("%(message)s").format(record)
    first, *rest = text.split("\n")
    assert first == "failed"
    assert rest and all(line.startswith("    | ") for line in rest)
