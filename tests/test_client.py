"""``sts.client.TokenClient`` against a real ``sts dev`` over HTTP: cache, tasks, errors, retries, binding.

``running_dev`` and ``Dev`` (a development environment and its parties) live here; the verifier and
MCP tests start their own environment with them, one per module.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import requests
from cryptography import x509
from spiffe import WorkloadApiClient

from sts.binding import DpopKey, certificate_thumbprint
from sts.client import (
    HttpxTokenAuth,
    RequestsTokenAuth,
    TokenClient,
    error_from_response,
)
from sts.dev.services import LoopbackService, data_app, tool_app
from sts.dev.story import free_port_pair
from sts.errors import (
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    RateLimited,
    StsError,
    TemporarilyUnavailable,
)
from sts.verify import TokenVerifier

TOOL, DATA = "tool:web-search", "data:crm"


@dataclass
class RequestLog:
    """Counts the requests one ``requests.Session`` sent, by path."""

    paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        with self.lock:
            self.paths.append(requests.utils.urlparse(response.url).path)
        return response

    def count(self, path: str) -> int:
        with self.lock:
            return self.paths.count(path)

    def session(self) -> requests.Session:
        session = requests.Session()
        session.hooks["response"].append(self.hook)
        return session


@dataclass(frozen=True)
class Dev:
    """A running ``sts dev`` and ready-made parties of the demo registration."""

    process: subprocess.Popen[bytes]
    state_dir: Path
    description: dict[str, Any]

    @property
    def issuer(self) -> str:
        return str(self.description["issuer"])

    def socket(self, workload: str) -> str:
        return str(self.description["workloads"][workload]["socket"])

    def spiffe_id(self, workload: str) -> str:
        return str(self.description["workloads"][workload]["spiffe_id"])

    def client(self, workload: str = "agent", **settings: Any) -> TokenClient:
        return TokenClient(
            self.issuer,
            socket=self.socket(workload),
            mtls_token_endpoint=self.description["mtls_token_endpoint"],
            server_ca=self.description["server_ca"],
            **settings,
        )

    def verifier(self, audience: str, token_class: str, **settings: Any) -> TokenVerifier:
        workload = "tool" if audience == TOOL else "data"
        return TokenVerifier(
            issuer=self.issuer,
            audience=audience,
            token_class=token_class,
            socket=self.socket(workload),
            **settings,
        )

    def svid(self, workload: str) -> str:
        """A JWT-SVID of ``workload`` for the STS, straight from its Workload API socket."""
        with WorkloadApiClient(socket_path=self.socket(workload)) as api:
            return api.fetch_jwt_svid(audience={self.issuer}, timeout=5).token

    def new_task(self, ttl_seconds: int = 300) -> str:
        with self.client("orchestrator") as orchestrator:
            task = orchestrator.create_task(
                self.spiffe_id("agent"),
                {TOOL: ["invoke"], DATA: ["read"]},
                purpose="test",
                ttl_seconds=ttl_seconds,
            )
        return str(task["task_id"])


@contextmanager
def running_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    """``sts dev`` (Workload API sockets, STS on HTTP and mTLS) until the block ends."""
    state_dir = tmp_path_factory.mktemp("libdev")
    log = (state_dir / "dev.log").open("wb")
    port = free_port_pair()  # sts dev puts its TLS listener on port + 1
    process = subprocess.Popen(
        [sys.executable, "-m", "sts.cli", "dev", "--state-dir", str(state_dir), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (state_dir / "dev.json").exists():
            assert process.poll() is None, (state_dir / "dev.log").read_text()
            assert time.monotonic() < deadline, "sts dev did not write dev.json"
            time.sleep(0.1)
        yield Dev(process, state_dir, json.loads((state_dir / "dev.json").read_text()))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def sts_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    with running_dev(tmp_path_factory) as dev:
        yield dev


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]


# --- cache -----------------------------------------------------------------------------------------


def test_cache_hits_do_not_call_the_sts(sts_dev: Dev) -> None:
    calls = RequestLog()
    with sts_dev.client(session=calls.session()) as client:
        first = client.token(audience=TOOL, scope="invoke")
        assert client.token(audience=TOOL, scope="invoke") is first
        assert client.token(audience=TOOL, scope=["invoke"]) is first
        assert calls.count("/token") == 1
        # Another binding is another token: a bearer token must never be handed out as a bound one.
        key = DpopKey.generate()
        bound = client.token(audience=TOOL, scope="invoke", dpop=key)
        assert bound.value != first.value
        assert client.token(audience=TOOL, scope="invoke", dpop=key) is bound
        assert calls.count("/token") == 2


def test_one_exchange_in_flight_per_key(sts_dev: Dev) -> None:
    calls = RequestLog()
    with sts_dev.client(session=calls.session()) as client:
        start = threading.Barrier(8)
        values: list[str] = []

        def fetch() -> None:
            start.wait()
            values.append(client.token(audience=TOOL, scope="invoke").value)

        threads = [threading.Thread(target=fetch) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(values)) == 1 and len(values) == 8
        assert calls.count("/token") == 1


def test_token_is_not_handed_out_shortly_before_exp(sts_dev: Dev) -> None:
    now = [time.time()]
    calls = RequestLog()
    with sts_dev.client(session=calls.session(), clock=lambda: now[0], refresh_margin=10) as client:
        first = client.token(audience=TOOL, scope="invoke")
        now[0] = first.expires_at - 11
        assert client.token(audience=TOOL, scope="invoke") is first
        now[0] = first.expires_at - 9
        assert client.token(audience=TOOL, scope="invoke") is not first
        assert calls.count("/token") == 2


def test_cached_token_is_not_returned_after_its_task_ends(sts_dev: Dev) -> None:
    task_id = sts_dev.new_task()
    calls = RequestLog()
    with sts_dev.client(session=calls.session()) as agent:
        before = agent.token(audience=TOOL, scope="invoke", task_id=task_id)
        assert claims_of(before.value)["task_id"] == task_id
        agent.end_task(task_id)
        after = agent.token(audience=TOOL, scope="invoke", task_id=task_id)
        assert after.value != before.value
        assert calls.count("/token") == 2

        agent.complete_task(task_id)
        with pytest.raises(InvalidRequest, match="completed"):
            agent.token(audience=TOOL, scope="invoke", task_id=task_id)


def test_refusal_for_a_task_drops_all_its_cached_tokens(sts_dev: Dev) -> None:
    """The orchestrator ends the task behind the agent's back; the next exchange learns it."""
    task_id = sts_dev.new_task()
    with sts_dev.client() as agent, sts_dev.client("orchestrator") as orchestrator:
        agent.token(audience=TOOL, scope="invoke", task_id=task_id)
        orchestrator.complete_task(task_id)
        with pytest.raises(InvalidRequest):
            agent.token(audience=DATA, scope="read", task_id=task_id)
        with pytest.raises(InvalidRequest):  # not from the cache: the task's tool token was dropped
            agent.token(audience=TOOL, scope="invoke", task_id=task_id)


