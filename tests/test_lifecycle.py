"""``sts serve`` stops like production software: every process, within the drain deadline, port freed.

Real processes and signals: SIGINT to the whole process group (what Ctrl-C in a terminal does) and
SIGTERM to the supervisor (what a service manager or Kubernetes does), start/stop in a loop, a
request in flight finishing during the drain, and a worker that cannot stop (SIGSTOP: a real stuck
process, not a mock) killed at the deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.authority import TestAuthority
from tests.conftest import ISSUER_HOST, free_port, wait_ready, write_config

CYCLES = 12


def serve_config(
    directory: Path, example: TestAuthority, partner: TestAuthority, *, drain: int = 10
) -> tuple[Path, int]:
    port = free_port()
    config = write_config(directory, port, example, partner)
    config.write_text(
        config.read_text().replace("server: {workers: 1}", f"server: {{workers: 2, drain_timeout: {drain}}}")
    )
    return config, port


@contextmanager
def serving(config: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``sts serve`` in a process group of its own (as a shell would start it), ready."""
    log = (config.parent / "server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "sts.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://{ISSUER_HOST}:{port}", process)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def group_members(pgid: int) -> list[int]:
    """The processes still in process group ``pgid`` (from /proc: zombies of reaped children excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def port_is_free(port: int) -> bool:
    try:
        socket.create_server((ISSUER_HOST, port)).close()  # SO_REUSEADDR: TIME_WAIT does not count
    except OSError:
        return False
    return True


def worker_pids(supervisor: int) -> list[int]:
    """uvicorn's worker processes (multiprocessing spawn), not its resource tracker."""
    return [
        pid for pid in group_members(supervisor) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def nothing_left(pgid: int, within: float = 3.0) -> bool:
    """Every process of the group gone; multiprocessing's resource tracker exits on its own once the
    supervisor's end of its pipe closes, a moment after the supervisor."""
    deadline = time.monotonic() + within
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("cycle", range(CYCLES))
def test_start_stop_cycles_leave_nothing_behind(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority, cycle: int
) -> None:
    config, port = serve_config(tmp_path, example_org, partner_test)
    with serving(config, port) as process:
        assert len(worker_pids(process.pid)) >= 2
        assert requests.get(f"http://{ISSUER_HOST}:{port}/healthz", timeout=5).status_code == 200
        started = time.monotonic()
        if cycle % 2 == 0:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: every process of the group gets it
        else:
            process.send_signal(signal.SIGTERM)  # a service manager: the supervisor only
        assert process.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    assert nothing_left(process.pid), group_members(process.pid)
    assert port_is_free(port)


def test_a_request_in_flight_finishes_during_the_drain(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    config, port = serve_config(tmp_path, example_org, partner_test)
    with serving(config, port) as process:
        body = b"token=x"
        with socket.create_connection((ISSUER_HOST, port), timeout=10) as connection:
            connection.sendall(
                b"POST /introspect HTTP/1.1\r\nHost: sts\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:3]
            )
            time.sleep(0.3)  # the request is in a worker now
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            connection.sendall(body[3:])
            answer = connection.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]  # answered (unauthenticated), not cut
        assert process.wait(timeout=15) == 0
    assert nothing_left(process.pid), group_members(process.pid)
    rid = next(
        line.split(b": ", 1)[1].strip()
        for line in answer.split(b"\r\n")
        if line.lower().startswith(b"x-request-id")
    )
    audit = (tmp_path / "audit.jsonl").read_text()
    assert f'"request_id": "{rid.decode()}"' in audit or f'"request_id":"{rid.decode()}"' in audit, (
        "flushed at stop"
    )


def test_a_stuck_worker_does_not_keep_the_server_alive(
    tmp_path: Path, example_org: TestAuthority, partner_test: TestAuthority
) -> None:
    """A worker that can neither drain nor exit (SIGSTOP) is killed: by uvicorn's health check when it
    stops answering pings before the stop, by :class:`sts.web.supervisor.BoundedMultiprocess` at the
    drain deadline when it hangs in its shutdown. Either way the stop ends and nothing survives."""
    config, port = serve_config(tmp_path, example_org, partner_test, drain=1)
    with serving(config, port) as process:
        stuck = worker_pids(process.pid)[0]
        os.kill(stuck, signal.SIGSTOP)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        took = time.monotonic() - started
    assert nothing_left(process.pid), group_members(process.pid)
    assert took < 12, took  # drain (1 s) + uvicorn's 5 s ping timeout + the shutdown margin
    assert port_is_free(port)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("keys: {dir: keys}", "keys: {dir: keys, generate: false}"), "keys.generate is false"),
        (("store: {url: 'sqlite:///", "store: {url: 'sqlite:////proc/no-such-dir/"), "cannot open the store"),
        (("example.org: {bundle_file: example.org.json}", "example.org: {bundle_file: missing.json}"), ""),
    ],
    ids=["no-provisioned-keys", "store-cannot-open", "bundle-file-missing"],
)
def test_start_up_failures_are_one_line_and_exit_2(
    tmp_path: Path,
    example_org: TestAuthority,
    partner_test: TestAuthority,
    change: tuple[str, str],
    message: str,
) -> None:
    config, _ = serve_config(tmp_path, example_org, partner_test)
    text = config.read_text()
    assert change[0] in text
    config.write_text(text.replace(change[0], change[1]))
    result = subprocess.run(
        [sys.executable, "-m", "sts.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sts: ") and message in result.stderr, result.stderr
