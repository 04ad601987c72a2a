"""Where the running server spends its GIL time under load: py-spy (PyPI) attached to every worker.

py-spy is installed into the bench's temp dir (``pip install --target``), nothing is added to the
project. It samples each worker process during one extra load run with ``--gil`` (only the thread
holding the GIL: Python CPU, not lock waits) and ``--threads``; stacks are grouped by the stage of the
exchange they are in, as :mod:`bench.inprocess` names them. Needs ptrace rights (root, or
``kernel.yama.ptrace_scope`` = 0).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import load, ours

_HANDLER_MODULES = (
    "app.py", "token_endpoint.py", "http.py", "common.py", "oauth.py", "resources.py", "ops.py", "tls.py"
)
# First match wins: a stack inside svid.py counts as svid_verify even though Flask is below it.
STAGES: tuple[tuple[str, str], ...] = (
    ("sts/svid.py", "svid_verify"),
    ("sts/policy.py", "policy"),
    ("sts/store/", "store"),
    ("sts/keys.py", "sign"),
    ("sts/audit.py", "audit"),
    ("read_form", "parse_form"),
    ("error_response", "refusal logging"),
    ("sts/exchange.py", "exchange (own code)"),
    ("sts/token_index.py", "token index (background writes)"),
    ("sts/rate_lease.py", "rate limit"),
    ("prometheus_client/", "metrics"),
    # Every request's stack holds the connection protocol's frames: the handler modules come first.
    *((f"sts/web/{module}", "HTTP handler (sts/web)") for module in _HANDLER_MODULES),
    ("sts/web/plain_server.py", "HTTP/1.1 connections (sts/web/plain_server.py)"),
    ("sts/web/tls_server.py", "TLS listener (sts/web/tls_server.py)"),
    ("uvicorn/", "uvicorn (server)"),
    ("flask/app.py", "flask/werkzeug"),
)


def install(directory: Path, log: Callable[[str], None]) -> Path:
    target = directory / "py-spy"
    log(f"installing py-spy into {target} (throwaway)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(target),
            "py-spy",
        ],
        check=True,
        capture_output=True,
    )
    return target / "bin" / "py-spy"


def _spy_args(binary: Path, pid: int, seconds: int) -> list[str]:
    return [
        str(binary),
        "record",
        "-p",
        str(pid),
        "-d",
        str(seconds),
        "-r",
        "200",
        "--gil",
        "--threads",
        "-f",
        "raw",
    ]


def _stage(stack: str) -> str:
    for needle, stage in STAGES:
        if needle in stack:
            return stage
    return "event loop / native (no frame above)"


def record(
    binary: Path,
    url: str,
    requests_file: Path,
    server_pid: int,
    *,
    seconds: float,
    connections: int,
    scratch: Path,
) -> dict[str, Any]:
    """One load run at ``connections``; py-spy on every worker for most of it; shares by stage."""
    workers = ours.process_tree(server_pid)[1:]
    result: dict[str, load.LoadResult] = {}
    runner = threading.Thread(
        target=lambda: result.setdefault(
            "load",
            load.run_wrk(url, requests_file, connections=connections, seconds=seconds, server_pid=server_pid),
        )
    )
    runner.start()
    sample_s = max(1, int(seconds) - 3)
    outputs = [scratch / f"py-spy-{pid}.txt" for pid in workers]
    spies = [
        subprocess.Popen(
            [*_spy_args(binary, pid, sample_s), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for pid, out in zip(workers, outputs, strict=True)
    ]
    failures = []
    for spy in spies:
        _, err = spy.communicate()
        if spy.returncode != 0:
            failures.append(err.decode(errors="replace").strip()[-300:])
    runner.join()
    if failures:
        return {"error": "py-spy failed: " + " | ".join(failures)}
    stages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for out in outputs:
        for line in out.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            count = int(count_text)
            total += count
            stages[_stage(stack)] += count
            frames = [f.split(" (")[0] + " (" + f.rsplit("(", 1)[-1] for f in stack.split(";")[-2:]]
            leaves[" <- ".join(reversed(frames))] += count
    run = result["load"]
    return {
        "what": f"py-spy --gil on {len(workers)} workers for {sample_s} s during an N={connections} run",
        "samples": total,
        "requests": run.requests,
        "connections": connections,
        "exchanges_per_s": round(run.exchanges_per_s, 1),
        "server_cpu_us_per_request": round(run.server_cpu_us_per_request, 1),
        "share_by_stage": {k: round(v / total, 4) for k, v in stages.most_common()} if total else {},
        "top_leaves": [{"share": round(v / total, 4), "frames": k} for k, v in leaves.most_common(15)]
        if total
        else [],
    }
