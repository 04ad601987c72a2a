"""Caller-controlled text can never forge or split a log record (issue 11: log injection).

Against the real server: parameter names, paths and header values with CR, LF, NUL and the
Unicode line separators; then every line of the server's log must be one of its own records.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from urllib.parse import quote

import jwt
import pytest
import requests

from sts.logsafe import FORMAT, JsonFormatter, SafeFormatter, configure_logging, escape
from tests.authority import TestAuthority
from tests.conftest import RunningServer, free_port, running_server, write_config

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
    record = logging.LogRecord(
        "sts", logging.INFO, __file__, 1, "refused %s", ("a\nb\r\x00\x1b\\n\u2028",), None
    )
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


def _exchange(server: RunningServer, example: TestAuthority, **extra: str) -> requests.Response:
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": example.mint("spiffe://example.org/agent/researcher", server.issuer),
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "audience": "tool:calc",
        "scope": "invoke",
    } | extra
    return requests.post(f"{server.url}/token", data=form, timeout=5)


def test_one_info_line_per_issued_token_never_the_token(
    server: RunningServer, example_org: TestAuthority
) -> None:
    response = _exchange(server, example_org, **{})
    assert response.status_code == 200, response.text
    token, rid = response.json()["access_token"], response.headers["X-Request-Id"]
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    time.sleep(0.3)
    log = (server.directory / "server.log").read_text()
    lines = [line for line in log.splitlines() if f"request {rid})" in line]
    assert len(lines) == 1, lines
    assert (
        "INFO sts.web: issued tool token for tool:calc to spiffe://example.org/agent/researcher" in lines[0]
    )
    assert f"jti {jti}" in lines[0] and "binding none" in lines[0]
    assert token not in log and token.split(".")[2] not in log


def test_json_log_lines_carry_the_request_fields(
    tmp_path_factory: pytest.TempPathFactory, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    directory = tmp_path_factory.mktemp("json-log")
    port = free_port()
    config = write_config(directory, port, example_org, partner_test)
    config.write_text(config.read_text() + "logging: {format: json}\n")
    with running_server(config, port) as server:
        issued = _exchange(server, example_org)
        refused = _exchange(server, example_org, audience="tool:nowhere\nFORGED")
        time.sleep(0.3)
    records = [json.loads(line) for line in (directory / "server.log").read_text().splitlines() if line]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    by_request = {r.get("request_id"): r for r in records if r.get("logger") == "sts.web"}
    ok = by_request[issued.headers["X-Request-Id"]]
    assert (ok["level"], ok["sub"], ok["target"], ok["token_class"]) == (
        "INFO",
        "spiffe://example.org/agent/researcher",
        "tool:calc",
        "tool",
    )
    assert ok["jti"] and issued.json()["access_token"] not in json.dumps(records)
    bad = by_request[refused.headers["X-Request-Id"]]
    assert bad["error"] == "invalid_target" and "\n" not in bad["message"]


@pytest.mark.parametrize("created", [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0005, 1_699_999_999.5])
def test_the_remembered_second_formats_time_as_the_standard_formatter(created: float) -> None:
    """The second's text is made once a second; every record still reads as ``logging.Formatter``'s."""
    ours, theirs = SafeFormatter(FORMAT), logging.Formatter(FORMAT)
    json_ours = JsonFormatter()
    for moment in (created, created + 0.25, created - 1.0, created):  # forwards, backwards, back again
        record = logging.LogRecord("sts.test", logging.INFO, __file__, 1, "at %s", (moment,), None)
        record.created, record.msecs = moment, (moment - int(moment)) * 1000
        assert ours.format(record) == theirs.format(record)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(record.msecs):03d}Z"
        assert json.loads(json_ours.format(record))["time"] == stamp


def test_configured_logging_does_not_collect_what_no_format_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    for flag in ("logThreads", "logProcesses", "logMultiprocessing", "_srcfile"):
        monkeypatch.setattr(logging, flag, getattr(logging, flag))  # restored after the test
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("INFO")
    record = logging.getLogger("sts.test").makeRecord("sts.test", logging.INFO, "(unknown file)", 0, "m", (), None)
    assert record.thread is None and record.process is None and record.processName is None
    assert logging._srcfile is None  # no stack walk to find the caller of each record
