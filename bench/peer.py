"""The peer: authgent-server (PyPI), an open Python OAuth server with RFC 8693 token exchange.

Installed into a throwaway venv under the bench's temp dir; nothing is added to ours. Its setup, as
read from its package (``authgent_server/endpoints/token.py``, ``services/token_service.py``,
``services/client_service.py``, ``middleware/rate_limit.py``):

- It is started with its own documented command, ``authgent-server run`` (uvicorn, one process), or
  with ``uvicorn --workers W`` for ``--peer-workers W``; SQLite via aiosqlite in the temp dir.
- Rate limit raised: ``AUTHGENT_TOKEN_RATE_LIMIT`` (per IP per minute on /token, /agents) to 10^9.
- Workloads are its "agents" (``POST /agents``, open registration), each with an OAuth client that may
  use client_credentials and token exchange, scopes ``search calc crm.read admin`` and
  ``allowed_exchange_targets`` = our three targets' URIs.
- Subject tokens are its own ES256 access tokens from ``client_credentials`` (it cannot verify
  JWT-SVIDs: it exchanges only tokens it issued, or external OIDC id_tokens), scope
  ``search calc crm.read``, a few per agent, reused for the whole run like our SVIDs.
- Client authentication on the exchange: ``client_id`` only, no secret. authgent then looks the client
  up (public-client path) and skips bcrypt; with ``client_secret`` every request would pay bcrypt cost 12
  (~0.2 s of CPU), which would measure bcrypt, not token exchange. Ours runs with no client
  authentication either (the JWT-SVID is the credential).
- Refused 10%, the closest of its checks to ours: expired subject token (minted in a first start with
  ``AUTHGENT_CLIENT_CREDENTIALS_TTL=2``, then the server restarts on the same DB and key), forged
  signature (stands in for our "wrong audience": authgent does not check the subject token's audience),
  audience outside the agent's ``allowed_exchange_targets`` (unknown target), and a scope beyond the
  subject token's (policy deny: ``scope_escalation``).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from bench import ours
from bench.ours import PoolRequest

PACKAGE = "authgent-server"
TARGETS = ("https://search.internal/", "https://calc.internal/", "https://crm.internal/")
SCOPES = {
    "https://search.internal/": "search",
    "https://calc.internal/": "calc",
    "https://crm.internal/": "crm.read",
}
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


@dataclass(frozen=True, slots=True)
class PeerSetup:
    venv: Path
    version: str
    directory: Path


def install(directory: Path, log: Callable[[str], None]) -> PeerSetup:
    """A fresh venv with authgent-server from PyPI (its ordinary client: pip)."""
    venv = directory / "peer-venv"
    log(f"installing {PACKAGE} into {venv} (throwaway venv)")
    env = ours.clean_env(isolated=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    done = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PACKAGE],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip install {PACKAGE} failed: {done.stderr.strip()[-2000:]}")
    version = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import importlib.metadata as m; print(m.version('authgent-server'))",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    return PeerSetup(venv, version, directory)


def _env(setup: PeerSetup, port: int, extra: dict[str, str]) -> dict[str, str]:
    return {
        "AUTHGENT_SECRET_KEY": "b" * 64,  # fixed so the second start reads the keys the first one made
        "AUTHGENT_DATABASE_URL": f"sqlite+aiosqlite:///{setup.directory}/authgent.db",
        "AUTHGENT_SERVER_URL": f"http://{ours.HOST}:{port}",
        "AUTHGENT_HOST": ours.HOST,
        "AUTHGENT_PORT": str(port),
        "AUTHGENT_TOKEN_RATE_LIMIT": "1000000000",
        "AUTHGENT_REGISTER_RATE_LIMIT": "1000000000",
        "AUTHGENT_REGISTRATION_POLICY": "open",
        "AUTHGENT_ACCESS_TOKEN_TTL": str(3 * 3600),
        **extra,
    }


def command(setup: PeerSetup, port: int, workers: int) -> list[str]:
    if workers <= 1:
        return [str(setup.venv / "bin/authgent-server"), "run", "--host", ours.HOST, "--port", str(port)]
    return [
        str(setup.venv / "bin/uvicorn"),
        "authgent_server.app:create_app",
        "--factory",
        "--host",
        ours.HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


@contextmanager
def running(
    setup: PeerSetup, port: int, *, workers: int = 1, extra: dict[str, str] | None = None
) -> Iterator[int]:
    """The peer until the block ends; yields the pid of its top process."""
    with ours.running(
        command(setup, port, workers),
        ready_url=f"http://{ours.HOST}:{port}/health",
        log=setup.directory / "peer.log",
        env=ours.clean_env(_env(setup, port, extra or {}), isolated=True),
        cwd=setup.directory,
    ) as process:
        yield process.pid


def _post(url: str, data: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read() or b"{}")


def _agent(url: str, name: str) -> tuple[str, str]:
    body = {
        "name": name,
        "allowed_scopes": ["search", "calc", "crm.read", "admin"],
        "allowed_exchange_targets": list(TARGETS),
    }
    status, answer = _post(f"{url}/agents", json.dumps(body).encode(), "application/json")
    if status != 201:
        raise RuntimeError(f"authgent POST /agents answered {status}: {answer}")
    return answer["client_id"], answer["client_secret"]


def _client_token(url: str, client_id: str, secret: str) -> str:
    form = {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_secret": secret,
        "scope": "search calc crm.read",
    }
    status, answer = _post(f"{url}/token", urlencode(form).encode(), "application/x-www-form-urlencoded")
    if status != 200:
        raise RuntimeError(f"authgent client_credentials answered {status}: {answer}")
    return str(answer["access_token"])


def _exchange_form(client_id: str, token: str, audience: str, scope: str) -> str:
    return urlencode(
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "client_id": client_id,
            "subject_token": token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "audience": audience,
            "scope": scope,
        }
    )


def prepare(setup: PeerSetup, port: int, log: Callable[[str], None]) -> list[PoolRequest]:
    """Agents and subject tokens (expired ones from a first start), then the same 90/10 pool shape as ours."""
    url = f"http://{ours.HOST}:{port}"
    log("peer: first start (client_credentials TTL 2 s) for agents and soon-expired subject tokens")
    with running(setup, port, extra={"AUTHGENT_CLIENT_CREDENTIALS_TTL": "2"}):
        agents = [_agent(url, f"bench-agent-{i}") for i in range(ours.WORKLOADS)]
        expired = _client_token(url, *agents[0])
    log("peer: second start (normal TTLs) for the subject tokens of the run")
    with running(setup, port):
        tokens = [
            (client_id, _client_token(url, client_id, secret))
            for client_id, secret in agents
            for _ in range(ours.SVIDS_PER_WORKLOAD)
        ]
    time.sleep(3)  # the first start's tokens are now past their exp (PyJWT: no leeway)
    rng = random.Random(7)
    client0, token0 = tokens[0]
    head, payload, signature = token0.split(".")
    forged = f"{head}.{payload}.{signature[:-4]}{'AAAA' if not signature.endswith('AAAA') else 'BBBB'}"
    refusals = [
        ("expired", _exchange_form(agents[0][0], expired, TARGETS[0], "search"), 400, '"invalid_grant"'),
        ("forged_signature", _exchange_form(client0, forged, TARGETS[1], "calc"), 400, '"invalid_grant"'),
        (
            "unknown_target",
            _exchange_form(client0, token0, "https://unknown.internal/", "search"),
            403,
            '"access_denied"',
        ),
        ("policy_deny", _exchange_form(client0, token0, TARGETS[2], "admin"), 403, '"scope_escalation"'),
    ]
    n_refused = round(ours.POOL_SIZE * ours.REFUSED_SHARE)
    pool: list[PoolRequest] = []
    for i in range(ours.POOL_SIZE - n_refused):
        target = TARGETS[i % len(TARGETS)]
        client_id, token = tokens[(i // len(TARGETS)) % len(tokens)]
        body = _exchange_form(client_id, token, target, SCOPES[target])
        pool.append(PoolRequest(f"v{i:05d}", "valid", 200, '"access_token"', body))
    for i in range(n_refused):
        why, body, status, needle = refusals[i % len(refusals)]
        pool.append(PoolRequest(f"r{i:05d}", f"refused:{why}", status, needle, body))
    rng.shuffle(pool)
    return pool


def setup_note(setup: PeerSetup, workers: int) -> str:
    how = "authgent-server run (uvicorn, 1 process)" if workers <= 1 else f"uvicorn --workers {workers}"
    return (
        f"{PACKAGE} {setup.version}, {how}, SQLite (aiosqlite), rate limit raised "
        "(AUTHGENT_TOKEN_RATE_LIMIT=1e9/min); subject tokens = its own ES256 client_credentials tokens; "
        "client authentication on the exchange: client_id only (public-client path, no secret, no bcrypt); "
        "refusals: expired, forged signature (no subject-audience check exists), audience outside "
        "allowed_exchange_targets, scope escalation"
    )
