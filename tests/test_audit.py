"""Audit log: one JSON line per decision, hash-chained so edits and deletions are found."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from sts.audit import AuditLog, verify_chain


def written(tmp_path: Path, count: int) -> list[str]:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    for i in range(count):
        log.record({"event": "token_exchange", "decision": "allow", "n": i}, now=1000 + i)
    log.close()
    return path.read_text().splitlines()


def test_records_are_json_lines_with_a_chain(tmp_path: Path) -> None:
    lines = written(tmp_path, 3)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[1]["prev"] == records[0]["hash"]
    assert records[0]["ts"] == 1000
    assert verify_chain(lines) == []


def test_edit_is_detected(tmp_path: Path) -> None:
    lines = written(tmp_path, 3)
    lines[1] = lines[1].replace('"allow"', '"deny"')
    assert any("altered" in p for p in verify_chain(lines))


def test_deletion_is_detected(tmp_path: Path) -> None:
    lines = written(tmp_path, 3)
    del lines[1]
    assert any("broken" in p for p in verify_chain(lines))


def test_two_writers_keep_separate_chains(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(str(path)), AuditLog(str(path))
    for i in range(3):
        a.record({"n": i})
        b.record({"n": i})
    a.close()
    b.close()
    assert verify_chain(path.read_text().splitlines()) == []


def test_garbage_lines_reported(tmp_path: Path) -> None:
    assert verify_chain(["not json", '"a string"', "[1]"]) == [
        "line 1: not an audit record",
        "line 2: not an audit record",
        "line 3: not an audit record",
    ]


def test_stdout_copies_every_line_of_a_file_log(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """``audit.stdout``: the same chained line in the file and on standard output."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), stdout=True)
    log.record({"event": "token_exchange", "decision": "allow"}, now=1000)
    log.record({"event": "token_exchange", "decision": "deny"}, now=1001)
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert capfd.readouterr().out.splitlines() == lines
    assert verify_chain(lines) == []


def test_stdout_log_with_stdout_is_written_once(capfd: pytest.CaptureFixture[str]) -> None:
    log = AuditLog("-", stdout=True)
    log.record({"event": "token_exchange", "decision": "allow"}, now=1000)
    out = capfd.readouterr().out.splitlines()
    assert len(out) == 1
    assert verify_chain(out) == []


def test_observers_see_every_event_and_cannot_break_it(tmp_path: Path) -> None:
    seen: list[Mapping[str, Any]] = []

    def failing(event: Mapping[str, Any]) -> None:
        raise RuntimeError("observer bug")

    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), observers=(failing, seen.append))
    log.record({"event": "revoke", "decision": "allow"}, now=1000)
    log.record({"event": "token_exchange", "decision": "deny", "error": "invalid_target"}, now=1001)
    log.close()
    assert [e["event"] for e in seen] == ["revoke", "token_exchange"]
    assert len(path.read_text().splitlines()) == 2