def test_a_known_task_deadline_ends_its_cached_tokens(sts_dev: Dev) -> None:
    """Noted from the task (GET /tasks/{id} as the assignee): past it, no cached token of the task."""
    now = [time.time()]
    calls = RequestLog()
    task_id = sts_dev.new_task(ttl_seconds=120)
    with sts_dev.client(session=calls.session(), clock=lambda: now[0]) as agent:
        first = agent.token(audience=TOOL, scope="invoke", task_id=task_id)
        task = agent.task(task_id)
        assert task["status"] == "active"
        assert agent.token(audience=TOOL, scope="invoke", task_id=task_id) is first
        now[0] = task["expires_at"] + 1  # the client's clock only: the STS still has the task active
        assert agent.token(audience=TOOL, scope="invoke", task_id=task_id) is not first  # exchanged anew
        assert calls.count("/token") == 2


def test_reading_an_ended_task_drops_its_tokens(sts_dev: Dev) -> None:
    task_id = sts_dev.new_task()
    calls = RequestLog()
    with sts_dev.client(session=calls.session()) as agent, sts_dev.client("orchestrator") as orchestrator:
        agent.token(audience=TOOL, scope="invoke", task_id=task_id)
        orchestrator.complete_task(task_id)
        assert agent.task(task_id)["status"] == "completed"
        with pytest.raises(InvalidRequest, match="completed"):
            agent.token(audience=TOOL, scope="invoke", task_id=task_id)
        assert calls.count("/token") == 2


def test_end_task_during_an_exchange_keeps_the_result_out_of_the_cache(sts_dev: Dev) -> None:
    task_id = sts_dev.new_task()
    calls = RequestLog()
    with sts_dev.client(session=calls.session()) as agent:
        original = agent._exchange

        def exchange_then_end(want: Any) -> Any:
            token = original(want)
            agent.end_task(task_id)  # as if another thread ended the task meanwhile
            return token

        agent._exchange = exchange_then_end  # type: ignore[method-assign]
        agent.token(audience=TOOL, scope="invoke", task_id=task_id)
        agent._exchange = original  # type: ignore[method-assign]
        agent.token(audience=TOOL, scope="invoke", task_id=task_id)
        assert calls.count("/token") == 2


