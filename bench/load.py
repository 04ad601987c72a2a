"""The load generator: ``wrk`` (Debian package ``wrk``) with ``bench/load.lua`` over a file of bodies.

wrk runs in its own process on the same cores as the server; its CPU time is measured (``wait4``)
and reported with every run, so the share of the machine it took is visible. wrk is closed-loop:
N keep-alive connections, each sends its next request when the previous answer arrived.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.ours import PoolRequest, busy_cpu_seconds, cpu_seconds, process_tree

LUA = Path(__file__).with_name("load.lua")


class GeneratorMissing(RuntimeError):
    pass


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise GeneratorMissing(
            "wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk`; "
            "bench/ needs it as its load generator"
        )
    return path


def wrk_version() -> str:
    done = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip().splitlines()[0]


def write_requests(path: Path, pool: Sequence[PoolRequest]) -> Path:
    """The TSV the Lua script reads: id, kind, status, needle, body (bodies are URL-encoded: no tabs)."""
    with path.open("w") as out:
        for item in pool:
            out.write(f"{item.request_id}\t{item.kind}\t{item.status}\t{item.needle}\t{item.body}\n")
    return path


def outcome_errors(
    pool: Sequence[PoolRequest], answered: dict[str, int], sent: dict[str, int], in_flight: int
) -> int:
    """Answers that cannot be the right ones, when they are matched by outcome instead of by id.

    Kinds with the same expected status and needle form one outcome. More answers of an outcome than
    requests of it sent are wrong (a valid request refused, or a refused one let through, shows up
    so); fewer are allowed only for the requests still in flight when the run stopped: up to two per
    connection, as wrk builds each connection's next request before it knows the run is over.
    """
    outcome_of = {item.kind: (item.status, item.needle) for item in pool}
    sent_by: dict[tuple[int, str], int] = {}
    answered_by: dict[tuple[int, str], int] = {}
    for kind, n in sent.items():
        sent_by[outcome_of[kind]] = sent_by.get(outcome_of[kind], 0) + n
    for kind, n in answered.items():
        answered_by[outcome_of[kind]] = answered_by.get(outcome_of[kind], 0) + n
    excess = sum(max(0, n - sent_by.get(outcome, 0)) for outcome, n in answered_by.items())
    missing = sum(max(0, n - answered_by.get(outcome, 0)) for outcome, n in sent_by.items())
    return excess + max(0, missing - excess - 2 * in_flight)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One wrk run at ``connections`` connections for ``seconds``."""

    connections: int
    seconds: float
    requests: int
    valid_ok: int
    refused_ok: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    generator_cpu_s: float
    server_cpu_s: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def exchanges_per_s(self) -> float:
        return self.valid_ok / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 1.0

    @property
    def server_cpu_us_per_request(self) -> float:
        return 1e6 * self.server_cpu_s / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "valid_ok": self.valid_ok,
            "refused_ok": self.refused_ok,
            "errors": self.errors,
            "exchanges_per_s": round(self.exchanges_per_s, 1),
            "requests_per_s": round(self.requests_per_s, 1),
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "error_rate": round(self.error_rate, 6),
            "generator_cores": round(self.generator_cpu_s / self.seconds, 3),
            "server_cores": round(self.server_cpu_s / self.seconds, 3),
            "server_cpu_us_per_request": round(self.server_cpu_us_per_request, 1),
            **self.detail,
        }


