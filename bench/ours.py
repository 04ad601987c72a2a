"""Our side of the bench: a config in a temp dir, a pool of pre-minted JWT-SVIDs, and ``sts serve``.

The server is started exactly as operators start it (``python -m sts.cli serve --config FILE``, the
same command as ``tests/conftest.py``), with its default worker settings for this machine unless a
variant asks otherwise (``server:`` section, used only by :mod:`bench.servers`). The SVIDs come from
``tests.authority.TestAuthority``: a real ES256 JWT-SVID issuer whose bundle the server trusts from a file.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from tests.authority import TestAuthority

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
SVID_TTL_SECONDS = 3 * 3600  # valid for the whole run, however long the peer takes
WORKLOADS = 8
SVIDS_PER_WORKLOAD = 3  # agents reuse one SVID for many exchanges; a few live at once per workload
POOL_SIZE = 2000  # lines in the request file; exactly 10% refused
REFUSED_SHARE = 0.10

POLICIES = """
// Agents of example.org may invoke tools.
@id("agents-invoke-tools")
@ttl("200")
permit(principal, action == Action::"tool:invoke", resource is Tool)
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" };

// Agents may read data; data tokens are shorter lived.
@id("agents-read-data")
@ttl("60")
permit(principal, action == Action::"data:read", resource is Dataset)
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" };

// Writing data needs a task and a confidential target at most.
@id("agents-write-data-in-tasks")
permit(principal, action == Action::"data:write", resource is Dataset)
when { principal.path like "/agent/*" && context has task && resource.sensitivity_rank <= 2 };

// Restricted data is never handed out by token exchange.
@id("no-restricted-data")
forbid(principal, action, resource is Dataset)
when { resource.sensitivity_rank >= 3 };

// Quarantined workloads get nothing.
@id("quarantine")
forbid(principal, action, resource)
when { principal.path like "/quarantine/*" };

// Break-glass exceptions open what they name (forbids still apply).
@id("break-glass")
@ttl("30")
permit(principal, action in [Action::"tool", Action::"data"], resource) when { context.break_glass };
"""

CATALOG = """
catalog:
  - {id: tool:web-search, class: tool, resource: "https://search.internal/", scopes: [invoke], max_ttl: 300s}
  - {id: tool:calc, class: tool, resource: "https://calc.internal/", scopes: [invoke], max_ttl: 300s}
  - {id: data:crm, class: data, sensitivity: confidential, scopes: [read, write], max_ttl: 120s}
  - {id: data:vault, class: data, sensitivity: restricted, scopes: [read], max_ttl: 120s}