# --- errors and retries ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("want", "error"),
    [
        ({"audience": "tool:nope", "scope": "invoke"}, InvalidTarget),
        ({"audience": TOOL, "scope": "delete"}, InvalidScope),
        ({"audience": TOOL, "scope": "invoke", "task_id": "task_unknown"}, InvalidRequest),
    ],
    ids=["unknown-target", "scope-not-offered", "unknown-task"],
)
def test_refusals_are_the_servers_error_classes(sts_dev: Dev, want: dict[str, Any], error: type) -> None:
    with sts_dev.client() as client, pytest.raises(error) as raised:
        client.token(**want)
    assert type(raised.value) is error
    assert raised.value.description


def test_error_mapping_covers_retry_after_and_unknown_codes() -> None:
    limited = error_from_response(429, {"error": "rate_limited"}, {"Retry-After": "7"})
    assert isinstance(limited, RateLimited) and limited.retry_after == 7
    assert type(error_from_response(500, {"error": "weird"}, {})) is StsError
    assert type(error_from_response(502, "not json", {})) is StsError


class ScriptedAdapter(requests.adapters.BaseAdapter):
    """Answers from a script of (status, headers, body); records when each request came."""

    def __init__(self, script: list[tuple[int, dict[str, str], dict[str, Any]]]) -> None:
        super().__init__()
        self.script = script
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent.append(request)
        status, headers, body = self.script.pop(0)
        response = requests.Response()
        response.status_code = status
        response.headers.update({"Content-Type": "application/json", **headers})
        response._content = json.dumps(body).encode()
        response.url = str(request.url)
        response.request = request
        return response

    def close(self) -> None:
        pass


class FixedSvids:
    def jwt_svid(self, audience: str) -> str:
        return "svid"

    def x509_svid(self) -> tuple[list[x509.Certificate], Any]:
        raise AssertionError("not used")

    def x509_authorities(self) -> list[x509.Certificate]:
        return []

    def close(self) -> None:
        pass


def scripted_client(
    script: list[tuple[int, dict[str, str], dict[str, Any]]], **settings: Any
) -> tuple[TokenClient, ScriptedAdapter, list[float]]:
    adapter = ScriptedAdapter(script)
    session = requests.Session()
    session.mount("http://", adapter)
    waits: list[float] = []
    client = TokenClient(
        "http://sts.test", svids=FixedSvids(), session=session, sleep=waits.append, **settings
    )
    return client, adapter, waits


ISSUED = (200, {}, {"access_token": "a.b.c", "token_type": "Bearer", "expires_in": 60, "scope": "invoke"})
BUSY = (503, {"Retry-After": "2"}, {"error": "temporarily_unavailable", "error_description": "store down"})
LIMITED = (429, {"Retry-After": "1"}, {"error": "rate_limited", "error_description": "slow down"})


def test_429_and_503_are_retried_no_sooner_than_retry_after() -> None:
    client, adapter, waits = scripted_client([LIMITED, BUSY, ISSUED])
    assert client.token(audience=TOOL, scope="invoke").value == "a.b.c"
    assert len(adapter.sent) == 3
    assert waits[0] >= 1 and waits[1] >= 2


def test_retries_are_bounded() -> None:
    client, adapter, waits = scripted_client([BUSY, BUSY, BUSY], max_attempts=3)
    with pytest.raises(TemporarilyUnavailable, match="store down"):
        client.token(audience=TOOL, scope="invoke")
    assert len(adapter.sent) == 3 and len(waits) == 2


def test_retry_after_beyond_the_bound_is_raised_at_once() -> None:
    spent = (429, {"Retry-After": "3600"}, {"error": "rate_limited", "error_description": "budget spent"})
    client, adapter, waits = scripted_client([spent], max_retry_wait=10)
    with pytest.raises(RateLimited) as raised:
        client.token(audience=TOOL, scope="invoke")
    assert raised.value.retry_after == 3600
    assert waits == [] and len(adapter.sent) == 1


def test_each_retry_carries_a_fresh_dpop_proof() -> None:
    bound = (200, {}, {"access_token": "a.b.c", "token_type": "DPoP", "expires_in": 60, "scope": "invoke"})
    client, adapter, _ = scripted_client([LIMITED, bound])
    client.token(audience=TOOL, scope="invoke", dpop=DpopKey.generate())
    proofs = [r.headers["DPoP"] for r in adapter.sent]
    assert len(set(proofs)) == 2