def run_wrk(
    url: str,
    requests_file: Path,
    *,
    connections: int,
    seconds: float,
    server_pid: int | None = None,
    threads: int = 1,
    timeout_s: int = 5,
    by_outcome: Sequence[PoolRequest] | None = None,
) -> LoadResult:
    """One closed-loop run; counts only answers that match what each request should get.

    ``by_outcome`` (the pool the file was written from) is for a server that does not echo
    ``X-Request-Id``: answers are then matched by status and body, and their count per outcome is
    checked against the requests of that outcome sent (:func:`outcome_errors`).
    """
    command = [
        wrk_binary(),
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(LUA),
        url,
        "--",
        str(requests_file),
        *(["by-outcome"] if by_outcome is not None else []),
    ]
    pids = process_tree(server_pid) if server_pid else []
    server_before = {pid: cpu_seconds([pid]) for pid in pids}
    busy_before = busy_cpu_seconds()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 gives the generator's own CPU time: how much of the shared cores the load itself took.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stdout is not None
    assert process.stderr is not None
    out, err = process.stdout.read().decode(), process.stderr.read().decode()
    # Per process: keep-alive connections can pile onto one worker; the split shows whether they did.
    server_by_process = [cpu_seconds([pid]) - before for pid, before in server_before.items()]
    busy = busy_cpu_seconds() - busy_before
    line = next((x for x in out.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.strip() or out.strip()}")
    data = json.loads(line.removeprefix("BENCH_RESULT "))
    correct: dict[str, int] = data["correct"]
    socket_errors = data["socket_errors"]
    wall = data["duration_us"] / 1e6
    generator_cpu = usage.ru_utime + usage.ru_stime
    # What else kept the cores busy meanwhile (other users of this shared machine): a disturbed run shows.
    others = max(0.0, busy - sum(server_by_process) - generator_cpu) if server_pid else None
    valid_ok = correct.get("valid", 0)
    refused_ok = sum(n for kind, n in correct.items() if kind != "valid")
    # connect/read/write errors and timeouts are errors; answers we could not match to a request too.
    errors = data["wrong"] + data["unmatched"] + sum(socket_errors.values())
    if by_outcome is not None:
        errors += outcome_errors(by_outcome, correct, data["sent"], connections)
    return LoadResult(
        connections=connections,
        seconds=wall,
        requests=data["requests"],
        valid_ok=valid_ok,
        refused_ok=refused_ok,
        errors=errors,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        generator_cpu_s=generator_cpu,
        server_cpu_s=sum(server_by_process),
        detail={
            "server_cores_by_process": [round(c / wall, 3) for c in server_by_process],
            "other_cores": None if others is None else round(others / wall, 3),
            "correct_by_kind": correct,
            **({"sent_by_kind": data["sent"]} if by_outcome is not None else {}),
            "socket_errors": socket_errors,
            "wrong": data["wrong"],
            "unmatched": data["unmatched"],
            **({"wrong_sample": data["wrong_sample"]} if data["wrong_sample"] else {}),
        },
    )


def wait_quiet(*, threshold_cores: float = 0.25, max_wait_s: float = 30.0, window_s: float = 0.5) -> float:
    """Before a run, wait (up to ``max_wait_s``) until the machine is idle but for ``threshold_cores``.

    Between runs our server is idle, so what keeps cores busy is someone else's (this machine is
    shared). Returns the seconds waited; the run then reports ``other_cores`` either way.
    """
    started = time.monotonic()
    while True:
        before = busy_cpu_seconds()
        time.sleep(window_s)
        if (busy_cpu_seconds() - before) / window_s <= threshold_cores:
            return time.monotonic() - started
        if time.monotonic() - started >= max_wait_s:
            return time.monotonic() - started


@dataclass(frozen=True, slots=True)
class Summary:
    """Medians over the runs at one N (each figure's median on its own)."""

    runs: tuple[LoadResult, ...]

    def median(self, figure: Callable[[LoadResult], float]) -> float:
        return float(statistics.median(figure(r) for r in self.runs))

    @property
    def exchanges_per_s(self) -> float:
        return self.median(lambda r: r.exchanges_per_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "exchanges_per_s": round(self.exchanges_per_s, 1),
            "p50_ms": round(self.median(lambda r: r.p50_ms), 3),
            "p90_ms": round(self.median(lambda r: r.p90_ms), 3),
            "p99_ms": round(self.median(lambda r: r.p99_ms), 3),
            "error_rate": round(self.median(lambda r: r.error_rate), 6),
            "generator_cores": round(self.median(lambda r: r.generator_cpu_s / r.seconds), 3),
            "server_cores": round(self.median(lambda r: r.server_cpu_s / r.seconds), 3),
            "server_cpu_us_per_request": round(self.median(lambda r: r.server_cpu_us_per_request), 1),
            "other_cores": round(self.median(lambda r: r.detail.get("other_cores") or 0.0), 3),
            "runs": [r.to_json() for r in self.runs],
        }


def sweep(
    url: str,
    requests_file: Path,
    *,
    connections: Sequence[int],
    seconds: float,
    repeats: int,
    server_pid: int | None,
    log: Callable[[str], None],
    label: str = "",
    pause_s: float = 1.0,
    by_outcome: Sequence[PoolRequest] | None = None,
) -> dict[int, Summary]:
    """Every N ``repeats`` times, interleaved (N=1,16,64, then again) so drift hits every N alike."""
    results: dict[int, list[LoadResult]] = {n: [] for n in connections}
    for repeat in range(repeats):
        for n in connections:
            waited = wait_quiet()
            if waited > 1:
                log(f"  (waited {waited:.0f} s for other load on the machine to calm down)")
            result = run_wrk(
                url,
                requests_file,
                connections=n,
                seconds=seconds,
                server_pid=server_pid,
                by_outcome=by_outcome,
            )
            results[n].append(result)
            log(
                f"  {label}N={n:<3} run {repeat + 1}/{repeats}: {result.exchanges_per_s:8.0f} exchanges/s  "
                f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.error_rate:.2%}  "
                f"server {result.server_cpu_s / result.seconds:.2f} cores, wrk "
                f"{result.generator_cpu_s / result.seconds:.2f}, others {result.detail['other_cores']}"
                + (f"  [{result.detail['wrong_sample']}]" if "wrong_sample" in result.detail else "")
            )
            time.sleep(pause_s)
    return {n: Summary(tuple(runs)) for n, runs in results.items()}


def figures_by_n(summaries: dict[int, Summary]) -> dict[str, Any]:
    """Each headline figure keyed by N (as a string, as in the JSON), and every run under ``load``."""
    by_n = {str(n): s.to_json() for n, s in summaries.items()}
    return {
        "exchanges_per_s": {n: f["exchanges_per_s"] for n, f in by_n.items()},
        "p50_ms": {n: f["p50_ms"] for n, f in by_n.items()},
        "p99_ms": {n: f["p99_ms"] for n, f in by_n.items()},
        "error_rate": {n: f["error_rate"] for n, f in by_n.items()},
        "server_cpu_us_per_request": {n: f["server_cpu_us_per_request"] for n, f in by_n.items()},
        "load": by_n,
    }
