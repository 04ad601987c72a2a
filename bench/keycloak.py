"""The second peer: Keycloak (Maven Central), the server a security team would pick instead of ours.

What the bench runs, and why:

- Keycloak as pinned in ``bench/keycloak/pom.xml``, fetched by ``bench/keycloak/fetch.sh`` with Maven's
  ``dependency:copy`` into a cache outside the repository, and built once there with ``kc.sh build``
  (features ``spiffe``, ``client-auth-federated`` and ``token-exchange-standard:v2``, the embedded
  ``dev-file`` H2 database). It is started with ``kc.sh start --optimized``: what a production user
  runs (``start-dev`` re-augments at every start and runs with development settings). HTTP on
  loopback, ``--cache=local`` (one node: no JGroups cluster on the machine's network), its own default
  JVM heap settings.
- Configured through its admin REST API by the bench: a realm ``bench`` (``sslRequired: none``: plain
  HTTP on loopback, as ours), a SPIFFE identity provider for ``example.org`` reading the trust bundle
  from a SPIFFE bundle endpoint the bench serves on loopback (the same test authority ours trusts),
  and one confidential client per workload, authenticated by ``federated-jwt`` with the workload's
  SPIFFE ID as the expected subject and a service account. Keycloak refuses a client assertion
  issued more than 5 minutes before it is presented (a SPIRE agent renews JWT-SVIDs well within
  that), so the bench mints the pool's SVIDs, and the exchange's subject tokens, afresh before each
  phase (warm-up, client_credentials, token exchange).
- The like-for-like flow: ``client_credentials`` with
  ``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-spiffe`` and the JWT-SVID as
  ``client_assertion`` (audience: the realm's issuer). Keycloak verifies the SVID against the bundle
  and signs an access token: the same verify + sign work as our exchange. The pool has the same
  SVIDs-per-workload reuse as ours.
- Refused 10 %: an expired SVID, an SVID for another audience, a forged signature, and a SPIFFE ID
  with no client (the closest to our policy deny: nothing lets this workload in).
- Standard token exchange (V2) is measured separately: a workload's client exchanges a Keycloak access
  token it holds (its subject token, minted once before the run) for one for another client,
  authenticating with its JWT-SVID as above.

Keycloak does not echo ``X-Request-Id``, so wrk matches its answers by outcome (status and body), and
the bench checks the count of each outcome against the requests of that kind sent
(``load.run_wrk(by_outcome=True)``); every kind is also checked one by one before the load.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from bench import load, ours
from bench.ours import PoolRequest
from tests.authority import TestAuthority

FETCH = Path(__file__).resolve().parent / "keycloak" / "fetch.sh"
REALM = "bench"
IDP_ALIAS = "spiffe-example-org"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
ADMIN_USER = "bench-admin"
TARGET_CLIENT = "tool-web-search"  # the audience of the exchanged tokens (token exchange V2)
# Keycloak's JIT needs a while before its figures settle: at least this much load first, then until
# successive runs agree (bench/keycloak.py _warm_up).
WARM_UP_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class KeycloakSetup:
    home: Path
    version: str
    directory: Path
    port: int
    admin_password: str

    @property
    def url(self) -> str:
        return f"http://{ours.HOST}:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.url}/realms/{REALM}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/token"


def install(directory: Path, log: Callable[[str], None]) -> KeycloakSetup:
    """The cached Keycloak build (fetched and built on first use); a fresh data directory for this run."""
    log("keycloak: bench/keycloak/fetch.sh (Maven Central; cached by version outside the repository)")
    done = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench/keycloak/fetch.sh failed: {done.stderr.strip()[-2000:]}")
    home = Path(done.stdout.strip().splitlines()[-1])
    version = (home / "version.txt").read_text().split()[-1] if (home / "version.txt").exists() else home.name
    directory.mkdir(parents=True, exist_ok=True)
    return KeycloakSetup(home, version, directory, ours.free_port(), os.urandom(12).hex())


def command(setup: KeycloakSetup) -> list[str]:
    database = f"jdbc:h2:file:{setup.directory}/h2/keycloakdb;NON_KEYWORDS=VALUE"
    return [
        str(setup.home / "bin" / "kc.sh"),
        "start",
        "--optimized",
        "--http-enabled=true",
        f"--http-host={ours.HOST}",
        f"--http-port={setup.port}",
        "--hostname-strict=false",
        "--cache=local",
        f"--db-url={database}",
        "--log-level=WARN",
    ]


@contextmanager
def running(setup: KeycloakSetup) -> Iterator[int]:
    """Keycloak until the block ends; yields the pid of ``kc.sh`` (the JVM is its child).

    Started in its own process group, stopped with SIGTERM to the group (SIGKILL after 30 s): kc.sh
    does not exec the JVM, so signalling kc.sh alone would leave it running.
    """
    env = ours.clean_env(
        {
            "KC_BOOTSTRAP_ADMIN_USERNAME": ADMIN_USER,
            "KC_BOOTSTRAP_ADMIN_PASSWORD": setup.admin_password,
        },
        isolated=True,
    )
    with (setup.directory / "keycloak.log").open("ab") as out:
        process = subprocess.Popen(
            command(setup),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=setup.directory,
            start_new_session=True,
        )
        try:
            ours.wait_http(f"{setup.url}/realms/master", process, timeout=180)
            yield process.pid
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # The JVM may outlive kc.sh by a moment; the group is gone once it has no members.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def bundle_endpoint(authority: TestAuthority) -> Iterator[str]:
    """The test authority's SPIFFE bundle over HTTP on loopback (SPIFFE Trust Domain and Bundle §5)."""
    body = authority.spiffe_bundle()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((ours.HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{ours.HOST}:{server.server_address[1]}/bundle"
    finally:
        server.shutdown()
        server.server_close()


class Admin:
    """Keycloak's admin REST API, with a token from the bootstrap admin (master realm, admin-cli)."""

    def __init__(self, setup: KeycloakSetup) -> None:
        self.setup = setup
        form = {
            "grant_type": "password",
            "client_id": "admin-cli",
            "username": ADMIN_USER,
            "password": setup.admin_password,
        }
        status, body = _request(
            "POST",
            f"{setup.url}/realms/master/protocol/openid-connect/token",
            urlencode(form).encode(),
            "application/x-www-form-urlencoded",
        )
        if status != 200:
            raise RuntimeError(f"keycloak admin login answered {status}: {body[:300]!r}")
        self._token = str(json.loads(body)["access_token"])

    def call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        status, body = _request(
            method, f"{self.setup.url}/admin{path}", data, "application/json", bearer=self._token
        )
        if status >= 300:
            raise RuntimeError(f"keycloak admin {method} {path} answered {status}: {body[:500]!r}")
        return json.loads(body) if body else None


def _request(
    method: str, url: str, data: bytes | None, content_type: str, *, bearer: str | None = None
) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (loopback)
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def workload_id(index: int) -> str:
    return f"spiffe://example.org/agent/a{index}"


def configure(setup: KeycloakSetup, bundle_url: str) -> None:
    """Realm, SPIFFE identity provider, one client per workload, and the exchange's target client."""
    admin = Admin(setup)
    admin.call(
        "POST",
        "/realms",
        {
            "realm": REALM,
            "enabled": True,
            "sslRequired": "none",
            "accessTokenLifespan": 600,
            # Nothing in the flow needs events or brute-force detection; ours audits every answer, and
            # Keycloak's event store is off by default too.
        },
    )
    admin.call(
        "POST",
        f"/realms/{REALM}/identity-provider/instances",
        {
            "alias": IDP_ALIAS,
            "providerId": "spiffe",
            "enabled": True,
            "config": {"trustDomain": "spiffe://example.org", "bundleEndpoint": bundle_url},
        },
    )
    admin.call(
        "POST",
        f"/realms/{REALM}/clients",
        {
            "clientId": TARGET_CLIENT,
            "enabled": True,
            "publicClient": False,
            "bearerOnly": False,
            "standardFlowEnabled": False,
            "serviceAccountsEnabled": False,
        },
    )
    for index in range(ours.WORKLOADS):
        spiffe_id = workload_id(index)
        client = {
            "clientId": spiffe_id,
            "enabled": True,
            "publicClient": False,
            "clientAuthenticatorType": "federated-jwt",
            "serviceAccountsEnabled": True,
            "standardFlowEnabled": False,
            "directAccessGrantsEnabled": False,
            "attributes": {
                "jwt.credential.issuer": IDP_ALIAS,
                "jwt.credential.sub": spiffe_id,
                "standard.token.exchange.enabled": "true",
            },
            "protocolMappers": [
                {
                    # The exchange (V2) needs the requester in the subject token's audience, and the
                    # target client among the audiences the requester may ask for.
                    "name": "audience-self-and-target",
                    "protocol": "openid-connect",
                    "protocolMapper": "oidc-audience-mapper",
                    "config": {
                        "included.custom.audience": spiffe_id,
                        "access.token.claim": "true",
                        "id.token.claim": "false",
                    },
                },
                {
                    "name": "audience-target",
                    "protocol": "openid-connect",
                    "protocolMapper": "oidc-audience-mapper",
                    "config": {
                        "included.client.audience": TARGET_CLIENT,
                        "access.token.claim": "true",
                        "id.token.claim": "false",
                    },
                },
            ],
        }
        admin.call("POST", f"/realms/{REALM}/clients", client)


def _assertion_form(svid: str) -> str:
    return urlencode(
        {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": svid,
        }
    )


def _exchange_form(svid: str, subject_token: str) -> str:
    return urlencode(
        {
            "grant_type": TOKEN_EXCHANGE,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": svid,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "requested_token_type": ACCESS_TOKEN_TYPE,
            "audience": TARGET_CLIENT,
        }
    )


def _forged(token: str) -> str:
    head, payload, signature = token.split(".")
    tail = "AAAA" if not signature.endswith("AAAA") else "BBBB"
    return f"{head}.{payload}.{signature[:-4]}{tail}"


def _pool(valid: list[str], refusals: list[tuple[str, str, int, str]]) -> list[PoolRequest]:
    """Our pool's shape: 90 % valid over the given bodies in order, 10 % refused, shuffled alike."""
    rng = random.Random(7)
    n_refused = round(ours.POOL_SIZE * ours.REFUSED_SHARE)
    pool = [
        PoolRequest(f"v{i:05d}", "valid", 200, '"access_token"', valid[i % len(valid)])
        for i in range(ours.POOL_SIZE - n_refused)
    ]
    for i in range(n_refused):
        why, body, status, needle = refusals[i % len(refusals)]
        pool.append(PoolRequest(f"r{i:05d}", f"refused:{why}", status, needle, body))
    rng.shuffle(pool)
    return pool


def prepare(setup: KeycloakSetup, authority: TestAuthority) -> tuple[list[PoolRequest], list[PoolRequest]]:
    """The client_credentials pool and the token-exchange pool (Keycloak running and configured)."""
    now = time.time()
    svids = [
        authority.mint(workload_id(w), setup.issuer, ttl=ours.SVID_TTL_SECONDS, now=now - s)
        for w in range(ours.WORKLOADS)
        for s in range(ours.SVIDS_PER_WORKLOAD)
    ]
    expired = authority.mint(workload_id(0), setup.issuer, ttl=60, now=now - 7200)
    wrong_aud = authority.mint(workload_id(1), "https://elsewhere.example", ttl=ours.SVID_TTL_SECONDS)
    stranger = authority.mint("spiffe://example.org/quarantine/q1", setup.issuer, ttl=ours.SVID_TTL_SECONDS)
    refusals = [
        ("expired", _assertion_form(expired), 400, '"invalid_client"'),
        ("wrong_audience", _assertion_form(wrong_aud), 400, '"invalid_client"'),
        ("forged_signature", _assertion_form(_forged(svids[2])), 401, '"invalid_client"'),
        ("no_client", _assertion_form(stranger), 401, '"invalid_client"'),
    ]
    # Valid bodies in the order ours uses: SVID i//4 of the pool for request i (4 targets there).
    credentials = [_assertion_form(svids[(i // 4) % len(svids)]) for i in range(len(svids) * 4)]
    subject_tokens: dict[str, str] = {}
    for index, svid in enumerate(svids):
        owner = workload_id(index // ours.SVIDS_PER_WORKLOAD)
        if owner not in subject_tokens:
            status, body = ours.post_form(setup.token_url, _assertion_form(svid))
            if status != 200:
                raise RuntimeError(f"keycloak client_credentials answered {status}: {body[:300]}")
            subject_tokens[owner] = str(json.loads(body)["access_token"])
    exchanges = [
        _exchange_form(
            svids[(i // 4) % len(svids)],
            subject_tokens[workload_id(((i // 4) % len(svids)) // ours.SVIDS_PER_WORKLOAD)],
        )
        for i in range(len(svids) * 4)
    ]
    token0 = subject_tokens[workload_id(0)]
    exchange_refusals = [
        ("expired", _exchange_form(expired, token0), 400, '"invalid_client"'),
        ("forged_subject_token", _exchange_form(svids[0], _forged(token0)), 400, '"invalid_request"'),
        ("other_workloads_token", _exchange_form(svids[3], token0), 403, '"access_denied"'),
        ("no_client", _exchange_form(stranger, token0), 401, '"invalid_client"'),
    ]
    return _pool(credentials, refusals), _pool(exchanges, exchange_refusals)


def setup_note(setup: KeycloakSetup) -> str:
    return (
        f"Keycloak {setup.version}, kc.sh start --optimized (dev-file H2, --cache=local, default JVM "
        "heap), features spiffe + client-auth-federated + token-exchange-standard:v2; realm with a "
        "SPIFFE identity provider (bundle endpoint on loopback), one federated-jwt client per workload; "
        "flow: client_credentials with a JWT-SVID client assertion (jwt-spiffe); refusals: expired, "
        "wrong audience, forged signature, SPIFFE ID without a client"
    )


def _rss_mb(root: int) -> float:
    """Resident memory of kc.sh and the JVM below it, in MB."""
    return round(sum(ours.rss_mb(pid) or 0.0 for pid in ours.process_tree(root)), 1)


def _fresh_pools(
    setup: KeycloakSetup, authority: TestAuthority, directory: Path
) -> tuple[list[PoolRequest], list[PoolRequest], Path, Path]:
    """Both pools minted now, each kind of request checked once, and their request files."""
    cc_pool, exchange_pool = prepare(setup, authority)
    _check_each_kind(setup, cc_pool, "client_credentials")
    _check_each_kind(setup, exchange_pool, "token exchange")
    cc_file = load.write_requests(directory / "keycloak-cc.tsv", cc_pool)
    exchange_file = load.write_requests(directory / "keycloak-exchange.tsv", exchange_pool)
    return cc_pool, exchange_pool, cc_file, exchange_file


def _check_each_kind(setup: KeycloakSetup, pool: list[PoolRequest], flow: str) -> None:
    """One request of every kind, checked exactly (status and body) before the load."""
    seen: set[str] = set()
    for item in pool:
        if item.kind in seen:
            continue
        seen.add(item.kind)
        status, body = ours.post_form(setup.token_url, item.body)
        if status != item.status or item.needle not in body:
            raise RuntimeError(
                f"keycloak {flow} {item.kind}: expected {item.status}, got {status} {body[:200]}"
            )


def _warm_up(
    setup: KeycloakSetup,
    pid: int,
    cc_file: Path,
    cc_pool: list[PoolRequest],
    exchange_file: Path,
    exchange_pool: list[PoolRequest],
    at_least_s: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Both flows at N = 64 in 10 s runs until the JIT has settled: at least ``at_least_s`` seconds,
    then until two runs in a row of each flow agree within 10 % (at most 4 times ``at_least_s``: the
    pool's SVIDs must stay under Keycloak's 5-minute limit on a client assertion's age)."""
    series: dict[str, list[float]] = {"client_credentials": [], "token_exchange": []}
    started = time.monotonic()

    def settled(rates: list[float]) -> bool:
        return len(rates) >= 2 and abs(rates[-1] - rates[-2]) <= 0.10 * max(rates[-1], rates[-2])

    log(f"keycloak: warm-up (its JIT): at least {at_least_s:.0f} s at N=64, until runs agree within 10 %")
    while True:
        for rates, (file, pool) in zip(
            series.values(), ((cc_file, cc_pool), (exchange_file, exchange_pool)), strict=True
        ):
            run = load.run_wrk(
                setup.token_url, file, connections=64, seconds=10, server_pid=pid, by_outcome=pool
            )
            rates.append(round(run.exchanges_per_s, 1))
        elapsed = time.monotonic() - started
        log(
            f"  keycloak warm-up t={elapsed:4.0f} s: client_credentials "
            f"{series['client_credentials'][-1]:.0f}/s, token exchange {series['token_exchange'][-1]:.0f}/s"
        )
        done = elapsed >= at_least_s and all(settled(rates) for rates in series.values())
        if done or elapsed >= 4 * at_least_s:
            return {"seconds": round(elapsed), "settled": done, "exchanges_per_s_by_run": series}


def measure(
    directory: Path,
    authority: TestAuthority,
    *,
    connections: list[int],
    seconds: float,
    repeats: int,
    warm_up_s: float,
    ours_results: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Keycloak started, configured, warmed and loaded like ours; the figures and ours/Keycloak ratios."""
    setup = install(directory, log)
    cc_pool: list[PoolRequest]
    with bundle_endpoint(authority) as bundle_url:
        started = time.monotonic()
        log(f"keycloak: {setup.version}: kc.sh start --optimized on port {setup.port}")
        with running(setup) as pid:
            start_s = time.monotonic() - started
            configure(setup, bundle_url)
            cc_pool, exchange_pool, cc_file, exchange_file = _fresh_pools(setup, authority, directory)
            rss_idle = _rss_mb(pid)
            warm_up = _warm_up(setup, pid, cc_file, cc_pool, exchange_file, exchange_pool, warm_up_s, log)
            sweep = functools.partial(
                load.sweep, connections=connections, seconds=seconds, repeats=repeats, server_pid=pid, log=log
            )
            # Fresh SVIDs (and subject tokens) for each phase: Keycloak refuses a client assertion
            # issued more than 5 minutes ago, and a phase takes about two.
            cc_pool, exchange_pool, cc_file, exchange_file = _fresh_pools(setup, authority, directory)
            credentials = sweep(setup.token_url, cc_file, label="keycloak cc ", by_outcome=cc_pool)
            cc_pool, exchange_pool, cc_file, exchange_file = _fresh_pools(setup, authority, directory)
            exchange = sweep(setup.token_url, exchange_file, label="keycloak tx ", by_outcome=exchange_pool)
            rss_loaded = _rss_mb(pid)
    result: dict[str, Any] = {
        "name": "keycloak",
        "version": setup.version,
        "setup": setup_note(setup),
        "start_s": round(start_s, 1),
        "warm_up_s": warm_up["seconds"],
        "warm_up": warm_up,
        "rss_mb_idle": rss_idle,
        "rss_mb_after_load": rss_loaded,
        **load.figures_by_n(credentials),
        "token_exchange_v2": load.figures_by_n(exchange),
        "answers_matched": "by outcome (status and body), counts checked against requests sent per outcome",
    }
    ratios: dict[str, dict[str, float | None]] = {}
    for n, rate in result["exchanges_per_s"].items():
        if n not in ours_results["exchanges_per_s"]:
            continue
        mine_rate, mine_p99 = ours_results["exchanges_per_s"][n], ours_results["p99_ms"][n]
        theirs_p99 = result["p99_ms"][n]
        ratios[n] = {
            "exchanges_per_s": round(mine_rate / rate, 2) if rate else None,
            "p99": round(mine_p99 / theirs_p99, 3) if theirs_p99 else None,
            "exchanges_per_s_vs_token_exchange": round(
                mine_rate / result["token_exchange_v2"]["exchanges_per_s"][n], 2
            )
            if result["token_exchange_v2"]["exchanges_per_s"][n]
            else None,
        }
    result["ratio_ours_over_theirs"] = ratios
    return result
