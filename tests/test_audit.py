"""Audit log: one JSON line per decision, hash-chained so edits and deletions are found."""

from __future__ import annotations

import json
from pathlib import Path

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