def test_short_lived_tokens_are_cached_for_half_their_lifetime() -> None:
    now = [1000.0]
    short = (200, {}, {"access_token": "a.b.c", "token_type": "Bearer", "expires_in": 4, "scope": "invoke"})
    client, adapter, _ = scripted_client([short, short], refresh_margin=10, clock=lambda: now[0])
    first = client.token(audience=TOOL, scope="invoke")
    now[0] += 1.9
    assert client.token(audience=TOOL, scope="invoke") is first
    now[0] += 0.2
    assert client.token(audience=TOOL, scope="invoke") is not first
    assert len(adapter.sent) == 2


def test_rate_limit_of_the_real_server_is_waited_out(sts_dev: Dev) -> None:
    """The partner workload (alone on its rate limit, 20 per second) asks faster than that."""
    waits: list[float] = []
    limited = threading.Event()

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        limited.set()
        time.sleep(seconds)

    errors: list[Exception] = []

    def hammer() -> None:
        with sts_dev.client("partner", sleep=sleep) as partner:
            for _ in range(100):  # until the server has said 429 once
                partner.clear()
                try:
                    partner.token(audience=TOOL, scope="invoke")  # raises if the retries did not succeed
                except StsError as e:
                    errors.append(e)
                if limited.is_set():
                    return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert waits and min(waits) >= 1  # Retry-After: 1 honoured


# --- binding ---------------------------------------------------------------------------------------


def test_dpop_binding(sts_dev: Dev) -> None:
    key = DpopKey.generate()
    with sts_dev.client() as client:
        token = client.token(audience=TOOL, scope="invoke", dpop=key)
    assert token.token_type == "DPoP"
    assert claims_of(token.value)["cnf"] == {"jkt": key.jkt}
    headers = token.headers("GET", "https://tool.test/search?q=1")
    assert headers["Authorization"] == f"DPoP {token.value}"
    proof = jwt.decode(headers["DPoP"], options={"verify_signature": False})
    assert proof["htu"] == "https://tool.test/search" and proof["htm"] == "GET" and proof["ath"]


def test_mtls_exchange_binds_to_the_workloads_svid(sts_dev: Dev) -> None:
    with sts_dev.client() as client:
        token = client.token(audience=TOOL, scope="invoke", mtls=True)
        cert_file, _ = client.client_certificate_files()
        leaf = x509.load_pem_x509_certificates(Path(cert_file).read_bytes())[0]
    claims = claims_of(token.value)
    assert claims["cnf"] == {"x5t#S256": certificate_thumbprint(leaf)}
    assert claims["client_id"] == sts_dev.spiffe_id("agent")


def test_the_svid_key_never_touches_the_disk(sts_dev: Dev) -> None:
    """Issue 13 item 4: the client's X.509-SVID and key live in memory files, gone on close; nothing
    of the client or the TLS listener appears in the temporary directory."""
    before = {p.name for p in Path(tempfile.gettempdir()).iterdir()}
    with sts_dev.client() as client:
        client.token(audience=TOOL, scope="invoke", mtls=True)
        cert_file, key_file = client.client_certificate_files()
        assert cert_file.startswith("/proc/self/fd/") and key_file.startswith("/proc/self/fd/")
        assert b"PRIVATE KEY" in Path(key_file).read_bytes()
    assert not Path(key_file).exists() or b"PRIVATE KEY" not in Path(key_file).read_bytes()
    created = {p.name for p in Path(tempfile.gettempdir()).iterdir()} - before
    assert not {name for name in created if name.startswith("sts-")}, created


def test_mtls_server_is_verified_with_the_workloads_trust_bundle(sts_dev: Dev) -> None:
    """Without ``server_ca`` the STS's certificate is checked against the Workload API's X.509 bundle."""
    with TokenClient(
        sts_dev.issuer,
        socket=sts_dev.socket("agent"),
        mtls_token_endpoint=sts_dev.description["mtls_token_endpoint"],
    ) as client:
        token = client.token(audience=TOOL, scope="invoke", mtls=True)
    assert "x5t#S256" in claims_of(token.value)["cnf"]