"""


@dataclass(frozen=True, slots=True)
class PoolRequest:
    """One pre-made ``POST /token`` body and the answer that counts as correct for it."""

    request_id: str
    kind: str  # "valid" or "refused:<why>"
    status: int
    needle: str  # must appear in the response body
    body: str

    @property
    def valid(self) -> bool:
        return self.kind == "valid"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def write_config(
    directory: Path,
    port: int,
    authority: TestAuthority,
    server: str = "",
    name: str = "sts.yaml",
    state: str = "sts",
    issuer: str | None = None,
    store: str | None = None,
) -> Path:
    """Config with the embedded SQLite store, the catalog, the policies, and no throttling of the load.

    ``server`` (a YAML flow mapping such as ``{workers: 2, threads: 1}``) overrides the server's
    defaults for a variant; empty means the defaults ``sts serve`` picks for this machine, with
    ``server.reuse_port`` on (one listening socket per worker). ``state``
    names the database and audit files, so in-process measurements keep out of the server's.
    ``issuer`` (default: this server's URL) lets a variant on another port accept the same SVIDs;
    ``store`` (default: the embedded SQLite file) lets a variant measure what the store costs.
    """
    (directory / "policies").mkdir(parents=True, exist_ok=True)
    (directory / "policies" / "bench.cedar").write_text(POLICIES)
    authority.write_bundle(directory / "example.org.json")
    config = directory / name
    config.write_text(
        f"issuer: {issuer or f'http://{HOST}:{port}'}\n"
        f"listen: {{host: {HOST}, port: {port}}}\n"
        "trust_domains:\n"
        "  example.org: {bundle_file: example.org.json}\n"
        "keys: {dir: keys}\n"
        f"store: {{url: '{store or f'sqlite:///{directory}/{state}.db'}'}}\n"
        # The load's refused 10 % are anonymous and from one address: lift their budget too.
        "limits: {per_workload_per_second: 1000000000, tokens_per_task: 200,"
        " anonymous_refusals_per_minute: 1000000000}\n"
        f"{CATALOG}"
        "policy: {dir: policies}\n"
        f"audit: {{path: {state}-audit.jsonl}}\n"
        "log_level: INFO\n"
        # One socket per worker: the kernel spreads wrk's connections, which one shared socket may
        # leave all on one worker. A deployment turns it on where the server's user is its own.
        f"server: {server or '{reuse_port: true}'}\n"
    )
    return config


def _form(token: str, target: Mapping[str, str], scope: str) -> str:
    return urlencode(
        {
            "grant_type": GRANT,
            "subject_token_type": JWT_TYPE,
            "subject_token": token,
            **target,
            "scope": scope,
        }
    )


def make_pool(authority: TestAuthority, issuer: str, seed: int = 7) -> list[PoolRequest]:
    """90% valid exchanges over workloads, SVIDs and targets; 10% refused in four ways; shuffled."""
    rng = random.Random(seed)
    now = time.time()
    svids = [
        authority.mint(f"spiffe://example.org/agent/a{w}", issuer, ttl=SVID_TTL_SECONDS, now=now - s)
        for w in range(WORKLOADS)
        for s in range(SVIDS_PER_WORKLOAD)
    ]
    targets: list[tuple[dict[str, str], str]] = [
        ({"audience": "tool:web-search"}, "invoke"),
        ({"resource": "https://search.internal/"}, "invoke"),
        ({"audience": "tool:calc"}, "invoke"),
        ({"audience": "data:crm"}, "read"),
    ]
    expired = authority.mint("spiffe://example.org/agent/a0", issuer, ttl=60, now=now - 7200)
    wrong_aud = authority.mint(
        "spiffe://example.org/agent/a1", "https://elsewhere.example", ttl=SVID_TTL_SECONDS
    )
    quarantined = authority.mint("spiffe://example.org/quarantine/q1", issuer, ttl=SVID_TTL_SECONDS)
    refusals: list[tuple[str, str, str]] = [
        ("expired", _form(expired, {"audience": "tool:web-search"}, "invoke"), '"invalid_request"'),
        ("wrong_audience", _form(wrong_aud, {"audience": "tool:calc"}, "invoke"), '"invalid_request"'),
        (
            "unknown_target",
            _form(svids[0], {"audience": "tool:does-not-exist"}, "invoke"),
            '"invalid_target"',
        ),
        ("policy_deny", _form(svids[1], {"audience": "data:vault"}, "read"), '"invalid_target"'),
        ("policy_deny", _form(quarantined, {"audience": "tool:web-search"}, "invoke"), '"invalid_target"'),
    ]
    n_refused = round(POOL_SIZE * REFUSED_SHARE)
    pool: list[PoolRequest] = []
    for i in range(POOL_SIZE - n_refused):
        target, scope = targets[i % len(targets)]
        token = svids[(i // len(targets)) % len(svids)]
        pool.append(PoolRequest(f"v{i:05d}", "valid", 200, '"access_token"', _form(token, target, scope)))
    for i in range(n_refused):
        why, body, needle = refusals[i % len(refusals)]
        pool.append(PoolRequest(f"r{i:05d}", f"refused:{why}", 400, needle, body))
    rng.shuffle(pool)
    return pool


def check_pool(url: str, pool: list[PoolRequest]) -> tuple[list[str], int]:
    """Send one request of each kind; (answers that are not the expected one, requests sent)."""
    problems: list[str] = []
    seen: set[str] = set()
    for item in pool:
        key = item.kind + item.body[-40:] if not item.valid else item.kind
        if key in seen:
            continue
        seen.add(key)
        status, body = post_form(f"{url}/token", item.body)
        if status != item.status or item.needle not in body:
            problems.append(f"{item.kind}: got {status} {body[:200]}")
    return problems, len(seen)


def post_form(url: str, body: str) -> tuple[int, str]:
    request = urllib.request.Request(  # noqa: S310 (loopback URL we built)
        url, data=body.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until ``url`` answers 200 (or the process dies, or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready in {timeout:.0f} s")


def clean_env(extra: Mapping[str, str] | None = None, *, isolated: bool = False) -> dict[str, str]:
    """This environment plus ``extra``; ``isolated`` drops PYTHONPATH (the peer's venv must not see ours)."""
    env = {k: v for k, v in os.environ.items() if not (isolated and k == "PYTHONPATH")}
    return {**env, **(extra or {})}


@contextmanager
def running(
    command: list[str],
    *,
    ready_url: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process until the block ends; stopped with SIGTERM (then SIGKILL after 15 s).

    ``env`` is the whole environment (default: this one).
    """
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=dict(env) if env is not None else None, cwd=cwd
        )
        try:
            wait_http(ready_url, process)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def serve_command(config: Path) -> list[str]:
    """Exactly what ``sts serve --config FILE`` runs (the module form, as the tests use it)."""
    return [sys.executable, "-m", "sts.cli", "serve", "--config", str(config)]


# Process accounting from /proc: CPU and memory of a server and all its worker processes.

_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant alive now."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += children
        frontier = children
    return tree


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy so far (all cores, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (those that exited in between count zero)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))
    return total / _TICKS


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_rss_mb(root: int) -> list[float]:
    """RSS of each process below ``root`` that serves requests (the workers), in MB."""
    return [mb for pid in process_tree(root)[1:] if (mb := rss_mb(pid)) is not None]
