"""``sts audit tail`` / ``grep`` (sts.audit_query) on real logs written by sts.audit.AuditLog.

Filters, tampered and garbage lines (reported with their number, fatal only under --verify), a line
far over the size limit, the backwards tail of a file, and --follow of a live file within a deadline.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sts.audit import AuditLog
from sts.audit_query import MAX_LINE, Filters, follow, grep, main, parse_since

NOW = 1_800_000_000.0
ALICE, BOB = "spiffe://example.org/agent/alice", "spiffe://example.org/agent/bob"


def write_log(path: Path) -> None:
    log = AuditLog(str(path))
    records = [
        {
            "event": "token_exchange",
            "decision": "allow",
            "spiffe_id": ALICE,
            "task_id": "task_1",
            "target": "t",
        },
        {"event": "token_exchange", "decision": "deny", "spiffe_id": BOB, "error": "invalid_grant"},
        {
            "event": "token_exchange",
            "decision": "allow",
            "spiffe_id": BOB,
            "actor": ALICE,
            "task_id": "task_2",
        },
        {"event": "task_create", "decision": "allow", "caller": ALICE, "task_id": "task_1"},
        {"event": "token_exchange", "decision": "deny", "spiffe_id": ALICE, "error": "invalid_target"},
        {"event": "api_refusal", "decision": "deny", "path": "/x\n2026 forged", "error": "invalid_request"},
    ]
    for i, record in enumerate(records):
        log.record(record, now=NOW - 3600 * (len(records) - 1 - i))  # an hour apart, the last at NOW
    log.close()


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    return path


def run_grep(
    path: Path, filters: Filters, *, raw: bool = True, verify: bool = False
) -> tuple[list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with open(path, "rb") as stream:
        grep(stream, filters, raw=raw, verify=verify, out=out, err=err)
    return out.getvalue().splitlines(), err.getvalue()


def events(lines: list[str]) -> list[tuple[str, str]]:
    return [(json.loads(line)["event"], json.loads(line)["decision"]) for line in lines]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (Filters(task="task_1"), [("token_exchange", "allow"), ("task_create", "allow")]),
        (Filters(spiffe_id=BOB), [("token_exchange", "deny"), ("token_exchange", "allow")]),
        # subject, actor and caller all count
        (
            Filters(spiffe_id=ALICE, decision="allow"),
            [("token_exchange", "allow")] * 2 + [("task_create", "allow")],
        ),
        (Filters(decision="deny", error="invalid_grant"), [("token_exchange", "deny")]),
        (Filters(since=NOW - 3600 * 1.5), [("token_exchange", "deny"), ("api_refusal", "deny")]),
        (Filters(task="task_1", decision="deny"), []),
    ],
)
def test_grep_filters(log_file, filters, expected):
    lines, err = run_grep(log_file, filters)
    assert events(lines) == expected
    assert err == ""


def test_json_output_is_the_original_lines(log_file):
    lines, _ = run_grep(log_file, Filters())
    assert [line + "\n" for line in lines] == log_file.read_text().splitlines(keepends=True)


def test_human_output_escapes_caller_text(log_file):
    lines, _ = run_grep(log_file, Filters(error="invalid_request"), raw=False)
    (line,) = lines
    assert "\n" not in line and "\\x0a2026" in line
    assert line.startswith("2027-01-15T08:00:00.000Z api_refusal deny ")


def test_parse_since():
    assert parse_since("10m", now=NOW) == NOW - 600
    assert parse_since("3d", now=NOW) == NOW - 3 * 86400
    assert parse_since("2027-01-15T08:00:00Z") == NOW
    assert parse_since("2027-01-15T10:00:00+02:00") == NOW
    for bad in ("yesterday", "2027-01-15T08:00:00", "10"):
        with pytest.raises(ValueError, match="RFC 3339"):
            parse_since(bad)


def tamper(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"invalid_grant", b"invalid_scope")  # an edited record
    lines.insert(3, b"\x00\xff\xfe garbage \x1b[31m\n")  # not UTF-8
    lines.insert(4, b"x" * (MAX_LINE * 3) + b"\n")  # far over the limit
    lines.insert(5, b'{"json": "but no chain"}\n')
    path.write_bytes(b"".join(lines))


def test_bad_lines_are_reported_and_skipped(log_file):
    tamper(log_file)
    lines, err = run_grep(log_file, Filters())
    assert len(lines) == 5, "every intact record, the altered one left out"
    assert err.splitlines() == [
        "sts audit: line 2: record was altered (hash mismatch)",
        "sts audit: line 4: not an audit record (not UTF-8 JSON)",
        f"sts audit: line 5: line of {MAX_LINE * 3} bytes is too long for an audit record (limit {MAX_LINE})",
        "sts audit: line 6: not an audit record (no hash chain)",
    ]


def test_verify_stops_at_the_first_problem(log_file, capsys):
    tamper(log_file)
    assert main(["grep", str(log_file), "--verify", "--json"]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1, "only the record before the altered one"
    assert "line 2: record was altered" in captured.err


def test_verify_finds_a_deleted_record_between_printed_ones(log_file, capsys):
    lines = log_file.read_bytes().splitlines(keepends=True)
    log_file.write_bytes(b"".join(lines[:2] + lines[3:]))  # each line intact, one missing
    assert main(["grep", str(log_file)]) == 0, "without --verify a gap is not looked for"
    capsys.readouterr()
    assert main(["grep", str(log_file), "--verify"]) == 1
    assert "line 3: chain" in capsys.readouterr().err
    # a filtered-out record still links the chain: no false alarm when only some are printed
    write_log(log_file)
    assert main(["grep", str(log_file), "--verify", "--spiffe-id", BOB]) == 0


def test_grep_exit_codes(log_file, tmp_path, capsys):
    assert main(["grep", str(log_file), "--task", "task_1"]) == 0
    assert main(["grep", str(log_file), "--task", "nope"]) == 1
    assert main(["grep", str(tmp_path / "missing"), "--task", "x"]) == 2
    assert main(["grep", str(log_file), "--since", "soon"]) == 2
    assert "RFC 3339" in capsys.readouterr().err


@pytest.mark.parametrize("n", [0, 1, 3, 6, 100])
def test_tail_last_n(log_file, n):
    out, err = io.StringIO(), io.StringIO()
    follow(log_file, n, raw=True, verify=True, out=out, err=err)
    assert (
        out.getvalue().splitlines() == log_file.read_text().splitlines()[-n:] if n else out.getvalue() == ""
    )


def test_tail_of_a_big_file_names_absolute_line_numbers(tmp_path):
    path = tmp_path / "big.jsonl"
    log = AuditLog(str(path))
    for i in range(5000):
        log.record({"event": "token_exchange", "decision": "allow", "n": i, "pad": "p" * 200}, now=NOW)
    log.close()
    with open(path, "ab") as f:
        f.write(b"not json\n")
    log = AuditLog(str(path))
    log.record({"event": "token_exchange", "decision": "deny"}, now=NOW)
    log.close()
    out, err = io.StringIO(), io.StringIO()
    follow(path, 3, raw=False, verify=False, out=out, err=err)
    assert len(out.getvalue().splitlines()) == 2
    assert err.getvalue() == "sts audit: line 5001: not an audit record (not UTF-8 JSON)\n"


def test_tail_follow_prints_appended_records_before_a_deadline(log_file):
    command = [
        sys.executable,
        "-m",
        "sts.audit_query",
        "tail",
        str(log_file),
        "-n",
        "1",
        "--follow",
        "--json",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert json.loads(first)["event"] == "api_refusal"
        log = AuditLog(str(log_file))
        with open(log_file, "ab", buffering=0) as raw:
            raw.write(b'{"partial": ')  # a record being written: not printed until its line ends
            time.sleep(0.6)
            raw.write(b"1}\n")
        log.record({"event": "token_exchange", "decision": "allow", "spiffe_id": "spiffe://example.org/late"})
        log.close()
        deadline = time.monotonic() + 10
        seen: list[str] = []
        while time.monotonic() < deadline and len(seen) < 1:
            seen.append(process.stdout.readline())
        assert json.loads(seen[0])["spiffe_id"] == "spiffe://example.org/late"
        assert process.poll() is None, "--follow keeps running"
    finally:
        process.terminate()
        _, err = process.communicate(timeout=10)
    assert "not an audit record" in err, "the partial line, once complete, is reported, not printed"


def test_follow_in_process_reads_a_rotated_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path)
    out, err = io.StringIO(), io.StringIO()
    polls = iter(range(100))

    def stop() -> bool:
        step = next(polls)
        if step == 1:
            path.rename(tmp_path / "audit.jsonl.1")
            log = AuditLog(str(path))
            log.record({"event": "rotated", "decision": "allow"}, now=NOW)
            log.close()
        return step >= 4

    follow(path, 0, raw=True, verify=True, out=out, err=err, stop=stop)
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["rotated"]
    assert "rotated or truncated" in err.getvalue()


def test_tail_command_file_from_the_environment(log_file, monkeypatch, capsys):
    monkeypatch.delenv("STS_AUDIT_PATH", raising=False)
    assert main(["tail"]) == 2
    assert "STS_AUDIT_PATH" in capsys.readouterr().err
    monkeypatch.setenv("STS_AUDIT_PATH", str(log_file))
    assert main(["tail", "-n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == ["token_exchange", "api_refusal"]
    assert main(["tail", "-n", "-1"]) == 2


def test_grep_reads_standard_input_and_survives_a_closed_pipe(log_file):
    root = Path(__file__).parent.parent
    command = [sys.executable, "-m", "sts.audit_query", "grep", "-", "--decision", "refused", "--json"]
    with open(log_file, "rb") as stdin:
        result = subprocess.run(command, stdin=stdin, capture_output=True, check=False, cwd=root, timeout=60)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 3, result.stderr
    big = log_file.parent / "many.jsonl"
    big.write_bytes(log_file.read_bytes() * 1)
    log = AuditLog(str(big))
    for i in range(20000):
        log.record({"event": "token_exchange", "decision": "deny", "n": i}, now=NOW)
    log.close()
    command = [sys.executable, "-m", "sts.audit_query", "grep", str(big), "--decision", "refused"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root)
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline().split()[1] == b"token_exchange"
    process.stdout.close()  # like `| head -n 1`
    assert process.wait(timeout=120) == 0
    err = process.stderr.read().decode()
    process.stderr.close()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