def test_mtls_follows_an_x509_ca_rotation(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issue 14 item 7: a long-lived client re-reads its trust bundle, so once the STS's TLS
    certificate comes from the new CA the client still verifies it (no stale CA file)."""
    now = [time.time()]
    session = requests.Session()
    with running_dev(tmp_path_factory) as dev, TokenClient(
        dev.issuer,
        socket=dev.socket("agent"),
        mtls_token_endpoint=dev.description["mtls_token_endpoint"],
        clock=lambda: now[0],
        session=session,
    ) as client:
        first = client.token(audience=TOOL, scope="invoke", mtls=True)
        old_ca = tmp_path_factory.mktemp("old-ca") / "ca.pem"
        old_ca.write_text(dev.description["server_ca"])
        health = dev.description["mtls_token_endpoint"].removesuffix("/token") + "/healthz"
        dev.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while True:  # until the TLS listener presents a certificate of the new CA only
            try:
                requests.get(health, verify=str(old_ca), timeout=2)
            except requests.exceptions.SSLError:
                break
            assert time.monotonic() < deadline, "the TLS listener kept the old CA's certificate"
            time.sleep(0.2)
        now[0] += 31  # past SERVER_CA_RECHECK_SECONDS
        client.invalidate(first.value)  # so the next token() goes to the STS again
        session.close()  # and over a new connection: a new TLS handshake with the new certificate
        token = client.token(audience=TOOL, scope="invoke", mtls=True)
    assert token.value != first.value
    assert "x5t#S256" in claims_of(token.value)["cnf"]


def test_client_assertion_authenticates_the_client(sts_dev: Dev) -> None:
    with sts_dev.client() as client:
        token = client.token(audience=TOOL, scope="invoke", client_assertion=True)
    assert claims_of(token.value)["client_id"] == sts_dev.spiffe_id("agent")


# --- adapters --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(sts_dev: Dev) -> Iterator[tuple[str, str]]:
    """The demo tool and data services, verifying as their own workloads (introspection uncached)."""
    tool = LoopbackService(tool_app(sts_dev.verifier(TOOL, "tool", introspection_cache_seconds=0)))
    data = LoopbackService(data_app(sts_dev.verifier(DATA, "data", introspection_cache_seconds=0)))
    with tool, data:
        yield f"{tool.url}/search", f"{data.url}/customers"


def test_requests_adapter_attaches_bearer_and_dpop_tokens(sts_dev: Dev, services: tuple[str, str]) -> None:
    tool_url, data_url = services
    task_id = sts_dev.new_task()
    with sts_dev.client() as agent:
        response = requests.get(
            tool_url, auth=RequestsTokenAuth(agent, audience=TOOL, scope="invoke"), timeout=10
        )
        assert response.status_code == 200, response.text
        # Confidential data needs a bound token and an authenticated client (the demo guardrail policy).
        auth = RequestsTokenAuth(
            agent,
            audience=DATA,
            scope="read",
            task_id=task_id,
            dpop=DpopKey.generate(),
            client_assertion=True,
        )
        for _ in range(2):  # the same token twice, each time with a fresh proof
            response = requests.get(data_url, auth=auth, timeout=10)
            assert response.status_code == 200, response.text
            assert response.json()["binding"] == "dpop"


def test_adapter_forgets_a_token_the_resource_server_calls_invalid(
    sts_dev: Dev, services: tuple[str, str]
) -> None:
    tool_url, _ = services
    calls = RequestLog()
    with sts_dev.client(session=calls.session()) as agent:
        auth = RequestsTokenAuth(agent, audience=TOOL, scope="invoke")
        assert requests.get(tool_url, auth=auth, timeout=10).status_code == 200
        token = agent.token(audience=TOOL, scope="invoke")
        requests.post(
            f"{sts_dev.issuer}/revoke",
            data={"token": token.value},
            headers={"Authorization": f"Bearer {sts_dev.svid('agent')}"},
            timeout=10,
        )
        refused = requests.get(tool_url, auth=auth, timeout=10)
        assert refused.status_code == 401
        assert requests.get(tool_url, auth=auth, timeout=10).status_code == 200  # a new token
        assert calls.count("/token") == 2


def test_httpx_adapter_sync_and_async(sts_dev: Dev, services: tuple[str, str]) -> None:
    tool_url, data_url = services
    task_id = sts_dev.new_task()
    with sts_dev.client() as agent:
        key = DpopKey.generate()
        data_auth = HttpxTokenAuth(
            agent, audience=DATA, scope="read", task_id=task_id, dpop=key, client_assertion=True
        )
        with httpx.Client(timeout=10) as http:
            response = http.get(tool_url, auth=HttpxTokenAuth(agent, audience=TOOL, scope="invoke"))
            assert response.status_code == 200, response.text
            assert http.get(data_url, auth=data_auth).status_code == 200

        async def read_twice() -> list[int]:
            async with httpx.AsyncClient(timeout=10) as http:
                return [(await http.get(data_url, auth=data_auth)).status_code for _ in range(2)]

        import anyio

        assert anyio.run(read_twice) == [200, 200]
